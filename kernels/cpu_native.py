"""C++ kernels for CPUs, compiled once per machine and loaded from a cache: paged attention
(decode and extend) and the decoder layer's fused elementwise ops (RMSNorm with the residual
add, SiLU-and-mul, RoPE).

The torch twin stays the reference; these are the fast CPU path for the op where pure torch
is far off the memory-bandwidth floor (see csrc/ for why). If the compiler or ninja is
missing, or ``KVMESH_CPU_NATIVE=0``, callers fall back to the torch twin.

The build is cached under ``$KVMESH_CACHE/torch_extensions`` (default ``~/.cache/kvmesh``) in
a directory named by a hash of everything the binary depends on: the bytes of every source
and header in ``csrc/`` (keyed by file name), the compile flags, torch's and Python's
versions, the compiler's version and the CPU's feature flags (the code is built with
``-march=native``). Nothing in the key depends on where the source or the
interpreter lives, so every checkout and virtual environment on a machine shares one build.

A process that finds the built module imports it directly: no ninja, no torch JIT versioner,
no compiler. (Going through ``torch.utils.cpp_extension.load`` every time rebuilt it whenever
another checkout or venv had used the same build directory last: ninja keys its outputs by the
exact command line, and that holds the absolute paths of the source, torch's headers and
Python's headers; a fresh clone's newer source mtime triggers a rebuild too.) A missing build
is made once under a file lock, so replicas starting together compile it once, in a private
directory, and published by an atomic rename, so nobody imports a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "paged_decode_cpu.cpp"
"""The translation unit that defines the Python module (the torch bindings)."""
SOURCE_SUFFIXES = (".cpp", ".h")
EXT_NAME = "kvmesh_paged_decode_cpu"
EXTRA_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
EXTRA_LDFLAGS = ("-fopenmp",)
LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"

STATUS: dict[str, Any] = {}
"""How this process got the kernel: ``source`` is ``"cache"`` (imported a finished build),
``"built"`` (compiled it here), ``"disabled"`` or ``"unavailable"``; ``path`` and ``seconds``
(spent in ``native_ops``) when it loaded."""


def cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE", Path.home() / ".cache" / "kvmesh"))


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.splitlines()[0].strip() if out else "unknown"


def cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for), sorted."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / ARM
                return " ".join(sorted(set(line.split(":", 1)[1].split())))
    return platform.processor()


def source_files() -> list[Path]:
    """``SOURCE`` and every other source or header next to the kernels, in a stable order.

    Globbed rather than listed, so a file added to ``csrc/`` is compiled (``.cpp``) and keyed
    into the build hash without anyone remembering to register it: a header edit must give a
    new build as surely as a source edit.
    """
    others = sorted(
        p
        for p in CSRC.iterdir()
        if p.suffix in SOURCE_SUFFIXES and p.is_file() and p.name != SOURCE.name
    )
    return [SOURCE, *others]


def build_inputs() -> dict[str, Any]:
    """Everything the compiled binary depends on; its hash names the build directory."""
    cxx = os.environ.get("CXX", "c++")  # what torch's cpp_extension compiles with
    return {
        "name": EXT_NAME,
        # By file name, not path: the same bytes in another checkout are the same build.
        "sources_sha256": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files()
        },
        "cflags": list(EXTRA_CFLAGS),
        "ldflags": list(EXTRA_LDFLAGS),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": sys.implementation.cache_tag,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "compiler": f"{cxx}: {_compiler_version(cxx)}",
        "machine": platform.machine(),
        "cpu_flags": cpu_flags(),
    }


def build_dir(inputs: dict[str, Any] | None = None) -> Path:
    """Where the build for these inputs (default: this machine's) lives."""
    inputs = inputs or build_inputs()
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "torch_extensions" / f"{EXT_NAME}-{key}"


@cache
def native_ops() -> ModuleType | None:
    """The compiled extension module, or None when it cannot be built here."""
    if os.environ.get("KVMESH_CPU_NATIVE", "1") == "0":
        STATUS.update(source="disabled")
        return None
    start = time.perf_counter()
    try:
        inputs = build_inputs()
        out = build_dir(inputs)
        lib = out / f"{EXT_NAME}{LIB_SUFFIX}"
        module = _import_cached(lib)
        source = "cache"
        if module is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with _locked(out.parent / f".{out.name}.lock"):
                module = _import_cached(lib)  # another process built it while we waited
                if module is None:
                    module = _build(inputs, out, lib)
                    source = "built"
    except Exception as exc:
        STATUS.update(source="unavailable", error=str(exc))
        log.warning("CPU attention kernels unavailable (%s); using the torch twin", exc)
        return None
    seconds = time.perf_counter() - start
    path = getattr(module, "__file__", None) or str(lib)
    STATUS.update(source=source, path=path, seconds=seconds)
    log.info("CPU attention kernels %s in %.2fs (%s)", source, seconds, path)
    return module


def _import_cached(lib: Path) -> ModuleType | None:
    """Import a finished build directly (None if there is none, or it no longer loads)."""
    if not lib.is_file():
        return None
    try:
        return _import_extension(lib)
    except ImportError as exc:
        # A build for these inputs that does not load (a library it links to changed in a
        # way the key does not see): rebuild it rather than lose the fast path.
        log.warning("cached CPU kernel %s does not load (%s); rebuilding it", lib, exc)
        return None


def _import_extension(lib: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(EXT_NAME, lib)
    if spec is None or spec.loader is None:
        raise ImportError(f"{lib} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between processes; the OS drops it if its holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still guards readers
        yield
        return
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(inputs: dict[str, Any], out: Path, lib: Path) -> ModuleType:
    """Compile in a private directory, then publish the module at ``lib`` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"build.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt of this pid
    tmp.mkdir()
    log.warning("compiling the CPU attention kernels (once per machine) into %s", out)
    start = time.perf_counter()
    try:
        module = _compile(tmp)
        built = Path(module.__file__)
        # torch renames a module it rebuilt in the same process (``<name>_v1``); such a
        # module cannot be imported under EXT_NAME, so it serves this process only.
        if built.name == lib.name:
            staged = out / f".{lib.name}.tmp{os.getpid()}"
            shutil.copyfile(built, staged)
            os.chmod(staged, 0o755)
            os.replace(staged, lib)
            module.__file__ = str(lib)  # the build directory goes away below
            seconds = round(time.perf_counter() - start, 2)
            (out / "inputs.json").write_text(
                json.dumps({**inputs, "build_seconds": seconds}, indent=1)
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return module


def _compile(build_directory: Path) -> ModuleType:
    """torch's JIT build (ninja) in ``build_directory``; returns the imported module."""
    from torch.utils.cpp_extension import load

    # The ninja binary comes with the `ninja` wheel next to this interpreter; a venv's bin/ is
    # not on PATH unless the venv is activated (CI, Ray workers).
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    files = source_files()
    return load(
        name=EXT_NAME,
        sources=[str(p) for p in files if p.suffix == ".cpp"],
        extra_include_paths=sorted({str(p.parent) for p in files}),
        extra_cflags=list(EXTRA_CFLAGS),
        extra_ldflags=list(EXTRA_LDFLAGS),
        build_directory=str(build_directory),
        verbose=False,
    )
