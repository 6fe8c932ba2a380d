"""Build a model and fill it from a local safetensors checkpoint (one file or sharded).

A tensor-parallel rank passes its ``TPShard``: it then reads only its own slice of each split
weight (``safe_open(...).get_slice``), never a full copy of the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.models import model_class
from kvmesh.replicas.models.llama import LlamaForCausalLM
from kvmesh.replicas.tp.layers import TPShard


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights")
    return files


def iter_weights(model_dir: Path, tp: TPShard | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                part = tp.weight_slice(name) if tp is not None else None
                if part is None:
                    yield name, f.get_tensor(name)
                else:
                    dim, start, stop = part
                    sl = f.get_slice(name)
                    yield name, sl[start:stop] if dim == 0 else sl[:, start:stop]


def load_model(
    model_dir: Path,
    cfg: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPShard | None = None,
) -> LlamaForCausalLM:
    cls = model_class(cfg)
    # Build on the meta device (no random init of weights we overwrite), then allocate.
    with torch.device("meta"):
        model = cls(cfg, max_positions, tp=tp)
    model = model.to_empty(device=device).to(dtype)
    model.load_weights(iter_weights(model_dir, tp))
    model.init_rope(device)
    return model.eval()
