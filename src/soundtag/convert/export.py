"""Convert a PANNs body (convert/family.py) to LiteRT (fp32, fp16, int8) with litert-torch, prove it,
then write it, with its spec (spec.py) inside each model file.

Workarounds for litert-torch silent-corruption bugs (both open upstream):
- #1061: the constant cache is keyed by the storage address of ``x.contiguous().detach().cpu()``;
  for a non-contiguous or temporary constant that copy is freed and its address reused, so a later
  constant can silently receive an earlier one's values. We fold every constant ourselves (BatchNorm
  into the conv weights, bn0 into a per-mel scale/shift), make each one contiguous CPU float32 so
  that call returns the tensor itself, and keep all of them alive (``_ExportBody.keepalive``) for the
  whole conversion.
- #1238: since 0.9 a non-contiguous constant is written in storage order -> every constant is
  contiguous (asserted before conversion).
And none of that is trusted: every model is compared with the PyTorch body on several inputs and
refused (nothing written) when it misses the gate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import features
from ..errors import ValidationError
from ..files import atomic_write_bytes, file_digest
from ..model import GPU_CHECKS
from ..spec import CNN14, CNN14_FRONT_END, FrontEnd, ModelSpec, embed_spec
from .cnn14 import Cnn14Body, decision_level, shifted_time_pools
from .family import ARCHITECTURES, Architecture, load
from .frontend import LogmelFrontEnd
from .head import WithClassifier
from .winograd import WidthTwoConv3x3, WinogradConv3x3
from .validate import (GATES, GPU_GATES, MAX_TENSOR_BYTES, SED_GPU_GATES, WAVEFORM_GPU_GATES, ModelOutputs, compare, gpu_parity,
                       inspect_graph, run_tflite)

log = logging.getLogger(__name__)

CNN14_ARCH = ARCHITECTURES["Cnn14"]
MODEL_FILES = {p: CNN14_ARCH.file(p) for p in ("fp32", "fp16", "int8")}  # cnn14_audioset_{p}.tflite
# `soundtag convert --waveform`: waveform [1, 320000] in, the log-mel in the graph (32 kHz front ends)
WAVEFORM_FILES = {p: CNN14_ARCH.file(p, waveform=True) for p in ("fp32", "fp16")}
REPORT_FILE = "conversion_report.json"  # Cnn14's; other architectures: report_file(arch)
LABELS_TXT = "audioset_labels.txt"
PRECISIONS = tuple(MODEL_FILES)
DEFAULT_PRECISIONS = ("fp32", "fp16")
# block -> Winograd output tile m of F(m x m, 3x3), measured per layer (bench/profile_blocks.py, README):
# F(4x4) where the feature map is at least 4 wide (blocks 2-5), F(2x2) in block 6 (31 x 2: a 4x4 tile
# would compute as many zeros as values; 2 wide, it takes WidthTwoConv3x3's 12 GEMMs instead of 16),
# direct in block 1 (64 channels: the transforms cost more than the 4x fewer multiply-adds save)
WINOGRAD_BLOCKS = {2: 4, 3: 4, 4: 4, 5: 4, 6: 2}
# The GPU layout (issue #8): each convolution sums over at most this many input channels per op and
# adds the partial outputs. No weight tensor then exceeds WebGPU's 128 MiB binding limit (block 6's
# 2048x2048x3x3 weights are 144 MiB in fp32), and in the GPU's fp16 mode, where every op accumulates
# in float16, no sum runs long: with groups of 32 channels ML Drift also keeps its own Winograd
# F(4x4, 3x3) (used from 64 channels on, 3x the fp16 error here) off the layer. Measured on the
# synthetic CNN14, GPU fp16 mode vs CPU, min corr over the validation inputs (bench numbers in README):
# direct unsplit 0.99965, groups of 256 0.99982, of 64 0.99989, of 32 0.99992.
LAYOUTS = {  # precision -> (Winograd blocks, input channels per direct conv group, per Winograd GEMM group)
    "fp32": (WINOGRAD_BLOCKS, None, 256),  # CPU speed first; on a GPU exact in fp32 mode (fp16 mode: corr 0.9993)
    "fp16": ({}, 32, None),  # the GPU model: fp16-mode parity first (CPU: 6 % faster than unsplit, too)
    "int8": ({}, None, None),  # a CPU variant, not run on a GPU: unsplit (groups of 256 cost it 6 % here)
}
NO_WINOGRAD_GROUP = 256  # `--no-winograd` fp32: direct convolutions over groups of 256 input channels
AEQ_CHUNK_BYTES = 32 * 1024 * 1024  # ai-edge-quantizer 0.10 chunks weights above this size (#472)


class _ExportBody(nn.Module):
    """CNN14 body with every BatchNorm folded into constants, for conversion only.

    Blocks in ``winograd`` (1-based block -> output tile m) run their 3x3 convolutions as Winograd
    F(m x m, 3x3); the others directly.
    ``direct_group`` / ``winograd_group``: input channels per partial sum (see LAYOUTS); None: one.
    With ``embedding`` the model has a second output: the 2048-d embedding (fc1 + ReLU), as upstream.
    ``folded``: the 12 convolutions' (weight, bias) to use instead of folded_convs(body) (int8.calibrate's).
    """

    def __init__(self, body: Cnn14Body, winograd: dict[int, int] | None = None, embedding: bool = False,
                 direct_group: int | None = None, winograd_group: int | None = None, gemm: str = "conv",
                 logmel_shape: tuple[int, int] = (CNN14.frames, CNN14_FRONT_END.n_mels), head: nn.Module | None = None,
                 folded: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        super().__init__()
        keep: list[torch.Tensor] = []
        winograd = dict(winograd or {})

        def const(t: torch.Tensor) -> torch.Tensor:
            c = t.detach().to(torch.float32).contiguous().clone()
            assert c.is_contiguous() and c.device.type == "cpu"
            keep.append(c)
            return c

        scale, shift = _bn_affine(body.bn0)
        self.bn0_scale = const(scale.reshape(1, 1, 1, -1))
        self.bn0_shift = const(shift.reshape(1, 1, 1, -1))
        self.convs: list = []  # callables x -> relu(conv(x) + b), two per block
        h, w = logmel_shape  # frames, mel bins of the model's window
        convs = iter(folded if folded is not None else folded_convs(body))
        for number, pool in enumerate(Cnn14Body.POOLS, 1):
            m = winograd.get(number)
            # block 6 (2 wide): WidthTwoConv3x3's 12 GEMMs, not 16; F(m x m) with an even m pools in its tiles
            form = WidthTwoConv3x3 if (m, w) == (2, 2) else WinogradConv3x3
            in_tiles = form is WinogradConv3x3 and pool == 2 and m is not None and m % 2 == 0
            for second in (False, True):
                weight, t = next(convs)
                if m is None:
                    self.convs.append(_DirectConv(weight, t, const, direct_group))
                else:
                    self.convs.append(form(weight, t, h, w, const, winograd_group, m, gemm,
                                           pool=2 if in_tiles and second else 1))
            h, w = h // pool, w // pool
        self.pools = Cnn14Body.POOLS
        self.fc1 = (const(body.fc1.weight), const(body.fc1.bias))
        if body.FRAMES_PER_SEGMENT is not None:  # a DecisionLevel (SED) body: its own tail, as its module
            import copy

            self.decision = nn.ModuleList([copy.deepcopy(body.fc1), copy.deepcopy(body.head())]).eval()
        else:
            self.decision = None
            self.fc2 = (const(body.fc_audioset.weight), const(body.fc_audioset.bias))
        self.keepalive = keep  # litert-torch #1061: no constant may be freed during conversion
        self.embedding = embedding
        self.head = head  # a trained head (convert/head.py): embedding -> the model's probabilities

    def forward(self, logmel: torch.Tensor):
        x = logmel * self.bn0_scale + self.bn0_shift
        for i, pool in enumerate(self.pools):
            for conv in self.convs[2 * i : 2 * i + 2]:
                x = conv(x)
            if pool > 1 and not self.pools_in_tiles(i):
                x = F.avg_pool2d(x, pool)
        if self.decision is not None:
            return decision_level(x, self.decision[0], self.decision[1], shifted_time_pools)  # (clipwise, segmentwise)
        x = x.mean(dim=3)
        x = torch.amax(x, dim=2) + x.mean(dim=2)
        emb = F.relu(F.linear(x, *self.fc1))
        probs = torch.sigmoid(F.linear(emb, *self.fc2)) if self.head is None else self.head(emb)
        return (probs, emb) if self.embedding else probs


    def pools_in_tiles(self, i: int) -> bool:
        """Whether block i (0-based)'s second convolution computes the block's average pool itself."""
        return getattr(self.convs[2 * i + 1], "pool", 1) > 1


class _DirectConv:
    """relu(conv2d(x, w, b, padding=1)), summed over groups of at most ``group`` input channels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, const, group: int | None) -> None:
        cin = weight.shape[1]
        self.group = min(group or cin, cin)
        self.weights = [const(weight[:, k : k + self.group]) for k in range(0, cin, self.group)]
        self.bias = const(bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.weights) == 1:
            return F.relu(F.conv2d(x, self.weights[0], self.bias, padding=1))
        y = None
        for k, w in enumerate(self.weights):
            part = F.conv2d(x[:, k * self.group : (k + 1) * self.group], w, None, padding=1)
            y = part if y is None else y + part
        return F.relu(y + self.bias.reshape(1, -1, 1, 1))


def folded_convs(body: Cnn14Body) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The body's 12 convolutions with their BatchNorms folded in: (weight [O, C, 3, 3], bias [O]), float64."""
    out = []
    for block in body.blocks():
        for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
            s, t = _bn_affine(bn)
            out.append((conv.weight.detach().double() * s.reshape(-1, 1, 1, 1), t))
    return out


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, computed in float64."""
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shift = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
    return scale, shift


class _PlainExport(nn.Module):
    """A "plain" layout body (family.Architecture.layout) as it is, in eval mode: its BatchNorms are
    left to the converter, its parameters are the module's own contiguous tensors (kept alive by it for
    the whole conversion: litert-torch #1061), and the gates below decide. Outputs (probs, embedding)
    with ``embedding``; ``head``: a trained head (convert/head.py) instead of the body's classifier."""

    def __init__(self, body: nn.Module, embedding: bool, head: nn.Module | None = None) -> None:
        super().__init__()
        import copy

        body = copy.deepcopy(body).eval()
        for parent in list(body.modules()):  # no weight over WebGPU's 128 MiB binding limit (ResNet38, Wavegram)
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and child.weight.numel() * 4 > MAX_TENSOR_BYTES:
                    setattr(parent, child_name, _SplitConv2d(child))
        for name, t in list(body.named_parameters()) + list(body.named_buffers()):
            assert t.is_contiguous(), name  # litert-torch #1238: a non-contiguous constant is written wrongly
        self.body, self.embedding, self.head = body, embedding, head

    def forward(self, *inputs: torch.Tensor):
        emb = self.body.embed(*inputs)
        probs = self.body.classify(emb) if self.head is None else self.head(emb)
        return (probs, emb) if self.embedding else probs


class _SplitConv2d(nn.Module):
    """A Conv2d as the sum of convolutions over groups of input channels, each weight under
    MAX_TENSOR_BYTES in fp32 (as _DirectConv's groups do in the cnn14 layout)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        assert conv.groups == 1 and conv.padding_mode == "zeros"
        cin = conv.in_channels
        per = max(1, MAX_TENSOR_BYTES // (4 * conv.weight[:, :1].numel()))
        self.group = 1 << (min(per, cin).bit_length() - 1)  # a power of two that fits
        for i, k in enumerate(range(0, cin, self.group)):
            self.register_buffer(f"w{i}", conv.weight.detach()[:, k : k + self.group].contiguous().clone())
        self.parts = -(-cin // self.group)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for i in range(self.parts):
            part = F.conv2d(x[:, i * self.group : (i + 1) * self.group], getattr(self, f"w{i}"), None,
                            self.stride, self.padding, self.dilation)
            y = part if y is None else y + part
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


class _WaveformInputs(nn.Module):
    """Waveform [1, window] -> (waveform, in-graph log-mel) for a body that takes both (Wavegram). The
    body's bn0 moves into the front end (frontend.LogmelFrontEnd's ``mel_affine``: after the front end's
    reshape, LiteRT's GPU delegate broadcast it wrong, corr 0.93 vs the CPU in both GPU modes)."""

    def __init__(self, inner: _PlainExport) -> None:
        super().__init__()
        bn0 = getattr(inner.body, "bn0", None)  # the export's own copy of the body
        affine = None
        if isinstance(bn0, nn.BatchNorm2d):
            affine = _bn_affine(bn0)
            inner.body.bn0 = nn.Identity()
        self.front, self.inner = LogmelFrontEnd(mel_affine=affine), inner

    def forward(self, wave: torch.Tensor):
        return self.inner(wave, self.front(wave))


def _validation_waves(seed: int = 0, fe: FrontEnd = CNN14_FRONT_END, n: int = CNN14.window_samples) -> dict[str, np.ndarray]:
    """White noise, a chirp (50 Hz - the front end's fmax) and recorded speech, one window each at the
    front end's rate."""
    from ..audio import load_audio

    rng = np.random.default_rng(seed)
    sr = fe.sample_rate
    t = np.arange(n) / sr
    f0, f1 = 50.0, float(fe.fmax)
    chirp = 0.5 * np.sin(2 * np.pi * f0 * (t[-1] / np.log(f1 / f0)) * ((f1 / f0) ** (t / t[-1]) - 1))
    speech, _, _ = load_audio(_asset_path("speech_espeak.flac"), sample_rate=sr)
    speech = np.pad(speech[:n], (0, max(0, n - speech.size)))
    return {"noise": 0.1 * rng.standard_normal(n), "chirp": chirp, "speech": speech}


def validation_inputs(seed: int = 0, spec: ModelSpec = CNN14) -> dict[str, np.ndarray]:
    """Named log-mel inputs [1, 1, frames, mels] of a spec's front end and window (CNN14: [1,1,1001,64]):
    random log-mel, white noise, a chirp and recorded speech."""
    rng = np.random.default_rng(seed)
    fe, frames = spec.front_end, spec.frames
    waves = _validation_waves(seed, fe, spec.window_samples)
    rng.standard_normal(spec.window_samples)  # the draw the noise took: the random log-mel stays as it was
    out = {"random_logmel": rng.normal(-40.0, 20.0, (frames, fe.n_mels)).clip(-100, 40)}
    out.update({k: features.logmel(v, fe) for k, v in waves.items()})
    return {k: np.ascontiguousarray(v, np.float32).reshape(1, 1, frames, fe.n_mels) for k, v in out.items()}


def _asset_path(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("soundtag.assets").joinpath(name)))


def reference_outputs(body: nn.Module, inputs: dict[str, np.ndarray], spec: ModelSpec = CNN14,
                      head: nn.Module | None = None) -> ModelOutputs:
    """The PyTorch body's probabilities and embeddings per named input (a log-mel; for a body that
    takes the waveform and its log-mel, the waveform, whose host log-mel it gets beside it); with
    ``head``, its probabilities instead of the body's classifier's."""
    probs, embs, segs = {}, {}, {}
    with torch.inference_mode():
        for k, v in inputs.items():
            if getattr(body, "FRAMES_PER_SEGMENT", None) is not None:  # SED: (clipwise, segmentwise)
                clip, seg = body(*_body_inputs(body, v, spec))
                probs[k], segs[k] = clip.double().numpy()[0], seg.double().numpy()[0]
                continue
            emb = body.embed(*_body_inputs(body, v, spec))
            embs[k] = emb.double().numpy()[0]
            probs[k] = (body.classify if head is None else head)(emb).double().numpy()[0]
    return ModelOutputs(probs, embs or None, segs or None)


def _body_inputs(body: nn.Module, x: np.ndarray, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    if tuple(getattr(body, "INPUTS", ("logmel",))) == ("waveform", "logmel"):
        lm = features.logmel(x.reshape(-1), spec.front_end).reshape(1, 1, spec.frames, spec.front_end.n_mels)
        return torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(lm)
    return (torch.from_numpy(x),)


def to_fp32_tflite(body: nn.Module, layout: tuple = ({}, None, None), embedding: bool = True,
                   arch: Architecture = CNN14_ARCH, spec: ModelSpec = CNN14, head: nn.Module | None = None,
                   folded: list | None = None) -> bytes:
    """litert-torch conversion of a body: for the cnn14 layout, the folded body in a layout of LAYOUTS
    (Winograd blocks, direct group, Winograd group); for a plain one, the module itself; with ``head``,
    a trained head after the embedding instead of the body's classifier; ``folded``: the cnn14 layout's
    convolutions to use (_ExportBody). Returns the flatbuffer bytes (unvalidated, without a spec)."""
    try:
        import litert_torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("conversion needs litert-torch: pip install 'soundtag[convert]'") from exc
    if arch.inputs == ("waveform", "logmel"):
        export = _WaveformInputs(_PlainExport(body, embedding, head)).eval()
        sample = (torch.zeros(1, spec.window_samples),)
    else:
        if arch.layout == "cnn14":
            export = _ExportBody(body, layout[0], embedding, layout[1], layout[2],
                                 logmel_shape=(spec.frames, spec.front_end.n_mels), head=head, folded=folded).eval()
        else:
            export = _PlainExport(body, embedding, head).eval()
        sample = (torch.zeros(1, 1, spec.frames, spec.front_end.n_mels),)
    with torch.inference_mode():
        edge = litert_torch.convert(export, sample)
    data = edge.model_content() if callable(getattr(edge, "model_content", None)) else edge.model_content
    del edge
    return bytes(data)


class _WaveformBody(nn.Module):
    """Waveform [1, 320000] -> the log-mel front end (frontend.py) -> the folded body -> probabilities."""

    def __init__(self, body: Cnn14Body, layout: tuple) -> None:
        super().__init__()
        self.front = LogmelFrontEnd()
        self.body = _ExportBody(body, layout[0], False, layout[1], layout[2])

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.body(self.front(wave))


def to_waveform_tflite(body: Cnn14Body, layout: tuple, precision: str) -> bytes:
    """The waveform model (single output, like the fp16 model card's), fp32 or fp16 weights."""
    import litert_torch

    export = _WaveformBody(body, layout).eval()
    with torch.inference_mode():
        edge = litert_torch.convert(export, (torch.zeros(1, CNN14.window_samples),))
    data = edge.model_content() if callable(getattr(edge, "model_content", None)) else edge.model_content
    del edge
    # litert-torch names each op's output tensor after its module path: the front end's contain this
    return to_fp16_tflite(bytes(data), (type(export.front).__name__,)) if precision == "fp16" else bytes(data)


def validation_waveforms(seed: int = 0) -> dict[str, np.ndarray]:
    """Named waveforms [1, 320000] for the waveform models: the log-mel inputs' noise, chirp and speech,
    plus full-scale clipping (noise at 4x full scale clipped to +-1) and near-silence (noise at 1e-5)."""
    rng = np.random.default_rng(seed + 1)
    n = CNN14.window_samples
    waves = _validation_waves(seed)  # a fresh dict
    waves["clipping"] = np.clip(4.0 * rng.standard_normal(n), -1.0, 1.0)
    waves["near_silence"] = 1e-5 * rng.standard_normal(n)
    return {k: np.ascontiguousarray(v, np.float32).reshape(1, n) for k, v in waves.items()}


def to_fp16_tflite(fp32: bytes, keep_float32: tuple[str, ...] = (), ops: tuple[str, ...] = ("*",)) -> bytes:
    """float16 weights (FC and conv constants) with explicit DEQUANTIZE, via ai-edge-quantizer.

    Ops whose output tensor names match a regex of ``keep_float32`` keep float32 constants: the
    waveform model's front end, whose DFT in float16 weights would leak ~-66 dB under each frame's
    peak into every other bin (speech corr 0.977, a chirp 0.51 vs the fp32 front end). ``ops``: the
    op types whose constants become float16 (PLAIN_FP16_OPS for the plain layouts)."""
    recipe = [dict(_aeq_rule("float_casting", {"num_bits": 16, "dtype": "FLOAT"}, "FLOAT", True), operation=op)
              for op in ops]
    recipe += [{"regex": scope, "operation": "*", "algorithm_key": "no_quantize", "op_config": {}} for scope in keep_float32]
    return _quantize(fp32, recipe)


def to_int8_tflite(fp32: bytes, keep_float: tuple[str, ...] = (), keep_first: int = 0,
                   keep_scopes: tuple[str, ...] = ()) -> bytes:
    """Dynamic-range int8 (ai-edge-quantizer's dynamic_wi8_afp32 recipe); the layers named in
    ``keep_float`` (INT8_LAYERS: "block1.conv1" ... "block6.conv2", "fc1", "fc_audioset") keep float32
    weights and arithmetic.

    ai-edge-quantizer 0.10 fails on weights over 32 MiB (CNN14 blocks 5-6, fc1) because its chunked
    path broadcasts per-channel scales [O,1,1,1] onto a 2-D view (upstream ai-edge-quantizer #472).
    _aeq_no_chunking keeps such tensors off that path.
    """
    recipe = [
        _aeq_rule(
            "min_max_uniform_quantize",
            {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
            "INTEGER",
            False,
        )
    ]
    names = dict(zip(INT8_LAYERS, weighted_op_outputs(fp32))) if keep_float else {}
    unknown = [k for k in keep_float if k not in names]
    if unknown:
        raise ValueError(f"unknown layer {unknown[0]!r}; choose from {', '.join(INT8_LAYERS)}")
    if keep_first:  # any architecture: its first convolutions (in graph order) by their output names
        first = [n for n in weighted_op_outputs(fp32, expected=None) if not any(sc in n for sc in keep_scopes)][:keep_first]
        names.update({f"op{i}": n for i, n in enumerate(first)})
        keep_float = tuple(keep_float) + tuple(f"op{i}" for i in range(len(first)))
    # ai-edge-quantizer searches the regex in a string that holds the op's output name (anchors fail);
    # litert-torch's names nest (";6" inside ";;...;6", ";3" a prefix of ";31"), hence the guards
    recipe += [{"regex": "(?<!;)" + re.escape(names[k]) + r"(?!\d)", "operation": "*", "algorithm_key": "no_quantize",
                "op_config": {}} for k in keep_float]
    # ops whose output names hold one of keep_scopes (a module's name: the waveform front end) stay float
    recipe += [{"regex": scope, "operation": "*", "algorithm_key": "no_quantize", "op_config": {}} for scope in keep_scopes]
    with _aeq_no_chunking():
        return _quantize(fp32, recipe)


INT8_LAYERS = tuple(f"block{b}.conv{c}" for b in range(1, 7) for c in (1, 2)) + ("fc1", "fc_audioset")
# The int8 CNN14 keeps only its first convolution in float32 (1 input channel: 0.04 G of its 20 G
# multiply-adds; its 9 weights per channel round worst of all). The others are int8 with calibrated
# weights (int8.calibrate): GPTQ rounding in INT8_GPTQ_LAYERS, nearest in the rest (blocks 5-6: few
# positions per window for their 4608-18432 inputs per output), every bias corrected. Measured (issue #22,
# bench/int8_error.py): nearest rounding with block 1 and block2.conv1 in float32, what shipped before,
# min corr 0.99911 vs PyTorch at 77 ms per window on a Zen 4; all but block1.conv1 int8 and nearest,
# 0.99507; calibrated, docs/speed.md.
INT8_FLOAT_LAYERS = ("block1.conv1",)
INT8_GPTQ_LAYERS = tuple(k for k in INT8_LAYERS[:8] if k not in INT8_FLOAT_LAYERS)  # blocks 1-4


def int8_folded(body: Cnn14Body, spec: ModelSpec = CNN14) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The body's folded convolutions with calibrated int8 weights and biases (int8.calibrate) on
    int8.calibration_inputs of its front end."""
    from .int8 import calibrate, calibration_inputs

    scale, shift = _bn_affine(body.bn0)
    index = {name: i for i, name in enumerate(INT8_LAYERS)}
    return calibrate((scale.reshape(1, 1, 1, -1), shift.reshape(1, 1, 1, -1)), folded_convs(body), Cnn14Body.POOLS,
                     calibration_inputs(spec), {index[k] for k in INT8_FLOAT_LAYERS}, {index[k] for k in INT8_GPTQ_LAYERS})


def int8_calibration_note() -> dict:
    """What the int8 CNN14's conversion report says about its calibration."""
    from .int8 import CALIBRATION_SEED, CALIBRATION_WINDOWS, DAMPING

    return {"method": "GPTQ rounding (Frantar et al. 2022) + empirical bias correction (Nagel et al. 2019)",
            "gptq_layers": list(INT8_GPTQ_LAYERS), "nearest_rounding": [k for k in INT8_LAYERS[:12] if k not in
                                                                        INT8_GPTQ_LAYERS + INT8_FLOAT_LAYERS],
            "windows": CALIBRATION_WINDOWS, "audio": "synthetic (int8.calibration_waves), not the validation inputs",
            "seed": CALIBRATION_SEED, "damping": DAMPING}
# The plain layouts keep their first convolutions float for the same reason (the log-mel's widest
# range): measured on the synthetic Cnn10, all int8 corr 0.99777 vs PyTorch, under the 0.998 gate.
PLAIN_INT8_FLOAT_OPS = 3
# The plain layouts' fp16 casts convolutions and dense layers only: their unfolded BatchNorms' MUL/ADD
# constants (shift = beta - mean * scale, large and cancelling) and the depthwise kernels stay float32
# (a few kB). Synthetic MobileNetV1: every constant float16 corr 0.99959, these 0.99990 (gate 0.9999).
PLAIN_FP16_OPS = ("CONV_2D", "FULLY_CONNECTED")


def weighted_op_outputs(model: bytes, expected: int | None = len(INT8_LAYERS)) -> list[str]:
    """Output tensor names of the convolutions and fully connected layers of a direct-layout model,
    in graph order (INT8_LAYERS); ai-edge-quantizer's recipes select ops by these names."""
    from ai_edge_litert import schema_py_generated as schema

    codes = {schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D,
             schema.BuiltinOperator.FULLY_CONNECTED}
    m = schema.Model.GetRootAs(model, 0)
    sg = m.Subgraphs(0)
    out = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        oc = m.OperatorCodes(op.OpcodeIndex())
        if max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()) in codes:
            out.append(sg.Tensors(op.Outputs(0)).Name().decode())
    if expected is not None and len(out) != expected:
        raise ValueError(f"expected {len(INT8_LAYERS)} convolutions and dense layers (direct layout), found {len(out)}")
    return out


def _aeq_rule(algorithm: str, weight_cfg: dict, compute: str, explicit_dq: bool) -> dict:
    return {
        "regex": ".*",
        "operation": "*",
        "algorithm_key": algorithm,
        "op_config": {
            "weight_tensor_config": weight_cfg,
            "compute_precision": compute,
            "explicit_dequantize": explicit_dq,
            "skip_checks": False,
            "min_weight_elements": 0,
        },
    }


def _quantize(fp32: bytes, recipe: list) -> bytes:
    try:
        from ai_edge_quantizer import quantizer
    except ImportError as exc:  # pragma: no cover
        raise ImportError("quantization needs ai-edge-quantizer: pip install 'soundtag[convert]'") from exc
    qt = quantizer.Quantizer(bytearray(fp32), recipe)
    result = qt.quantize(enable_progress_report=False)
    return bytes(result.quantized_model)


class _aeq_no_chunking:
    """Context manager working around ai-edge-quantizer #472 (0.10): for weights over 32 MiB its
    uniform_quantize() takes a chunked path that broadcasts per-channel scales [O,1,1,1] onto a 2-D
    view and fails. We split such a tensor along its quantized (per-channel) axis into slices under
    16 MiB, quantize each slice with its own scales through the regular path, and concatenate:
    the same per-channel arithmetic, never the broken branch. All callers in the package look the
    function up on its module, so patching the module attribute covers them; it is restored on exit.
    """

    def __enter__(self):
        from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

        self._module, self._original = uqt, uqt.uniform_quantize
        original = self._original

        def uniform_quantize(tensor_data, quantization_params, is_blockwise_quant=False):
            axis = quantization_params.quantized_dimension
            scale = np.asarray(quantization_params.scale)
            zero = np.asarray(quantization_params.zero_point)
            if (
                is_blockwise_quant
                or tensor_data.ndim < 2
                or tensor_data.nbytes <= AEQ_CHUNK_BYTES
                or axis is None
                or scale.size != tensor_data.shape[axis]
            ):
                return original(tensor_data, quantization_params, is_blockwise_quant)
            step = max(1, tensor_data.shape[axis] * AEQ_CHUNK_BYTES // (2 * tensor_data.nbytes))
            parts = []
            for k in range(0, tensor_data.shape[axis], step):
                index = np.arange(k, min(k + step, tensor_data.shape[axis]))
                params = dataclasses.replace(
                    quantization_params,
                    scale=scale.reshape(-1)[index],
                    zero_point=zero.reshape(-1)[index] if zero.size == scale.size else zero,
                    quantized_data=None,
                )
                parts.append(original(np.take(tensor_data, index, axis=axis), params))
            return np.concatenate(parts, axis=axis)

        uqt.uniform_quantize = uniform_quantize
        return self

    def __exit__(self, *exc):
        self._module.uniform_quantize = self._original
        return False


@dataclass
class ConversionResult:
    report: dict
    written: list[Path]


def report_file(arch: Architecture) -> str:
    """The conversion report's name: conversion_report.json for Cnn14 (as before the family), else
    {arch}_conversion_report.json, so the models of several architectures share a folder."""
    return REPORT_FILE if arch.name == "Cnn14" else f"{arch.name.lower()}_{REPORT_FILE}"


def mel_basis_file(fe: FrontEnd) -> str:
    """mel_basis.bin for CNN14's front end (the model card's file), mel_basis_{rate}hz_{n_fft}.bin else."""
    return features.MEL_BASIS_FILE if fe == CNN14_FRONT_END else f"mel_basis_{fe.sample_rate}hz_{fe.n_fft}.bin"


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    precisions: tuple[str, ...] | None = None,
    gates: dict | None = None,
    winograd: bool = True,
    gpu_check: str = "auto",
    waveform: bool = False,
    arch: str | None = None,
) -> ConversionResult:
    """Convert, validate and (only if every model passes) write models, assets and report.

    The architecture comes from the checkpoint (family.detect: tensor names and shapes, the front
    end's tensors, the upstream file name) or ``arch``; every model carries its spec (spec.py).
    For the cnn14 layout, fp32 runs blocks 2-6 as Winograd convolutions when ``winograd`` (CPU speed,
    bigger file); fp16 and int8 use direct convolutions. Layouts: LAYOUTS. ``gpu_check`` (GPU_CHECKS):
    where LiteRT's GPU accelerator runs, the fp32 and fp16 models also run on it, in fp16 and fp32
    mode, held to GPU_GATES against their CPU run (about a minute per model on a software GPU); "auto"
    records a missing GPU and warns about a disagreeing one, "require" refuses to write models in
    either case. With ``waveform``, also the waveform models of fp32/fp16 among ``precisions``
    (32 kHz front ends): waveform in, the log-mel front end in the graph, held to the same gates
    against the PyTorch body on the host log-mel.

    ``precisions`` None: the architecture's own (family.Architecture.precisions: fp32 and fp16 for most).
    Raises ValidationError (after writing the report, but no model) when any model misses its gate.
    """
    t0 = time.perf_counter()
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    gates = {**GATES, **(gates or {})}
    bad = [p for p in precisions or () if p not in MODEL_FILES]
    if bad:
        raise ValueError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    if gpu_check not in GPU_CHECKS:  # model.GPU_CHECKS says what each means
        raise ValueError(f"unknown GPU check {gpu_check!r}; choose from {', '.join(GPU_CHECKS)}")
    md5 = file_digest(checkpoint, "md5")
    a, body = load(checkpoint, arch, md5)
    precisions = tuple(precisions or a.precisions)
    wave_in = a.inputs != ("logmel",)  # the body takes the waveform itself (Wavegram): every model is waveform-in
    if waveform and (a.front_end != CNN14_FRONT_END or a.layout != "cnn14" or a.frames_per_segment):
        raise ValueError(f"--waveform builds the 32 kHz CNN14 front end into the graph; {a.name} "
                         f"({a.front_end.describe()}) has no waveform model yet")
    base = a.spec(None, md5, wave_in, embedding=True)
    inputs = validation_waveforms() if wave_in else validation_inputs(spec=base)
    reference = reference_outputs(body, inputs, base)
    report: dict = {
        "checkpoint": {"path": str(checkpoint), "bytes": checkpoint.stat().st_size, "md5": md5},
        "architecture": a.name,
        "front_end": dataclasses.asdict(a.front_end),
        "published_map": a.published_map,
        "inputs": list(inputs),
        "reference": f"PyTorch {type(body).__name__} (soundtag.convert.{a.body.split(':')[0]}), eval mode, float32",
        "models": {},
        "gpu_check": gpu_check,
        "versions": _versions(),
    }
    # fp32 and int8 (CPU models) carry the embedding as a second output; fp16 keeps the model card's
    # single-output signature, a drop-in for its Android code.
    blobs: dict[str, bytes] = {}
    if a.layout == "cnn14":
        layouts = dict(LAYOUTS, fp32=LAYOUTS["fp32"] if winograd else ({}, NO_WINOGRAD_GROUP, None))
    else:
        layouts = {p: ({}, None, None) for p in PRECISIONS}

    def convert(layout: tuple, embedding: bool) -> bytes:
        return to_fp32_tflite(body, layout, embedding, a, base)

    def with_spec(data: bytes, precision: str, embedding: bool) -> bytes:
        return embed_spec(data, a.spec(precision, md5, wave_in, embedding))

    fp32 = with_spec(convert(layouts["fp32"], True), "fp32", True)
    direct = None
    calibrated = a.layout == "cnn14" and not wave_in  # int8 weights by GPTQ + bias correction (convert/int8.py)
    if "int8" in precisions:
        if calibrated:
            direct = to_fp32_tflite(body, layouts["int8"], True, a, base, folded=int8_folded(body, base))
        else:
            direct = fp32 if layouts["int8"] == layouts["fp32"] else convert(layouts["int8"], True)
    plain = convert(layouts["fp16"], False) if "fp16" in precisions else None
    keep_float = INT8_FLOAT_LAYERS if calibrated else ()
    keep_first = 0 if keep_float else PLAIN_INT8_FLOAT_OPS
    front_scope = (LogmelFrontEnd.__name__,) if wave_in else ()  # the in-graph DFT stays float32
    makers = {"fp32": lambda: fp32,
              "fp16": lambda: with_spec(to_fp16_tflite(plain, (LogmelFrontEnd.__name__,) if wave_in else (),
                                                       ("*",) if a.layout == "cnn14" else PLAIN_FP16_OPS), "fp16", False),
              "int8": lambda: with_spec(to_int8_tflite(direct, keep_float, keep_first, front_scope), "int8", True)}
    conv_form = {p: _describe_layout(layouts[p]) if a.layout == "cnn14" else
                 "as the PyTorch module (BatchNorm folded by the converter)" for p in precisions}
    fp32_out = run_tflite(fp32, inputs)
    for precision in precisions:
        data = makers[precision]()
        out = fp32_out if precision == "fp32" else run_tflite(data, inputs)
        gpu_gates = (WAVEFORM_GPU_GATES if wave_in else SED_GPU_GATES if a.frames_per_segment else GPU_GATES).get(precision)
        entry = _prove(a.file(precision), precision, conv_form[precision], data, out, reference, gates[precision],
                       gpu_gates, inputs, gpu_check, base)
        if precision == "int8":
            entry["float32_layers"] = (list(keep_float) or ([f"the first {keep_first} convolutions"] if keep_first else [])
                                       + [f"every op of {s}" for s in front_scope])
            if calibrated:
                entry["calibration"] = int8_calibration_note()
        if precision != "fp32":
            entry["fidelity_vs_fp32"] = dataclasses.asdict(compare(precision, fp32_out.probs, out.probs, {"min_corr": 0.0, "max_abs_diff": None}))
        report["models"][precision] = entry
        blobs[a.file(precision)] = data
        if _no_gpu_but_required(entry):  # no later model can pass: say so now, not after converting them
            waveform = False
            break
    del fp32, direct, plain, makers
    for precision in [p for p in precisions if p in WAVEFORM_FILES] if waveform else []:
        waves = validation_waveforms()
        ref = reference_outputs(body, {k: features.logmel(v[0]).reshape(1, 1, CNN14.frames, CNN14_FRONT_END.n_mels)
                                       for k, v in waves.items()})
        data = embed_spec(to_waveform_tflite(body, layouts[precision], precision), a.spec(precision, md5, True, False))
        out = run_tflite(data, waves)
        entry = _prove(a.file(precision, waveform=True), precision, "log-mel front end in the graph (convert/frontend.py), "
                       + conv_form[precision], data, out, ref, gates[precision],
                       WAVEFORM_GPU_GATES[precision], waves, gpu_check)
        entry["reference"] = f"PyTorch {type(body).__name__} on the host log-mel (features.logmel) of each waveform"
        report.setdefault("waveform_inputs", list(waves))
        report["models"][f"waveform_{precision}"] = entry
        blobs[a.file(precision, waveform=True)] = data
    report["passed"] = all(m["passed"] for m in report["models"].values())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if report["passed"]:
        for file, data in blobs.items():
            written.append(atomic_write_bytes(output_dir / file, data))
        basis = np.ascontiguousarray(features.mel_basis(a.front_end), dtype="<f4")
        written.append(atomic_write_bytes(output_dir / mel_basis_file(a.front_end), basis.tobytes()))
        names = "".join(lab.name + "\n" for lab in base.labels)
        written.append(atomic_write_bytes(output_dir / LABELS_TXT, names.encode()))
    written.append(atomic_write_bytes(output_dir / report_file(a), (json.dumps(report, indent=2) + "\n").encode()))
    if not report["passed"]:
        failed = [f"{p} (corr {m['parity_vs_pytorch']['min_corr']:.6f}, max|dp| "
                  f"{m['parity_vs_pytorch']['max_abs_diff']:.2e}, graph ok {m['graph']['passed']}"
                  + (f", {m['gpu']['finding']}" if m.get("gpu", {}).get("finding") else "") + ")"
                  for p, m in report["models"].items() if not m["passed"]]
        raise ValidationError(f"{checkpoint}: converted model failed validation: {', '.join(failed)}; "
                              f"no model written (see {output_dir / report_file(a)})")
    return ConversionResult(report, written)


def convert_with_head(checkpoint: str | Path, head: nn.Module, arch: str | None = None, append: bool = False,
                      winograd: bool = True, gpu_check: str = "auto", **spec_fields) -> tuple[bytes, dict]:
    """The fp32 model of a checkpoint's body with a trained ``head`` (convert/head.py) after its
    embedding, in place of the body's classifier (``append``: after the classifier's outputs):
    (flatbuffer bytes with its spec, report entry).

    Proven as every model is (``_prove``): the PyTorch body + head on the validation inputs (GATES
    "fp32"), the graph (one subgraph, GPU ops only) and, where LiteRT's GPU runs, the GPU vs the CPU.
    ``spec_fields``: what the model's spec says beyond the architecture's (labels, thresholds,
    training: spec.ModelSpec). Raises ValidationError when it misses a gate (nothing is returned to write)."""
    if gpu_check not in GPU_CHECKS:
        raise ValueError(f"unknown GPU check {gpu_check!r}; choose from {', '.join(GPU_CHECKS)}")
    checkpoint = Path(checkpoint)
    md5 = file_digest(checkpoint, "md5")
    a, body = load(checkpoint, arch, md5)
    if a.embedding_size is None:
        raise ValueError(f"{checkpoint}: {a.name} has no clip embedding to train a head on; use a clip model (Cnn14)")
    if append:
        head = WithClassifier(body.classify, head)
    wave_in = a.inputs != ("logmel",)
    base = a.spec(None, md5, wave_in, embedding=True)
    spec = dataclasses.replace(a.spec("fp32", md5, wave_in, True), **spec_fields)
    inputs = validation_waveforms() if wave_in else validation_inputs(spec=base)
    reference = reference_outputs(body, inputs, base, head)
    if a.layout == "cnn14":
        layout = LAYOUTS["fp32"] if winograd else ({}, NO_WINOGRAD_GROUP, None)
        form = _describe_layout(layout)
    else:
        layout, form = ({}, None, None), "as the PyTorch module (BatchNorm folded by the converter)"
    data = embed_spec(to_fp32_tflite(body, layout, True, a, base, head), spec)
    out = run_tflite(data, inputs)
    entry = _prove("<trained model>", "fp32", form, data, out, reference, GATES["fp32"],
                   (WAVEFORM_GPU_GATES if wave_in else GPU_GATES)["fp32"], inputs, gpu_check, base)
    entry["reference"] = f"PyTorch {type(body).__name__} + the trained head, eval mode, float32"
    if not entry["passed"]:
        par = entry["parity_vs_pytorch"]
        raise ValidationError(f"{checkpoint}: the model with the trained head failed validation (corr "
                              f"{par['min_corr']:.6f}, max|dp| {par['max_abs_diff']:.2e}, graph ok {entry['graph']['passed']}"
                              + (f", {entry['gpu']['finding']}" if entry.get("gpu", {}).get("finding") else "") + ")")
    return data, entry


def _prove(file: str, precision: str, form: str, data: bytes, out: ModelOutputs, reference: ModelOutputs,
           gate: dict, gpu_gates: dict | None, inputs: dict, gpu_check: str = "auto", spec: ModelSpec = CNN14) -> dict:
    """A model's report entry: parity vs PyTorch (probabilities, embedding), graph checks and, for a
    model with ``gpu_gates`` unless ``gpu_check`` is "off", the GPU accelerator's parity with the CPU run
    (gpu_verdict). ``passed`` says if it may be written."""
    parity = compare(precision, reference.probs, out.probs, gate)
    graph = inspect_graph(data)
    entry = {
        "file": file,
        "precision": precision,
        "convolutions": form,
        "outputs": [f"probabilities [1, {len(next(iter(out.probs.values())))}]"]
                   + ([f"embedding [1, {len(next(iter(out.embeddings.values())))}]"] if out.embeddings else []),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "parity_vs_pytorch": dataclasses.asdict(parity),
        "graph": dataclasses.asdict(graph),
        "passed": parity.passed and graph.passed,
    }
    if reference.segmentwise:  # SED: the framewise scores (upstream's framewise_output) over all frames
        frame_gate = {"min_corr": gate["framewise_min_corr"], "max_abs_diff": gate["framewise_max_abs_diff"]}
        fw = compare(precision, _framewise(reference.segmentwise, spec), _framewise(out.segmentwise, spec), frame_gate)
        entry["outputs"].append(f"segmentwise [1, {len(next(iter(reference.segmentwise.values())))}, "
                                f"{len(next(iter(out.probs.values())))}]")
        entry["framewise_parity_vs_pytorch"] = dataclasses.asdict(fw)
        entry["passed"] = entry["passed"] and fw.passed
    if out.embeddings:
        emb_gate = {"min_corr": gate["embedding_min_corr"], "max_abs_diff": None}
        emb = compare(precision, reference.embeddings, out.embeddings, emb_gate)
        entry["embedding_parity_vs_pytorch"] = dataclasses.asdict(emb)
        entry["passed"] = entry["passed"] and emb.passed
    if gpu_gates and entry["passed"]:
        if gpu_check == "off":
            entry["gpu"] = {"checked": False, "reason": "not checked (--gpu-check off)"}
        else:
            entry["gpu"] = gpu_verdict(gpu_parity(gpu_gates, data, inputs, out), gpu_check, file)
            entry["passed"] = entry["gpu"]["write"]
    log.info("%s: corr %.7f max|dp| %.2e graph %s gpu %s", file, parity.min_corr, parity.max_abs_diff, graph.passed,
             entry.get("gpu", {}).get("passed"))
    return entry


def _framewise(segmentwise: dict, spec: ModelSpec) -> dict:
    """{input: framewise [frames, classes]} of {input: segmentwise [steps, classes]} (sed.framewise:
    upstream's interpolate + pad_framewise_output), in the window of a SED model's ``spec``."""
    from ..sed import framewise

    return {k: framewise(np.asarray(v, np.float64), spec.frames_per_segment, spec.frames) for k, v in segmentwise.items()}


def _no_gpu_but_required(entry: dict) -> bool:
    gpu = entry.get("gpu", {})
    return gpu.get("required", False) and not gpu.get("checked", True)


def gpu_verdict(gpu: dict, gpu_check: str, file: str) -> dict:
    """A gpu_parity report with what it means for writing the model under ``gpu_check`` (GPU_CHECKS):
    ``checked``, ``write`` and, when the GPU was missing or disagreed, ``finding`` (one line; "auto"
    logs it as a warning for a GPU that disagreed, and only records a missing one)."""
    required = gpu_check == "require"
    gpu = {"checked": gpu["available"], **gpu, "required": required}
    if not gpu["available"]:
        gpu["finding"] = f"no GPU to check it on: {gpu['reason']}"
        gpu["write"] = not required
    elif not gpu["passed"]:
        modes = "; ".join(f"{mode} mode " + (r["error"] if "error" in r else f"corr {r['min_corr']:.6f}, max|dp| "
                                             f"{r['max_abs_diff']:.2e} vs gate {r['gate']}")
                          for mode, r in gpu["modes"].items() if not r["passed"])
        # a mode that failed its probe names the adapter itself; the report knows it only from a mode that loaded
        who = f"the GPU ({gpu['adapter']})" if "adapter" in gpu else "the GPU"
        gpu["finding"] = f"{who} disagrees with the CPU: {modes}"
        gpu["write"] = not required
        if not required:
            log.warning("%s written, but this machine's GPU driver disagrees with the CPU (a finding about the "
                        "driver; --gpu-check require makes it fatal): %s", file, gpu["finding"])
    else:
        gpu["write"] = True
    return gpu


def _describe_layout(layout: tuple) -> str:
    blocks, direct_group, winograd_group = layout
    parts = []
    if blocks:
        def tile(m: int, bs: list[int]) -> str:
            text = f"F({m}x{m},3x3) in block{'s' if len(bs) > 1 else ''} {', '.join(map(str, bs))}"
            two = m == 2 and all(CNN14_FRONT_END.n_mels >> (b - 1) == 2 for b in bs)  # WidthTwoConv3x3's blocks
            return text + (" as 12 GEMMs (2 wide: Karatsuba across the columns)" if two else "")
        parts.append("winograd " + ", ".join(tile(m, bs) for m, bs in _by_tile(blocks))
                     + (f" (GEMMs over groups of {winograd_group} input channels)" if winograd_group else ""))
    parts.append(("direct elsewhere" if blocks else "direct")
                 + (f" (groups of {direct_group} input channels)" if direct_group else ""))
    return ", ".join(parts)


def _by_tile(blocks: dict[int, int]) -> list[tuple[int, list[int]]]:
    """{block: m} as [(m, [blocks])], largest tile first: {2: 4, 3: 4, 6: 2} -> [(4, [2, 3]), (2, [6])]."""
    return [(m, sorted(b for b, t in blocks.items() if t == m)) for m in sorted(set(blocks.values()), reverse=True)]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("soundtag", "torch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
