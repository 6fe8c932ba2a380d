"""Prefix-aware routing, free of Ray: policy, prefix index, and the replica → router report.

* :class:`PrefixRouterCore` ranks replicas for a request (used by the Serve ``RequestRouter``
  in :mod:`kvmesh.router.request_router` and by ``bench/router_sim.py``).
* :class:`CacheReporter` runs in each model replica and builds what ``record_routing_stats``
  returns (its module docstring is the replica-side API).
* :class:`RoutingHint` is what an ingress passes in the handle call when it does not pass a
  ``ReplicaRequest`` (module :mod:`~kvmesh.router.routing.hint` says how the router finds it).
"""

from kvmesh.router.routing.config import ReporterConfig, RouterConfig
from kvmesh.router.routing.core import PrefixRouterCore
from kvmesh.router.routing.hint import RoutingHint, find_route_inputs
from kvmesh.router.routing.policy import Decision, Reason
from kvmesh.router.routing.reporter import CacheReporter
from kvmesh.router.routing.wire import PAYLOAD_KEY, parse_report

__all__ = [
    "PAYLOAD_KEY",
    "CacheReporter",
    "Decision",
    "PrefixRouterCore",
    "Reason",
    "ReporterConfig",
    "RouterConfig",
    "RoutingHint",
    "find_route_inputs",
    "parse_report",
]
