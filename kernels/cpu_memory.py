"""CPU memory for the engine: large tensors on transparent huge pages, and a malloc that keeps
what a step frees for the next step.

A decode step reads every live sequence's KV blocks, and the blocks sit in random order in a
pool of hundreds of megabytes: with 4 KiB pages nearly every block costs TLB misses (a 16-token
float32 block of SmolLM2 spans three pages per K and V). Backing the pool with 2 MiB pages
cuts those walks: the decode attention kernel over a 25 MB float32 pool went 1,541 -> 1,367 µs
on a 2-core Xeon (AMX), 1,190 -> 1,060 µs over a bfloat16 one.

Linux hands out huge pages to anonymous memory only where asked (``madvise(MADV_HUGEPAGE)``)
when ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise``, the common default; torch
asks only under ``THP_MEM_ALLOC_ENABLE=1``, read once when it first allocates, so a library
cannot turn it on for itself. Here the buffer is a fresh mapping, its 2 MiB-aligned part
advised before anything touches it, so the pages are huge from their first fault. Where the call
is missing or refused (not Linux, THP ``never``) the tensor is ordinary memory: same values,
same behaviour.

Each step allocates and frees activations of megabytes (a 512-token prefill's gate/up output
is 6 MB in float32). glibc serves such blocks with fresh ``mmap`` calls and returns them on
free, so every step faults its activations in again, page by page, and the kernel zeroes each
page: 1.2-1.5 M page faults and ~5 s of system time in a 48 s float32 run of the offline
mixed workload. ``keep_freed_memory`` raises malloc's mmap and trim thresholds so freed blocks
stay in the heap and the next step reuses them (38-45 k faults, 0.2 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import sys
import warnings
from functools import cache

import torch

from kvmesh.kernels.switches import env_switch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it are
# always mapped; everything a step of the models we serve allocates is below.
_MMAP_THRESHOLD = 32 << 20
# Freed memory at the top of the heap kept before giving it back, and the extra asked for
# when the heap grows: a few steps' worth of activations.
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 128 << 20


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@cache
def _madvise():
    libc = _libc()
    if libc is None:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype)`` on the CPU, on 2 MiB pages where the OS allows.

    Smaller than one huge page, or where ``madvise`` is unavailable: plain ``torch.zeros``.
    The memory is a fresh anonymous mapping of its own (malloc could hand back heap pages
    already faulted in as 4 KiB ones, which advice no longer changes), up to 2 MiB larger
    than asked for the alignment; the tensor is a contiguous view that keeps it alive."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if nbytes < HUGE_PAGE or madvise is None:
        return torch.zeros(shape, dtype=dtype)
    # private: a shared anonymous mapping is shmem, which THP leaves alone by default
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with warnings.catch_warnings():  # an mmap is writable; torch warns about buffers generally
        warnings.simplefilter("ignore")
        buffer = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE
    region = buffer[start : start + nbytes]
    madvise(region.data_ptr(), nbytes, _MADV_HUGEPAGE)  # advice: a refusal changes nothing
    region.zero_()  # fault the pages in now, at start-up, not in the first steps
    return region.view(dtype).view(shape)


@cache
def keep_freed_memory() -> bool:
    """Process-wide, once: glibc keeps freed blocks up to 32 MiB in the heap for reuse
    instead of unmapping them (see the module docstring). Returns whether it was applied: not
    on other C libraries, nor with ``KVMESH_CPU_MALLOC_TUNING=0`` (the escape hatch, e.g. for a
    process that must hand memory back between steps)."""
    if not env_switch("KVMESH_CPU_MALLOC_TUNING"):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Fixed values also switch off glibc's own threshold adjustment, which starts at 128 KiB.
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )
