"""Real Ray nodes on this machine, started with the ``ray`` CLI as an operator would.

Each node is one ``ray start`` in its own process session, so one node (its raylet, its
workers, and on the head the GCS and dashboard) can be stopped alone, abruptly, by signalling
its process group: that is a machine dying, and it touches no other Ray cluster on the machine
(``ray stop`` would stop all of them, including the test session's own).

Token authentication is on (``RAY_AUTH_MODE=token``), with a token made here and passed to
every node and client through the environment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from kvmesh_testing import free_port

from kvmesh.cluster.serve_env import SERVE_PROCESS_ENV

BIN = Path(sys.executable).parent
NODE_MEMORY = 3 * 1024**3
OBJECT_STORE = 200 * 1024**2


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@dataclass
class RayNodes:
    """A head node and any number of worker nodes, all on this machine."""

    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    groups: dict[str, int] = field(default_factory=dict)  # node name -> process group

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that talks to this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env.update(SERVE_PROCESS_ENV)  # as the `ray up` configs and KubeRay manifests start nodes
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        cmd = [
            str(BIN / "ray"),
            "start",
            *args,
            f"--memory={NODE_MEMORY}",
            f"--object-store-memory={OBJECT_STORE}",
            "--disable-usage-stats",
        ]
        # Its own session: every process of this node shares one process group.
        proc = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=120, start_new_session=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        # ray start exits once the node is up; its daemons keep the group (= its pid).
        self.groups[name] = self._group_of_node()

    def _group_of_node(self) -> int:
        """The process group of the raylet started last (the newest ``raylet`` process)."""
        out = subprocess.run(
            ["ps", "-ww", "-eo", "pid,pgid,etimes,args"], capture_output=True, text=True
        ).stdout
        raylets = [
            line.split(None, 3)
            for line in out.splitlines()
            if "/raylet/raylet" in line and f":{self.gcs_port}" in line
        ]
        if not raylets:
            raise RuntimeError("no raylet found for this cluster")
        raylets.sort(key=lambda r: int(r[2]))  # youngest first
        pgid = int(raylets[0][1])
        if pgid in self.groups.values():
            raise RuntimeError("could not tell the new node's processes from the others")
        return pgid

    def start_head(self, *, num_cpus: float = 1, num_gpus: int = 0, extra: list[str] = ()) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--num-cpus={num_cpus}",
                f"--num-gpus={num_gpus}",
                # Notice a dead node within seconds, not Ray's default ~30 s.
                '--system-config={"health_check_period_ms": 1000, '
                '"health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}',
                *extra,
            ],
        )
        self.wait_for_dashboard()

    def add_worker(self, name: str, *, num_cpus: float = 1) -> None:
        self._start(
            name,
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}",
            ],
        )

    def wait_for_dashboard(self, timeout_s: float = 60) -> None:
        headers = {"authorization": f"Bearer {self.token}"}
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.dashboard}/api/version", headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Ray dashboard did not come up")
            time.sleep(0.5)

    def alive_nodes(self) -> list[dict]:
        headers = {"authorization": f"Bearer {self.token}"}
        r = httpx.get(f"{self.dashboard}/nodes?view=summary", headers=headers, timeout=10)
        r.raise_for_status()
        return [n for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout_s: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(nodes := self.alive_nodes()) != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} nodes alive, expected {n}")
            time.sleep(0.5)
        return nodes

    def kill(self, name: str) -> None:
        """The node's machine dies: every process of it, at once, without a goodbye."""
        _kill_group(self.groups.pop(name))

    def kvmesh(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """Run the kvmesh command line against this cluster."""
        return subprocess.run(
            [str(BIN / "kvmesh"), *args, "--address", self.dashboard],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def serve_details(self) -> dict:
        headers = {"authorization": f"Bearer {self.token}"}
        r = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def shutdown(self) -> None:
        for name in list(self.groups)[::-1]:  # workers first, the head last
            self.kill(name)
