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
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def machine_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name, which of :data:`SPEED_FLAGS` it has, its cores and torch's thread count, for the line above
    a benchmark's table (int8 speed differs several times between a CPU with AVX2 only and one with VNNI or AMX)."""
    import os
    import platform

    import torch

    name, flags = platform.processor() or "unknown CPU", set()
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
    present = [flag for flag in SPEED_FLAGS if flag in flags]
    return (
        f"{name} ({', '.join(present) or 'none of ' + '/'.join(SPEED_FLAGS)}), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
