"""Ray Serve settings read from the environment of Serve's own processes (proxy, controller).

They cannot travel in an app's config: Serve reads them when its processes start, so they go
where the Ray cluster starts. ``kvmesh serve`` sets them on the local cluster it starts; the
``ray up`` configs in ``cluster/launch/`` and the KubeRay manifests in ``k8s/`` set them on
every node (a test keeps those three in step).

``RAY_SERVE_PROXY_USE_GRPC=1``: the HTTP proxy hands each request to the ingress over Serve's
gRPC channel between replicas instead of Ray actor calls. With the ingress -> replica hop on
gRPC too (``replica_transport``), it raised concurrency-16 output throughput by a further
~8 % on 2 cores (``bench/RESULTS.md``).

``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0``: a process that calls a deployment (the proxy, the
ingress) runs the handle's router on its own event loop instead of a loop in another thread, so
each streamed chunk is not handed across threads (and the GIL) once more on its way. Measured on
2 cores, `kvmesh serve` at concurrency 16: 266-272 against 250-261 output tokens/s in three
runs each, alternated (+5.6 % on the means); concurrency 1 unchanged. Serve's other
"throughput optimized" switches tried beside it (user code on the replica's main loop, no
per-request logs to stderr) gave nothing on their own (``bench/RESULTS.md``).
"""

from __future__ import annotations

import os

SERVE_PROCESS_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def apply_serve_process_env() -> None:
    """Set the settings in this process's environment (what the user set wins), before
    ``ray.init`` starts a local cluster: its processes inherit them."""
    for name, value in SERVE_PROCESS_ENV.items():
        os.environ.setdefault(name, value)
