"""The `soundtag` command line: formats, exit codes, model lookup, batches, resume, interrupts."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundtag.cli import main
from tests.fixtures import scene, write_wav


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("clips")
    paths = [write_wav(d / f"c{i}.wav", scene(4 + i, seed=i), 32000) for i in range(3)]
    (d / "sub").mkdir()
    paths.append(write_wav(d / "sub" / "s.flac", scene(3, sr=44100, seed=9, channels=2), 44100))
    return paths


def _errors(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if not line.startswith("soundtag: model ")]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_jsonl_top_k_and_order(fp32_model, clips, capsys):
    code, out, err = run(capsys, "tag", clips[0], "--model", fp32_model, "--top-k", 527, "--format", "jsonl")
    assert code == 0, err
    rec = json.loads(out)
    assert set(rec) == {"path", "duration_s", "tags", "windows", "events"}
    assert rec["path"] == str(clips[0]) and rec["duration_s"] == pytest.approx(4.0)
    assert len(rec["tags"]) == 527 and set(rec["tags"][0]) == {"index", "mid", "label", "score"}
    scores = [t["score"] for t in rec["tags"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(t["index"] for t in rec["tags"]) == list(range(527))


def test_failed_input_continues(fp32_model, clips, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    code, out, err = run(capsys, "tag", clips[0], bad, tmp_path / "missing.wav", clips[1], "--model", fp32_model, "--format", "jsonl")
    recs = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["path"] for r in recs] == [str(clips[0]), str(bad), str(tmp_path / "missing.wav"), str(clips[1])]
    assert "tags" in recs[0] and "tags" in recs[3]
    assert recs[1] == {"path": str(bad), "error": recs[1]["error"]} and "not an audio file" in recs[1]["error"]
    assert recs[2]["error"] == "no such file"
    assert f"{bad}: not an audio file" in err and len(_errors(err)) == 2


def test_all_bad_inputs_in_one_batch(fp32_model, clips, tmp_path, capsys):
    """Every kind of bad input gets its own line; the good file is still tagged; exit code 1."""
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    data = write_wav(tmp_path / "full.wav", scene(2), 32000).read_bytes()
    trunc = tmp_path / "trunc.wav"
    trunc.write_bytes(data[: len(data) // 2])
    zero = write_wav(tmp_path / "zero.wav", np.zeros(0, np.float32), 32000)
    x = scene(2)
    x[100] = np.nan
    nan = write_wav(tmp_path / "nan.wav", x, 32000, subtype="FLOAT")
    many = tmp_path / "many.wav"
    sf.write(str(many), np.zeros((10, 200), np.int16), 8000)
    noaudio = tmp_path / "noaudio"
    noaudio.mkdir()
    (noaudio / "readme.txt").write_text("hi")
    code, out, err = run(capsys, "tag", empty, trunc, zero, nan, many, noaudio, clips[0], "--model", fp32_model, "--format", "jsonl")
    recs = {r["path"]: r for r in map(json.loads, out.splitlines())}
    assert code == 1
    assert "tags" in recs[str(clips[0])]
    expect = {empty: "empty file", trunc: "truncated", zero: "no audio samples", nan: "non-finite",
              many: "unsupported channel count 200", noaudio: "no audio files"}
    for path, msg in expect.items():
        assert msg in recs[str(path)]["error"], recs[str(path)]
    assert len(_errors(err)) == len(expect)


def test_usage_errors_exit_2(fp32_model, clips, tmp_path, capsys):
    code, _, err = run(capsys, "tag", clips[0], "--model", fp32_model, "--allow", "Dogg")
    assert code == 2 and "did you mean 'Dog'" in err
    code, _, err = run(capsys, "tag", clips[0], "--model", fp32_model, "--deny", "Speeech")
    assert code == 2 and "unknown AudioSet class 'Speeech'" in err and "Speech" in err
    assert run(capsys, "tag", clips[0], "--model", fp32_model, "--top-k", 0)[0] == 2
    assert run(capsys, "tag", clips[0], "--model", fp32_model, "--threads", 0)[0] == 2
    assert run(capsys, "tag", clips[0], "--model", fp32_model, "--hop", -1)[0] == 2
    assert run(capsys, "tag", clips[0], "--model", fp32_model, "--jobs", 0)[0] == 2
    assert run(capsys, "tag", clips[0], "--model", fp32_model, "--format", "xml")[0] == 2
    assert run(capsys, "tag")[0] == 2
    assert run(capsys, "tag", clips[0], "--model", fp32_model, "--resume")[0] == 2
    assert run(capsys, "tag", clips[0], "--model", fp32_model, "--output", tmp_path / "x.json")[0] == 2
    assert run(capsys, "bogus")[0] == 2


def test_model_lookup(fp32_model, clips, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SOUNDTAG_MODEL", raising=False)
    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path / "cache"))
    code, out, err = run(capsys, "tag", clips[0])
    assert code == 1 and "soundtag fetch" in err and "SOUNDTAG_MODEL" in err and "--model" in err
    monkeypatch.setenv("SOUNDTAG_MODEL", str(fp32_model))
    assert run(capsys, "tag", clips[0], "--format", "jsonl")[0] == 0
    monkeypatch.delenv("SOUNDTAG_MODEL")
    (tmp_path / "cache" / "models").mkdir(parents=True)
    os.symlink(fp32_model, tmp_path / "cache" / "models" / "cnn14_audioset_fp32.tflite")
    assert run(capsys, "tag", clips[0], "--format", "jsonl")[0] == 0
    wrong = tmp_path / "wrong.tflite"
    wrong.write_bytes(b"garbage" * 100)
    code, out, err = run(capsys, "tag", clips[0], "--model", wrong)
    assert code == 1 and f"{wrong}: not a LiteRT model" in err


def test_labels(capsys):
    code, out, _ = run(capsys, "tag", "--labels")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 527 and lines[0] == "0\t/m/09x0r\tSpeech"


def test_formats_table_csv_json(fp32_model, clips, capsys):
    code, out, _ = run(capsys, "tag", clips[0], "--model", fp32_model, "--top-k", 3)
    assert code == 0 and out.startswith(str(clips[0])) and len(out.strip().splitlines()) == 4
    code, out, _ = run(capsys, "tag", clips[0], clips[1], "--model", fp32_model, "--top-k", 2, "--format", "csv")
    rows = list(csv.DictReader(out.splitlines()))
    assert code == 0 and len(rows) == 4 and rows[0]["rank"] == "1" and rows[2]["path"] == str(clips[1])
    code, out, _ = run(capsys, "tag", clips[0], clips[1], "--model", fp32_model, "--format", "json")
    assert code == 0 and [r["path"] for r in json.loads(out)] == [str(clips[0]), str(clips[1])]


def test_folder_and_list_inputs(fp32_model, clips, tmp_path, capsys):
    folder = clips[0].parent
    (folder / "notes.txt").write_text("skip me")
    code, out, _ = run(capsys, "tag", folder, "--model", fp32_model, "--format", "jsonl")
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert code == 0 and paths == sorted(paths) and len(paths) == 4 and paths[-1].endswith("s.flac")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{clips[1]}\n\n{clips[0]}\n")
    code, out, _ = run(capsys, "tag", f"@{listing}", "--model", fp32_model, "--format", "jsonl")
    assert code == 0 and [json.loads(line)["path"] for line in out.splitlines()] == [str(clips[1]), str(clips[0])]


def test_jobs_and_outputs(fp32_model, clips, tmp_path, capsys):
    out_jsonl = tmp_path / "all.jsonl"
    code, _, err = run(capsys, "tag", *clips, "--model", fp32_model, "--jobs", 2, "--output", out_jsonl, "--hop", 2)
    assert code == 0, err
    recs = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [r["path"] for r in recs] == [str(c) for c in clips]
    assert [len(r["windows"]) for r in recs] == [1, 1, 1, 1]
    raven = tmp_path / "events.txt"
    code, _, _ = run(capsys, "tag", clips[2], "--model", fp32_model, "--output", raven, "--threshold", 0.3)
    rows = raven.read_text().splitlines()
    assert code == 0 and rows[0].startswith("Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)")
    assert len(rows) > 1 and rows[1].split("\t")[0] == "1" and rows[1].split("\t")[7] == str(clips[2])


def test_plot(fp32_model, tmp_path, capsys):
    wav = write_wav(tmp_path / "long.wav", scene(35, seed=4), 32000)
    png = tmp_path / "t.png"
    code, _, err = run(capsys, "tag", wav, "--model", fp32_model, "--plot", png, "--hop", 5)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _spawn(args, env_model):
    env = dict(os.environ, SOUNDTAG_MODEL=str(env_model), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "soundtag.cli", "tag", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_lines(path: Path, n: int, timeout_s: float = 120) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        if path.is_file() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


@pytest.fixture(scope="module")
def many_clips(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("many")
    return [write_wav(d / f"m{i:02d}.wav", scene(2, seed=i), 32000) for i in range(8)]


def test_resume_after_kill(fp32_model, many_clips, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    proc = _spawn([*many_clips, "--output", out], fp32_model)
    _wait_lines(out.with_name(out.name + ".part"), 3)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait()
    assert not out.exists()
    code, _, err = run(capsys, "tag", *many_clips, "--model", fp32_model, "--output", out, "--resume")
    assert code == 0, err
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(paths) == sorted(map(str, many_clips)) and len(paths) == len(set(paths))
    assert "already in" in err
    code, _, _ = run(capsys, "tag", *many_clips, "--model", fp32_model, "--output", out, "--resume")
    assert code == 0 and len(out.read_text().splitlines()) == len(many_clips)


def test_ctrl_c_leaves_valid_output(fp32_model, many_clips, tmp_path):
    out = tmp_path / "c.csv"
    proc = _spawn([*many_clips, "--output", out], fp32_model)
    _wait_lines(out.with_name(out.name + ".part"), 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert rows and all(r["path"] in map(str, many_clips) for r in rows)
    assert "rerun with --resume" in err


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_cli_says_model_precision(models, clips, capsys, precision):
    model = models / f"cnn14_audioset_{precision}.tflite"
    code, out, err = run(capsys, "tag", clips[0], "--model", model, "--format", "jsonl")
    assert code == 0 and f"model {model} ({precision})" in err
    assert json.loads(out)["tags"]


def test_version(capsys):
    """`soundtag --version` prints the version pyproject.toml declares, exit 0."""
    import tomllib

    want = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"soundtag {want}"
