"""`soundtag eval`: AP/AUC against scikit-learn (ties, undefined classes), labels and predictions files,
and the CLI end to end on clips tagged with the int8 synthetic model."""

from __future__ import annotations

import ast
import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from soundtag import Tagger
from soundtag.cli import main
from soundtag.evaluate import average_precision, class_metrics, d_prime, read_labels, roc_auc, summarize
from soundtag.labels import NUM_CLASSES, labels, lookup
from tests.fixtures import ROOT, SR, scene, write_wav

RTOL = 1e-12  # metrics vs scikit-learn: the same sums, up to float summation order
SPEECH, DOG, MUSIC, CAT = (lookup(k) for k in ("/m/09x0r", "/m/0bt9lr", "/m/04rlf", "/m/01yrx"))
# The AudioSet-style set: three clips with audio, one without (missing); seconds, seed, positives.
CLIPS = {
    "aaaaaaaaaa1": (3.0, 1, (SPEECH, DOG)),
    "-bbbbbbbbb2": (4.0, 2, (DOG, MUSIC)),
    "ccccccccc_3": (12.0, 3, (MUSIC,)),  # two windows: the clip score is their max
}
NO_AUDIO = ("ddddddddddd", (CAT,))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def synthetic(seed: int, clips: int = 300, classes: int = 12, decimals: int | None = None):
    """Labels with a per-class prevalence and scores that lean towards them; rounded scores tie a lot."""
    rng = np.random.default_rng(seed)
    y = rng.random((clips, classes)) < rng.uniform(0.05, 0.6, classes)
    s = np.clip(0.35 * y + 0.65 * rng.random((clips, classes)), 0.0, 1.0)
    if decimals is not None:
        s = np.round(s, decimals)
    assert y.any(axis=0).all() and (~y).any(axis=0).all()
    return y, s


def sklearn_metrics(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP (classes with a positive) and AUC (with a positive and a negative), NaN elsewhere."""
    ap = np.full(y.shape[1], np.nan)
    auc = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        if y[:, c].any():
            ap[c] = average_precision_score(y[:, c], s[:, c])
        if y[:, c].any() and not y[:, c].all():
            auc[c] = roc_auc_score(y[:, c], s[:, c])
    return ap, auc


# --- metrics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_ap_and_auc_match_sklearn(decimals):
    y, s = synthetic(seed=7 + (decimals or 0), decimals=decimals)
    if decimals == 1:
        assert len(np.unique(s)) <= 11  # every score tied with many others
    for c in range(y.shape[1]):
        assert_allclose(average_precision(y[:, c], s[:, c]), average_precision_score(y[:, c], s[:, c]), rtol=RTOL)
        assert_allclose(roc_auc(y[:, c], s[:, c]), roc_auc_score(y[:, c], s[:, c]), rtol=RTOL)
    ap, auc = class_metrics(y, s)
    ref_ap, ref_auc = sklearn_metrics(y, s)
    assert_allclose(ap, ref_ap, rtol=RTOL)
    assert_allclose(auc, ref_auc, rtol=RTOL)


def test_float32_scores_and_all_tied_match_sklearn():
    y, s = synthetic(seed=3, clips=120)
    s32 = s.astype(np.float32)  # what the model gives
    ap, auc = class_metrics(y, s32)
    ref_ap, ref_auc = sklearn_metrics(y, s32)
    assert_allclose(ap, ref_ap, rtol=RTOL)
    assert_allclose(auc, ref_auc, rtol=RTOL)
    flat = np.full(y.shape[0], 0.5)  # one threshold: AP is the prevalence, AUC one half
    assert_allclose(average_precision(y[:, 0], flat), average_precision_score(y[:, 0], flat), rtol=RTOL)
    assert_allclose(roc_auc(y[:, 0], flat), 0.5, rtol=RTOL)


def test_classes_without_positives_or_negatives():
    y, s = synthetic(seed=11, clips=80, classes=6, decimals=1)
    y[:, 0] = False  # no positive: AP and AUC undefined
    y[:, 1] = True  # no negative: AUC undefined, AP = 1
    ap, auc = class_metrics(y, s)
    assert math.isnan(ap[0]) and math.isnan(auc[0])
    assert_allclose([ap[1], average_precision_score(y[:, 1], s[:, 1])], 1.0, rtol=RTOL)
    assert math.isnan(auc[1])
    with warnings.catch_warnings():  # scikit-learn has no AUC either: NaN and a warning (older: ValueError)
        warnings.simplefilter("ignore")
        try:
            assert math.isnan(roc_auc_score(y[:, 1], s[:, 1]))
        except ValueError:
            pass
    ref_ap, ref_auc = sklearn_metrics(y, s)
    assert_allclose(ap, ref_ap, rtol=RTOL)
    assert_allclose(auc, ref_auc, rtol=RTOL)
    m_ap, m_auc, dp = summarize(ap, auc)
    assert_allclose(m_ap, np.mean(ref_ap[1:]), rtol=RTOL)  # the all-positive class counts in mAP
    assert_allclose(m_auc, np.mean(ref_auc[2:]), rtol=RTOL)  # but not in the mean AUC
    assert_allclose(dp, math.sqrt(2) * norm.ppf(m_auc), rtol=RTOL)
    assert all(math.isnan(v) for v in summarize(np.full(3, np.nan), np.full(3, np.nan)))


def test_d_prime():
    for auc in (0.5, 0.75, 0.9, 0.968, 0.2):
        assert_allclose(d_prime(auc), math.sqrt(2) * norm.ppf(auc), rtol=RTOL)
    assert d_prime(0.5) == 0.0 and d_prime(1.0) == math.inf and math.isnan(d_prime(math.nan))


def test_package_imports_no_sklearn_and_stays_light():
    code = (
        "import sys, numpy as np; import soundtag.cli as cli; cli.build_parser();"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'pyarrow', 'pandas') or m == 'scipy.stats'];"
        "assert not heavy, heavy;"
        "from soundtag.evaluate import class_metrics; class_metrics(np.eye(4, 3, dtype=bool), np.random.rand(4, 3));"
        "assert not [m for m in sys.modules if m.startswith('sklearn')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_only_cli_imports_evaluate():
    importers = []
    for f in (ROOT / "src" / "soundtag").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.split(".")[-1] == "evaluate" for n in names):
                importers.append(f.name)
    assert set(importers) == {"cli.py"}


# --- labels files -------------------------------------------------------------------------------
def test_audioset_csv(tmp_path):
    labels_csv = tmp_path / "eval_segments.csv"
    labels_csv.write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=3, num_segs=3, num_unique_labels=4, num_positive_labels=5\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
        '-0RWZT-miFs, 420.000, 430.000, "/m/03v3yw,/m/0k4j"\n'
        '\n'
        '-0RWZT-miFs, 440.000, 450.000, "/m/01yrx"\n'  # the same video again: one clip, labels merged
    )
    got = read_labels(str(labels_csv))
    assert got.kind == "audioset"
    assert [c.name for c in got.clips] == ["--PJHxphWEs", "-0RWZT-miFs"]
    assert got.clips[0].positives == {SPEECH, lookup("Gush")}
    assert got.clips[1].positives == {lookup("Keys jangling"), lookup("Car"), CAT}
    header = tmp_path / "with_header.csv"  # an uncommented header row
    header.write_text('YTID,start_seconds,end_seconds,positive_labels\nabc,0,10,"/m/0bt9lr"\n')
    assert read_labels(str(header)).clips[0].positives == {DOG}


def test_paths_csv(tmp_path):
    labels_csv = tmp_path / "sets" / "labels.csv"
    labels_csv.parent.mkdir()
    labels_csv.write_text('path,labels\n"a.wav","Male speech, man speaking;dog"\n/abs/b.flac,/m/04rlf\nc.wav,\n')
    got = read_labels(str(labels_csv))
    assert got.kind == "paths"
    assert [(c.name, c.path, set(c.positives)) for c in got.clips] == [
        ("a.wav", str(labels_csv.parent / "a.wav"), {lookup("Male speech, man speaking"), DOG}),
        ("/abs/b.flac", "/abs/b.flac", {MUSIC}),
        ("c.wav", str(labels_csv.parent / "c.wav"), set()),
    ]
    assert read_labels(str(labels_csv), audio_dir="/audio").clips[0].path == "/audio/a.wav"


# --- predictions files (synthetic scores, no model) -----------------------------------------------
def synthetic_predictions(seed: int, clips: int = 24, classes=(SPEECH, DOG, MUSIC, CAT, 300, 400)):
    """Clip names, [clips, 527] float32 scores, and positives (classes labeled at random)."""
    rng = np.random.default_rng(seed)
    scores = rng.random((clips, NUM_CLASSES)).astype(np.float32)
    positives = [tuple(c for c in classes if rng.random() < 0.4) for _ in range(clips)]
    for row, pos in zip(scores, positives):
        row[list(pos)] = np.clip(row[list(pos)] + 0.3, 0, 1)
    return [f"yt{n:09d}" for n in range(clips)], scores, positives


def reference(scores: np.ndarray, positives) -> dict:
    y = np.zeros(scores.shape, dtype=bool)
    for row, pos in zip(y, positives):
        row[list(pos)] = True
    ap, auc = sklearn_metrics(y, scores)
    m_auc = float(np.nanmean(auc))
    return {"mAP": float(np.nanmean(ap)), "mean_auc": m_auc, "d_prime": math.sqrt(2) * norm.ppf(m_auc), "ap": ap,
            "auc": auc, "positives": y.sum(axis=0)}


def assert_report_matches(report: dict, ref: dict) -> None:
    assert_allclose([report["mAP"], report["mean_auc"], report["d_prime"]],
                    [ref["mAP"], ref["mean_auc"], ref["d_prime"]], rtol=RTOL)
    by_index = {c["index"]: c for c in report["classes"]}
    for c in range(NUM_CLASSES):
        row = by_index[c]
        assert row["positives"] == ref["positives"][c]
        for key in ("ap", "auc"):
            if math.isnan(ref[key][c]):
                assert row[key] is None
            else:
                assert_allclose(row[key], ref[key][c], rtol=RTOL)


def audioset_csv(path: Path, names, positives) -> Path:
    rows = [f'{name}, 0.000, 10.000, "{",".join(labels()[c].mid for c in pos)}"' for name, pos in zip(names, positives)]
    path.write_text("# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join(rows) + "\n")
    return path


def write_paths_csv(path: Path, clips) -> Path:
    """A path,labels CSV (display names, quoted where they hold a comma)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows([name, ";".join(labels()[c].name for c in pos)] for name, pos in clips)
    return path


def parquet_rows(paths, scores) -> list[dict]:
    """Rows in the schema of `soundtag tag --output x.parquet` / `soundtag corpus`."""
    table = labels()
    rows = []
    for path, s in zip(paths, scores):
        top = np.argsort(s)[::-1][:3]
        rows.append({
            "path": path, "duration_s": 10.0, "clip_scores": [float(v) for v in s],
            "tags": [{"index": int(i), "mid": table[i].mid, "label": table[i].name, "score": float(s[i])} for i in top],
            "windows": [{"start_s": 0.0, "end_s": 10.0, "scores": [float(v) for v in s]}],
            "events": [], "embedding": None, "error": None,
        })
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f32 = pa.list_(pa.float32())
    tag = pa.struct([("index", pa.int32()), ("mid", pa.string()), ("label", pa.string()), ("score", pa.float32())])
    window = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("scores", f32)])
    event = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("label", pa.string()),
                       ("mid", pa.string()), ("score", pa.float32())])
    schema = pa.schema([("path", pa.string()), ("duration_s", pa.float64()), ("clip_scores", f32),
                        ("tags", pa.list_(tag)), ("windows", pa.list_(window)), ("events", pa.list_(event)),
                        ("embedding", f32), ("error", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_parquet_predictions(tmp_path, capsys):
    names, scores, positives = synthetic_predictions(seed=5)
    # files named <YTID>_<start>.flac somewhere else; a failed row and a row without scores are missing
    rows = parquet_rows([f"/data/audioset/{n}_0.000.flac" for n in names[:-2]], scores[:-2])
    rows.append({"path": f"/data/audioset/{names[-2]}.wav", "error": "truncated: header declares 9 bytes"})
    rows.append({"path": f"/data/audioset/{names[-1]}.wav", "error": None})
    rows.append(parquet_rows(["/data/audioset/unlabeled.wav"], scores[:1])[0])
    pred = write_parquet(tmp_path / "preds.parquet", rows)
    labels_csv = audioset_csv(tmp_path / "segments.csv", names, positives)
    code, out, err = run(capsys, "eval", labels_csv, "--predictions", pred, "--format", "json",
                         "--output", tmp_path / "report.json")
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert_report_matches(report, reference(scores[:-2], positives[:-2]))
    assert report["clips"] == {"labeled": 24, "evaluated": 22, "missing": 2, "from_predictions": 22, "tagged": 0,
                               "unmatched_predictions": 1}
    assert report["missing"] == [
        {"clip": names[-2], "path": None, "reason": "prediction failed: truncated: header declares 9 bytes"},
        {"clip": names[-1], "path": None, "reason": "prediction failed: no clip scores"},
    ]
    assert "2 of 24 labeled clips missing" in err

    dataset = tmp_path / "dataset"  # a Parquet dataset folder (as soundtag corpus writes) gives the same
    dataset.mkdir()
    write_parquet(dataset / "part-0.parquet", rows[:10])
    write_parquet(dataset / "part-1.parquet", rows[10:])
    code, out2, err = run(capsys, "eval", labels_csv, "--predictions", dataset, "--format", "json")
    assert code == 0, err
    assert json.loads(out2) == {**report, "source": {**report["source"], "predictions": str(dataset)}}


def test_ytids_match_whole_names_not_prefixes(tmp_path, capsys):
    """Clip `a1` is not `a10.wav`: a file matches a YTID by its whole name, then as YTID.ext, then as
    YTID_<start>[_<end>].ext; a file named for one labeled clip never stands in for another."""
    names, scores, positives = synthetic_predictions(seed=11, clips=5)
    names = ["a1", "a10", "b2", "c3", "c3_0"]
    rows = parquet_rows(["/d/a10.wav", "/d/b2_30.000.flac", "/d/c3_5.wav", "/d/c3.wav", "/d/c3_0.wav"],
                        scores[[1, 2, 0, 3, 4]])
    pred = write_parquet(tmp_path / "preds.parquet", rows)
    labels_csv = audioset_csv(tmp_path / "segments.csv", names, positives)
    code, out, err = run(capsys, "eval", labels_csv, "--predictions", pred, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["missing"] == [{"clip": "a1", "path": None, "reason": f"no prediction in {pred}"}]
    assert report["clips"]["evaluated"] == 4 and report["clips"]["unmatched_predictions"] == 1  # c3_5.wav
    assert_report_matches(report, reference(scores[1:], positives[1:]))


def test_audio_dir_matches_whole_ytids(tmp_path):
    from soundtag.evaluate import find_audio

    for name in ("a10.wav", "b2_30.000_40.000.flac", "b22.wav", "c3.wav", "c3x.wav"):
        (tmp_path / name).write_bytes(b"")
    labels_csv = audioset_csv(tmp_path / "segments.csv", ["a1", "a10", "b2", "c3"], [(DOG,)] * 4)
    found, missing = find_audio(read_labels(str(labels_csv)), str(tmp_path), range(4))
    assert found == {1: str(tmp_path / "a10.wav"), 2: str(tmp_path / "b2_30.000_40.000.flac"),
                     3: str(tmp_path / "c3.wav")}
    assert missing == {0: f"no audio file {tmp_path / 'a1'}*"}


def test_jsonl_predictions_and_table(tmp_path, capsys):
    names, scores, positives = synthetic_predictions(seed=8, clips=30, classes=tuple(range(0, 520, 20)))
    table = labels()
    with open(tmp_path / "preds.jsonl", "w") as f:
        for name, s in zip(names, scores):
            tags = [{"index": int(i), "mid": table[i].mid, "label": table[i].name, "score": float(s[i])}
                    for i in np.argsort(s)[::-1]]
            f.write(json.dumps({"path": f"/elsewhere/{name}.wav", "duration_s": 10.0, "tags": tags}) + "\n")
    labels_csv = tmp_path / "labels.csv"  # matched by file name: neither the path nor the resolved path fits
    write_paths_csv(labels_csv, [(f"{n}.wav", pos) for n, pos in zip(names, positives)])
    code, out, err = run(capsys, "eval", labels_csv, "--predictions", tmp_path / "preds.jsonl",
                         "--output", tmp_path / "r.json")
    assert code == 0, err
    ref = reference(scores, positives)
    assert_report_matches(json.loads((tmp_path / "r.json").read_text()), ref)
    assert f"mAP {ref['mAP']:.4f}   mean AUC {ref['mean_auc']:.4f}   d-prime {ref['d_prime']:.3f}" in out
    assert "10 worst classes by AP:" in out and "10 best classes by AP:" in out
    worst = np.nanargmin(ref["ap"])
    first_worst = out.split("10 worst classes by AP:")[1].splitlines()[2]  # after the column heads
    assert first_worst.endswith(f"{table[worst].name}  [{table[worst].mid}]")


def test_json_array_with_clip_scores(tmp_path, capsys):
    """`soundtag tag --format json` (one array) of records that carry all 527 "clip_scores"."""
    names, scores, positives = synthetic_predictions(seed=9, clips=12)
    records = [{"path": f"{n}.wav", "duration_s": 10.0, "tags": [], "clip_scores": [float(v) for v in s]}
               for n, s in zip(names, scores)]
    (tmp_path / "preds.json").write_text(json.dumps(records, indent=2))
    labels_csv = write_paths_csv(tmp_path / "labels.csv", [(f"{n}.wav", pos) for n, pos in zip(names, positives)])
    code, out, err = run(capsys, "eval", labels_csv, "--predictions", tmp_path / "preds.json", "--format", "json")
    assert code == 0, err
    assert_report_matches(json.loads(out), reference(scores, positives))


# --- the CLI on tagged clips (int8 synthetic model) -----------------------------------------------
@pytest.fixture(scope="module")
def int8_model(models) -> Path:
    return models / "cnn14_audioset_int8.tflite"


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory, int8_model):
    """An AudioSet-style folder: <YTID>.wav for three clips; the clip scores soundtag.Tagger gives them."""
    d = tmp_path_factory.mktemp("audioset")
    wavs = {ytid: write_wav(d / f"{ytid}.wav", scene(sec, seed=seed), SR) for ytid, (sec, seed, _) in CLIPS.items()}
    (d / "notes.txt").write_text("not audio")
    labels_csv = audioset_csv(d / "segments.csv", [*CLIPS, NO_AUDIO[0]], [c[2] for c in CLIPS.values()] + [NO_AUDIO[1]])
    tagger = Tagger.from_model_path(int8_model)
    scores = np.stack([tagger.tag_file(p).clip_scores for p in wavs.values()])
    return d, labels_csv, wavs, scores


def tagged_reference(scores: np.ndarray) -> dict:
    ref = reference(scores, [c[2] for c in CLIPS.values()])
    assert np.isfinite(ref["ap"]).sum() == 3 and np.isfinite(ref["auc"]).sum() == 3  # Speech, Dog, Music
    return ref


def test_eval_tags_an_audio_dir(audio_set, int8_model, tmp_path, capsys):
    d, labels_csv, wavs, scores = audio_set
    out_file = tmp_path / "report.json"
    code, out, err = run(capsys, "eval", labels_csv, "--audio-dir", d, "--model", int8_model, "--format", "json",
                         "--output", out_file)
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads(out_file.read_text())
    assert {"mAP", "mean_auc", "d_prime", "clips", "classes", "missing"} <= set(report)
    ref = tagged_reference(scores)
    assert_report_matches(report, ref)
    assert report["clips"] == {"labeled": 4, "evaluated": 3, "missing": 1, "from_predictions": 0, "tagged": 3,
                               "unmatched_predictions": 0}
    assert report["classes_with_positives"] == 3 and report["classes_without_positives"] == NUM_CLASSES - 3
    assert report["missing"] == [{"clip": NO_AUDIO[0], "path": None, "reason": f"no audio file {d / NO_AUDIO[0]}*"}]
    classes = report["classes"]
    assert len(classes) == NUM_CLASSES and {c["index"] for c in classes} == set(range(NUM_CLASSES))
    assert [c["ap"] for c in classes[:3]] == sorted(c["ap"] for c in classes[:3])  # worst first
    assert all(c["ap"] is None and c["auc"] is None and c["positives"] == 0 for c in classes[3:])
    assert {c["index"]: c["positives"] for c in classes[:3]} == {SPEECH: 1, DOG: 2, MUSIC: 2}
    assert classes[0].keys() >= {"index", "mid", "label", "ap", "auc", "positives"}
    assert report["source"]["model"] == str(int8_model)
    assert err.strip().splitlines()[-1] == "soundtag: 1 of 4 labeled clips missing (reasons in the report)"


def tag_jsonl(capsys, model, paths) -> str:
    code, out, err = run(capsys, "tag", *paths, "--top-k", "527", "--format", "jsonl", "--model", model)
    assert code == 0, err
    return out


def test_eval_jsonl_predictions_match_tagging(audio_set, int8_model, tmp_path, capsys):
    d, _, wavs, scores = audio_set
    preds = tmp_path / "preds.jsonl"
    preds.write_text(tag_jsonl(capsys, int8_model, [p.resolve() for p in wavs.values()]))
    labels_csv = d / "labels.csv"  # paths relative to the CSV's folder: matched by resolved path
    write_paths_csv(labels_csv, [(f"{y}.wav", c[2]) for y, c in CLIPS.items()] + [(f"{NO_AUDIO[0]}.wav", NO_AUDIO[1])])
    code, out, err = run(capsys, "eval", labels_csv, "--predictions", preds, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert_report_matches(report, tagged_reference(scores))  # the same numbers as tagging the folder
    assert report["clips"]["from_predictions"] == 3 and report["clips"]["tagged"] == 0
    assert report["missing"] == [{"clip": f"{NO_AUDIO[0]}.wav", "path": str(d / f"{NO_AUDIO[0]}.wav"),
                                  "reason": f"no prediction in {preds}"}]


def test_eval_uses_predictions_first_then_tags(audio_set, int8_model, tmp_path, capsys):
    d, labels_csv, wavs, scores = audio_set
    lines = tag_jsonl(capsys, int8_model, list(wavs.values())[:2]).splitlines()
    preds = tmp_path / "two.jsonl"
    preds.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "eval", labels_csv, "--predictions", preds, "--audio-dir", d, "--model", int8_model,
                         "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert_report_matches(report, tagged_reference(scores))
    assert report["clips"]["from_predictions"] == 2 and report["clips"]["tagged"] == 1
    assert report["missing"][0]["reason"] == f"no prediction in {preds}; no audio file {d / NO_AUDIO[0]}*"


def test_eval_reports_clips_that_fail_to_tag(int8_model, tmp_path, capsys):
    (tmp_path / "good1234567.wav").write_bytes(b"")  # empty: fails
    write_wav(tmp_path / "fine1234567.wav", scene(2.0, seed=4), SR)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("good1234567, 0, 10, \"/m/09x0r\"\nfine1234567, 0, 10, \"/m/09x0r\"\n")
    code, out, err = run(capsys, "eval", labels_csv, "--audio-dir", tmp_path, "--model", int8_model, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["clips"]["evaluated"] == 1
    bad = str(tmp_path / "good1234567.wav")
    assert report["missing"][0]["clip"] == "good1234567" and report["missing"][0]["path"] == bad
    assert report["missing"][0]["reason"] and f"soundtag: {bad}: {report['missing'][0]['reason']}" in err


# --- errors -------------------------------------------------------------------------------------
def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soundtag: "), err
    return lines[0]


def test_unknown_class_is_a_usage_error(tmp_path, capsys):
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,labels\na.wav,Dgo\n")
    (tmp_path / "p.jsonl").write_text("")
    code, _, err = run(capsys, "eval", labels_csv, "--predictions", tmp_path / "p.jsonl")
    assert code == 2
    line = one_line(err)
    assert f"{labels_csv}: line 2: unknown AudioSet class 'Dgo'" in line and "did you mean" in line and "'Dog'" in line


def test_jsonl_without_every_score_is_refused(tmp_path, capsys):
    table = labels()
    tags = [{"index": i, "mid": table[i].mid, "label": table[i].name, "score": 0.5} for i in range(5)]
    preds = tmp_path / "top5.jsonl"
    preds.write_text(json.dumps({"path": "a.wav", "duration_s": 1.0, "tags": tags}) + "\n")
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,labels\na.wav,Dog\n")
    code, _, err = run(capsys, "eval", labels_csv, "--predictions", preds)
    assert code == 2
    line = one_line(err)
    assert str(preds) in line and "5 of 527 classes" in line and "--top-k 527" in line


@pytest.mark.parametrize("case", ["missing labels", "no source", "not labels", "missing predictions", "bad parquet"])
def test_usage_errors_are_one_line(tmp_path, capsys, case):
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,labels\na.wav,Dog\n")
    argv = {
        "missing labels": ["eval", tmp_path / "nope.csv", "--predictions", labels_csv],
        "no source": ["eval", labels_csv],
        "not labels": ["eval", tmp_path / "other.csv", "--predictions", labels_csv],
        "missing predictions": ["eval", labels_csv, "--predictions", tmp_path / "nope.parquet"],
        "bad parquet": ["eval", labels_csv, "--predictions", tmp_path / "bad.parquet"],
    }[case]
    (tmp_path / "other.csv").write_text("name,value\nx,1\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    line = one_line(err)
    if case == "missing labels":
        assert line == f"soundtag: {tmp_path / 'nope.csv'}: no such labels file"


def test_nothing_evaluated_exits_1(tmp_path, capsys):
    preds = tmp_path / "failed.jsonl"
    preds.write_text(json.dumps({"path": "a.wav", "error": "no audio stream"}) + "\n")
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,labels\na.wav,Dog\n")
    code, out, err = run(capsys, "eval", labels_csv, "--predictions", preds, "--format", "json")
    assert code == 1
    report = json.loads(out)
    assert report["mAP"] is None and report["clips"]["evaluated"] == 0
    assert report["missing"] == [{"clip": "a.wav", "path": str(tmp_path / "a.wav"),
                                  "reason": "prediction failed: no audio stream"}]
    assert err.strip().splitlines()[-1] == "soundtag: nothing evaluated: no clip"


def test_missing_model_exits_1(tmp_path, capsys):
    write_wav(tmp_path / "clip0000001.wav", scene(1.0), SR)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text('clip0000001, 0, 10, "/m/09x0r"\n')
    code, _, err = run(capsys, "eval", labels_csv, "--audio-dir", tmp_path, "--model", tmp_path / "none.tflite")
    assert code == 1
    assert "model file not found" in one_line(err)
