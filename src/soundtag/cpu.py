"""The CPU this process runs on, read once from /proc/cpuinfo: its name and the features that choose
the kernels (XNNPACK's, and the bench peers'). Floor 1: nothing else of soundtag is imported here."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

# what moves the CPU kernels (bench/peers.py: OpenVINO uses AMX, XNNPACK does not; issue #22)
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
            "asimd", "asimddp", "sve")


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says about the first CPU ("" and no flags where it cannot be read)."""

    name: str  # "model name", e.g. "AMD EPYC 9R14 96-Core Processor"; platform.processor() elsewhere
    family: str  # "cpu family" (x86)
    model: str  # "model" (x86)
    flags_line: str  # the whole "flags" (x86) or "Features" (arm64) line, as the kernel wrote it
    flags: frozenset[str]

    @property
    def features(self) -> list[str]:
        """The kernel-choosing FEATURES this CPU has, in FEATURES' order."""
        return [f for f in FEATURES if f in self.flags]

    def line(self) -> str:
        """E.g. "AMD EPYC (family 25, model 17), 2 cores, flags: avx2 fma avx512f avx512_vnni"."""
        name = self.name or platform.processor() or platform.machine()
        if self.family and self.model:
            name += f" (family {self.family}, model {self.model})"
        return f"{name}, {os.cpu_count()} cores, flags: {' '.join(self.features) or 'none of avx2/avx512'}"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    info: dict[str, str] = {}
    flags_line = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                info.setdefault(key, value.strip())
                if key in ("flags", "Features"):
                    flags_line = line.strip()
                    break
    except OSError:
        pass
    return CpuInfo(info.get("model name", ""), info.get("cpu family", ""), info.get("model", ""), flags_line,
                   frozenset(flags_line.partition(":")[2].split()))
