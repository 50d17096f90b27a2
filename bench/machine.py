"""The machine a benchmark ran on: CPU model, cores and the SIMD flags that move the numbers."""

from __future__ import annotations

import os
import platform


def cpu_line() -> str:
    """E.g. "AMD EPYC (family 25, model 17), 2 cores, flags: avx2 fma avx512f avx512_vnni"."""
    flags: set[str] = set()
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    model = info.get("model name") or platform.processor()
    if info.get("cpu family") and info.get("model"):
        model += f" (family {info['cpu family']}, model {info['model']})"
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                          "amx_bf16", "amx_int8") if f in flags]
    return f"{model or platform.machine()}, {os.cpu_count()} cores, flags: {' '.join(wanted) or 'none of avx2/avx512'}"
