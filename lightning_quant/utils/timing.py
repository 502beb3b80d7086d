"""Wall-clock timing of model calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(run: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median wall time in milliseconds of ``run()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


#: the /proc/cpuinfo flags that decide which int8 and bf16 kernels run
SPEED_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


#: the flags of an int8 dot-product instruction (VPDPBUSD, AMX): without them, x86 int8 kernels multiply uint8 by
#: int8 into int16 pairs (VPMADDUBSW), which saturate for large activations
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str] | None]:
    """The CPU's model name and its flags from ``cpuinfo`` (flags ``None`` where that file cannot be read)."""
    import platform

    name, flags = platform.processor() or "unknown CPU", None
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, flags


def cpu_kind(cpuinfo: str = "/proc/cpuinfo") -> str:
    """Which kind of x86 CPU this is for int8 speed: ``"amx"`` (AMX int8 tiles), ``"avx512_vnni"``, ``"avx_vnni"``,
    ``"avx2"`` or ``"other"`` (no AVX2, or flags that cannot be read); names a benchmark's file per kind of machine."""
    flags = cpu_flags(cpuinfo)[1] or set()
    for kind, flag in (("amx", "amx_int8"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"), ("avx2", "avx2")):
        if flag in flags:
            return kind
    return "other"


def has_int8_dot_product(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has VNNI or AMX int8 instructions; ``None`` when its flags cannot be read (not Linux)."""
    flags = cpu_flags(cpuinfo)[1]
    return None if flags is None else any(flag in flags for flag in INT8_DOT_FLAGS)


def machine_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name, which of :data:`SPEED_FLAGS` it has, its cores and torch's thread count, for the line above
    a benchmark's table (int8 speed differs several times between a CPU with AVX2 only and one with VNNI or AMX)."""
    import os

    import torch

    name, flags = cpu_flags(cpuinfo)
    present = [flag for flag in SPEED_FLAGS if flag in (flags or set())]
    return (
        f"{name} ({', '.join(present) or 'none of ' + '/'.join(SPEED_FLAGS)}), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
