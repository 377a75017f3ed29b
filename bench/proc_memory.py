"""Resident memory of this process from /proc/self/status (Linux), for the benchmarks' memory children.

Not ru_maxrss: Linux carries it over fork + exec, so a child of a big process starts with its
parent's peak; VmHWM belongs to the child's own address space and can be reset.
"""
from __future__ import annotations


def status_bytes(field: str) -> int:
    """VmRSS, VmHWM, ... in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_bytes("VmHWM") <= status_bytes("VmRSS") + 2**20
    except OSError:
        return False
