"""Corpus scale, outputs: embeddings (vs the PyTorch model) and Parquet files read without soundtag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soundtag import ModelError, Tagger, TaggerOptions
from soundtag.cli import main
from tests.fixtures import SR, scene, write_wav
from tests.test_features import torchlibrosa_logmel


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("corpus")
    # float WAVs: the test reference starts from the very same samples (16-bit noise moves empty mel bins)
    return [write_wav(d / f"c{i}.wav", scene(6 + 4 * i, seed=40 + i), SR, subtype="FLOAT") for i in range(3)]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_conversion_report_embedding_outputs(models):
    report = json.loads((models / "conversion_report.json").read_text())
    m = report["models"]
    assert m["fp32"]["outputs"] == ["probabilities [1, 527]", "embedding [1, 2048]"]
    assert m["fp16"]["outputs"] == ["probabilities [1, 527]"]  # the model card's signature
    assert m["int8"]["outputs"] == ["probabilities [1, 527]", "embedding [1, 2048]"]
    assert m["fp32"]["embedding_parity_vs_pytorch"]["min_corr"] >= 0.99999
    assert m["int8"]["embedding_parity_vs_pytorch"]["passed"]


def test_embeddings_match_pytorch(fp32_model, body, clips):
    """Per-window embeddings vs upstream CNN14's `embedding` (fc1 + ReLU) on torchlibrosa's log-mel."""
    tagger = Tagger(TaggerOptions(model_path=str(fp32_model), embeddings=True, hop_s=5.0))
    res = tagger.tag_file(clips[2])  # 14 s: windows at 0 and 4 s
    x = scene(14, seed=42)
    starts = [round(s * SR) for s in res.window_starts_s]
    assert starts == [0, 4 * SR]
    for i, s in enumerate(starts):
        lm = torchlibrosa_logmel(x[s : s + 320_000].astype(np.float64), torch.float32)
        with torch.inference_mode():
            ref = body.embed(torch.from_numpy(lm[None, None])).numpy()[0]
        assert float(np.corrcoef(res.window_embeddings[i], ref)[0, 1]) >= 0.99999
        np.testing.assert_allclose(res.window_embeddings[i], ref, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(res.clip_embedding, res.window_embeddings.max(axis=0))
    mean = Tagger(TaggerOptions(embeddings=True, aggregate="mean"), model=tagger.model).tag_file(clips[2])
    np.testing.assert_allclose(mean.clip_embedding, mean.window_embeddings.mean(axis=0), rtol=1e-6)


def test_embeddings_cli_and_fp16_refusal(models, clips, capsys):
    code, out, err = run(capsys, "tag", clips[0], "--model", models / "cnn14_audioset_int8.tflite",
                         "--embeddings", "--format", "jsonl")
    rec = json.loads(out)
    assert code == 0 and len(rec["embedding"]) == 2048 and min(rec["embedding"]) >= 0  # after ReLU
    code, out, err = run(capsys, "tag", clips[0], "--model", models / "cnn14_audioset_int8.tflite", "--format", "jsonl")
    assert "embedding" not in json.loads(out)
    fp16 = models / "cnn14_audioset_fp16.tflite"
    code, out, err = run(capsys, "tag", clips[0], "--model", fp16, "--embeddings")
    assert code == 1 and f"{fp16}: has no embedding output" in err and err.count("\n") == 1
    with pytest.raises(ModelError, match="has no embedding output"):
        Tagger(TaggerOptions(model_path=str(fp16), embeddings=True))


def test_parquet_output_read_by_duckdb_and_pandas(models, clips, tmp_path, capsys):
    """One row per input with every score, readable without soundtag; resume and errors as for jsonl."""
    import duckdb
    import pandas as pd

    model = models / "cnn14_audioset_int8.tflite"
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    out = tmp_path / "all.parquet"
    code, _, err = run(capsys, "tag", clips[0], bad, clips[1], "--model", model, "--output", out, "--embeddings")
    assert code == 1, err
    assert not out.with_name("all.parquet.part").exists()
    df = pd.read_parquet(out)
    assert list(df.columns) == ["path", "duration_s", "clip_scores", "tags", "windows", "events", "embedding", "error", "segment_s"]
    assert list(df["path"]) == [str(clips[0]), str(bad), str(clips[1])]
    assert df["error"].isna().tolist() == [True, False, True] and "not an audio file" in df["error"][1]
    ref = Tagger(TaggerOptions(model_path=str(model), embeddings=True)).tag_file(clips[1])
    np.testing.assert_array_equal(np.array(df["clip_scores"][2], np.float32), ref.clip_scores)
    np.testing.assert_array_equal(np.array(df["embedding"][2], np.float32), ref.clip_embedding)
    assert [len(w["scores"]) for w in df["windows"][2]] == [527] * len(ref.windows)
    con = duckdb.connect()
    rows = con.execute(f"SELECT path, len(clip_scores), len(embedding), list_max(clip_scores) FROM '{out}' "
                       "WHERE error IS NULL ORDER BY path").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(str(clips[0]), 527, 2048), (str(clips[1]), 527, 2048)]
    assert rows[1][3] == pytest.approx(float(ref.clip_scores.max()), abs=1e-7)
    # resume: the error row is tried again (now fixed), the tagged rows are kept, each input once
    write_wav(bad, scene(3, seed=9), SR)
    code, _, err = run(capsys, "tag", clips[0], bad, clips[1], clips[2], "--model", model, "--output", out,
                       "--embeddings", "--resume")
    assert code == 0 and "2 skipped" in err
    df = pd.read_parquet(out)
    assert sorted(df["path"]) == sorted(map(str, [clips[0], bad, clips[1], clips[2]])) and df["error"].isna().all()


def test_parquet_killed_run_resumes(models, clips, tmp_path):
    """A run killed mid-way leaves a journal; --resume turns it into a complete Parquet file."""
    import pyarrow.parquet as pq

    model = models / "cnn14_audioset_int8.tflite"
    out = tmp_path / "k.parquet"
    files = [write_wav(tmp_path / f"k{i}.wav", scene(20, seed=i), SR) for i in range(8)]
    p = subprocess.Popen([sys.executable, "-m", "soundtag", "tag", *map(str, files), "--model", str(model),
                          "--output", str(out)], stderr=subprocess.PIPE)
    journal = out.with_name("k.parquet.part")
    import time

    end = time.time() + 120
    while time.time() < end and not (journal.exists() and journal.read_bytes().count(b"\n") >= 2):
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert not out.exists() and journal.exists()
    code = main(["tag", *map(str, files), "--model", str(model), "--output", str(out), "--resume"])
    assert code == 0
    table = pq.read_table(out)
    assert sorted(table["path"].to_pylist()) == sorted(map(str, files))


def test_parquet_resume_refuses_an_unreadable_file(models, clips, tmp_path, capsys):
    out = tmp_path / "x.parquet"
    out.write_bytes(b"PAR1 not really")
    code, _, err = run(capsys, "tag", clips[0], "--model", models / "cnn14_audioset_int8.tflite", "--output", out,
                       "--resume")
    assert code == 2 and f"{out}: cannot read it to resume" in err and err.count("\n") <= 2
    assert out.read_bytes() == b"PAR1 not really" and not out.with_name("x.parquet.lock").exists()
