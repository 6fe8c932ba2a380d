"""The real 1 -> 2 -> 1 autoscaling run on this machine, with its timeline plot.

    .venv/bin/python bench/autoscale_real.py

Runs ``tests/cluster/test_autoscaling_real.py`` (``kvmesh serve`` with SmolLM2 autoscaled by
kvmesh's policy between 1 and 2 replicas: a burst of long prompts, then long streams on both
replicas while the burst stops, then the scale-down with its drain) and plots what happened:
the autoscaler's target and running replicas, and every request as a bar from start to end
(streams and burst requests apart, by replica). Prints a JSON summary; writes
``bench/plots/autoscale_real.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "bench" / "plots" / "autoscale_real.png"


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timeline.json"
        env = {**os.environ, "KVMESH_AUTOSCALE_TIMELINE": str(out)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:warnings"]
        cmd.append("tests/cluster/test_autoscaling_real.py")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit("the run did not produce a timeline")
        timeline = json.loads(out.read_text())
    timeline["test_passed"] = proc.returncode == 0
    return timeline


def plot(tl: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    t = [d[0] for d in tl["decisions"]]
    top.step(t, [d[1] for d in tl["decisions"]], where="post", label="autoscaler target")
    top.step(t, [d[2] for d in tl["decisions"]], where="post", label="running replicas")
    top.set_ylabel("replicas")
    top.set_ylim(0, 3)
    top.legend(loc="upper right")
    replicas = sorted({r["replica"] for r in tl["requests"] if r["replica"]})
    colors = {name: f"C{i}" for i, name in enumerate(replicas)}
    for i, r in enumerate(sorted(tl["requests"], key=lambda r: r["start"])):
        style = "-" if r["kind"] == "stream" else ":"
        bottom.plot(
            [r["start"], r["end"]],
            [i, i],
            style,
            color=colors.get(r["replica"], "k") if r["ok"] else "red",
            linewidth=2 if r["kind"] == "stream" else 1,
        )
    for name, color in colors.items():
        bottom.plot([], [], color=color, label=name)
    bottom.set_ylabel("requests (solid: streams)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left", fontsize=7)
    fig.suptitle("kvmesh autoscaling on a real app: 1 -> 2 -> 1 replicas, no request lost")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    tl = run()
    plot(tl, PLOT)
    streams = [r for r in tl["requests"] if r["kind"] == "stream"]
    up = next((d for d in tl["decisions"] if d[1] == 2), None)
    print(
        json.dumps(
            {
                "test_passed": tl["test_passed"],
                "requests": len(tl["requests"]),
                "failed": sum(not r["ok"] for r in tl["requests"]),
                "streams": len(streams),
                "scale_up_decided_s": up[0] if up else None,
                "second_replica_serving_s": tl.get("scaled_up"),
                "burst_over_s": tl.get("burst_over"),
                "back_to_one_s": tl.get("scaled_down"),
                "decisions": tl["decisions"],
                "plot": str(PLOT.relative_to(ROOT)),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
