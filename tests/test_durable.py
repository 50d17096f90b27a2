"""Durable files (files.py, writers.ResultFile): one holder per lock, temp files that follow no planted
link, and a --resume that never truncates the only copy of the results (no model needed)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from soundtag import files, writers
from soundtag.errors import OutputError
from soundtag.files import FileLock, atomic_write_bytes
from soundtag.writers import ResultFile


# --- the lock ------------------------------------------------------------------------------------
def test_a_released_lock_has_one_next_holder(tmp_path, monkeypatch):
    """B opens the lock file while A holds it and gets its flock once A lets go; C comes after: only one of
    B and C may hold the lock (unlinking the file A held used to let both hold 'the' lock)."""
    path = tmp_path / "out.jsonl.lock"
    a = FileLock(path, "out.jsonl")
    real_flock = files.fcntl.flock
    calls = []

    def flock_after_a_lets_go(fd, op):  # B: between its open() and its flock(), A releases
        if not calls:
            a.release()
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", flock_after_a_lets_go)
    b = FileLock(path, "out.jsonl")
    monkeypatch.setattr(files.fcntl, "flock", real_flock)
    with pytest.raises(OutputError, match="in use by another soundtag run"):
        FileLock(path, "out.jsonl")  # C
    b.release()
    FileLock(path, "out.jsonl").release()  # free again once B is done


def test_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    path = tmp_path / "x.lock"
    first = FileLock(path, "x")
    with pytest.raises(OutputError) as err:
        FileLock(path, "x")
    assert str(err.value) == (f"x: in use by another soundtag run (pid {os.getpid()}); wait for it or choose "
                              "another --output")
    first.release()
    FileLock(path, "x").release()


# --- temp files ----------------------------------------------------------------------------------
def test_atomic_write_follows_no_link_planted_at_a_temp_name(tmp_path):
    """A link planted where the old code put its temp file (".NAME.PID.tmp") is not written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    dest = tmp_path / "report.json"
    (tmp_path / f".{dest.name}.{os.getpid()}.tmp").symlink_to(victim)
    atomic_write_bytes(dest, b"new")
    assert victim.read_text() == "precious"
    assert dest.read_bytes() == b"new" and not dest.is_symlink()


def test_temp_files_are_new_files_beside_the_target(tmp_path):
    dest = tmp_path / "a.bin"
    fd1, tmp1 = files.create_beside(dest)
    fd2, tmp2 = files.create_beside(dest)
    os.close(fd1), os.close(fd2)
    assert tmp1 != tmp2 and tmp1.parent == tmp2.parent == tmp_path
    assert tmp1.name.startswith(".a.bin.") and tmp1.stat().st_size == 0


def test_parquet_result_follows_no_link_planted_at_its_temp_name(tmp_path):
    pytest.importorskip("pyarrow")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "all.parquet"
    (tmp_path / f".{out.name}.{os.getpid()}.tmp").symlink_to(victim)
    rf = ResultFile(out)
    rf.write(_record("a.wav"))
    rf.close()
    assert victim.read_text() == "precious" and not out.is_symlink()
    assert _parquet_paths(out) == ["a.wav"]


# --- resume never truncates the only copy --------------------------------------------------------
def _record(path: str) -> dict:
    """A result record as to_record(scores=True) makes it (what every output kind can hold)."""
    tag = {"index": 0, "mid": "/m/09x0r", "label": "Speech", "score": 0.5}
    return {"path": path, "duration_s": 1.0, "tags": [tag], "events": [], "clip_scores": [0.5] * 527,
            "windows": [{"start_s": 0.0, "end_s": 1.0, "tags": [tag], "scores": [0.5] * 527}]}


def _parquet_paths(path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["path"])["path"].to_pylist()


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_disk_full_during_the_resume_rewrite_loses_nothing(tmp_path, monkeypatch, suffix):
    """A killed run left FILE.part (for Parquet the only copy of its results); the next --resume hits a full
    disk while it writes its new .part: every recorded input is still there for the run after it."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"all{suffix}"
    killed = ResultFile(out)
    for i in range(3):
        killed.write(_record(f"c{i}.wav"))
    killed.abandon()
    before = out.with_name(out.name + ".part").read_bytes()

    real_write = os.write
    written = []

    def disk_fills(fd, data):  # a few bytes go, then the disk is full
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(fd)
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(writers.os, "write", disk_fills)
    with pytest.raises(OutputError) as err:
        ResultFile(out, resume=True)
    assert str(err.value).startswith(f"{out}: ") and "No space left on device" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(writers.os, "write", real_write)

    assert out.with_name(out.name + ".part").read_bytes() == before  # untouched
    assert [p.name for p in tmp_path.iterdir()] == [out.name + ".part"]  # no temp file, no lock left
    again = ResultFile(out, resume=True)
    assert sorted(again.done) == ["c0.wav", "c1.wav"] if suffix == ".csv" else ["c0.wav", "c1.wav", "c2.wav"]
    again.write(_record("c9.wav"))
    again.close()
    if suffix == ".parquet":
        assert sorted(_parquet_paths(out)) == ["c0.wav", "c1.wav", "c2.wav", "c9.wav"]
    elif suffix == ".jsonl":
        assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == ["c0.wav", "c1.wav", "c2.wav",
                                                                                       "c9.wav"]


def test_resume_keeps_the_journal_when_the_rename_fails(tmp_path, monkeypatch):
    """The new journal goes in place by one rename; until then the old one is whole."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "all.parquet"
    killed = ResultFile(out)
    killed.write(_record("c0.wav"))
    killed.abandon()
    part = out.with_name(out.name + ".part")
    before = part.read_bytes()

    def no_rename(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writers.os, "replace", no_rename)
    with pytest.raises(OutputError, match="Input/output error"):
        ResultFile(out, resume=True)
    assert part.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [part.name]


def test_a_killed_runs_temp_files_go_with_the_next_run(tmp_path):
    out = tmp_path / "all.jsonl"
    part = out.with_name(out.name + ".part")
    stale = [tmp_path / f".{part.name}.{'ab' * 8}.tmp", tmp_path / f".{out.name}.{'0f' * 8}.tmp"]
    foreign = tmp_path / f".{out.name}.mine.tmp"
    for p in (*stale, foreign):
        p.write_bytes(b"half")
    rf = ResultFile(out, resume=True)
    rf.close()
    assert not any(p.exists() for p in stale) and foreign.read_bytes() == b"half"
