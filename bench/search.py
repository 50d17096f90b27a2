"""`soundtag index` / `soundtag search` at scale: build time, query latency, recall@10 of the HNSW index
against brute force, file sizes and peak memory, for N windows of 2048-d vectors.

    python bench/search.py [--windows 100000] [--queries 50] [--threads 2]

The vectors are synthetic but shaped like CNN14 embeddings (fc1 + ReLU: non-negative, about half zeros,
clustered): ReLU(center + noise) around --clusters centers. A query is a stored vector plus fresh noise
(an example "like something in the collection"), so it has true neighbours, as a real query does; on
unstructured random vectors every point is nearly equidistant and no ANN index has a meaningful recall.

Measured through soundtag's own code: EmbeddingStore (Parquet parts: write, reopen), search.new_hnsw /
save_hnsw / search_hnsw (usearch) and search.search_exact (numpy brute force). Times are medians over the
queries, one query window each. Never fails on timing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.machine import cpu_line  # noqa: E402

DIM = 2048  # CNN14's embedding
CLUSTERS = 1000  # centres of the synthetic collection
NOISE = 0.5  # noise around a centre (centres are N(0, 1))
QUERY_NOISE = 0.3  # a query: a stored vector plus this much fresh noise
WINDOWS_PER_FILE = 100  # rows per synthetic file in the store
TOP = 10


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _vectors(rng, n: int, centres: np.ndarray) -> np.ndarray:
    out = np.empty((n, DIM), np.float32)
    step = 10_000
    for lo in range(0, n, step):
        k = min(step, n - lo)
        c = centres[rng.integers(0, len(centres), k)]
        out[lo : lo + k] = np.maximum(c + NOISE * rng.standard_normal((k, DIM), dtype=np.float32), 0)
    return out


def _median_ms(times: list[float]) -> float:
    return 1000 * float(np.median(times))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--connectivity", type=int, default=None, help="HNSW M (default: soundtag's)")
    ap.add_argument("--expansion-add", type=int, default=None, help="HNSW efConstruction (default: soundtag's)")
    ap.add_argument("--expansion-search", type=int, default=None, help="HNSW ef (default: soundtag's)")
    ap.add_argument("--no-store", action="store_true", help="skip the Parquet store (write and reopen)")
    args = ap.parse_args(argv)

    from soundtag import search
    from soundtag.embeddings import EmbeddingStore, FileEmbeddings

    opts = search.HnswOptions(connectivity=args.connectivity or search.CONNECTIVITY,
                              expansion_add=args.expansion_add or search.EXPANSION_ADD,
                              expansion_search=args.expansion_search or search.EXPANSION_SEARCH)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    t = time.perf_counter()
    data = _vectors(rng, args.windows, centres)
    gen_s = time.perf_counter() - t
    picks = rng.integers(0, args.windows, args.queries)
    queries = np.maximum(data[picks] + QUERY_NOISE * rng.standard_normal((args.queries, DIM), dtype=np.float32), 0)
    rows: list[tuple[str, str]] = []

    with tempfile.TemporaryDirectory(prefix="soundtag-bench-search-") as tmp:
        folder = Path(tmp) / "idx"
        store = None
        if not args.no_store:
            store = EmbeddingStore(folder, "bench", DIM, hop_s=10.0)
            t = time.perf_counter()
            for i, lo in enumerate(range(0, args.windows, WINDOWS_PER_FILE)):
                hi = min(lo + WINDOWS_PER_FILE, args.windows)
                starts = 10.0 * np.arange(hi - lo)
                store.add(FileEmbeddings(f"file{i:06d}.flac", f"{i:064x}", 10.0 * (hi - lo), starts, starts + 10.0,
                                         data[lo:hi]))
                if (i + 1) % 64 == 0:
                    store.flush()
            store.flush()
            write_s = time.perf_counter() - t
            parts_bytes = sum(p.stat().st_size for p in folder.glob("part-*.parquet"))
            t = time.perf_counter()
            store = EmbeddingStore.open(folder)
            assert store.rows == args.windows
            reopen_s = time.perf_counter() - t
            rows += [("Parquet store: write (64 files x 100 windows per part)", f"{write_s:.1f} s"),
                     ("Parquet store: reopen (read every part)", f"{reopen_s:.1f} s"),
                     ("Parquet store: size", f"{parts_bytes / 2**20:.0f} MiB")]
        else:
            folder.mkdir(parents=True)

        index = search.new_hnsw(DIM, opts)
        t = time.perf_counter()
        index.add(np.arange(args.windows, dtype=np.uint64), data, threads=args.threads)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        search.save_hnsw(index, folder, opts)
        save_s = time.perf_counter() - t
        hnsw_bytes = (folder / search.HNSW_FILE).stat().st_size
        t = time.perf_counter()
        index = search.load_hnsw(folder, DIM, opts.metric, args.windows)
        load_s = time.perf_counter() - t

        exact_t, approx_t, recalls = [], [], []
        search_exact = search.search_exact
        for q in queries:
            t = time.perf_counter()
            truth = search_exact(data, q[None], TOP, opts.metric)
            exact_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = search.search_hnsw(index, q[None], TOP, threads=1)
            approx_t.append(time.perf_counter() - t)
            recalls.append(len({r for r, _ in truth} & {r for r, _ in got}) / TOP)

        rows += [("HNSW build (index.add, all windows)", f"{build_s:.1f} s ({args.windows / build_s:,.0f} windows/s)"),
                 ("HNSW save / load", f"{save_s:.2f} s / {load_s:.2f} s"),
                 ("HNSW file size", f"{hnsw_bytes / 2**20:.0f} MiB"),
                 ("query, exact (numpy brute force), median", f"{_median_ms(exact_t):.1f} ms"),
                 ("query, approximate (HNSW, 1 thread), median", f"{_median_ms(approx_t):.2f} ms"),
                 (f"recall@{TOP} approximate vs exact (mean over {args.queries} queries)",
                  f"{np.mean(recalls):.3f} (min {np.min(recalls):.1f})"),
                 ("process peak RSS", f"{_rss_mib():,.0f} MiB (vectors alone: {data.nbytes / 2**20:,.0f} MiB)")]

    print(f"CPU: {cpu_line()}")
    print(f"{args.windows:,} windows x {DIM}-d float32 (ReLU(centre + noise), {CLUSTERS} centres; generated in "
          f"{gen_s:.1f} s), metric {opts.metric}, HNSW M={opts.connectivity} efConstruction={opts.expansion_add} "
          f"ef={max(opts.expansion_search, TOP)}, {args.threads} threads for the build")
    print()
    print("| measure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
