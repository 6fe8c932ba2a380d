"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from kvmesh.cluster.local_ports import free_loopback_port as free_port  # noqa: F401  (the tests import it from here)

TINY_BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    # Larger than transformers' 0.02 so logits are peaked: greedy comparisons then test our
    # arithmetic, not which of two near-equal logits float rounding happens to favour.
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
)


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random-initialised HF model (safetensors + config, no tokenizer) to ``path``."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    kwargs = {**TINY_BASE, **overrides}
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
    cfg = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers' generate, one prompt at a time, greedy, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Generate exactly max_new_tokens without banning EOS (min_new_tokens would change the
    # argmax): no EOS token at all, as our requests use ignore_eos.
    model.generation_config.eos_token_id = None
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outs.append(y[0, len(ids) :].tolist())
    del model
    gc.collect()
    return outs


def random_prompts(seed: int, lengths: list[int], vocab: int = 320) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def wait_until_ok(
    url: str,
    timeout_s: float,
    *,
    proc=None,
    log: Path | None = None,
    period_s: float = 0.5,
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` (the server) exits, with the
    end of its ``log``."""
    import time

    import httpx

    def tail() -> str:
        return log.read_text()[-4000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}) before {url}:\n{tail()}")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(period_s)
    raise AssertionError(f"{url} not ready after {timeout_s}s: {last}\n{tail()}")
