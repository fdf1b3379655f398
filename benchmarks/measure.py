"""Wall time and peak memory of one call, on a CUDA device or on the CPU.

GPU: `torch.cuda.max_memory_allocated` over the call (every live tensor on the device counts).
CPU: torch has no allocator statistics for the CPU, so the call runs once under
`torch.profiler.profile(profile_memory=True)`, which records every allocation and free made
through torch's CPU allocator during the call; the peak of their running sum is the most tensor
memory the call added. Adding the bytes of the tensors alive when it starts (the models and the
batch, counted by the caller) gives the CPU analogue of `max_memory_allocated`. Not counted:
memory outside torch's allocator (Python objects, library workspaces); the RSS of the process is
larger. The profiled run is a separate run, never a timed one.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

# glibc's mallopt parameters and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory in the process (glibc: no mmap, no trimming) while inside, as PyTorch's
    caching allocator does on a GPU. Without it, every tile-sized temporary of a CPU step is a
    fresh mmap whose pages the kernel faults in and zeroes: a third of the step's CPU time and most
    of its run-to-run spread, on this project's machine. Yields False (and changes nothing) where
    glibc is not the allocator."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except OSError:
        yield False
        return
    kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield kept
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            mallopt(param, value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds of this process) of one call, the device's queue drained before
    and after. The CPU time is None on a GPU, where it would count the host's waiting. On a
    shared CPU machine it is the steadier number: other processes' load stretches the wall time,
    not (much) the CPU time of a single-threaded run."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    synchronize(device)
    return time.perf_counter() - wall, (time.process_time() - cpu if device.type == "cpu" else None)


def unique_tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights counted once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def peak_memory(call: Callable[[], object], device: torch.device, live_bytes: int) -> tuple[int, int]:
    """(bytes alive when the call starts, peak bytes alive during it) on `device`.

    On CUDA both come from the allocator; on the CPU the first is `live_bytes` (the caller's
    count of the tensors alive at the start) and the second adds the profiler's peak.
    """
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        synchronize(device)
        return start, torch.cuda.max_memory_allocated(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    return live_bytes, live_bytes + _peak_of_allocations(prof)


def _peak_of_allocations(prof: profile) -> int:
    """The maximum over time of (bytes allocated − bytes freed) since profiling began."""
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate(e.nbytes() for e in events), default=0)
