"""`soundtag index` / `soundtag search` end to end on real recordings (Debian's hydrogen drum kits and
ALSA's test sounds) with the synthetic fp32 CNN14: answers against a numpy cosine ranking of embeddings
made independently with Tagger.tag_file, approximate vs exact recall, incremental and killed runs,
clips against the source read with soundfile, and the errors of bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from numpy.testing import assert_allclose

from soundtag.cli import main
from soundtag.embeddings import EmbeddingStore
from soundtag.files import file_digest
from soundtag.search import HNSW_FILE
from tests.fixtures import ROOT

KIT = Path("/usr/share/hydrogen/data/drumkits/Audiophob")
ALSA = Path("/usr/share/sounds/alsa")
HOP = 10  # s: one window per short file
TOP = 10
SCORE_ATOL = 2e-5  # a cosine from the CLI (float32 HNSW/numpy, printed to 6 decimals) vs float64 numpy
SELF_ATOL = 2e-5  # a window's cosine with itself: 1 up to float32 rounding
CLIP_ATOL = 2.0 ** -23  # clips are 24-bit FLAC; the 16/24-bit sources fit exactly, up to one 24-bit step
KILL_WAIT_S = 120  # for the first part of a killed run

pytestmark = pytest.mark.skipif(not (KIT.is_dir() and ALSA.is_dir()),
                                reason="needs Debian's hydrogen-drumkits and alsa-utils sounds")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """The kit's WAVs, a 25.7 s FLAC of ALSA's sounds twice over (three windows), ALSA's sounds."""
    folder = tmp_path_factory.mktemp("corpus")
    alsa = sorted(str(p) for p in ALSA.glob("*.wav"))
    long = folder / "alsa_twice.flac"
    sf.write(long, np.concatenate([sf.read(p, dtype="int16")[0] for p in alsa * 2]), 48_000, subtype="PCM_16")
    return sorted(str(p) for p in KIT.glob("*.wav")) + [str(long)] + alsa


def long_file(corpus) -> str:
    return next(p for p in corpus if p.endswith("alsa_twice.flac"))


@pytest.fixture(scope="module")
def reference(corpus, fp32_model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per file (window starts, window embeddings) straight from the tagger: not from the store."""
    from soundtag import Tagger, TaggerOptions

    tagger = Tagger(TaggerOptions(model_path=str(fp32_model), embeddings=True, hop_s=HOP))
    out = {}
    for p in corpus:
        r = tagger.tag_file(p)
        out[p] = (np.asarray(r.window_starts_s, dtype=np.float64), np.asarray(r.window_embeddings, dtype=np.float64))
    return out


@pytest.fixture(scope="module")
def index(corpus, fp32_model, tmp_path_factory) -> Path:
    """An index of all but the last two corpus files."""
    out = tmp_path_factory.mktemp("index") / "idx"
    code = main(["index", *corpus[:-2], "--output", str(out), "--model", str(fp32_model), "--hop", str(HOP)])
    assert code == 0
    return out


def brute_force(reference, files, query: np.ndarray) -> list[tuple[str, float, float]]:
    """(path, start, score) of every window of ``files``, best first: cosine, best over query windows."""
    rows = [(p, s, e) for p in files for s, e in zip(*reference[p])]
    m = np.stack([e for _, _, e in rows])
    q = np.atleast_2d(query)
    cos = (q @ m.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(m, axis=1)[None, :]
    best = cos.max(axis=0)
    return sorted(((p, float(s), float(b)) for (p, s, _), b in zip(rows, best)), key=lambda r: -r[2])


def assert_same_answer(hits: list[dict], expected: list[tuple[str, float, float]], top: int = TOP) -> None:
    """The CLI's top hits are the reference's top (up to ties within SCORE_ATOL), with its scores."""
    assert [h["rank"] for h in hits] == list(range(1, min(top, len(expected)) + 1))
    score = {(p, round(s, 3)): b for p, s, b in expected}
    kth = expected[min(top, len(expected)) - 1][2]
    for h in hits:
        assert_allclose(h["score"], score[(h["path"], round(h["start_s"], 3))], atol=SCORE_ATOL)
        assert h["score"] >= kth - SCORE_ATOL
    assert all(a["score"] >= b["score"] - 1e-9 for a, b in zip(hits, hits[1:]))


def test_search_matches_numpy_cosine_and_recall(capsys, corpus, reference, index):
    files = corpus[:-2]
    long = long_file(corpus)
    for query in (files[0], files[5], ALSA / "Noise.wav", long):
        query = str(query)
        expected = brute_force(reference, files, reference[query][1])
        for flags in ((), ("--exact",)):
            code, out, err = run(capsys, "search", query, "--index", index, "--format", "jsonl", *flags)
            assert code == 0, err
            hits = jsonl(out)
            assert_same_answer(hits, expected)
            # each query window finds itself at cosine 1: the first hits are the query's own windows, in
            # any order (the long file's three tie at 1 up to float32 rounding)
            own = reference[query][0]
            assert {(h["path"], round(h["start_s"], 3)) for h in hits[:len(own)]} == {(query, round(s, 3)) for s in own}
            assert_allclose([h["score"] for h in hits[:len(own)]], 1.0, atol=SELF_ATOL)
    # --at: only the query window holding 12.5 s (the long file's second, 10-20 s)
    starts, emb = reference[long]
    code, out, err = run(capsys, "search", long, "--at", 12.5, "--index", index, "--format", "jsonl")
    assert code == 0, err
    hits = jsonl(out)
    assert_same_answer(hits, brute_force(reference, files, emb[1]))
    assert (hits[0]["path"], hits[0]["start_s"]) == (long, 10.0)
    # approximate (HNSW) vs exact recall@10 of every row: 1.0 on this small index
    store = EmbeddingStore.open(index)
    assert store.rows == sum(len(reference[p][0]) for p in files)
    for row in range(store.rows):
        answers = []
        for flags in ((), ("--exact",)):
            code, out, err = run(capsys, "search", "--row", row, "--index", index, "--format", "jsonl", *flags)
            assert code == 0, err
            answers.append({h["row"] for h in jsonl(out)})
        assert answers[0] == answers[1], f"row {row}: recall@10 {len(answers[0] & answers[1]) / TOP}"
    # table and csv carry the same hits
    code, table, _ = run(capsys, "search", "--row", 0, "--index", index, "--top", 3)
    code, csv_text, _ = run(capsys, "search", "--row", 0, "--index", index, "--top", 3, "--format", "csv")
    assert len(table.splitlines()) == 4 and csv_text.splitlines()[0] == "rank,path,start_s,end_s,score,row"
    assert [line.split(",")[1] for line in csv_text.splitlines()[1:]] == [line.split()[-1] for line in table.splitlines()[1:]]


def test_incremental_index_embeds_only_new_files(capsys, corpus, reference, index, fp32_model, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    before = EmbeddingStore.open(copy)
    parts = sorted(p.name for p in copy.glob("part-*.parquet"))
    code, out, err = run(capsys, "index", *corpus, "--output", copy, "--model", fp32_model, "--hop", HOP)
    assert code == 0, err
    assert f"{len(corpus)} files" in out and "(2 new files" in out
    after = EmbeddingStore.open(copy)
    new_windows = sum(len(reference[p][0]) for p in corpus[-2:])
    assert after.rows == before.rows + new_windows
    assert sorted(p.name for p in copy.glob("part-*.parquet")) == [*parts, f"part-{len(parts):05d}.parquet"]
    assert_allclose(after.matrix()[: before.rows], before.matrix())  # old rows untouched
    for p in corpus[-2:]:  # the new rows are the tagger's embeddings
        assert_allclose(after.get(file_digest(p, "sha256")).embeddings, reference[p][1], rtol=1e-6, atol=1e-6)
    # a third run embeds nothing
    code, out, err = run(capsys, "index", *corpus, "--output", copy, "--model", fp32_model, "--hop", HOP)
    assert code == 0 and "(0 new files, 0 new windows" in out
    for query in corpus[-2:]:
        code, out, err = run(capsys, "search", query, "--index", copy, "--format", "jsonl")
        assert code == 0, err
        hits = jsonl(out)
        assert_same_answer(hits, brute_force(reference, corpus, reference[query][1]))
        assert hits[0]["path"] == query


def test_killed_run_resumes(capsys, corpus, reference, fp32_model, tmp_path):
    from soundtag import Tagger, TaggerOptions

    files = corpus[:8]
    out = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "soundtag.cli", "index", *files, "--output", str(out), "--model",
                             str(fp32_model), "--hop", str(HOP), "--part-files", "1", "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_WAIT_S
    while not (out / "part-00000.parquet").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(EmbeddingStore.open(out))
    assert 1 <= kept
    code, stdout, err = run(capsys, "index", *files, "--output", out, "--model", fp32_model, "--hop", HOP)
    assert code == 0, err
    assert f"({len(files) - kept} new files" in stdout
    store = EmbeddingStore.open(out)
    assert [f.path for f in store.files()] == files
    for f in store.files():
        assert_allclose(f.embeddings, reference[f.path][1], rtol=1e-6, atol=1e-6)
    assert (out / HNSW_FILE).is_file() and not list(out.glob(".*.tmp"))
    for row in range(store.rows):
        code, stdout, err = run(capsys, "search", "--row", row, "--index", out, "--format", "jsonl", "--top", 1)
        assert jsonl(stdout)[0]["row"] == row
    # the API: a generator closed early keeps what it embedded
    tagger = Tagger(TaggerOptions(model_path=str(fp32_model), embeddings=True, hop_s=HOP))
    api = EmbeddingStore(tmp_path / "api", store.key, store.embedding_size)
    gen = api.embed(tagger, files, part_files=100)
    assert [next(gen)[0] for _ in range(2)] == files[:2]
    gen.close()
    assert len(EmbeddingStore(tmp_path / "api", store.key, store.embedding_size)) == 2


def test_clips_equal_the_source_segments(capsys, corpus, index, tmp_path):
    long = long_file(corpus)
    clips = tmp_path / "clips"
    code, out, err = run(capsys, "search", long, "--at", 15, "--index", index, "--top", 3, "--format", "jsonl",
                         "--clips", clips)
    assert code == 0, err
    hits = jsonl(out)
    names = sorted(os.listdir(clips))
    assert len(names) == 3 and names[0] == "01_alsa_twice_10.000.flac"
    for h, name in zip(hits, names):
        assert name.startswith(f"{h['rank']:02d}_")
        got, sr = sf.read(clips / name, dtype="float64", always_2d=True)
        info = sf.info(h["path"])
        assert sr == info.samplerate
        a, b = round(h["start_s"] * sr), min(round(h["end_s"] * sr), info.frames)
        want, _ = sf.read(h["path"], start=a, stop=b, dtype="float64", always_2d=True)
        assert got.shape == want.shape
        assert_allclose(got, want, atol=CLIP_ATOL, rtol=0)


def test_bad_inputs(capsys, corpus, index, fp32_model, tmp_path):
    def one_line(err: str, *names) -> None:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("soundtag: "), err
        for n in names:
            assert str(n) in lines[0]

    missing = tmp_path / "nope"
    code, _, err = run(capsys, "search", "--row", 0, "--index", missing)
    assert code == 1
    one_line(err, missing)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all" * 100)
    code, _, err = run(capsys, "search", broken, "--index", index)
    assert code == 1
    one_line(err, broken)
    code, _, err = run(capsys, "search", corpus[0], "--at", 99, "--index", index)
    assert code == 2
    one_line(err, corpus[0], "--at")
    code, _, err = run(capsys, "search", "--row", 10_000, "--index", index)
    assert code == 2
    one_line(err, index, "--row")
    code, _, err = run(capsys, "search", "--row", 0, "--top", 0, "--index", index)
    assert code == 2
    one_line(err, "--top")
    # index: an unreadable file is one line, the others are indexed
    out = tmp_path / "idx"
    code, stdout, err = run(capsys, "index", corpus[0], broken, corpus[1], "--output", out, "--model", fp32_model,
                            "--hop", HOP)
    assert code == 1
    one_line(err, broken)
    assert len(EmbeddingStore.open(out)) == 2 and "1 failed" in stdout
    # the same folder with another hop: refused before any work
    code, _, err = run(capsys, "index", corpus[0], "--output", out, "--model", fp32_model, "--hop", 5)
    assert code == 2
    one_line(err, out)
