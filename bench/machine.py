"""The machine a benchmark ran on: CPU model, cores and the SIMD flags that move the numbers."""

from __future__ import annotations

from soundtag.cpu import cpu_info


def cpu_line() -> str:
    """E.g. "AMD EPYC (family 25, model 17), 2 cores, flags: avx2 fma avx512f avx512_vnni"."""
    return cpu_info().line()


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM, reset by execve, unlike getrusage's ru_maxrss)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
