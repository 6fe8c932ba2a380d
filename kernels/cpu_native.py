"""A C++ decode-attention kernel for CPUs, compiled on first use (and cached).

The torch twin stays the reference; this is the fast CPU path for the one op where pure torch
is far off the memory-bandwidth floor (see csrc/paged_decode_cpu.cpp for why). If the compiler
or ninja is missing, or ``KVMESH_CPU_NATIVE=0``, callers fall back to the torch twin.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.cpp"


@cache
def native_ops():
    """The compiled extension module, or None when it cannot be built here."""
    if os.environ.get("KVMESH_CPU_NATIVE", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        build = Path(os.environ.get("KVMESH_CACHE", Path.home() / ".cache" / "kvmesh"))
        build = build / "torch_extensions" / f"torch{torch.__version__.split('+')[0]}"
        build.mkdir(parents=True, exist_ok=True)
        # The ninja binary comes with the `ninja` wheel next to this interpreter; a venv's
        # bin/ is not on PATH unless the venv is activated (CI, Ray workers).
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return load(
            name="kvmesh_paged_decode_cpu",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:
        log.warning("CPU decode-attention kernel unavailable (%s); using the torch twin", exc)
        return None
