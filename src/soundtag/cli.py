"""`soundtag` command line: builds options, calls the public API, prints results.

Exit codes: 0 all inputs ok, 1 some inputs failed, 2 usage error, 130 interrupted, 141 output closed
(broken pipe). Results go to stdout (or --output FILE); errors and progress to stderr, one line each.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import sys
from pathlib import Path

from .commands import err as _err, finite as _finite
from .errors import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
TEXT_ERRORS = "soundtag-path"  # stdout/stderr error handler for file names in any locale


class UsageError(Exception):
    pass


def _path_bytes_or_escape(err: UnicodeError):
    """Encoding error handler: undecodable file-name bytes (surrogate escapes) go out as the original
    bytes, as `ls` shows them; characters the locale cannot encode become backslash escapes."""
    chunk = err.object[err.start : err.end]
    if isinstance(err, UnicodeEncodeError) and all("\udc80" <= c <= "\udcff" for c in chunk):
        return bytes(ord(c) - 0xDC00 for c in chunk), err.end
    return codecs.backslashreplace_errors(err)


codecs.register_error(TEXT_ERRORS, _path_bytes_or_escape)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (subcommand parsers inherit it)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


class _VersionAction(argparse.Action):
    """`--version`: the version is looked up only when asked for, not at every start."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help="print the version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"soundtag {_version()}")
        parser.exit(0)


def _version() -> str:
    """The installed distribution's version (the wheel's), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("soundtag")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from .scoring import AGGREGATES
    from .spec import DEFAULT_WINDOW_S as WINDOW_S
    from .writers import FORMATS

    p = _Parser(prog="soundtag", description="AudioSet sound-event tagging with PANNs CNN14 on LiteRT.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tag", help="tag audio files, folders or @lists of paths")
    t.add_argument("paths", nargs="*", metavar="PATH", help="audio file, folder (recursive) or @list.txt")
    _add_tag_options(t)
    t.add_argument("--format", choices=FORMATS, default="table", help="stdout format (default table)")
    t.add_argument("--jobs", type=int, default=1, help="worker processes, each loading the model once (default 1)")
    t.add_argument("--threads", type=int, help="LiteRT threads per process (default: one per core, up to 4)")
    t.add_argument("--output", metavar="FILE",
                   help="write one combined file: .jsonl, .csv, .parquet (every score) or Raven selection table .txt")
    t.add_argument("--resume", action="store_true", help="with --output: skip inputs already in FILE")
    t.add_argument("--plot", metavar="PNG", help="draw the timeline of the top classes (one input only)")
    t.add_argument("--labels", action="store_true", help="print the classes (index, MID, name) of --model, else AudioSet's 527, and exit")

    r = sub.add_parser("corpus", help="tag an archive on Ray Data into a folder of Parquet files ([ray])")
    r.add_argument("paths", nargs="+", metavar="INPUT",
                   help="audio file, folder, @list.txt, or a .parquet/.csv with a 'path' column")
    r.add_argument("--output", required=True, metavar="DIR", help="folder of Parquet files (one row per input)")
    r.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray on this machine)")
    r.add_argument("--actors", type=int, default=1, help="tagging actors, each loading the model once (default 1)")
    r.add_argument("--threads-per-actor", type=int, default=1, help="CPUs reserved and LiteRT threads per actor")
    r.add_argument("--resume", action="store_true", help="skip inputs already in DIR; retry its error rows")
    _add_tag_options(r)

    li = sub.add_parser("listen", help="tag live audio: raw PCM on stdin ('-') or the microphone ([mic])")
    li.add_argument("source", nargs="?", metavar="SOURCE", help="'-': raw interleaved PCM on stdin; left out: the microphone")
    li.add_argument("--rate", type=int, metavar="HZ", help="input sample rate (default: the model's on stdin, 32000 for CNN14; the device's for a microphone)")
    li.add_argument("--channels", type=int, default=1, help="interleaved channels, averaged to mono (default 1)")
    li.add_argument("--encoding", default="f32le", help="stdin sample format: f32le, s16le or s32le (default f32le)")
    li.add_argument("--device", type=int, metavar="N", help="microphone: sounddevice input device index (default: the default input)")
    li.add_argument("--format", choices=("table", "jsonl"), help="table (live; default on a terminal) or jsonl (default otherwise)")
    _add_tag_options(li)

    v = sub.add_parser("serve", help="HTTP API and web page over one loaded model ([serve])")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 is your choice)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--workers", type=int, default=1, help="interpreters, i.e. windows tagged at once (default 1)")
    v.add_argument("--queue", type=int, default=8, help="uploads that may wait for a turn; more get 429 (default 8)")
    v.add_argument("--max-upload-mb", type=_finite("--max-upload-mb"), default=100.0, help="larger uploads get 413")
    v.add_argument("--max-duration-s", type=_finite("--max-duration-s"), default=3600.0,
                   help="longer audio gets 413, a longer stream is closed (default 3600)")
    v.add_argument("--max-windows", type=int, default=1000,
                   help="an upload or stream of more windows at its hop gets 413 / is closed (default 1000)")
    v.add_argument("--read-timeout-s", type=_finite("--read-timeout-s"), default=30.0,
                   help="a request's headers within this, its body never paused longer (default 30)")
    v.add_argument("--max-connections", type=int, default=64, help="open connections; 503 beyond (default 64)")
    v.add_argument("--max-streams", type=int, default=4, help="WebSocket streams at once (default 4)")
    v.add_argument("--stream-idle-s", type=_finite("--stream-idle-s"), default=30.0,
                   help="close a stream that sends nothing for this long (default 30)")
    v.add_argument("--allowed-host", nargs="+", action="extend", default=[], metavar="NAME",
                   help="Host names accepted besides the bound address ('*': any)")
    v.add_argument("--allowed-origin", nargs="+", action="extend", default=[], metavar="ORIGIN",
                   help="browser origins (scheme://host:port) that may use the server besides its own page")
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
                                     "(visible in ps: prefer --api-key-file or $SOUNDTAG_API_KEY)")
    v.add_argument("--api-key-file", metavar="FILE", help="read the API key from the first line of FILE")
    v.add_argument("--threads", type=int, help="LiteRT threads per interpreter")
    _add_tag_options(v)

    c = sub.add_parser("convert", help="convert an upstream PANNs checkpoint to validated LiteRT models")
    c.add_argument("checkpoint", help="Cnn14_mAP=0.431.pth, Cnn14_16k_mAP=0.438.pth, ... or a file in the same format")
    c.add_argument("--arch", help="the architecture, where the checkpoint and its name do not say (e.g. Cnn14, Cnn6)")
    c.add_argument("--output-dir", required=True, help="where models, mel basis, labels and report go")
    c.add_argument("--precision", nargs="+", action="extend", help="fp32 fp16 int8 (default: fp32 fp16; the MobileNets fp32)")
    c.add_argument("--no-winograd", action="store_true",
                   help="fp32 with direct convolutions (smaller file, slower on CPU; fp16/int8 always direct)")
    c.add_argument("--waveform", action="store_true",
                   help="also write cnn14_audioset_waveform_{fp32,fp16}.tflite: waveform in, the log-mel in the graph")
    _add_gpu_check_option(c)

    st = sub.add_parser("selftest", help="load a model, run the probe on the CPU or GPU, report parity and speed")
    st.add_argument("--model", help="a soundtag .tflite of any family model (default: $SOUNDTAG_MODEL, then the cache "
                    "from 'soundtag fetch')")
    _add_accelerator_options(st)
    st.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    st.add_argument("--runs", type=int, default=3, help="timed windows after a warm-up (default 3)")
    st.add_argument("--threads", type=int, help="LiteRT CPU threads (default: one per core, up to 4)")

    f = sub.add_parser("fetch", help="download upstream checkpoints, verify them, convert them into the cache")
    f.add_argument("names", nargs="*", metavar="NAME", help="models to fetch (default: cnn14; 'soundtag models' lists them)")
    f.add_argument("--url", help="download from this URL instead of Zenodo (a mirror); still verified")
    f.add_argument("--md5", help="expected md5 (default: the upstream checkpoint's)")
    f.add_argument("--bytes", type=int, help="expected size in bytes (default: the upstream checkpoint's)")
    f.add_argument("--no-verify", action="store_true", help="accept any file from --url (no size or md5 check)")
    f.add_argument("--precision", nargs="+", action="extend", help="fp32 fp16 int8 (default: fp32 fp16)")
    _add_gpu_check_option(f)

    sub.add_parser("models", help="list the PANNs family: names for fetch, files, md5 pins, front ends, what is installed")

    from . import evaluate

    evaluate.add_parser(sub)
    from . import search, train

    train.add_parser(sub)
    search.add_parsers(sub)
    return p


def _add_tag_options(p: argparse.ArgumentParser) -> None:
    """The model and report options shared by tag and corpus."""
    from .scoring import AGGREGATES
    from .spec import DEFAULT_WINDOW_S as WINDOW_S

    p.add_argument("--model", help="a soundtag .tflite of any family model (default: $SOUNDTAG_MODEL, then the cache "
                    "from 'soundtag fetch')")
    p.add_argument("--top-k", type=int, default=5, help="tags per clip and per window (1 to the model's classes: 527 for AudioSet; default 5)")
    p.add_argument("--threshold", type=_finite("--threshold"),
                   help="report only scores >= this, in [0, 1]; also the event threshold (default 0.5)")
    p.add_argument("--thresholds", metavar="FILE", help="per-class thresholds: JSON {name: t} or lines 'name,t'")
    p.add_argument("--allow", nargs="+", action="extend", metavar="CLASS", help="report only these classes (names or MIDs)")
    p.add_argument("--deny", nargs="+", action="extend", metavar="CLASS", help="never report these classes")
    p.add_argument("--hop", type=_finite("--hop"), default=WINDOW_S, metavar="SECONDS",
                   help="seconds between 10 s windows (default 10)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="max", help="clip score from windows (default max)")
    p.add_argument("--max-duration", type=_finite("--max-duration"), default=24 * 3600, metavar="SECONDS",
                   help="refuse inputs longer than this (default 86400 = 24 h)")
    p.add_argument("--embeddings", action="store_true",
                   help="add the clip embedding to each record (fp32/int8 models; CNN14 2048-d, Cnn6/10 512, MobileNets 1024)")
    from .sed import add_arguments

    add_arguments(p)
    _add_accelerator_options(p)


def _post_processing(args):
    """The sound event detection flags as a sed.PostProcessing; a bad value is a usage error."""
    from .errors import OptionsError
    from .sed import from_arguments

    try:
        return from_arguments(args)
    except OptionsError as exc:
        raise UsageError(str(exc)) from None


def _add_gpu_check_option(p: argparse.ArgumentParser) -> None:
    from .model import GPU_CHECKS

    p.add_argument("--gpu-check", choices=GPU_CHECKS, default="auto",
                   help="run the models on LiteRT's GPU accelerator too: auto (default; where a usable GPU exists, "
                        "a GPU that disagrees is a warning), require (a missing or failing GPU check writes no "
                        "model) or off")


def _add_accelerator_options(p: argparse.ArgumentParser) -> None:
    from .model import ACCELERATORS, GPU_PRECISIONS

    p.add_argument("--accelerator", choices=ACCELERATORS, default="cpu",
                   help="cpu (default), gpu (LiteRT's GPU accelerator; fails if none runs the model correctly) "
                        "or auto (the GPU when it passes its probe, else the CPU)")
    p.add_argument("--gpu-precision", choices=GPU_PRECISIONS,
                   help="GPU arithmetic (default: fp16 for the fp16 log-mel model, fp32 for the others)")


def _tagger_options(args, num_threads: int | None = None):
    """TaggerOptions from the shared flags; a bad value is a usage error."""
    from .errors import OptionsError
    from .tagger import TaggerOptions

    try:
        return TaggerOptions(
            model_path=args.model, top_k=args.top_k, threshold=args.threshold,
            thresholds=_read_thresholds(args.thresholds) if args.thresholds else None,
            hop_s=args.hop, aggregate=args.aggregate, allow=args.allow, deny=args.deny,
            num_threads=num_threads, max_duration_s=args.max_duration, embeddings=args.embeddings,
            accelerator=args.accelerator, gpu_precision=args.gpu_precision, sed=_post_processing(args),
        )
    except OptionsError as exc:
        raise UsageError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=TEXT_ERRORS)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (or --help)
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"tag": _cmd_tag, "corpus": _cmd_corpus, "listen": _cmd_listen, "serve": _cmd_serve, "convert": _cmd_convert, "fetch": _cmd_fetch, "eval": _cmd_eval, "models": _cmd_models,
                    "selftest": _cmd_selftest, "train": _cmd_train, "index": _cmd_index, "search": _cmd_search}
        return commands[args.command](args)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:  # `soundtag tag ... | head`: the reader has gone
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _cmd_tag(args) -> int:
    from .errors import ModelError, OptionsError, OutputError
    from .labels import labels

    if args.labels:  # the classes of --model (a trained head's), else AudioSet's
        table = labels()
        if args.model:
            from .spec import read_spec

            try:
                spec = read_spec(args.model) if Path(args.model).is_file() else None
            except ModelError as exc:
                _err(str(exc))
                return EXIT_FAILED
            table = spec.labels if spec is not None else table
        for lab in table:
            print(f"{lab.index}\t{lab.mid}\t{lab.name}")
        return EXIT_OK
    if not args.paths:
        raise UsageError("tag: give at least one PATH (file, folder or @list.txt)")
    if args.resume and not args.output:
        raise UsageError("--resume needs --output FILE")
    from .batch import cap_jobs, expand_inputs, run_batch
    from .tagger import Tagger
    from .writers import ResultFile, StreamSink

    options = _tagger_options(args, args.threads)
    try:
        tagger = Tagger(options)  # loads and checks the model once, before any worker starts
    except ModelError as exc:
        _err(str(exc))
        return EXIT_FAILED
    try:
        jobs, warning = cap_jobs(args.jobs, tagger.model.path)
        out = ResultFile(args.output, resume=args.resume) if args.output else None  # refused before any tagging
    except (OptionsError, OutputError) as exc:
        raise UsageError(str(exc)) from None
    if warning:
        _err(warning)
    _err(f"model {tagger.model.path} ({tagger.model.precision})")
    inputs = list(expand_inputs(args.paths))
    if args.plot and len(inputs) != 1:
        if out is not None:
            out.abandon()
        raise UsageError("--plot draws one input; give exactly one file")
    sink = out if out is not None else StreamSink(sys.stdout, args.format)
    done = out.done if out is not None else set()
    skipped = sum(1 for p, e in inputs if e is None and p in done)
    if skipped:
        _err(f"resume: {skipped} input(s) already in {args.output}, skipped")
    progress = _progress(sum(1 for p, e in inputs if e is None) - skipped)
    plotted = []

    def on_record(path: str, result) -> None:
        progress.update(1)
        if args.plot and result is not None:
            plotted.append(result)

    try:
        counts = run_batch(inputs, tagger, [sink], jobs=jobs, done=done,
                           on_error=lambda path, reason: _err(f"{path}: {reason}"),
                           on_record=on_record)
    except KeyboardInterrupt:
        progress.close()
        if out is not None:
            out.close()
            _err(f"interrupted; {len(out.done)} input(s) saved in {args.output} (rerun with --resume)")
        else:
            _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if out is not None:
            out.abandon()
        raise
    except Exception as exc:  # a failure of the run itself (disk full, a lost worker): keep what is done
        progress.close()
        if out is not None:
            part = out.abandon()
            _err(f"failed: {exc}; {len(out.done)} input(s) saved in {part} (rerun with --resume)")
        else:
            _err(f"failed: {exc}")
        return EXIT_FAILED
    progress.close()
    sink.close()
    if out is not None:
        _err(f"{counts.tagged} tagged, {counts.failed} failed, {counts.skipped} skipped; results in {args.output}")
    if plotted:
        from .plot import plot_timeline

        plot_timeline(plotted[0], args.plot, spec=tagger.spec)
    return EXIT_FAILED if counts.failed else EXIT_OK


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", file=sys.stderr, disable=None if total > 1 else True, leave=False)


def _read_thresholds(path: str) -> dict[str, float]:
    """JSON {name-or-MID: threshold}, or one 'name-or-MID,threshold' per line (# comments)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"--thresholds {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"--thresholds {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("expected a JSON object {class: threshold}")
            table = {str(k): float(v) for k, v in raw.items()}
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
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--thresholds {path}: {exc}") from None
    return table


def _cmd_convert(args) -> int:
    try:
        from .convert.cnn14 import CheckpointError
        from .convert.export import PRECISIONS, convert_checkpoint
        from .errors import ValidationError
    except ImportError as exc:
        _err(f"convert needs the conversion tools: pip install 'soundtag[convert]' ({exc})")
        return EXIT_FAILED
    precisions = tuple(args.precision) if args.precision else None  # None: the architecture's own
    bad = [p for p in precisions or () if p not in PRECISIONS]
    if bad:
        raise UsageError(f"--precision {bad[0]!r}: choose from {', '.join(PRECISIONS)}")
    if not Path(args.checkpoint).is_file():
        _err(f"{args.checkpoint}: no such file")
        return EXIT_FAILED
    try:
        result = convert_checkpoint(args.checkpoint, args.output_dir, precisions, winograd=not args.no_winograd,
                                    gpu_check=args.gpu_check, waveform=args.waveform, arch=args.arch)
    except (CheckpointError, ValidationError, ValueError) as exc:
        _err(str(exc))
        return EXIT_FAILED
    for precision, m in result.report["models"].items():
        par, g = m["parity_vs_pytorch"], m["graph"]
        print(f"{m['file']}: {precision} ({m['convolutions']}), {m['bytes'] / 1e6:.1f} MB, corr {par['min_corr']:.7f}, "
              f"max|dp| {par['max_abs_diff']:.2e}, {g['subgraphs']} subgraph, rank <= {g['max_rank']}, "
              f"GPU ops {'all supported' if g['gpu_ok'] else 'missing ' + ', '.join(g['gpu_unsupported'])}, "
              f"largest tensor {g['largest_tensor_bytes'] / 2**20:.0f} MiB as fp32")
        gpu = m.get("gpu")
        if gpu and gpu.get("available"):
            modes = ", ".join((f"{mode} mode corr {r['min_corr']:.6f}" if "min_corr" in r else f"{mode} mode: {r['error']}")
                              + ("" if r.get("gated", True) else " (not gated)") for mode, r in gpu["modes"].items())
            print(f"  on the GPU ({gpu.get('backend', 'WebGPU')} {gpu.get('adapter', '')}): {modes}"
                  + ("" if gpu["passed"] else " -- DISAGREES with the CPU (written: a finding about this GPU's driver)"))
        elif gpu:
            print(f"  GPU not checked: {gpu['reason']}")
    print(f"wrote {len(result.written)} files to {args.output_dir} in {result.report['seconds']} s")
    return EXIT_OK


def _cmd_fetch(args) -> int:
    from . import fetch as f
    from .errors import FetchError

    if args.no_verify and (args.md5 or args.bytes is not None):
        raise UsageError("--no-verify and --md5/--bytes contradict each other")

    def progress(have: int, total: int | None) -> None:
        if sys.stderr.isatty():
            pct = f"{100 * have / total:5.1f}%" if total else f"{have / 1e6:.0f} MB"
            print(f"\rdownloading {pct}", end="", file=sys.stderr)

    try:
        entries = [f.checkpoint(n) for n in (args.names or ["cnn14"])]
    except FetchError as exc:
        raise UsageError(str(exc)) from None
    if len(entries) > 1 and (args.url or args.md5 or args.bytes is not None):
        raise UsageError("--url, --md5 and --bytes describe one file: fetch one NAME with them")
    failed = 0
    for c in entries:
        if args.no_verify:
            _err(f"fetch {c.name}: --no-verify: {args.url or c.url} is converted without any size or md5 check")
        md5 = None if args.no_verify else (args.md5 or c.md5)
        if md5 is None and not args.no_verify:
            _err(f"fetch {c.name}: no md5 pin is known for {c.file} ({c.pin_source}); give --md5 (and --bytes) "
                 "or --no-verify")
            failed += 1
            continue
        try:
            where = f.fetch(
                url=args.url or c.url,
                expected_bytes=None if args.no_verify else (args.bytes if args.bytes is not None else c.bytes),
                expected_md5=md5,
                precisions=tuple(args.precision) if args.precision else None,
                progress=progress, gpu_check=args.gpu_check, file_name=c.file, arch=c.arch,
            )
        except FetchError as exc:
            _err(str(exc))
            failed += 1
            continue
        except Exception as exc:  # conversion refused the checkpoint
            _err(f"fetch {c.name}: {exc}")
            failed += 1
            continue
        print(f"{c.name}: models ready in {where}")
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_models(args) -> int:
    """The registry as a table: name, architecture, mAP, rate, parameters, checkpoint and pins, the cached
    models (precision: MB, and ms per window where `soundtag selftest` measured it)."""
    from . import fetch as f
    from .paths import models_dir
    from .selftest import measured

    have, times = models_dir(), measured()
    rows = [("name", "architecture", "mAP", "rate", "params", "checkpoint", "md5", "bytes", "cached (MB, ms/window)")]
    for c in f.CHECKPOINTS.values():
        installed = []
        for p in sorted(have.glob(f"{c.arch.lower()}_audioset_*.tflite")) if have.is_dir() else []:
            ms = times.get(p.name, {}).get("ms_per_window")
            installed.append(f"{p.name.removeprefix(c.arch.lower() + '_audioset_').removesuffix('.tflite')} "
                             f"{p.stat().st_size / 1e6:.0f}" + (f" {ms:g}ms" if ms is not None else ""))
        rows.append((c.name, c.arch, f"{c.published_map:.3f}", f"{c.sample_rate} Hz", _parameters(c.arch), c.file,
                     c.md5 or "(no pin)", str(c.bytes) if c.bytes else "?", ", ".join(installed) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return EXIT_OK


def _parameters(arch: str) -> str:
    """The body's parameter count (millions), where the converter (torch) is installed."""
    try:
        from .convert.family import ARCHITECTURES
    except ImportError:
        return "?"
    import math

    return f"{sum(math.prod(s) for s in ARCHITECTURES[arch].body_signature().values()) / 1e6:.1f}M"


def _cmd_corpus(args) -> int:
    from .batch import expand_inputs
    from .errors import ModelError, OptionsError, OutputError
    from .tagger import Tagger

    options = _tagger_options(args, args.threads_per_actor)
    try:
        Tagger(options)  # the model loads and the options hold before any actor starts
    except ModelError as exc:
        _err(str(exc))
        return EXIT_FAILED
    items: list[str] = []
    for item in args.paths:
        if item.lower().endswith((".parquet", ".csv")) and os.path.isfile(item):
            from .corpus import read_path_table

            try:
                items.extend(read_path_table(item))
            except (OptionsError, OSError, ValueError) as exc:
                raise UsageError(f"{item}: {getattr(exc, 'reason', None) or exc}") from None
        else:
            items.append(item)
    inputs = list(expand_inputs(items))
    for path, error in inputs:
        if error is not None:
            _err(f"{path}: {error}")
    paths = [p for p, e in inputs if e is None]
    try:
        from .corpus import run_corpus

        counts = run_corpus(paths, args.output, options, actors=args.actors, threads_per_actor=args.threads_per_actor,
                            address=args.address, resume=args.resume)
    except (OptionsError, OutputError) as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        _err(f"interrupted; finished files are in {args.output} (rerun with --resume)")
        return EXIT_INTERRUPTED
    for path, reason in counts.failures:
        _err(f"{path}: {reason}")
    failed = counts.failed + sum(1 for _, e in inputs if e is not None)
    _err(f"{counts.tagged} tagged, {failed} failed, {counts.skipped} skipped; Parquet files in {args.output}")
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_serve(args) -> int:
    from .errors import ModelError, OptionsError

    options = _tagger_options(args, args.threads)
    try:
        from .serve import ServeConfig, read_api_key, serve

        config = ServeConfig(options, workers=args.workers, queue=args.queue, max_upload_mb=args.max_upload_mb,
                             max_duration_s=args.max_duration_s, max_windows=args.max_windows,
                             api_key=read_api_key(args.api_key, args.api_key_file), host=args.host, port=args.port,
                             read_timeout_s=args.read_timeout_s, max_connections=args.max_connections,
                             max_streams=args.max_streams, stream_idle_s=args.stream_idle_s,
                             allowed_hosts=tuple(args.allowed_host), allowed_origins=tuple(args.allowed_origin))
    except OptionsError as exc:
        raise UsageError(str(exc)) from None
    from .tagger import Tagger

    try:  # the model and the options it must serve (--embeddings), checked before the port opens
        Tagger(options)
    except ModelError as exc:
        _err(str(exc))
        return EXIT_FAILED
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        _err(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it")
    _err(f"serving {options.model_path or 'the cached model'} on http://{args.host}:{args.port}/")
    try:
        serve(config)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def _cmd_selftest(args) -> int:
    from .selftest import format_table, selftest

    if args.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {args.runs}")
    report = selftest(args.model, args.accelerator, args.gpu_precision, runs=args.runs, num_threads=args.threads)
    print(json.dumps(report, indent=2) if args.format == "json" else format_table(report))
    return EXIT_OK if report["passed"] else EXIT_FAILED


def _cmd_listen(args) -> int:
    from . import listen
    from .errors import OptionsError, SoundtagError

    if args.embeddings:
        raise UsageError("listen: --embeddings is for files ('soundtag tag'); a live stream reports tags and events")
    try:
        options = listen.ListenOptions(source=args.source, sample_rate=args.rate, channels=args.channels,
                                       encoding=args.encoding, device=args.device,
                                       view=args.format or listen.default_view(sys.stdout))
    except OptionsError as exc:
        raise UsageError(str(exc)) from None
    try:
        report = listen.run(_tagger_options(args), options)
    except SoundtagError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:  # before the stream runs (model loading), or a second Ctrl-C while it closes
        _err("interrupted")
        return EXIT_INTERRUPTED
    _err(report.summary())
    return EXIT_INTERRUPTED if report.interrupted else EXIT_OK

def _cmd_eval(args) -> int:
    from . import evaluate

    return evaluate.main(args)


def _cmd_train(args) -> int:
    from . import train

    return train.main(args)


def _cmd_index(args) -> int:
    from . import search

    return search.main_index(args)


def _cmd_search(args) -> int:
    from . import search

    return search.main_search(args)


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # python -m soundtag.cli
    main_exit()
