"""Write tests/data/upstream_keys.json: {arch: {state_dict key: shape}} of upstream's PANNs classes.

Usage: python tools/upstream_keys.py PATH/TO/audioset_tagging_cnn/pytorch/models.py [-o OUT.json]

Instantiates each class of qiuqiangkong/audioset_tagging_cnn ``pytorch/models.py`` with the AudioSet
constructor arguments and records its whole state_dict (front-end keys included). Needs torch and
torchlibrosa (a dev dependency). Upstream's ``from pytorch_utils import ...`` is satisfied by a stub
when pytorch_utils.py is not beside models.py (only training helpers come from it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

ARCHITECTURES = ("Cnn14", "Cnn14_DecisionLevelMax", "Cnn14_DecisionLevelAtt", "Cnn6", "Cnn10", "MobileNetV1", "MobileNetV2", "ResNet38", "Wavegram_Logmel_Cnn14")
AUDIOSET_ARGS = dict(  # the AudioSet checkpoints' constructor arguments
    sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000, classes_num=527
)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "upstream_keys.json"


def load_upstream(models_py: str | Path) -> types.ModuleType:
    """Import upstream's models.py as a module (stubbing pytorch_utils if it is not beside it)."""
    models_py = Path(models_py).resolve()
    if "pytorch_utils" not in sys.modules and not (models_py.parent / "pytorch_utils.py").exists():
        stub = types.ModuleType("pytorch_utils")
        for name in ("do_mixup", "interpolate", "pad_framewise_output"):
            setattr(stub, name, _unavailable(name))
        sys.modules["pytorch_utils"] = stub
    sys.path.insert(0, str(models_py.parent))
    try:
        spec = importlib.util.spec_from_file_location("upstream_panns_models", models_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(models_py.parent))
    return module


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"pytorch_utils.{name} is stubbed (inference only)")

    return fail


def upstream_keys(models_py: str | Path) -> dict[str, dict[str, list[int]]]:
    module = load_upstream(models_py)
    out = {}
    for arch in ARCHITECTURES:
        model = getattr(module, arch)(**AUDIOSET_ARGS)
        out[arch] = {k: list(v.shape) for k, v in model.state_dict().items()}
    return out


def _dumps(keys: dict[str, dict[str, list[int]]]) -> str:
    """JSON with one state_dict key per line (reviewable diffs)."""
    archs = []
    for arch, shapes in keys.items():
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
        archs.append(f" {json.dumps(arch)}: {{\n{rows}\n }}")
    return "{\n" + ",\n".join(archs) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_py", help="upstream's pytorch/models.py")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    keys = upstream_keys(args.models_py)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dumps(keys))
    print(f"{args.out}: " + ", ".join(f"{a} {len(k)} keys" for a, k in keys.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
