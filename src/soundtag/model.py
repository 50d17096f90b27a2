"""A LiteRT PANNs model: what its spec says in (log-mel [1, 1, frames, mels] or a waveform window),
probabilities [1, classes] out, and optionally its embedding.

The model's numbers (sample rate, window, front end, labels, embedding size) come from the spec in
the file (spec.py), or, for a file without one, from its signature (the model card's CNN14).

One wrapper for every user of a model: the tagger, and the converter's validation, which runs the
bytes it is about to write through ``Model.from_bytes`` so the gate tests the code that ships.

Two runtimes: the CPU (XNNPACK, the default) and the GPU (LiteRT's ``CompiledModel`` on its GPU
accelerator: ML Drift over WebGPU/Dawn, which reaches Vulkan, Metal or D3D12). A model file runs on
the CPU through ``CompiledModel`` with XNNPACK's weight cache: XNNPACK packs every convolution's and
dense layer's weights into a file (once per model and CPU, under paths.weight_cache_dir()) and maps
it, so the process holds the packed weights once, as file pages that every process on the model
shares, instead of the model's pages plus a private packed copy on the heap (issue #12: fp32 peak RSS
1326 -> 736 MB for a 596 MiB model). Flatbuffer bytes (the converter's checks),
$SOUNDTAG_WEIGHT_CACHE=0, or a cache directory that cannot be written take LiteRT's Interpreter,
which packs on the heap.

A GPU can return wrong numbers without raising anything (a buffer over WebGPU's binding limit
reads as zeros), so a GPU model is only accepted after a probe: the shipped speech clip through the
GPU and through the CPU, compared against PROBE_GATES.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import hashlib
import logging
import os
import re
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import features
from .cpu import cpu_info
from .errors import InferenceError, ModelError, NoGpuError
from .files import atomic_write_bytes, create_beside, file_chunks
from .paths import weight_cache_dir
from .spec import CNN14, ModelSpec, from_signature, read_spec

log = logging.getLogger(__name__)

DEFAULT_THREADS = min(4, os.cpu_count() or 1)  # XNNPACK threads; one per core up to 4
ACCELERATORS = ("cpu", "gpu", "auto")  # "auto": the GPU when it loads and passes the probe, else the CPU
# `convert --gpu-check` (issue #18): what a GPU check means for writing the models. A machine without a
# usable GPU (NoGpuError: parts missing, or no adapter that Dawn accepts) is recorded and never stops a
# conversion unless "require"; a GPU that loads and disagrees with the CPU is a finding about that
# machine's driver, not the model: "auto" writes the models with one warning and records it, "require"
# (CI, the GPU tests) makes any missing or failing GPU check fatal; "off" runs none.
GPU_CHECKS = ("auto", "require", "off")
GPU_PRECISIONS = ("fp16", "fp32")  # the GPU's arithmetic; None: fp16 for the fp16 log-mel model, else fp32
# Probe gates, GPU vs CPU on the speech clip: far looser than the converter's (which prove the layout),
# tight enough to refuse a broken device or driver (zeros, garbage, a dropped layer).
PROBE_GATES = {"fp32": {"min_corr": 0.99999, "max_abs_diff": 1e-4}, "fp16": {"min_corr": 0.999, "max_abs_diff": 0.05}}
WEBGPU_LIBRARY = "libLiteRtWebGpuAccelerator.so"
# What Dawn says when the Vulkan loader and a driver file exist but no device is usable (a driver for
# absent hardware; Debian 12's Mesa 22.3 lavapipe, which Dawn rejects): a machine without a GPU.
NO_ADAPTER_PATTERN = r"No adapters found"
VULKAN_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")


@dataclass
class GpuInfo:
    """What the GPU path found: for `soundtag selftest`, the conversion report and the logs."""

    precision: str  # fp16 or fp32 arithmetic
    backend: str  # e.g. "WebGPU/Vulkan"
    adapter: str  # e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"
    adapter_type: str  # e.g. "CPU / Software", "Discrete GPU"
    fully_accelerated: bool
    probe: dict = field(default_factory=dict)  # corr, max_abs_diff, top1 vs the CPU on the speech clip


class Model:
    """A loaded .tflite PANNs model; ``spec`` (spec.ModelSpec) says what it is. Call it with the
    window's input: a log-mel [frames, mels] or [1, 1, frames, mels] (CNN14: [1001, 64]); a waveform
    model (``input_kind == "waveform"``, log-mel inside the graph) with the window's samples instead.

    Outputs: probabilities float32 [1, classes], and optionally the embedding float32 [1, size]
    (``has_embedding``; the fp32 and int8 models of ``soundtag convert`` carry it, the fp16 model keeps
    the model card's single-output signature).

    ``accelerator``: "cpu" (default), "gpu" (ModelError naming what is missing when no GPU runs it
    correctly) or "auto" (the GPU if it loads, is fully accelerated and passes the probe; else the
    CPU with one warning). ``gpu_precision``: "fp16" or "fp32"; None takes the model's own.
    ``weight_cache``: run the CPU from XNNPACK's weight cache file (the module docstring); False takes
    the Interpreter, whose runs release the GIL, so several models in one process run at once (serve).

    Args:
        path: The .tflite file (any model `soundtag convert` writes, or the model card's fp16 file).
        num_threads: LiteRT CPU threads; None: one per core, up to 4.
        accelerator: "cpu", "gpu" or "auto" (above).
        gpu_precision: "fp16" or "fp32" on the GPU; None: the model's own.
        weight_cache: Map XNNPACK's packed weights from a file shared between processes.

    Attributes:
        path: The model file.
        spec: What the model is (`ModelSpec`), read from the file's metadata or its signature.
        precision: "fp32", "fp16" or "int8".
        accelerator: Where it runs after the probe: "cpu" or "gpu".

    Raises:
        ModelError: Missing, not a LiteRT model, a signature no PANNs model has, a spec that
            disagrees with the tensors, or (with "gpu") no GPU that runs it correctly.
    """

    def __init__(self, path: str | Path, num_threads: int | None = None, accelerator: str = "cpu",
                 gpu_precision: str | None = None, weight_cache: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError("model file not found", str(self.path))
        self._load(str(self.path), dict(model_path=str(self.path)), num_threads, accelerator, gpu_precision, weight_cache)

    @classmethod
    def from_bytes(cls, data: bytes, num_threads: int | None = None, name: str = "<bytes>",
                   accelerator: str = "cpu", gpu_precision: str | None = None) -> Model:
        """A model from flatbuffer bytes (the converter checks what it is about to write this way)."""
        self = cls.__new__(cls)
        self.path = Path(name)
        self._load(name, dict(model_content=bytes(data)), num_threads, accelerator, gpu_precision)
        return self

    def _load(self, name: str, source: dict, num_threads: int | None, accelerator: str,
              gpu_precision: str | None, weight_cache: bool = False) -> None:
        if accelerator not in ACCELERATORS:
            raise ModelError(f"unknown accelerator {accelerator!r}; choose from {', '.join(ACCELERATORS)}", name)
        if gpu_precision not in (None, *GPU_PRECISIONS):
            raise ModelError(f"unknown GPU precision {gpu_precision!r}; choose from {', '.join(GPU_PRECISIONS)}", name)
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        threads = num_threads or DEFAULT_THREADS
        cache_dir = weight_cache_dir()
        cached = weight_cache and "model_path" in source and cache_dir is not None
        try:
            # with the weight cache, this Interpreter only reads the signature: no delegate, no packing
            interp = Interpreter(**source, num_threads=threads, experimental_op_resolver_type=(
                OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if cached else OpResolverType.AUTO))
            if not cached:
                interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"not a LiteRT model ({' '.join(str(exc).split())})", name) from None
        self.precision = _precision(interp.get_tensor_details())
        self.spec = _model_spec(interp, source, name, self.precision)
        self._cpu = _CpuRunner(interp, name, self.spec)
        self.weight_cache: Path | None = None  # the packed-weights file the CPU runs from, if any
        if cached:
            cache = _CachedCpuRunner.load(source["model_path"], cache_dir, threads, self._cpu)
            if cache is not None:
                self._cpu, self.weight_cache = cache, cache.path
            else:
                interp = Interpreter(**source, num_threads=threads)
                interp.allocate_tensors()
                self._cpu = _CpuRunner(interp, name, self.spec)
        self.input_shape = self.spec.input_shape
        self.input_kind = self.spec.input
        self._gpu: _GpuRunner | None = None
        self.accelerator, self.gpu, self.fallback_reason = "cpu", None, None
        if accelerator != "cpu":
            # the fp16 log-mel model runs in the GPU's fp16 mode by default; a waveform model's in-graph
            # front end needs fp32 arithmetic (see convert/validate.py WAVEFORM_GPU_GATES)
            precision = gpu_precision or ("fp16" if self.precision == "fp16" and self.input_kind == "logmel" else "fp32")
            try:
                self._gpu = _GpuRunner(source, precision, name, self._cpu)
            except ModelError as exc:
                if accelerator == "gpu":
                    raise
                self.fallback_reason = exc.reason
                log.warning("GPU not used, running on the CPU: %s", exc.reason)
            else:
                self.accelerator, self.gpu = "gpu", self._gpu.info
                self._cpu = None  # the CPU interpreter only served the probe: don't hold its weights twice
        log.info("loaded %s (%s, %s)", name, self.precision, self.accelerator)

    @property
    def has_embedding(self) -> bool:
        return (self._gpu or self._cpu).has_embedding

    def features(self, wave: np.ndarray) -> np.ndarray:
        """The model's input for one window of samples.

        Args:
            wave: `spec.window_samples` float samples at `spec.sample_rate`.

        Returns:
            The host log-mel of the model's front end, float32 [frames, mels], or the samples
            themselves for a waveform model (its log-mel is in the graph).
        """
        if self.input_kind == "waveform":
            return np.asarray(wave, dtype=np.float32)
        return features.logmel(wave, self.spec.front_end)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [classes] for one window's input; InferenceError if any is not in [0, 1]."""
        return self.run(x)[0]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the model on one window's input.

        Args:
            x: What `features` returns for the window.

        Returns:
            `(probabilities [classes], second)`: `second` is the embedding [size] when the model has one,
            a sound event detection model's segmentwise scores [steps, classes], else None.

        Raises:
            InferenceError: A probability not finite or not in [0, 1], or a non-finite embedding.
        """
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(self.input_shape)
        probs, second = (self._gpu or self._cpu).run(x)
        if self.spec.framewise:  # a SED model: its segmentwise scores [steps, classes], probabilities too
            segs = np.asarray(second, np.float32).reshape(self.spec.segmentwise_shape[1:])
            _checked(segs, None)
            return _checked(probs, None)[0], segs
        return _checked(probs, second)


def _checked(probs: np.ndarray, emb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if not (np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0):
        bad = int(np.count_nonzero(~(np.isfinite(probs) & (probs >= 0) & (probs <= 1))))
        raise InferenceError(f"the model produced {bad} non-finite or out-of-range probabilities")
    if emb is not None and not np.isfinite(emb).all():
        raise InferenceError("the model produced a non-finite embedding")
    return probs, emb


def _model_spec(interp, source: dict, name: str, precision: str) -> ModelSpec:
    """The file's spec (spec.read_spec), held against its tensors; for a file without one, the spec
    its signature implies (the model card's CNN14). ModelError (one line) when they disagree."""
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) not in (1, 2):
        raise ModelError(f"expected 1 input and 1 or 2 outputs, found {len(inputs)} and {len(outputs)}: "
                         "not a soundtag model", name)
    for kind, det in [("input", inputs[0])] + [("output", o) for o in outputs]:
        if det["dtype"] != np.float32:
            raise ModelError(f"{kind} is {np.dtype(det['dtype']).name}, expected float32: not a soundtag model", name)
    shape_in = tuple(int(d) for d in inputs[0]["shape"])
    shapes_out = [tuple(int(d) for d in o["shape"]) for o in outputs]
    spec = read_spec(source.get("model_path") or source["model_content"], name)
    if spec is None:
        return from_signature(shape_in, shapes_out, name).with_precision(precision)
    spec.check_signature(shape_in, shapes_out, name)
    if spec.precision is not None and spec.precision != precision:
        raise ModelError(f"its spec says {spec.precision} weights, but its tensors are {precision}", name)
    return spec.with_precision(precision)


class _CpuRunner:
    """LiteRT's Interpreter (XNNPACK): the default runtime and the GPU probe's reference."""

    def __init__(self, interp, name: str, spec: ModelSpec) -> None:
        inputs, outputs = interp.get_input_details(), interp.get_output_details()
        p, e = spec.output_roles([tuple(int(d) for d in o["shape"]) for o in outputs], name)
        self.spec = spec
        self._interp = interp
        self._in, self._out = inputs[0]["index"], outputs[p]["index"]
        self._emb = None if e is None else outputs[e]["index"]
        self.has_embedding = e is not None and not spec.framewise  # a SED model's second output: segmentwise

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        self._interp.set_tensor(self._in, x)
        self._interp.invoke()
        probs = self._interp.get_tensor(self._out)[0].copy()
        return probs, None if self._emb is None else self._interp.get_tensor(self._emb)[0].copy()


class _CompiledRunner:
    """Runs one LiteRT CompiledModel (CPU or GPU) through its first signature's tensor buffers.

    LiteRT writes a line to stderr for every accelerator it registers or destroys with an
    environment: a model's own (built in the loaders' ``_native_log``, released in ``close``, on
    garbage collection or at exit) and a process-wide one that the first run creates and only the C++
    runtime's exit destroys. Those lines go to the DEBUG log, or after the last Python code has run, to
    /dev/null (``_close_compiled_models``), never into a command's one-line error."""

    _alive: weakref.WeakSet = weakref.WeakSet()
    _ran = False  # has any CompiledModel run in this process (so the process-wide environment exists)

    def _bind(self, model, name: str) -> None:
        self._model = model
        _CompiledRunner._alive.add(self)
        signature = model.get_signature_list()
        key = next(iter(signature))
        details = model.get_output_tensor_details(key)
        shapes = [tuple(int(d) for d in details[o]["shape"]) for o in signature[key]["outputs"]]
        self._p, self._e = self.spec.output_roles(shapes, name)
        self.has_embedding = self._e is not None and not self.spec.framewise
        self._sizes = [int(np.prod(s)) for s in shapes]
        self._inputs = model.create_input_buffers(0)
        self._outputs = model.create_output_buffers(0)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # the first write creates LiteRT's process-wide environment, and says so on stderr
        with contextlib.nullcontext() if _CompiledRunner._ran else _native_log():
            self._inputs[0].write(x.ravel())
            self._model.run_by_index(0, self._inputs, self._outputs)
        _CompiledRunner._ran = True
        out = [buf.read(n, np.float32) for buf, n in zip(self._outputs, self._sizes)]
        return out[self._p].copy(), None if self._e is None else out[self._e].copy()

    def close(self) -> None:
        held = [self.__dict__.pop(k, None) for k in ("_inputs", "_outputs", "_model")]
        if any(h is not None for h in held):
            with contextlib.suppress(Exception), _native_log():
                del held[:]

    def __del__(self) -> None:
        self.close()


@atexit.register
def _close_compiled_models() -> None:
    """At exit: release the models still alive (their lines to the DEBUG log); then, if LiteRT's
    process-wide environment exists, point stderr at /dev/null for the C++ runtime's own teardown,
    which logs each accelerator it destroys after every Python handler has run. Python has printed
    any traceback before atexit runs; what is lost is the teardown's own chatter."""
    for runner in list(_CompiledRunner._alive):
        runner.close()
    if _CompiledRunner._ran:
        import sys

        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.flush()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)


class _CachedCpuRunner(_CompiledRunner):
    """LiteRT's CompiledModel on the CPU (XNNPACK) with XNNPACK's weight cache file (see the module
    docstring). The file's name holds the model's path, size and mtime, LiteRT's version and the CPU's
    flags, so a changed model or another CPU never reads a stale packing; it is built under a
    temporary name and renamed into place, so concurrent first loads never see a partial file, with
    a CRC-32 beside it that every load checks: XNNPACK would run damaged packed weights silently (4 KiB
    of garbage in the int8 cache moved probabilities by 0.72), so a mismatch rebuilds the file.
    Unlike the Interpreter, CompiledModel's run holds the GIL."""

    def __init__(self, model, path: Path, signature: _CpuRunner) -> None:
        self.path, self.spec = path, signature.spec
        self._bind(model, str(path))

    @classmethod
    def load(cls, model_path: str, directory: Path, threads: int, signature: _CpuRunner) -> _CachedCpuRunner | None:
        """The runner, or None (logged) when the cache directory cannot be written or LiteRT refuses."""
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import CpuOptions, HardwareAccelerator, Options

        path = weight_cache_file(model_path, directory)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
        try:  # an unpredictable name beside the file (issue #18), freed for XNNPACK to create anew
            fd, tmp = create_beside(path)
            os.close(fd)
            tmp.unlink()
        except OSError as exc:
            log.warning("XNNPACK weight cache not used for %s (weights packed on the heap): %s", model_path, exc)
            return None
        check = path.with_name(path.name + ".crc32")  # the finished file's checksum, written with it
        target = tmp
        if path.is_file():
            if _checksum_ok(path, check):
                target = path
            else:  # XNNPACK would run damaged packed weights without a word: never use them
                log.warning("XNNPACK weight cache %s does not match its checksum: rebuilding it", path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                              cpu_options=CpuOptions(num_threads=threads, xnnpack_weight_cache_path=str(target)))
            with _native_log():  # LiteRT's environment and accelerator lines: to the DEBUG log
                model = CompiledModel.from_file(model_path, options=options)
                runner = cls(model, path, signature)
            if target == tmp:
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    raise OSError(f"LiteRT wrote no weight cache to {tmp}")
                atomic_write_bytes(check, f"{_crc32(tmp):08x} {tmp.stat().st_size}\n".encode())
                os.replace(tmp, path)  # the mapping stays valid; others now find the finished file
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("XNNPACK weight cache not used for %s (weights packed on the heap): %s", model_path,
                        " ".join(str(exc).split()))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        return runner


def _crc32(path: Path) -> int:
    crc = 0
    for chunk in file_chunks(path):
        crc = zlib.crc32(chunk, crc)
    return crc


def _checksum_ok(path: Path, check: Path) -> bool:
    """Whether a weight cache file is whole and unchanged since it was built (CRC-32 and size, ~0.2 s
    for fp32's 700 MB: XNNPACK checks its header, not the packed weights)."""
    try:
        want = check.read_text().split()
        return len(want) == 2 and int(want[1]) == path.stat().st_size and int(want[0], 16) == _crc32(path)
    except (OSError, ValueError):
        return False


def weight_cache_file(model_path: str | Path, directory: Path) -> Path:
    """Where XNNPACK's packed weights for this model file on this CPU live, in ``directory``."""
    from importlib.metadata import version

    st = os.stat(model_path)
    real = os.path.realpath(model_path)
    key = "|".join((real, str(st.st_size), str(st.st_mtime_ns), version("ai-edge-litert"), cpu_info().flags_line))
    return Path(directory) / f"{Path(real).stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.xnnpack"


class _GpuRunner(_CompiledRunner):
    """LiteRT's CompiledModel on the GPU accelerator, proven by the probe before it is used."""

    def __init__(self, source: dict, precision: str, name: str, cpu: _CpuRunner) -> None:
        missing = gpu_missing()
        if missing:
            raise NoGpuError(f"no GPU accelerator: {missing}", name)
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import GpuOptions, HardwareAccelerator, Options

        options = Options(hardware_accelerators=HardwareAccelerator.GPU,
                          gpu_options=GpuOptions(enforce_f32=precision == "fp32"))
        self.spec = cpu.spec
        self._data = source.get("model_content")  # kept alive for the compiled model's lifetime
        with _native_log() as logged:
            try:
                if self._data is not None:
                    self._model = CompiledModel.from_buffer(self._data, options=options)
                else:
                    self._model = CompiledModel.from_file(source["model_path"], options=options)
            except RuntimeError:
                self._model = None
        dawn = _dawn_facts(logged.text)
        if self._model is None:
            said = dawn.get("error") or "no details logged"
            if dawn.get("no_adapter"):  # the parts are there, but no device Dawn accepts: no GPU, not a bad model
                raise NoGpuError(f"no GPU accelerator: Dawn found no usable GPU adapter ({said})", name)
            raise ModelError(f"the GPU accelerator failed to load it: {said}", name)
        self._bind(self._model, name)
        fully = bool(self._model.is_fully_accelerated())
        self.info = GpuInfo(precision, dawn.get("backend", "WebGPU"), dawn.get("adapter", "unknown"),
                            dawn.get("adapter_type", "unknown"), fully)
        if not fully:
            raise ModelError("the GPU accelerator does not run the whole model (some ops fell back to the CPU)", name)
        with _native_log() as logged:
            try:
                self.info.probe = self._probe(cpu, precision, name)
            except ModelError as exc:
                error = exc
            else:
                error = None
        if error is not None:
            said = _dawn_facts(logged.text).get("error")
            raise ModelError(error.reason + (f"; the GPU said: {said}" if said else ""), name) from None

    def _probe(self, cpu: _CpuRunner, precision: str, name: str) -> dict:
        """The speech clip on the GPU vs the CPU: refuse zeros, non-finite or far-off outputs."""
        x = probe_input(cpu.spec)
        want, _ = cpu.run(x)
        got, emb = self.run(x)
        where = f"the GPU ({self.info.adapter}, {precision}) "
        if not np.isfinite(got).all() or (emb is not None and not np.isfinite(emb).all()):
            raise ModelError(where + "returned non-finite outputs on the probe", name)
        if not np.any(got):
            raise ModelError(where + "returned all zeros on the probe (a buffer over the device's limits?)", name)
        if got.min() < 0 or got.max() > 1:
            raise ModelError(where + "returned probabilities outside [0, 1] on the probe", name)
        corr = float(np.corrcoef(want.astype(np.float64), got.astype(np.float64))[0, 1])
        diff = float(np.max(np.abs(want.astype(np.float64) - got)))
        gate = PROBE_GATES[precision]
        result = {"input": "speech_espeak.flac", "corr": corr, "max_abs_diff": diff,
                  "top1_cpu": int(np.argmax(want)), "top1_gpu": int(np.argmax(got)), "gate": gate}
        if not (corr >= gate["min_corr"] and diff <= gate["max_abs_diff"]):
            raise ModelError(where + f"differs from the CPU on the probe: corr {corr:.6f} (gate {gate['min_corr']}), "
                             f"max|dp| {diff:.2e} (gate {gate['max_abs_diff']:.0e})", name)
        return result


def probe_input(spec: ModelSpec = CNN14) -> np.ndarray:
    """The shipped speech clip's first window, at the model's rate, as its input (spec.input_shape):
    log-mel (CNN14: [1, 1, 1001, 64]) or, for a waveform model, the samples (CNN14: [1, 320000])."""
    from importlib import resources

    from .audio import load_audio

    n = spec.window_samples
    wave, _, _ = load_audio(str(resources.files("soundtag.assets").joinpath("speech_espeak.flac")),
                            sample_rate=spec.sample_rate)
    wave = np.pad(wave[:n], (0, max(0, n - wave.size))).astype(np.float32)
    if spec.input == "waveform":
        return wave.reshape(spec.input_shape)
    return np.ascontiguousarray(features.logmel(wave, spec.front_end), np.float32).reshape(spec.input_shape)


def gpu_missing() -> str | None:
    """What stops LiteRT's GPU accelerator here, in words; None when its parts are all present."""
    import ai_edge_litert

    if not (Path(ai_edge_litert.__file__).parent / WEBGPU_LIBRARY).is_file():
        return f"LiteRT's WebGPU accelerator library ({WEBGPU_LIBRARY}) is missing (pip install 'ai-edge-litert>=2.3')"
    try:
        ctypes.CDLL("libvulkan.so.1")
    except OSError:
        return "the Vulkan loader libvulkan.so.1 is missing (Debian/Ubuntu: apt-get install libvulkan1)"
    named = os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")
    icds = [p for p in named.split(os.pathsep) if os.path.isfile(p)] if named else \
        [p for d in VULKAN_ICD_DIRS for p in glob.glob(os.path.join(d, "*.json"))]
    if not icds:
        where = f"VK_DRIVER_FILES/VK_ICD_FILENAMES={named}" if named else ", ".join(VULKAN_ICD_DIRS)
        return (f"no Vulkan driver (ICD) found in {where} (install your GPU's Vulkan driver; without a GPU, Mesa's "
                "lavapipe >= 25: apt-get install -t bookworm-backports mesa-vulkan-drivers)")
    return None


class _native_log(contextlib.AbstractContextManager):
    """Captures what LiteRT, Dawn and the Vulkan loader write to file descriptors 1 and 2 while a GPU
    model loads and runs its probe (a few dozen lines; one of them goes to stdout, where it would mix
    with results), logs it at DEBUG and keeps it in ``.text`` for the facts it holds. Nested, only the
    outermost captures (the inner one's ``.text`` stays empty), so the GPU probe still sees what a
    first run inside it says."""

    _depth = 0

    def __enter__(self):
        import sys

        self.text = ""
        self._saved = []
        _native_log._depth += 1
        if _native_log._depth > 1:
            return self
        self._file = tempfile.TemporaryFile()
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            try:
                stream.flush()
                self._saved.append((fd, os.dup(fd)))
                os.dup2(self._file.fileno(), fd)
            except (OSError, ValueError, AttributeError):  # no such descriptor to redirect: let it be
                pass
        return self

    def __exit__(self, *exc):
        _native_log._depth -= 1
        if _native_log._depth > 0:
            return False
        for fd, saved in self._saved:
            os.dup2(saved, fd)
            os.close(saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        for line in self.text.splitlines():
            log.debug("litert: %s", line)
        return False


def _dawn_facts(text: str) -> dict:
    """Adapter, backend and the first error from the GPU accelerator's log."""
    facts = {}
    m = re.search(r"Selected adapter: (.*?), arch=.*?backend=(\w+), adapterType=([^\n]*)", text)
    if m:
        facts.update(adapter=m.group(1).strip(), backend=f"WebGPU/{m.group(2)}", adapter_type=m.group(3).strip())
    m = re.search(r"(Failed to initialize WebGPU environment: [^\n]*|No adapters found[^\n]*|"
                  r"Validation error: [^\n]*)", text)
    if m:
        facts["error"] = m.group(1).strip()
        facts["no_adapter"] = bool(re.search(NO_ADAPTER_PATTERN, facts["error"]))
    return facts


def _precision(tensors: list[dict]) -> str:
    """fp32, fp16 (float16 weights) or int8 (dynamic-range int8 weights), from the tensor types."""
    types = {np.dtype(t["dtype"]) for t in tensors}
    if np.dtype(np.int8) in types:
        return "int8"
    if np.dtype(np.float16) in types:
        return "fp16"
    return "fp32"


Cnn14Model = Model  # the name before the family (issue #19); kept for code written against 0.1
