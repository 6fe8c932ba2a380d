"""The cluster launcher configs in ``cluster/launch/``: valid for Ray, and ``ray up`` for real.

* Every YAML passes Ray's own preparation and validation (``prepare_config`` fills the
  provider's defaults, ``validate_config`` checks ``ray/autoscaler/ray-schema.json`` and the
  node-type rules) and has the shape kvmesh needs (a CPU-only head, GPU worker types, the
  metrics port, the install script).
* ``local.yaml`` is brought up against this machine itself: ``ray up`` over SSH to 127.0.0.1,
  then ``kvmesh deploy``, a completion, ``kvmesh down``, ``ray down``.

The "remote machine" of the second test is this one seen through SSH, with two things of its
own so that it behaves like another host: a PID namespace (``ray stop``, which ``ray up`` and
``ray down`` run, stops every Ray process it can see; in its namespace it sees only the
cluster's, not the test session's) and a home directory (``~/.bashrc`` puts this checkout's
virtual environment on ``PATH``; Ray's token and bootstrap files land there). The SSH server is
Debian's ``sshd``, started per connection in inetd mode by the ``ssh_proxy_command`` (no port
to open, no daemon to leave behind); file mounts go over ``rsync`` through it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from kvmesh_testing import free_port

from kvmesh.cluster.serve_env import SERVE_PROCESS_ENV

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "cluster" / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))
BIN = Path(sys.executable).parent


def prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def test_there_are_cloud_and_local_configs():
    assert {p.name for p in CONFIGS} == {"aws-gpu.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validation(path):
    import ray.autoscaler

    config = prepared(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # Every node installs kvmesh from the synced checkout, and exports Ray's metrics.
    assert config["file_mounts"] == {"~/kvmesh": "."}
    assert config["setup_commands"] == ["bash ~/kvmesh/cluster/launch/install-node.sh"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("--metrics-export-port=8080" in c for c in config[key]), key
        # Serve's process settings, as `kvmesh serve` starts its own cluster.
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for c in starts:  # each setting in the environment `ray start` runs with
            env = c.split("ray start", 1)[0].split()
            for name, value in SERVE_PROCESS_ENV.items():
                assert f"{name}={value}" in env, (key, name)
    assert ".venv" in config["rsync_exclude"]


def test_a_misspelt_key_is_refused():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu-1"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_cloud_head_takes_no_replica_and_gpu_types_scale_from_zero():
    config = prepared(LAUNCH / "aws-gpu.yaml")
    assert any("--num-gpus=0" in c for c in config["head_start_ray_commands"])
    workers = {k: v for k, v in config["available_node_types"].items() if k != "head"}
    assert set(workers) == {"gpu-1", "gpu-4", "gpu-8"}
    assert all(w["min_workers"] == 0 for w in workers.values())
    assert config["max_workers"] >= max(w["max_workers"] for w in workers.values())
    assert config["idle_timeout_minutes"] > 0


def test_install_script_parses():
    subprocess.run(["bash", "-n", str(LAUNCH / "install-node.sh")], check=True)


# ---- ray up against this machine ------------------------------------------------------------
SSHD_CONFIG = """\
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/client_key.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
"""


SHARED_FROM_ROOT = (".pyenv", ".cache", ".local")
UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private")
REAPER = (
    f"{sys.executable} -c 'import os, time\n"
    "while True:\n"
    "    try: os.wait()\n"
    "    except ChildProcessError: time.sleep(0.2)'"
)


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: .ci/install installs openssh-server, rsync")


@pytest.fixture
def remote_host(tmp_path):
    """This machine as an SSH host with its own PID namespace and home; yields
    (ssh_proxy_command, home)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a PID and mount namespace for the pretend host")
    _require("ssh", "ssh-keygen", "rsync", "unshare", "nsenter")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        pytest.fail("missing sshd: .ci/install installs openssh-server")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / key)], check=True
        )
    (tmp_path / "sshd_config").write_text(SSHD_CONFIG.format(dir=tmp_path))
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text(f'export PATH="{BIN}:$PATH"\n')
    # The namespace's first process keeps it alive; its /root is the private home, except
    # what this machine's Python lives in (a venv's interpreter may be under /root) and the
    # caches (converted model, compiled kernels: a shared path, as on a real cluster).
    shared = [d for d in SHARED_FROM_ROOT if (Path("/root") / d).is_dir()]
    binds = " && ".join(f"mkdir -p {home / d} && mount --bind /root/{d} {home / d}" for d in shared)
    # PID 1 of the namespace must reap the processes `ray stop` ends (sleep would not).
    script = f"{binds + ' && ' if binds else ''}mount --rbind {home} /root && exec {REAPER}"
    holder = subprocess.Popen(
        [*UNSHARE, "sh", "-c", script],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            inner = subprocess.run(
                ["pgrep", "-P", str(holder.pid)], capture_output=True, text=True
            ).stdout.split()
            if inner and holder.poll() is None:
                break
            if holder.poll() is not None or time.monotonic() > deadline:
                pytest.skip("unshare --pid --mount is not permitted here (no namespaces)")
            time.sleep(0.1)
        target = inner[0]  # the reaper, pid 1 of the namespace
        proxy = (
            f"nsenter --target {target} --pid --mount {sshd} -i "
            f"-f {tmp_path / 'sshd_config'} -E {tmp_path / 'sshd.log'}"
        )
        yield proxy, home, target
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the namespace's init dies: all of it goes
        holder.wait()


def processes_in(target: str) -> list[str]:
    out = subprocess.run(
        ["nsenter", "--target", target, "--pid", "--mount", "ps", "-e", "-o", "pid=,comm="],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    found = [line.split(None, 1) for line in out if line.strip()]
    return [comm for pid, comm in found if pid != "1" and comm not in ("ps", "nsenter")]


@pytest.mark.slow
def test_ray_up_local_provider_deploy_and_down(remote_host, tmp_path):
    proxy, home, target = remote_host
    gcs, dashboard, serve_port = free_port(), free_port(), free_port()
    config = yaml.safe_load((LAUNCH / "local.yaml").read_text())
    config["cluster_name"] = f"kvmesh-test-{os.getpid()}-{gcs}"
    # One machine: it is the head; the shipped config's worker list stays for real hosts.
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config.update(min_workers=0, max_workers=0)
    config["auth"] = {
        "ssh_user": "root",
        "ssh_private_key": str(tmp_path / "client_key"),
        "ssh_proxy_command": proxy,
    }
    # The checkout is synced for real (rsync over SSH); installing it into this machine's
    # Python is what we skip: the pretend host already runs this checkout's environment.
    config["setup_commands"] = ["bash -n ~/kvmesh/cluster/launch/install-node.sh"]
    config["head_start_ray_commands"] = [
        c.replace("--port=6379", f"--port={gcs}").replace(
            "ray start --head",
            f"ray start --head --dashboard-port={dashboard} --num-cpus=2 "
            f"--memory={3 * 1024**3} --object-store-memory={200 * 1024**2} "
            "--disable-usage-stats",
        )
        for c in config["head_start_ray_commands"]
    ]
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}

    def ray(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / "ray"), *args, str(cluster_yaml)],
            cwd=REPO,  # file_mounts' "." is this checkout
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert done.returncode == 0, f"ray {args}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done

    # The operator's `ray get-auth-token --generate` on the head: `ray start` finds the token
    # and turns token authentication on.
    token = secrets.token_hex(16)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    ray("up", "-y", "--no-config-cache")
    try:
        assert (home / "kvmesh" / "cluster" / "launch" / "local.yaml").is_file()  # synced
        assert (home / "ray_bootstrap_config.yaml").is_file()
        assert "raylet" in processes_in(target)
        # Token authentication is on: without the token, nothing gets deployed.
        refused = httpx.get(f"http://127.0.0.1:{dashboard}/api/serve/applications/")
        assert refused.status_code == 401, refused.text
        deploy_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        app = tmp_path / "app.yaml"
        app.write_text(
            f"port: {serve_port}\nmodels:\n  - name: smol\n    num_cpus: 1\n"
            "    torch_threads: 1\n    engine: {max_model_len: 512, num_kv_blocks: 64}\n"
        )

        def kvmesh(*args: str) -> subprocess.CompletedProcess:
            address = f"http://127.0.0.1:{dashboard}"
            return subprocess.run(
                [str(BIN / "kvmesh"), *args, "--address", address],
                env=deploy_env,
                capture_output=True,
                text=True,
                timeout=600,
            )

        deployed = kvmesh("deploy", "--config", str(app))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        body = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 6}
        r = httpx.post(f"http://127.0.0.1:{serve_port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
        removed = kvmesh("down")
        assert removed.returncode == 0 and "removed kvmesh" in removed.stdout, removed.stderr
        try:  # Serve's proxy may stay (404: no app there) or be gone with its last app
            gone = httpx.post(
                f"http://127.0.0.1:{serve_port}/v1/completions", json=body, timeout=10
            ).status_code
        except httpx.HTTPError:
            gone = None
        assert gone in (None, 404), gone
    finally:
        down = ray("down", "-y", "-v")
    deadline = time.monotonic() + 30
    while left := processes_in(target):  # `ray down` ran `ray stop` on the head
        assert time.monotonic() < deadline, f"left after ray down: {left}\n{down.stdout[-3000:]}"
        time.sleep(1)
