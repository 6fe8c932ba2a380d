"""Ray Serve settings read from the environment of Serve's own processes (proxy, controller).

They cannot travel in an app's config: Serve reads them when its processes start, so they go
where the Ray cluster starts. ``kvmesh serve`` sets them on the local cluster it starts; the
``ray up`` configs in ``cluster/launch/`` and the KubeRay manifests in ``k8s/`` set them on
every node (a test keeps those three in step).

``RAY_SERVE_PROXY_USE_GRPC=1``: the HTTP proxy hands each request to the ingress over Serve's
gRPC channel between replicas instead of Ray actor calls. With the ingress -> replica hop on
gRPC too (``replica_transport``), it raised concurrency-16 output throughput by a further
~8 % on 2 cores (``bench/RESULTS.md``).
"""

from __future__ import annotations

import os

SERVE_PROCESS_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def apply_serve_process_env() -> None:
    """Set the settings in this process's environment (what the user set wins), before
    ``ray.init`` starts a local cluster: its processes inherit them."""
    for name, value in SERVE_PROCESS_ENV.items():
        os.environ.setdefault(name, value)
