"""The in-graph log-mel front end (soundtag.convert.frontend) vs the host's features.logmel (float64)
and torchlibrosa (float64): as a torch module in float32 and in float16 arithmetic, converted by
litert-torch and run by the LiteRT CPU interpreter, and in the GPU delegate (fp16 and fp32 modes)
over the software Vulkan driver.

Tolerances are in dB, per bin, by how far the host's value lies below the loudest bin of its frame
(``depth``); bins deeper than the deepest band are not compared (float rounding of the DFT, not the
construction, sets them: torchlibrosa in float32 misses there by as much).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from soundtag import features
from soundtag.spec import CNN14
from soundtag.convert.frontend import LogmelFrontEnd
from tests.fixtures import SR, scene, speech_wave, tone
from tests.test_features import torchlibrosa_logmel

N = CNN14.window_samples
SHAPE = CNN14.input_shape
# (depth below the frame's loudest host bin, max |delta|), dB; measured worst case over the inputs
# below in the comment (LiteRT 2.3, litert-torch 0.10, Mesa lavapipe)
F32_TOL = ((60.0, 1e-3), (100.0, 0.02))  # float32 torch, LiteRT CPU, GPU enforce_f32: 2.6e-4, 0.0071
TORCHLIBROSA_TOL = F32_TOL  # torchlibrosa float64 is the host to ~1e-5 dB here (test_features.py)
F16_TORCH_TOL = ((30.0, 0.25), (60.0, 0.5))  # torch float16 arithmetic on the CPU: 0.19, 0.22
GPU_F16_TOL = ((30.0, 0.4), (40.0, 0.8), (60.0, 2.0))  # GPU fp16: 0.32, 0.59, 1.5 (float16 DFT sums; the split DFT, exact in fp32, adds ~0.1 dB here)
GPU_F16_MEAN_TOL = 0.1  # mean |delta| within 60 dB of the frame's peak, GPU fp16: 0.05
ABS_F32_TOL = 0.01  # float32, every bin where the host is above -80 dB: 0.0056
INTERMEDIATE_MAX = 1e4  # largest |value| any op may produce in float16 (float16 max 65504)
MAX_TENSOR_BYTES = 128 * 2**20  # any constant or tensor of the converted graph

LOUD = ("square", "clipped_noise", "loud_noise")
GPU_SIGNALS = ("square", "loud_noise", "scene", "speech", "near_silence", "silence")


@lru_cache(maxsize=1)
def _signals() -> dict[str, np.ndarray]:
    import soxr

    rng = np.random.default_rng(7)
    t = np.arange(N) / SR
    speech, sr = speech_wave()
    speech32 = soxr.resample(speech, sr, SR)[:N]
    short = scene(2.5, seed=3)
    out = {
        "tone": tone(10),
        "scene": scene(10),
        "speech": np.pad(speech32, (0, N - speech32.size)),
        "square": np.where(np.sin(2 * np.pi * 440.0 * t) >= 0, 1.0, -1.0),  # full scale
        "clipped_noise": np.clip(3 * rng.standard_normal(N), -1, 1),
        "loud_noise": np.clip(3 * rng.standard_normal(N), -2, 2),  # +-2, louder than full scale
        "near_silence": 1e-5 * rng.standard_normal(N),
        "silence": np.zeros(N),
        "short_clip": np.pad(short, (0, N - short.size)),  # 2.5 s, then digital silence
    }
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


@lru_cache(maxsize=None)
def _host(name: str) -> np.ndarray:
    return features.logmel(_signals()[name])


def _errors(got: np.ndarray, ref: np.ndarray, bands) -> dict[float, tuple[float, float]]:
    """(max, mean) |got - ref| over the bins within each band's depth of their frame's loudest bin."""
    got = np.asarray(got, np.float64).reshape(ref.shape)
    diff = np.abs(got - ref)
    depth = ref.max(axis=1, keepdims=True) - ref
    out = {}
    for band, _ in bands:
        sel = depth <= band
        out[band] = (float(diff[sel].max()), float(diff[sel].mean()))
    return out


def _assert_close(got: np.ndarray, ref: np.ndarray, bands, label: str) -> None:
    assert np.isfinite(got).all(), f"{label}: non-finite output"
    errors = _errors(got, ref, bands)
    for band, tol in bands:
        worst = errors[band][0]
        assert worst <= tol, f"{label}: max |delta| {worst:.4g} dB within {band} dB of the peak > {tol}"


def _assert_f32(got: np.ndarray, name: str, label: str) -> None:
    ref = _host(name)
    got = np.asarray(got).reshape(ref.shape)
    if name == "silence":
        assert (got == -100.0).all(), f"{label}: digital silence must be exactly -100 dB"
        return
    _assert_close(got, ref, F32_TOL, label)
    loud = ref > -80.0
    if loud.any():
        assert np.abs(got - ref)[loud].max() <= ABS_F32_TOL, f"{label}: above -80 dB"


@pytest.fixture(scope="module")
def front_end() -> LogmelFrontEnd:
    return LogmelFrontEnd().eval()


def _run_torch(module, x: np.ndarray, dtype=torch.float32) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)[None].to(dtype)).float().numpy()


# --- torch, float32 ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_signals()))
def test_torch_float32_matches_host_and_torchlibrosa(front_end, name):
    x = _signals()[name]
    got = _run_torch(front_end, x)
    assert got.shape == SHAPE and got.dtype == np.float32
    _assert_f32(got, name, "torch float32 vs host")
    lib = torchlibrosa_logmel(x.astype(np.float64))
    if name == "silence":
        np.testing.assert_array_equal(lib, -100.0)
    else:
        _assert_close(got, lib, TORCHLIBROSA_TOL, "torch float32 vs torchlibrosa float64")


def test_digital_silence_is_exactly_the_floor(front_end):
    got = _run_torch(front_end, _signals()["silence"])
    np.testing.assert_array_equal(got, np.float32(-100.0))
    short = _run_torch(front_end, _signals()["short_clip"])[0, 0]
    host = _host("short_clip")
    tail = host.max(axis=1) == -100.0  # frames wholly in the zero padding
    assert tail.sum() > 700
    np.testing.assert_array_equal(short[tail], np.float32(-100.0))


def test_every_constant_goes_through_const():
    seen: list[torch.Tensor] = []

    def const(t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float64, "constants are built in float64"
        c = t.detach().to(torch.float32).contiguous().clone()
        seen.append(c)
        return c

    module = LogmelFrontEnd(const)
    tensors = [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    assert tensors and all(any(t is s for s in seen) for t in tensors)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in seen)


# --- torch, float16 arithmetic ----------------------------------------------------------------


class _RangeWatch(TorchDispatchMode):
    """Largest |value| and any non-finite value among every op's floating-point output."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0.0
        self.non_finite: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            if not torch.isfinite(out).all():
                self.non_finite.append(str(func))
            self.largest = max(self.largest, float(out.abs().max()))
        return out


@pytest.mark.parametrize("name", LOUD + ("scene", "near_silence", "silence"))
def test_float16_arithmetic_stays_in_range(name):
    """Every constant and op in float16 (torch CPU): no intermediate overflows or goes non-finite,
    and the result keeps the host's values (CPU float16 GEMMs may accumulate in float32; the GPU
    delegate's own fp16 accumulation is checked below)."""
    module = LogmelFrontEnd(lambda t: t.to(torch.float16).contiguous())
    watch = _RangeWatch()
    with watch:
        got = _run_torch(module, _signals()[name], torch.float16)
    assert not watch.non_finite, watch.non_finite
    assert watch.largest <= INTERMEDIATE_MAX
    if name == "silence":
        np.testing.assert_array_equal(got, -100.0)
    else:
        _assert_close(got, _host(name), F16_TORCH_TOL, "torch float16")


# --- litert-torch conversion, CPU interpreter -------------------------------------------------


@pytest.fixture(scope="module")
def frontend_tflite() -> bytes:
    import litert_torch

    module = LogmelFrontEnd().eval()
    with torch.inference_mode():
        edge = litert_torch.convert(module, (torch.zeros(1, N),))
    data = edge.model_content() if callable(getattr(edge, "model_content", None)) else edge.model_content
    return bytes(data)


def test_converted_graph_is_gpu_ready(frontend_tflite):
    from ai_edge_litert import schema_py_generated as schema

    from soundtag.convert.validate import inspect_graph

    report = inspect_graph(frontend_tflite)
    assert report.subgraphs == 1 and report.max_rank <= 4
    assert report.gpu_unsupported == [], report.ops
    assert not {"GATHER", "GATHER_ND", "CONV_1D"} & set(report.ops), report.ops
    assert report.ops.get("FULLY_CONNECTED", 0) >= 2  # the DFT and the mel product
    model = schema.Model.GetRootAs(frontend_tflite, 0)
    for b in range(model.BuffersLength()):
        buf = model.Buffers(b)
        assert max(buf.DataLength(), buf.Size()) <= MAX_TENSOR_BYTES
    sg = model.Subgraphs(0)
    for t in range(sg.TensorsLength()):
        tensor = sg.Tensors(t)
        assert 4 * int(np.prod(tensor.ShapeAsNumpy())) <= MAX_TENSOR_BYTES


@pytest.fixture(scope="module")
def cpu_interpreter(frontend_tflite):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=frontend_tflite, num_threads=2)
    interp.allocate_tensors()
    return interp


def _run_interpreter(interp, x: np.ndarray) -> np.ndarray:
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert tuple(inp["shape"]) == (1, N) and tuple(out["shape"]) == SHAPE
    interp.set_tensor(inp["index"], x[None].astype(np.float32))
    interp.invoke()
    return interp.get_tensor(out["index"]).copy()


@pytest.mark.parametrize("name", list(_signals()))
def test_converted_cpu_matches_host(cpu_interpreter, name):
    got = _run_interpreter(cpu_interpreter, _signals()[name])
    _assert_f32(got, name, "LiteRT CPU vs host")


# --- GPU delegate over the software Vulkan driver ---------------------------------------------


@pytest.fixture(scope="module")
def gpu_models(frontend_tflite):
    """The converted front end compiled for the GPU accelerator, fp16 and fp32 modes."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import GpuOptions, Options

    models = {}
    for mode, enforce_f32 in (("fp16", False), ("fp32", True)):
        gpu = GpuOptions(enforce_f32=enforce_f32)
        options = Options(hardware_accelerators=HardwareAccelerator.GPU, gpu_options=gpu)
        try:
            models[mode] = CompiledModel.from_buffer(frontend_tflite, options=options)
        except Exception as exc:  # no Vulkan device / GPU accelerator on this machine
            pytest.skip(f"LiteRT GPU accelerator unavailable: {exc}")
    return models


def _run_gpu(model, x: np.ndarray) -> np.ndarray:
    inp, out = model.create_input_buffers(0), model.create_output_buffers(0)
    inp[0].write(np.ascontiguousarray(x.ravel(), np.float32))
    model.run_by_index(0, inp, out)
    return out[0].read(int(np.prod(SHAPE)), np.float32).reshape(SHAPE)


@pytest.mark.parametrize("mode", ["fp16", "fp32"])
def test_gpu_delegate_matches_host(gpu_models, mode):
    model = gpu_models[mode]
    assert model.is_fully_accelerated()
    for name in GPU_SIGNALS:
        got = _run_gpu(model, _signals()[name])
        label = f"GPU {mode} {name}"
        assert np.isfinite(got).all(), label
        if mode == "fp32":
            _assert_f32(got, name, label)
        elif name == "silence":
            np.testing.assert_array_equal(got, -100.0)
        else:
            assert (got != 0).any() and (got > -100.0).any(), f"{label}: all zero or all at the floor"
            _assert_close(got, _host(name), GPU_F16_TOL, label)
            assert _errors(got, _host(name), GPU_F16_TOL)[60.0][1] <= GPU_F16_MEAN_TOL, label
