"""Conversion: parity gates, graph checks, refusal of corrupted models, checkpoint loading."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from soundtag.convert import export
from soundtag.convert.cnn14 import CheckpointError, Cnn14Body, load_body
from soundtag.convert.validate import ValidationError, inspect_graph, run_tflite
from soundtag.features import mel_basis
from soundtag.labels import labels
from tests.fixtures import absent_gpu_env


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "soundtag", *map(str, args)], capture_output=True, text=True,
                          env=env or os.environ, timeout=timeout)


def test_report_gates_and_files(models):
    report = json.loads((models / "conversion_report.json").read_text())
    assert report["passed"] is True
    assert report["inputs"] == ["random_logmel", "noise", "chirp", "speech"]
    fp32, fp16, int8 = (report["models"][p] for p in ("fp32", "fp16", "int8"))
    assert fp32["parity_vs_pytorch"]["min_corr"] >= 0.99999
    assert fp32["parity_vs_pytorch"]["max_abs_diff"] <= 1e-4
    assert fp16["parity_vs_pytorch"]["min_corr"] >= 0.9999
    assert int8["parity_vs_pytorch"]["min_corr"] >= 0.999  # calibrated int8 weights (tests/test_int8.py)
    assert set(int8["fidelity_vs_fp32"]["per_input"]["speech"]) >= {"corr", "max_abs_diff", "top1_agree", "top5_overlap"}
    for m in (fp32, fp16, int8):
        g = m["graph"]
        assert g["subgraphs"] == 1 and g["max_rank"] <= 4 and g["gpu_ok"] and g["gpu_unsupported"] == []
        assert "model_builder.cc" in g["gpu_op_source"]
        assert (models / m["file"]).stat().st_size == m["bytes"]
    assert int8["bytes"] < 0.3 * fp32["bytes"] and int8["bytes"] < 0.55 * fp16["bytes"]
    # the GPU layout (issue #8): each 3x3 convolution summed over groups of input channels
    cins = (1, 64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024, 2048)  # per conv, blocks 1-6
    ops16, ops8, ops32 = fp16["graph"]["ops"], int8["graph"]["ops"], fp32["graph"]["ops"]
    assert ops16["CONV_2D"] + ops16.get("DEPTHWISE_CONV_2D", 0) == sum(-(-c // 32) for c in cins) == 189
    assert ops16["DEQUANTIZE"] >= 189  # fp16 weights, dequantized (GPU folds these)
    assert ops8["CONV_2D"] + ops8.get("DEPTHWISE_CONV_2D", 0) == 12  # int8, a CPU variant: unsplit
    assert fp16["convolutions"] == "direct (groups of 32 input channels)"
    assert int8["convolutions"] == "direct" and int8["float32_layers"] == ["block1.conv1"]
    # fp32: blocks 2-5 as Winograd F(4x4), block 6 as F(2x2): per group of 256 input channels one grouped
    # 1x1 CONV_2D holding the n² GEMMs (XNNPACK's weight cache packs CONV_2D, not BATCH_MATMUL), and per
    # convolution one output-transform GEMM by a constant, which is a FULLY_CONNECTED; block 1 direct
    assert fp32["convolutions"] == ("winograd F(4x4,3x3) in blocks 2, 3, 4, 5, F(2x2,3x3) in block 6 as 12 GEMMs (2 wide: "
                                    "Karatsuba across the columns) (GEMMs over groups of 256 input channels), direct elsewhere")
    assert "BATCH_MATMUL" not in ops32
    # the output transforms, the 2x2 average pools of blocks 2-5 inside their tiles, fc1 and fc_audioset
    assert ops32["FULLY_CONNECTED"] == 10 + 4 + 2 and ops32["AVERAGE_POOL_2D"] == 1  # block 1's (direct)
    # 2 direct + 10 Winograd input transforms (depthwise) + the GEMM parts
    assert ops32["CONV_2D"] + ops32.get("DEPTHWISE_CONV_2D", 0) == 2 + 10 + sum(-(-c // 256) for c in cins[2:]) == 37
    assert "DEQUANTIZE" not in fp32["graph"]["ops"]


def test_assets_written(models):
    basis = np.fromfile(models / "mel_basis.bin", dtype="<f4").reshape(64, 513)
    np.testing.assert_array_equal(basis, mel_basis())
    names = (models / "audioset_labels.txt").read_text().splitlines()
    assert len(names) == 527 and names[0] == "Speech" and names == [lab.name for lab in labels()]


def test_models_match_pytorch_on_fresh_inputs(models, body):
    """Inputs the converter never saw: a different seed of random log-mels and a loud scene."""
    rng = np.random.default_rng(123)
    inputs = {f"r{i}": rng.normal(-30, 25, (1, 1, 1001, 64)).astype(np.float32) for i in range(2)}
    with torch.inference_mode():
        ref = {k: body(torch.from_numpy(v)).double().numpy()[0] for k, v in inputs.items()}
    got32 = run_tflite((models / "cnn14_audioset_fp32.tflite").read_bytes(), inputs).probs
    got16 = run_tflite((models / "cnn14_audioset_fp16.tflite").read_bytes(), inputs).probs
    for k in inputs:
        np.testing.assert_allclose(got32[k], ref[k], atol=1e-4, rtol=0)
        assert np.corrcoef(got16[k], ref[k])[0, 1] >= 0.9999
        assert 0.001 < np.median(ref[k]) < 0.5  # synthetic weights give spread, unsaturated outputs


@pytest.fixture
def corrupted_fp32(checkpoint, models, monkeypatch):
    """Make the converter return a silently wrong model: one fc_audioset bias of 80 million weights
    altered, as litert-torch #1061 does when a constant receives another's values."""
    good = (models / "cnn14_audioset_fp32.tflite").read_bytes()
    bias = load_body(checkpoint).fc_audioset.bias.detach().numpy().astype("<f4")
    at = good.find(bias.tobytes())
    assert at > 0, "fc_audioset bias not found in the flatbuffer"
    altered = bias.copy()
    altered[7] += 0.5
    bad = good[:at] + altered.tobytes() + good[at + altered.nbytes :]
    monkeypatch.setattr(export, "to_fp32_tflite", lambda body, *args, **kwargs: bad)
    return bad


def test_corrupted_model_is_refused(checkpoint, corrupted_fp32, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match="failed validation"):
        export.convert_checkpoint(checkpoint, out, ("fp32",), gpu_check="off")
    assert not list(out.glob("*.tflite"))
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] is False and report["models"]["fp32"]["passed"] is False
    assert report["models"]["fp32"]["parity_vs_pytorch"]["max_abs_diff"] > 1e-4


def test_cli_convert_refuses_corrupted(checkpoint, corrupted_fp32, tmp_path, capsys):
    from soundtag.cli import main

    assert main(["convert", str(checkpoint), "--output-dir", str(tmp_path), "--precision", "fp32", "--gpu-check", "off"]) == 1
    assert "failed validation" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tflite"))


def test_checkpoint_formats(body, tmp_path):
    sd = body.state_dict()
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    loaded = load_body(bare)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k])


def test_wrong_checkpoint_lists_keys(tmp_path):
    sd = Cnn14Body().state_dict()
    sd.pop("fc1.weight")
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \[fc1.weight\], unexpected keys \[extra.weight\]"):
        load_body(path)


def test_non_checkpoint_and_pickle_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_body(junk)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):  # weights_only refuses the object
        load_body(evil)


class _Payload:
    pass


def test_graph_inspection_flags_non_gpu_ops(tmp_path):
    """The GPU check is not vacuous: a graph with an op outside the delegate's list is flagged."""
    import litert_torch

    class ArgMax(torch.nn.Module):
        def forward(self, x):
            return torch.argmax(x, dim=1)

    edge = litert_torch.convert(ArgMax().eval(), (torch.ones(1, 8),))
    data = edge.model_content() if callable(getattr(edge, "model_content", None)) else edge.model_content
    g = inspect_graph(bytes(data))
    assert not g.gpu_ok and "ARG_MAX" in g.gpu_unsupported


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("cin, cout, h, w", [(3, 5, 7, 6), (8, 4, 31, 2), (16, 16, 62, 4), (4, 6, 13, 9)])
def test_winograd_conv_matches_direct(cin, cout, h, w, m, batch):
    """Winograd F(m x m, 3x3) vs torch's direct conv2d (the independent reference), sizes that are and
    are not multiples of the tile, one window or a batch of them (each window its own)."""
    from soundtag.convert.winograd import GEMM_FORMS, WinogradConv3x3

    g = torch.Generator().manual_seed(cin * cout)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    x = torch.randn(batch, cin, h, w, generator=g, dtype=torch.float64)
    ref = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
    for gemm in GEMM_FORMS:  # grouped 1x1 convolutions (shipped) or batched matmuls
        # one GEMM, or summed over groups of input channels (the GPU layout); the convolution form
        # takes groups that divide Cin (CNN14's channel counts are powers of two)
        for group in (None, 4, 3) if gemm == "bmm" else [g for g in (None, 1, 2, 4) if g is None or cin % g == 0]:
            conv = WinogradConv3x3(weight, bias, h, w, lambda t: t.detach().double().contiguous(), group, m, gemm)
            torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-10)
            # with the block's 2 x 2 average pool inside the tiles (bias in the GEMMs, pooling by a GEMM)
            pooled = WinogradConv3x3(weight, bias, h, w, lambda t: t.detach().double().contiguous(), group, m, gemm,
                                     pool=2)
            torch.testing.assert_close(pooled(x), torch.nn.functional.avg_pool2d(ref, 2), rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cin, cout, h", [(3, 5, 7), (8, 4, 31), (16, 16, 2), (4, 6, 1)])
def test_width_two_conv_matches_direct(cin, cout, h, batch):
    """Block 6's form (Karatsuba across the 2 columns, 1-D F(2, 3) down the rows) vs torch's conv2d."""
    from soundtag.convert.winograd import GEMM_FORMS, WidthTwoConv3x3

    g = torch.Generator().manual_seed(cin + cout + h)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    x = torch.randn(batch, cin, h, 2, generator=g, dtype=torch.float64)
    ref = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
    for gemm in GEMM_FORMS:
        for group in [g for g in (None, 1, 2, 4) if g is None or cin % g == 0]:
            conv = WidthTwoConv3x3(weight, bias, h, 2, lambda t: t.detach().double().contiguous(), group, 2, gemm)
            assert conv.k == 12 and sum(u.numel() for u in conv.u) == 12 * cin * cout  # 3/4 of F(2x2)'s weights
            torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-10)


def test_winograd_transforms_are_lavin_and_grays():
    """The matrices solved from the interpolation points are the published F(4x4, 3x3) ones
    (Lavin & Gray 2016, section 4.2), up to the sign convention of each row pair."""
    from soundtag.convert.winograd import transforms

    at, g, bt = transforms(4)
    np.testing.assert_array_equal(at, [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
    np.testing.assert_allclose(g, [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], rtol=1e-15)
    np.testing.assert_array_equal(bt, [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                                       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])


def test_split_direct_conv_matches_conv2d():
    """A direct convolution summed over groups of input channels vs torch's conv2d, uneven last group."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 10, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(1, 10, 9, 7, generator=g, dtype=torch.float64)
    conv = export._DirectConv(weight, bias, lambda t: t.detach().double().contiguous(), 4)
    assert len(conv.weights) == 3
    ref = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-10)


def test_cli_convert_direct_fp32_without_a_gpu_adapter(checkpoint, tmp_path):
    """--no-winograd writes the model card's direct layout for fp32, through the same gates; on a machine
    whose Vulkan driver file has no device behind it (issue #18: Dawn finds no adapter) --gpu-check auto
    (the default) still writes it and records why the GPU was not checked, --gpu-check require writes no
    model and says why in one line."""
    env = absent_gpu_env(tmp_path)
    out = tmp_path / "auto"
    r = _cli("convert", checkpoint, "--output-dir", out, "--precision", "fp32", "--no-winograd", env=env)
    assert r.returncode == 0, r.stderr
    assert "cnn14_audioset_fp32.tflite: fp32 (direct (groups of 256 input channels))" in r.stdout
    assert "GPU not checked: no GPU accelerator: Dawn found no usable GPU adapter" in r.stdout
    report = json.loads((out / "conversion_report.json").read_text())
    fp32 = report["models"]["fp32"]
    assert report["passed"] and report["gpu_check"] == "auto"
    assert fp32["gpu"]["checked"] is False and fp32["gpu"]["write"] is True and "No adapters found" in fp32["gpu"]["reason"]
    assert fp32["convolutions"] == "direct (groups of 256 input channels)" and "BATCH_MATMUL" not in fp32["graph"]["ops"]
    assert fp32["parity_vs_pytorch"]["min_corr"] >= 0.99999 and fp32["parity_vs_pytorch"]["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == [
        "audioset_labels.txt", "cnn14_audioset_fp32.tflite", "conversion_report.json", "mel_basis.bin"]

    out = tmp_path / "require"
    r = _cli("convert", checkpoint, "--output-dir", out, "--precision", "fp32", "fp16", "--no-winograd",
             "--gpu-check", "require", env=env)
    lines = [x for x in r.stderr.splitlines() if x.startswith("soundtag: ")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "no GPU to check it on" in lines[0] and "no model written" in lines[0] and "No adapters found" in lines[0]
    assert not list(out.glob("*.tflite"))
    report = json.loads((out / "conversion_report.json").read_text())
    assert not report["passed"] and list(report["models"]) == ["fp32"]  # stopped at the first model


def test_gpu_verdict_without_a_gpu():
    """No usable GPU: recorded, written under auto, refused under require (the GPU that disagrees: test_gpu)."""
    missing = {"available": False, "reason": "no GPU accelerator: Dawn found no usable GPU adapter (No adapters found)"}
    auto = export.gpu_verdict(dict(missing), "auto", "m.tflite")
    assert auto["write"] and not auto["checked"] and not auto["required"] and "no GPU to check it on" in auto["finding"]
    required = export.gpu_verdict(dict(missing), "require", "m.tflite")
    assert not required["write"] and required["required"]
    with pytest.raises(ValueError, match="unknown GPU check 'maybe'"):
        export.convert_checkpoint("unused.pth", "unused", ("fp32",), gpu_check="maybe")


@pytest.mark.slow
def test_int8_keeps_named_layers_in_float(body):
    """to_int8_tflite(keep_float=...) (bench/int8_layers.py's layer choices): the named layers keep float32
    weights, every other convolution and dense layer is int8, and an unknown name is refused."""
    from ai_edge_litert import schema_py_generated as schema

    fp32 = export.to_fp32_tflite(body, export.LAYOUTS["int8"], embedding=True)
    with pytest.raises(ValueError, match="unknown layer 'block7.conv1'"):
        export.to_int8_tflite(fp32, ("block7.conv1",))
    data = export.to_int8_tflite(fp32, ("block1.conv2", "fc_audioset"))
    model = schema.Model.GetRootAs(data, 0)
    sg = model.Subgraphs(0)
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    weights = {}  # weight shape -> type of the weighted ops' second input (after any DEQUANTIZE: none here)
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        if op.InputsLength() > 1:
            t = sg.Tensors(op.Inputs(1))
            weights[tuple(t.ShapeAsNumpy())] = types[t.Type()]
    assert weights[(527, 2048)] == "FLOAT32" and weights[(64, 3, 3, 64)] == "FLOAT32"  # fc_audioset, block1.conv2
    assert weights[(2048, 2048)] == "INT8" and weights[(128, 3, 3, 64)] == "INT8"  # fc1, block2.conv1
    assert sum(v == "INT8" for v in weights.values()) == 12
