"""Build a model and fill it from a local safetensors checkpoint (one file or sharded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvmesh.replicas.config import ModelArchConfig
from kvmesh.replicas.models import model_class
from kvmesh.replicas.models.llama import LlamaForCausalLM


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights")
    return files


def iter_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def load_model(
    model_dir: Path,
    cfg: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
) -> LlamaForCausalLM:
    cls = model_class(cfg)
    # Build on the meta device (no random init of weights we overwrite), then allocate.
    with torch.device("meta"):
        model = cls(cfg, max_positions)
    model = model.to_empty(device=device).to(dtype)
    model.load_weights(iter_weights(model_dir))
    model.init_rope(device)
    return model.eval()
