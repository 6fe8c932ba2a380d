"""The load generator: workloads, statistics, and one small real run against the app."""

from __future__ import annotations

import json

import pytest

from kvmesh.cluster import loadgen
from kvmesh.cluster.cli import main


def test_workloads_have_the_requested_shapes():
    spec = loadgen.WorkloadSpec(kind="synthetic", num_requests=5, input_len=20, output_len=7)
    reqs = loadgen.make_requests(spec)
    assert [len(r.prompt_token_ids) for r in reqs] == [20] * 5
    assert {r.max_tokens for r in reqs} == {7}
    mixed = loadgen.make_requests(
        loadgen.WorkloadSpec(kind="mixed", num_requests=200, input_len=40, output_len=40)
    )
    lens = [len(r.prompt_token_ids) for r in mixed]
    assert min(lens) >= 10 and max(lens) <= 70 and len(set(lens)) > 20
    shared = loadgen.make_requests(
        loadgen.WorkloadSpec(
            kind="shared-prefix", num_requests=6, input_len=5, prefix_len=32, num_prefixes=2
        )
    )
    assert shared[0].prompt_token_ids[:32] == shared[2].prompt_token_ids[:32]
    assert shared[0].prompt_token_ids[:32] != shared[1].prompt_token_ids[:32]
    assert len(shared[0].prompt_token_ids) == 37
    assert loadgen.make_requests(spec)[0] == reqs[0]  # seeded: same workload every run


def test_summary_percentiles_goodput_and_errors():
    results = []
    for i in range(100):
        r = loadgen.RequestResult(
            ok=True,
            start=0.0,
            ttft=(i + 1) / 1000,
            e2e=1.0,
            itl=[0.01],
            prompt_tokens=10,
            output_tokens=11,
        )
        results.append(r)
    results.append(loadgen.RequestResult(ok=False, start=0.0, error="HTTP 429: busy"))
    s = loadgen.summarize(results, duration_s=10.0, slo_ttft_ms=50)
    assert s["ttft_ms"]["p50"] == pytest.approx(50) and s["ttft_ms"]["p99"] == pytest.approx(99)
    assert s["tpot_ms"]["p50"] == pytest.approx((1.0 - 0.05) / 10 * 1e3, rel=0.05)
    assert (s["completed"], s["errors"]) == (100, 1) and s["error_examples"] == ["HTTP 429: busy"]
    assert s["request_throughput"] == pytest.approx(10.0)
    assert s["output_token_throughput"] == pytest.approx(110.0)
    assert s["goodput"] == pytest.approx(5.0)  # 50 of 100 met TTFT <= 50 ms


def test_only_loopback_targets():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"):
        loadgen.check_loopback(url)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            loadgen.check_loopback(url)


@pytest.mark.slow
def test_bench_serve_against_the_app(serve_app, tmp_path):
    out, png = tmp_path / "report.json", tmp_path / "latency.png"
    rc = main(
        [
            "bench",
            "serve",
            "--url",
            serve_app.url,
            "--model",
            "tiny",
            "--api-key",
            serve_app.api_key,
            "--concurrency",
            "1,3",
            "--num-requests",
            "6",
            "--input-len",
            "24",
            "--output-len",
            "8",
            "--workload",
            "shared-prefix",
            "--prefix-len",
            "32",
            "--slo-ttft-ms",
            "5000",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert [p["load"] for p in report["points"]] == [1, 3]
    for point in report["points"]:
        s = point["summary"]
        assert (s["completed"], s["errors"]) == (6, 0)
        assert s["output_tokens"] == 6 * 8 and s["prompt_tokens"] == 6 * (32 + 24)
        assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] and s["tpot_ms"]["p50"] > 0
        assert s["goodput"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
