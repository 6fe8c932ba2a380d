"""Prometheus metrics of the prefix-aware router (``prometheus_client``, default registry).

The router runs inside the process that holds the ``DeploymentHandle`` (the ingress replica),
so these land in that process's registry next to the ingress's own metrics.

===============================================  =======  =======================================
name                                             type     meaning
===============================================  =======  =======================================
``kvmesh:router_decisions_total``                counter  routed requests by ``reason``:
                                                          cache_hit, no_prefix, load_fallback,
                                                          session_affinity
``kvmesh:router_prompt_tokens_total``            counter  prompt tokens of routed requests
``kvmesh:router_predicted_hit_tokens_total``     counter  of those, tokens the router expected
                                                          cached on the replica it chose
``kvmesh:router_reported_query_tokens_total``    counter  prompt tokens replicas report looking
                                                          up (their ``prefix_cache_queries``)
``kvmesh:router_reported_hit_tokens_total``      counter  tokens replicas report hitting
``kvmesh:router_index_blocks``                   gauge    index entries by ``kind``
                                                          (confirmed, speculative)
``kvmesh:router_report_resyncs_total``           counter  snapshot resyncs of a replica's entries
``kvmesh:router_report_gaps_total``              counter  reports that showed missed events
===============================================  =======  =======================================

All carry ``model_name``. Predicted hit rate is ``rate(predicted_hit)/rate(prompt_tokens)``;
the real one ``rate(reported_hit)/rate(reported_query)``. The reported counters are
cluster-wide as each router sees them, so with several ingress replicas take ``max`` (or
``avg``) over instances, not ``sum``; the predicted ones are per router and do sum.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, generate_latest

DECISIONS = Counter(
    "kvmesh:router_decisions",
    "Requests routed, by the reason the replica was chosen.",
    ["model_name", "reason"],
)
PROMPT_TOKENS = Counter(
    "kvmesh:router_prompt_tokens",
    "Prompt tokens of the requests routed.",
    ["model_name"],
)
PREDICTED_HIT_TOKENS = Counter(
    "kvmesh:router_predicted_hit_tokens",
    "Prompt tokens the router expected to find cached on the replica it chose.",
    ["model_name"],
)
REPORTED_QUERY_TOKENS = Counter(
    "kvmesh:router_reported_query_tokens",
    "Prompt tokens the replicas report looking up in their prefix caches.",
    ["model_name"],
)
REPORTED_HIT_TOKENS = Counter(
    "kvmesh:router_reported_hit_tokens",
    "Prompt tokens the replicas report finding in their prefix caches.",
    ["model_name"],
)
INDEX_BLOCKS = Gauge(
    "kvmesh:router_index_blocks",
    "Entries in the router's prefix index.",
    ["model_name", "kind"],
)
RESYNCS = Counter(
    "kvmesh:router_report_resyncs",
    "Times a replica's index entries were rebuilt from a snapshot.",
    ["model_name"],
)
GAPS = Counter(
    "kvmesh:router_report_gaps",
    "Reports showing that this router missed some of a replica's events.",
    ["model_name"],
)


class RouterMetrics:
    """The metric children for one model name (label lookups done once)."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self._decisions = {}
        self.prompt_tokens = PROMPT_TOKENS.labels(model_name)
        self.predicted_hit_tokens = PREDICTED_HIT_TOKENS.labels(model_name)
        self.reported_query_tokens = REPORTED_QUERY_TOKENS.labels(model_name)
        self.reported_hit_tokens = REPORTED_HIT_TOKENS.labels(model_name)
        self.index_confirmed = INDEX_BLOCKS.labels(model_name, "confirmed")
        self.index_speculative = INDEX_BLOCKS.labels(model_name, "speculative")
        self.resyncs = RESYNCS.labels(model_name)
        self.gaps = GAPS.labels(model_name)

    def decision(self, reason: str) -> None:
        child = self._decisions.get(reason)
        if child is None:
            child = self._decisions[reason] = DECISIONS.labels(self.model_name, reason)
        child.inc()


class _RouterFamilies:
    """The default registry seen through a filter: only this module's families."""

    def collect(self):
        for family in REGISTRY.collect():
            if family.name.startswith("kvmesh:router"):
                yield family


def render() -> str:
    """This process's router metrics as Prometheus text (the ingress adds it to ``/metrics``:
    the router runs in the ingress process, whose own metrics live in another registry)."""
    return generate_latest(_RouterFamilies()).decode()  # type: ignore[arg-type]
