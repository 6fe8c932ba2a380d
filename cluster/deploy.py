"""``kvmesh deploy`` and ``kvmesh down``: put the app on a running Ray cluster, or take it off.

Both speak to the cluster's dashboard (its HTTP address, as ``ray job submit`` and
``serve deploy`` do) and deploy *declaratively*: what reaches Serve is a Serve config file, the
same one ``kvmesh build-config`` writes and a KubeRay ``RayService`` carries. That makes a
deploy from a laptop, a ``ray up`` cluster and KubeRay one path, and it needs nothing on the
caller's side but an HTTP connection (no Ray client, no matching Python).

Serve's declarative API replaces the whole set of applications on each PUT. Deploying kvmesh
must not remove somebody else's app, so both commands read what is deployed, change only
kvmesh's application(s) in it, and put the rest back as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from kvmesh.cluster.serve_cmd import check_serve_config, wait_until_ready

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
POLL_S = 1.0


def dashboard_address(address: str | None = None) -> str:
    """The dashboard's HTTP address: ``--address``, else ``RAY_ADDRESS`` (as for ``ray job
    submit``), else ``RAY_DASHBOARD_ADDRESS`` (as for ``serve deploy``), else this machine's."""
    found = (
        address
        or os.environ.get("RAY_ADDRESS")
        or os.environ.get("RAY_DASHBOARD_ADDRESS")
        or DEFAULT_DASHBOARD
    )
    if not found.startswith(("http://", "https://")):
        raise ValueError(
            f"{found!r} is not a dashboard address: kvmesh deploy talks to the Ray dashboard "
            "over HTTP, e.g. --address http://<head-ip>:8265 (RAY_ADDRESS=http://<head-ip>:8265),"
            " not to the GCS port (6379) or a ray:// client address"
        )
    return found.rstrip("/")


class _Client:
    """Ray's Serve REST client, with its failures told in kvmesh's terms."""

    def __init__(self, address: str) -> None:
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        self.address = address
        self._client = self._call(ServeSubmissionClient, address)

    def _call(self, fn, *args):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args)
        except AuthenticationError as exc:
            raise RuntimeError(
                f"the Ray cluster at {self.address} wants its token: set RAY_AUTH_MODE=token "
                "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the token the head uses "
                f"(`ray get-auth-token` on the head). Ray said: {exc}"
            ) from None
        except ConnectionError as exc:
            raise RuntimeError(
                f"no Ray dashboard answers at {self.address} (is the cluster up? for a remote "
                f"cluster, `ray dashboard <cluster.yaml>` forwards it): {exc}"
            ) from None

    def get_serve_details(self) -> dict[str, Any]:
        return self._call(self._client.get_serve_details)

    def deploy_applications(self, config: dict[str, Any]) -> None:
        self._call(self._client.deploy_applications, config)

    def delete_applications(self) -> None:
        self._call(self._client.delete_applications)


def _client(address: str) -> _Client:
    return _Client(address)


def other_apps(details: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    """Every deployed application not named in ``names``, exactly as it was deployed."""
    return [
        app["deployed_app_config"]
        for name, app in (details.get("applications") or {}).items()
        if name not in names and app.get("deployed_app_config")
    ]


def merged_config(details: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """``ours`` plus every application already deployed that is not one of ours (by name)."""
    names = {app["name"] for app in ours["applications"]}
    return {**ours, "applications": [*other_apps(details, names), *ours["applications"]]}


def remaining_config(details: dict[str, Any], names: set[str]) -> dict[str, Any] | None:
    """What stays deployed once ``names`` are gone; None if nothing does."""
    keep = other_apps(details, names)
    if not keep:
        return None
    config: dict[str, Any] = {"applications": keep}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if details.get(key) is not None:
            config[key] = details[key]
    return config


def app_url(address: str, serve_config: dict[str, Any], route_prefix: str) -> str:
    """Where the app answers, seen from here: the dashboard's host, Serve's HTTP port."""
    host = urlsplit(address).hostname or "127.0.0.1"
    port = (serve_config.get("http_options") or {}).get("port", 8000)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def wait_for_apps(
    client, names: set[str], timeout_s: float, log: Callable[[str], None] = print
) -> None:
    """Until every app in ``names`` is RUNNING; a failed deploy raises with Serve's reason."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        apps = client.get_serve_details().get("applications") or {}
        for name in names:
            app = apps.get(name) or {}
            status = app.get("status", "NOT_STARTED")
            if status == "DEPLOY_FAILED":
                raise RuntimeError(f"application {name!r} failed to deploy: {app.get('message')}")
            if last.get(name) != status:
                log(f"{name}: {status}")
                last[name] = status
        if all(last.get(n) == "RUNNING" for n in names):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not RUNNING after {timeout_s:.0f}s: {last}")
        time.sleep(POLL_S)


def deploy(
    serve_config: dict[str, Any],
    address: str | None = None,
    *,
    url: str | None = None,
    timeout_s: float = 900.0,
    log: Callable[[str], None] = print,
) -> str:
    """Deploy ``serve_config``'s applications, keep the others, wait until kvmesh answers.
    Returns the URL of the (first) application."""
    problems = check_serve_config(serve_config)
    if problems:
        raise ValueError("invalid Serve config:\n" + "\n".join(problems))
    address = dashboard_address(address)
    client = _client(address)
    names = {app["name"] for app in serve_config["applications"]}
    client.deploy_applications(merged_config(client.get_serve_details(), serve_config))
    log(f"submitted {', '.join(sorted(names))} to {address}")
    start = time.monotonic()
    wait_for_apps(client, names, timeout_s, log)
    first = serve_config["applications"][0]
    url = url or app_url(address, serve_config, first.get("route_prefix") or "/")
    wait_until_ready(url, max(1.0, timeout_s - (time.monotonic() - start)), log)
    return url


def down(
    names: set[str],
    address: str | None = None,
    *,
    timeout_s: float = 600.0,
    log: Callable[[str], None] = print,
) -> None:
    """Remove the applications ``names``; every other application stays as deployed."""
    address = dashboard_address(address)
    client = _client(address)
    details = client.get_serve_details()
    present = names & set(details.get("applications") or {})
    if not present:
        log(f"nothing to remove: no application named {', '.join(sorted(names))}")
        return
    rest = remaining_config(details, names)
    if rest is None:
        client.delete_applications()
    else:
        client.deploy_applications(rest)
    deadline = time.monotonic() + timeout_s
    while present & set(client.get_serve_details().get("applications") or {}):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sorted(present)} still deployed after {timeout_s:.0f}s")
        time.sleep(POLL_S)
    log(f"removed {', '.join(sorted(present))} from {address}")
