"""Small builders shared by the router tests: prompts, block hashes, fake replicas."""

from __future__ import annotations

from kvmesh.replicas.block_hash import hash_block_tokens
from kvmesh.replicas.kv.events import BlockRemoved, BlockStored
from kvmesh.router.routing import CacheReporter, PrefixRouterCore, RouterConfig

BS = 16
MODEL = "m"


def prompt(tenant: int, n_tokens: int, suffix: int = 0) -> list[int]:
    """``n_tokens`` tokens shared by every prompt of ``tenant``, then 20 tokens of ``suffix``."""
    shared = [(tenant * 7919 + i) % 30000 + 1 for i in range(n_tokens)]
    return shared + [(suffix * 104729 + i) % 30000 + 1 for i in range(20)] if suffix else shared


def hashes(tokens: list[int]) -> list[bytes]:
    return hash_block_tokens(tokens, BS, extra_keys=(MODEL,))


def stored(block_hashes: list[bytes]) -> list[BlockStored]:
    out, parent = [], None
    for h in block_hashes:
        out.append(BlockStored(h, parent, BS))
        parent = h
    return out


def removed(block_hashes: list[bytes]) -> list[BlockRemoved]:
    return [BlockRemoved(h) for h in block_hashes]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_core(clock: FakeClock | None = None, **overrides) -> PrefixRouterCore:
    cfg = RouterConfig(block_size=BS, seed=0, **overrides)
    return PrefixRouterCore(cfg, router_id="r1", clock=clock or FakeClock())


def idle_load(**kw) -> dict:
    base = {
        "num_requests_running": 0,
        "num_requests_waiting": 0,
        "kv_cache_usage": 0.0,
        "pending_prefill_tokens": 0,
    }
    base.update(kw)
    return base


class FakeReplica:
    """A replica's reporter plus the load it claims."""

    def __init__(self, name: str, clock: FakeClock | None = None) -> None:
        self.name = name
        self.reporter = CacheReporter(block_size=BS, clock=clock or FakeClock(), epoch=name)
        self.load = idle_load()

    def report(self, events=(), snapshot_fn=None) -> dict:
        return self.reporter.report(events=events, snapshot_fn=snapshot_fn, load=self.load)
