"""`soundtag corpus` on a real local Ray (2 CPUs, one cluster per test session): results equal
`soundtag tag`, error rows, resume after a killed run, path tables as input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from soundtag import Tagger, TaggerOptions, corpus
from soundtag.cli import main
from soundtag.files import FileLock
from tests.fixtures import SR, scene, write_wav

ray = pytest.importorskip("ray", reason="soundtag[ray] not installed")


@pytest.fixture(scope="session")
def local_ray():
    from soundtag.corpus import init_ray

    init_ray(num_cpus=2)  # on 127.0.0.1 only
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("archive")
    for i in range(5):
        write_wav(d / f"a{i}.wav", scene(4 + 3 * i, seed=60 + i, sr=44100, channels=2), 44100)
    (d / "sub").mkdir()
    write_wav(d / "sub" / "s.flac", scene(8, seed=70), SR)
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return d


@pytest.fixture(scope="module")
def int8(models) -> Path:
    return models / "cnn14_audioset_int8.tflite"


def _read(out: Path):
    import pandas as pd

    return pd.read_parquet(out).set_index("path")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_corpus_equals_tag(local_ray, archive, int8, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "corpus", archive, "--output", out, "--model", int8, "--actors", 2, "--embeddings")
    assert code == 1 and "6 tagged, 1 failed, 0 skipped" in err
    assert f"{archive / 'broken.wav'}: " in err
    df = _read(out)
    files = sorted(str(p) for p in archive.rglob("*") if p.is_file())
    assert sorted(df.index) == files  # every input exactly once
    assert df.loc[str(archive / "broken.wav"), "error"] and df.drop(str(archive / "broken.wav"))["error"].isna().all()
    tagger = Tagger(TaggerOptions(model_path=str(int8), embeddings=True))
    for path, result, error in tagger.tag_files([p for p in files if not p.endswith("broken.wav")]):
        np.testing.assert_allclose(np.array(df.loc[path, "clip_scores"], np.float32), result.clip_scores, atol=1e-6)
        np.testing.assert_allclose(np.array(df.loc[path, "embedding"], np.float32), result.clip_embedding, atol=1e-5)
        assert [w["start_s"] for w in df.loc[path, "windows"]] == [w.start_s for w in result.windows]
        assert [t["index"] for t in df.loc[path, "tags"]] == [c.index for c in result.clip]


def test_corpus_resume_after_a_killed_run(local_ray, archive, int8, tmp_path, capsys):
    """A killed run leaves some files, maybe one cut short, and error rows: --resume gives every input once."""
    out = tmp_path / "out"
    code, _, _ = run(capsys, "corpus", archive, "--output", out, "--model", int8, "--actors", 2)
    files = sorted(out.glob("*.parquet"))
    assert len(files) >= 2
    files[0].unlink()  # never written
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # cut by the kill
    cut = files[1].read_bytes()
    write_wav(archive / "broken.wav", scene(3, seed=1), SR)  # the error is fixed now
    try:
        code, _, err = run(capsys, "corpus", archive, "--output", out, "--model", int8)
        assert code == 2 and "add --resume" in err  # never mixed into an old run by accident
        code, _, err = run(capsys, "corpus", archive, "--output", out, "--model", int8, "--resume")
        assert code == 0, err
        df = _read(out)
        assert sorted(df.index) == sorted(str(p) for p in archive.rglob("*") if p.is_file())
        assert df["error"].isna().all()
        assert (out / "_unreadable" / files[1].name).read_bytes() == cut  # moved aside, never deleted
        code, _, err = run(capsys, "corpus", archive, "--output", out, "--model", int8, "--resume")
        assert code == 0 and "0 tagged, 0 failed, 7 skipped" in err
    finally:
        (archive / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")


@pytest.fixture(scope="module")
def tagged(local_ray, archive, int8, tmp_path_factory) -> Path:
    """A folder one corpus run wrote: two tagged inputs and an error row (copy it before changing it)."""
    out = tmp_path_factory.mktemp("tagged") / "out"
    code = main(["corpus", str(archive / "a0.wav"), str(archive / "a1.wav"), str(archive / "broken.wav"),
                 "--output", str(out), "--model", str(int8)])
    assert code == 1
    return out


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_corpus_folder_has_a_manifest(tagged, archive, int8):
    """The manifest names the model (sha256 of its file), the options and the run that wrote each file;
    readers of the folder see only the rows (names starting with _ are not data)."""
    import hashlib
    import json

    manifest = json.loads((tagged / "_soundtag_corpus.json").read_text())
    assert manifest["model_sha256"] == hashlib.sha256(int8.read_bytes()).hexdigest()
    assert manifest["options"]["hop_s"] == 10.0 and manifest["options"]["top_k"] == 5
    files = list(tagged.glob("*.parquet"))
    assert len(manifest["runs"]) == 1 and files and all(p.name.startswith(manifest["runs"][0] + "_") for p in files)
    assert sorted(_read(tagged).index) == sorted(str(archive / n) for n in ("a0.wav", "a1.wav", "broken.wav"))


@pytest.mark.parametrize("foreign", ["other-schema", "not-parquet", "soundtag-tag-output"])
def test_corpus_refuses_a_folder_it_did_not_write(archive, int8, tmp_path, capsys, foreign):
    """A folder of someone else's Parquet files (no manifest) is refused with one line; nothing is touched."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from soundtag.writers import parquet_schema

    out = tmp_path / "theirs"
    out.mkdir()
    if foreign == "other-schema":
        pq.write_table(pa.table({"id": [1, 2], "label": ["a", "b"]}), out / "data.parquet")
    elif foreign == "not-parquet":
        (out / "data.parquet").write_bytes(b"PAR1 something else, or still being written")
    else:  # the very schema corpus writes, from somewhere else
        pq.write_table(pa.Table.from_pylist([{"path": str(archive / "a0.wav"), "error": None}],
                                            schema=parquet_schema()), out / "data.parquet")
    before = _snapshot(out)
    code, _, err = run(capsys, "corpus", archive / "a0.wav", "--output", out, "--model", int8, "--resume")
    assert code == 2
    assert _one_line(err).startswith(f"soundtag: {out}: holds Parquet files that soundtag corpus did not write")
    assert _snapshot(out) == before


def test_corpus_refuses_a_foreign_file_among_its_own(tagged, archive, int8, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = shutil.copytree(tagged, tmp_path / "out")
    pq.write_table(pa.table({"path": ["x.wav"], "error": [None]}), out / "extra.parquet")
    before = _snapshot(out)
    code, _, err = run(capsys, "corpus", archive / "a0.wav", "--output", out, "--model", int8, "--resume")
    assert code == 2 and f"{out / 'extra.parquet'}: was not written by soundtag corpus" in _one_line(err)
    assert _snapshot(out) == before


def test_corpus_refuses_another_model_or_other_options(tagged, archive, models, int8, tmp_path, capsys):
    out = shutil.copytree(tagged, tmp_path / "out")
    before = _snapshot(out)
    code, _, err = run(capsys, "corpus", archive / "a2.wav", "--output", out, "--model",
                       models / "cnn14_audioset_fp32.tflite", "--resume")
    assert code == 2 and "was tagged with another model (cnn14_audioset_int8.tflite" in _one_line(err)
    code, _, err = run(capsys, "corpus", archive / "a2.wav", "--output", out, "--model", int8, "--resume",
                       "--hop", "5")
    assert code == 2 and "was tagged with other options: hop_s 10.0 (now 5.0)" in _one_line(err)
    assert _snapshot(out) == before


def test_corpus_folder_is_locked(local_ray, archive, int8, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    held = FileLock(out / "_soundtag_corpus.lock", "another run")
    try:
        code, _, err = run(capsys, "corpus", archive / "a0.wav", "--output", out, "--model", int8)
        assert code == 2 and f"{out}: in use by another soundtag run" in _one_line(err)
        assert not list(out.glob("*.parquet"))
    finally:
        held.release()


def test_corpus_resume_changes_nothing_when_a_file_cannot_be_read(tagged, archive, int8, tmp_path, capsys,
                                                                 monkeypatch):
    """A permission or I/O error is not a file cut by a kill: the run stops before it moves or rewrites
    anything (the error row stays until a resume can read every file)."""
    import builtins

    out = shutil.copytree(tagged, tmp_path / "out")
    victim = sorted(out.glob("*.parquet"))[-1]
    before = _snapshot(out)

    def no_permission(path, *args, **kwargs):
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(corpus, "open", no_permission, raising=False)
    code, _, err = run(capsys, "corpus", archive / "a0.wav", "--output", out, "--model", int8, "--resume")
    assert code == 2 and _one_line(err) == (f"soundtag: {victim}: cannot read it (Permission denied); fix that and "
                                            "rerun with --resume (nothing was changed)")
    assert _snapshot(out) == before


def test_corpus_resume_disk_full_while_dropping_error_rows(tagged, archive, int8, tmp_path, capsys, monkeypatch):
    """Error rows are dropped by writing the file anew beside itself: a full disk meanwhile leaves it whole."""
    import errno

    import pyarrow.parquet as pq

    out = shutil.copytree(tagged, tmp_path / "out")
    before = _snapshot(out)

    def disk_full(table, where, *args, **kwargs):
        where.write(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    code, _, err = run(capsys, "corpus", archive / "a0.wav", "--output", out, "--model", int8, "--resume")
    assert code == 2 and "cannot write it anew without its error rows (No space left on device)" in _one_line(err)
    assert _snapshot(out) == before  # no temp file left either


def test_corpus_inputs_from_path_tables(local_ray, archive, int8, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = [str(archive / "a0.wav"), str(archive / "a1.wav")]
    table = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": wanted[:1], "other": [1]}), table)
    listing = tmp_path / "paths.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([["id", "path"], [1, wanted[1]]])
    out = tmp_path / "out"
    code, _, err = run(capsys, "corpus", table, listing, "--output", out, "--model", int8)
    assert code == 0, err
    assert sorted(_read(out).index) == wanted
    bad = tmp_path / "nopath.csv"
    bad.write_text("file\nx.wav\n")
    code, _, err = run(capsys, "corpus", bad, "--output", tmp_path / "o2", "--model", int8)
    assert code == 2 and "no 'path' column" in err


def test_unreachable_cluster_is_one_line(archive, int8, tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "soundtag", "corpus", str(archive), "--output", str(tmp_path / "o"),
                        "--model", str(int8), "--address", "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "soundtag: cannot connect to Ray at 127.0.0.1:1" in p.stderr
