"""`soundtag` command line: builds options, calls the public API, prints results.

Exit codes: 0 all inputs ok, 1 some inputs failed, 2 usage error, 130 interrupted.
Results go to stdout (or --output FILE); errors and progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    pass


def _err(msg: str) -> None:
    print(f"soundtag: {msg}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from .tagger import AGGREGATES, WINDOW_S
    from .writers import FORMATS

    p = argparse.ArgumentParser(prog="soundtag", description="AudioSet sound-event tagging with PANNs CNN14 on LiteRT.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tag", help="tag audio files, folders or @lists of paths")
    t.add_argument("paths", nargs="*", metavar="PATH", help="audio file, folder (recursive) or @list.txt")
    t.add_argument("--model", help="CNN14 .tflite (default: $SOUNDTAG_MODEL, then the cache from 'soundtag fetch')")
    t.add_argument("--top-k", type=int, default=5, help="tags per clip and per window (1-527, default 5)")
    t.add_argument("--format", choices=FORMATS, default="table", help="stdout format (default table)")
    t.add_argument("--threshold", type=float, help="report only scores >= this; also the event threshold (default 0.5)")
    t.add_argument("--thresholds", metavar="FILE", help="per-class thresholds: JSON {name: t} or lines 'name,t'")
    t.add_argument("--allow", nargs="+", action="extend", metavar="CLASS", help="report only these classes (names or MIDs)")
    t.add_argument("--deny", nargs="+", action="extend", metavar="CLASS", help="never report these classes")
    t.add_argument("--hop", type=float, default=WINDOW_S, metavar="SECONDS", help="seconds between 10 s windows (default 10)")
    t.add_argument("--aggregate", choices=AGGREGATES, default="max", help="clip score from windows (default max)")
    t.add_argument("--jobs", type=int, default=1, help="worker processes, each loading the model once (default 1)")
    t.add_argument("--threads", type=int, help="LiteRT threads per process (default: one per core, up to 4)")
    t.add_argument("--output", metavar="FILE", help="write one combined file: .jsonl, .csv or Raven selection table .txt")
    t.add_argument("--resume", action="store_true", help="with --output: skip inputs already in FILE")
    t.add_argument("--plot", metavar="PNG", help="draw the timeline of the top classes (one input only)")
    t.add_argument("--labels", action="store_true", help="print the 527 classes (index, MID, name) and exit")

    c = sub.add_parser("convert", help="convert an upstream CNN14 checkpoint to validated LiteRT models")
    c.add_argument("checkpoint", help="Cnn14_mAP=0.431.pth or a file in the same format")
    c.add_argument("--output-dir", required=True, help="where models, mel basis, labels and report go")
    c.add_argument("--precision", nargs="+", action="extend", help="fp32 fp16 int8 (default: fp32 fp16)")
    c.add_argument("--no-winograd", action="store_true",
                   help="fp32 with direct convolutions (smaller file, slower on CPU; fp16/int8 always direct)")

    f = sub.add_parser("fetch", help="download the upstream checkpoint, verify it, convert it into the cache")
    f.add_argument("--url", help="download from this URL instead of Zenodo (a mirror)")
    f.add_argument("--md5", help="expected md5 (default: the upstream checkpoint's)")
    f.add_argument("--bytes", type=int, help="expected size in bytes (default: the upstream checkpoint's)")
    f.add_argument("--precision", nargs="+", action="extend", help="fp32 fp16 int8 (default: fp32 fp16)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (or --help)
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"tag": _cmd_tag, "convert": _cmd_convert, "fetch": _cmd_fetch}[args.command](args)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE


def _cmd_tag(args) -> int:
    from .labels import labels

    if args.labels:
        for lab in labels():
            print(f"{lab.index}\t{lab.mid}\t{lab.name}")
        return EXIT_OK
    if not args.paths:
        raise UsageError("tag: give at least one PATH (file, folder or @list.txt)")
    if args.resume and not args.output:
        raise UsageError("--resume needs --output FILE")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    from .batch import expand_inputs, tag_paths
    from .fetch import ModelNotFoundError
    from .model import ModelError
    from .tagger import Tagger, TaggerOptions
    from .writers import RECORD_TEXT, ResultFile, csv_header, error_record, format_records, record

    options = TaggerOptions(
        model_path=args.model,
        top_k=args.top_k,
        threshold=args.threshold,
        thresholds=_read_thresholds(args.thresholds) if args.thresholds else None,
        hop_s=args.hop,
        aggregate=args.aggregate,
        allow=args.allow,
        deny=args.deny,
        num_threads=args.threads,
    )
    try:
        tagger = Tagger(options)  # validates options and the model once, before any worker starts
    except KeyError as exc:  # unknown class name in --allow/--deny/--thresholds
        raise UsageError(exc.args[0]) from None
    except ValueError as exc:
        if isinstance(exc, ModelError):
            _err(str(exc))
            return EXIT_FAILED
        raise UsageError(str(exc)) from None
    except ModelNotFoundError as exc:
        _err(str(exc))
        return EXIT_FAILED

    print(f"soundtag: model {tagger.model.path} ({tagger.model.precision})", file=sys.stderr)
    inputs = list(expand_inputs(args.paths))
    if args.plot and len(inputs) != 1:
        raise UsageError("--plot draws one input; give exactly one file")
    out = None
    if args.output:
        try:
            out = ResultFile(args.output, resume=args.resume)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    failed = 0
    records: list[dict] = []
    todo = [p for p, e in inputs if e is None and (out is None or p not in out.done)]
    skipped = sum(1 for p, e in inputs if e is None) - len(todo)
    if skipped:
        _err(f"resume: {skipped} input(s) already in {args.output}, skipped")

    if out is None and args.format == "csv":
        sys.stdout.write(csv_header())

    def emit(rec: dict) -> None:
        nonlocal failed
        if "error" in rec:
            failed += 1
            _err(f"{rec['path']}: {rec['error']}")
        if out is not None:
            out.write(rec)
        elif args.format == "json":
            records.append(rec)
        else:
            sys.stdout.write(RECORD_TEXT[args.format](rec))
            sys.stdout.flush()

    progress = _progress(len(todo))
    plot_result = None
    try:
        for path, error in inputs:
            if error is not None and (out is None or path not in out.done):
                emit(error_record(path, error))
        for path, result, error in tag_paths(todo, options, jobs=args.jobs, tagger=tagger):
            emit(error_record(path, error) if error else record(result))
            if args.plot and result is not None:
                plot_result = result
            progress.update(1)
    except KeyboardInterrupt:
        progress.close()
        if out is not None:
            out.close()
            _err(f"interrupted; {len(out.done)} input(s) saved in {args.output} (rerun with --resume)")
        else:
            _err("interrupted")
        return EXIT_INTERRUPTED
    progress.close()
    if out is not None:
        out.close()
        _err(f"{len(inputs) - skipped - failed} tagged, {failed} failed, {skipped} skipped; results in {args.output}")
    if records:
        sys.stdout.write(format_records(records, "json"))
    if plot_result is not None:
        from .plot import plot_timeline

        plot_timeline(plot_result, args.plot)
    return EXIT_FAILED if failed else EXIT_OK


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", file=sys.stderr, disable=None if total > 1 else True, leave=False)


def _read_thresholds(path: str) -> dict[str, float]:
    """JSON {name-or-MID: threshold}, or one 'name-or-MID,threshold' per line (# comments)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--thresholds {path}: {exc.strerror or exc}") from None
    try:
        if path.endswith(".json"):
            table = {str(k): float(v) for k, v in json.loads(text).items()}
        else:
            table = {}
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, _, value = line.replace("\t", ",").rpartition(",")
                if not name:
                    raise ValueError(f"line {n}: expected 'name,threshold'")
                table[name.strip()] = float(value)
    except (ValueError, AttributeError) as exc:
        raise UsageError(f"--thresholds {path}: {exc}") from None
    return table


def _cmd_convert(args) -> int:
    try:
        from .convert.export import DEFAULT_PRECISIONS, PRECISIONS, convert_checkpoint
        from .convert.cnn14 import CheckpointError
        from .convert.validate import ValidationError
    except ImportError as exc:
        _err(f"convert needs the conversion tools: pip install 'soundtag[convert]' ({exc})")
        return EXIT_FAILED
    precisions = tuple(args.precision or DEFAULT_PRECISIONS)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise UsageError(f"--precision {bad[0]!r}: choose from {', '.join(PRECISIONS)}")
    if not Path(args.checkpoint).is_file():
        _err(f"{args.checkpoint}: no such file")
        return EXIT_FAILED
    try:
        result = convert_checkpoint(args.checkpoint, args.output_dir, precisions, winograd=not args.no_winograd)
    except (CheckpointError, ValidationError) as exc:
        _err(str(exc))
        return EXIT_FAILED
    for precision, m in result.report["models"].items():
        par, g = m["parity_vs_pytorch"], m["graph"]
        print(f"{m['file']}: {precision} ({m['convolutions']}), {m['bytes'] / 1e6:.1f} MB, corr {par['min_corr']:.7f}, "
              f"max|dp| {par['max_abs_diff']:.2e}, {g['subgraphs']} subgraph, rank <= {g['max_rank']}, "
              f"GPU ops {'all supported' if g['gpu_ok'] else 'missing ' + ', '.join(g['gpu_unsupported'])}")
    print(f"wrote {len(result.written)} files to {args.output_dir} in {result.report['seconds']} s")
    return EXIT_OK


def _cmd_fetch(args) -> int:
    from . import fetch as f

    def progress(have: int, total: int | None) -> None:
        if sys.stderr.isatty():
            pct = f"{100 * have / total:5.1f}%" if total else f"{have / 1e6:.0f} MB"
            print(f"\rdownloading {pct}", end="", file=sys.stderr)

    try:
        where = f.fetch(
            url=args.url or f.UPSTREAM_URL,
            expected_bytes=args.bytes if args.bytes is not None else (None if args.url else f.UPSTREAM_BYTES),
            expected_md5=args.md5 or (None if args.url else f.UPSTREAM_MD5),
            precisions=tuple(args.precision) if args.precision else None,
            progress=progress,
        )
    except f.FetchError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except Exception as exc:  # conversion refused the checkpoint
        _err(f"fetch: {exc}")
        return EXIT_FAILED
    print(f"models ready in {where}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # python -m soundtag.cli
    main_exit()
