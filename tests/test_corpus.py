"""`soundtag corpus` on a real local Ray (2 CPUs, one cluster per test session): results equal
`soundtag tag`, error rows, resume after a killed run, path tables as input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from soundtag import Tagger, TaggerOptions
from soundtag.cli import main
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
    write_wav(archive / "broken.wav", scene(3, seed=1), SR)  # the error is fixed now
    try:
        code, _, err = run(capsys, "corpus", archive, "--output", out, "--model", int8)
        assert code == 2 and "add --resume" in err  # never mixed into an old run by accident
        code, _, err = run(capsys, "corpus", archive, "--output", out, "--model", int8, "--resume")
        assert code == 0, err
        df = _read(out)
        assert sorted(df.index) == sorted(str(p) for p in archive.rglob("*") if p.is_file())
        assert df["error"].isna().all()
        code, _, err = run(capsys, "corpus", archive, "--output", out, "--model", int8, "--resume")
        assert code == 0 and "0 tagged, 0 failed, 7 skipped" in err
    finally:
        (archive / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")


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
