"""configs/ against a real Prometheus scraping the real app.

A Prometheus server (Debian's ``prometheus`` package; ``.ci/install`` installs it) scrapes the
shared app's ``/metrics`` every second with the API key from a ``credentials_file`` and loads
the recording and alert rules from ``configs/prometheus``. After ~20 s of traffic, every query
of the Grafana dashboard and every rule expression must return data, so a renamed metric or a
label that does not match fails here, not on someone's empty panel. ``promtool`` checks the
rule files, runs their unit tests and checks the example scrape config.

Outside CI a missing ``prometheus`` skips this module; in CI (``$CI`` set) it fails.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from kvmesh_testing import free_port, wait_until_ok

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROM = CONFIGS / "prometheus"
RULE_FILES = (PROM / "recording_rules.yml", PROM / "alert_rules.yml")
RULE_TESTS = PROM / "alert_rules_test.yml"
EXAMPLE_CONFIG = PROM / "prometheus.yml"
DASHBOARD = CONFIGS / "grafana" / "kvmesh-dashboard.json"

JOB = "kvmesh"  # the alert on `up` selects this job, as the example config names it
TRAFFIC_S = 18.0
# Grafana's variables, as the test evaluates the dashboard: every model, one-minute windows
# (60 one-second scrapes: enough points after the traffic, short enough to hold it).
GRAFANA_VARS = {
    "${model_name}": ".*",
    "$model_name": ".*",
    "$__rate_interval": "1m",
    "$__interval": "1m",
}
# A shared prompt prefix (several KV blocks) so prefix-cache hits happen, with varied tails.
PREFIX = "You are a helpful assistant that answers in one short sentence. " * 4


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not on PATH in CI: .ci/install installs Debian's prometheus")
        pytest.skip(f"{name} is not installed (apt-get install prometheus; CI installs it)")
    return path


def _run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{out}"
    return out


# ---- promtool: no server needed --------------------------------------------------------------
def test_promtool_checks_rules_and_runs_their_unit_tests():
    promtool = _binary("promtool")
    out = _run(promtool, "check", "rules", *RULE_FILES)
    assert out.count("SUCCESS") == len(RULE_FILES), out
    out = _run(promtool, "test", "rules", RULE_TESTS)
    assert "SUCCESS" in out, out


def test_promtool_checks_example_config(tmp_path):
    promtool = _binary("promtool")
    _run(promtool, "check", "config", "--syntax-only", EXAMPLE_CONFIG)
    # The full check also loads the rule files and wants the key file to exist: check a copy
    # whose credentials_file points at a real file, next to copies of the rule files.
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    for scrape in config["scrape_configs"]:
        assert scrape["authorization"]["credentials_file"], scrape
        scrape["authorization"]["credentials_file"] = str(tmp_path / "api-key")
    (tmp_path / "api-key").write_text("some-key-0123456789\n")
    for rules in RULE_FILES:
        shutil.copy(rules, tmp_path / rules.name)
    assert sorted(config["rule_files"]) == sorted(r.name for r in RULE_FILES)
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    out = _run(promtool, "check", "config", copy)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out, out


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["DS_PROMETHEUS"]["type"] == "datasource"
    assert names["model_name"]["includeAll"] and names["model_name"]["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel, target in _targets(dash):
        assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        # Every model-labelled query follows the model selector (ingress series have no model).
        if "kvmesh:http_" not in target["expr"]:
            assert 'model_name=~"$model_name"' in target["expr"], (panel["title"], target)


# ---- a real Prometheus scraping the app ------------------------------------------------------
class Prometheus:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}\n{r.text}"
        return body["data"]["result"]

    def query_with_data(self, expr: str, what: str, timeout_s: float = 10.0) -> list[dict]:
        """The query's samples, at least one a number (not NaN). Retried for a while: one slow
        or failed scrape marks every series stale until the next one succeeds."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if any(math.isfinite(float(s["value"][1])) for s in result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no data from {expr!r}; got {result}")
            time.sleep(1.0)

    def rules(self) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/rules")
        r.raise_for_status()
        return [rule for g in r.json()["data"]["groups"] for rule in g["rules"]]


def _send_traffic(serve_app, duration_s: float) -> int:
    """Completions and chats to ``tiny`` and ``tiny-b``, some streamed, for ``duration_s``.
    Sampled (temperature 1, no seed) so the response cache never answers in the engine's
    place. Each worker waits for its request to finish, so every KV block is free after."""
    deadline = time.monotonic() + duration_s

    def worker(model: str, seed: int) -> int:
        ok = 0
        with serve_app.client() as c:
            for i in itertools.count():
                if time.monotonic() > deadline:
                    return ok
                tail = f"Question {seed}-{i}: what is {i} plus {seed}?"
                common = {"model": model, "max_tokens": 8, "temperature": 1.0}
                stream = i % 3 == 0
                if i % 2:
                    path = "/v1/chat/completions"
                    body = {**common, "messages": [{"role": "user", "content": PREFIX + tail}]}
                else:
                    path = "/v1/completions"
                    body = {**common, "prompt": PREFIX + tail}
                if stream:
                    with c.stream("POST", path, json={**body, "stream": True}) as r:
                        text = "".join(r.iter_text())
                        status = r.status_code
                    assert status != 200 or "[DONE]" in text, text
                else:
                    r = c.post(path, json=body)
                    status = r.status_code
                # 429: tiny-b's engine queue holds 2; shedding is fine, errors are not.
                assert status in (200, 429), (status, path, model)
                ok += status == 200
                time.sleep(0.05)
        return ok

    jobs = [("tiny", 1), ("tiny", 2), ("tiny-b", 3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return sum(pool.map(lambda job: worker(*job), jobs))


@pytest.fixture(scope="module")
def prometheus(serve_app, tmp_path_factory) -> Iterator[Prometheus]:
    binary = _binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    key_file = tmp / "api-key"
    key_file.write_text(serve_app.api_key)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(key_file)},
                "static_configs": [{"targets": [urlsplit(serve_app.url).netloc]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={urlsplit(url).netloc}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(url, log)
    try:
        wait_until_ok(f"{url}/-/ready", timeout_s=30, proc=proc, log=log, period_s=0.2)
        with serve_app.client() as c:
            # Error series, early so that their counters have points in every window.
            unknown = {"model": "no-such-model", "prompt": "hi"}
            assert c.post("/v1/completions", json=unknown).status_code == 404
            assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _send_traffic(serve_app, TRAFFIC_S) >= 20
        time.sleep(2.0)  # a scrape and a rule evaluation after the last request
        yield prom
    finally:
        prom.http.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _targets(dash: dict) -> Iterator[tuple[dict, dict]]:
    for panel in dash["panels"]:
        for inner in [panel, *panel.get("panels", [])]:  # rows may hold collapsed panels
            for target in inner.get("targets", []):
                yield inner, target


def _grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def _without_thresholds(expr: str) -> str:
    """An alert expression with each comparison turned into its ``bool`` form.

    An alert's expression is a condition: while all is well (as in this test) it returns
    nothing, so "no data" cannot tell a healthy app from a misspelt metric. With ``bool`` a
    comparison keeps every series it compares and answers 0 or 1 instead of filtering, so the
    expression returns a sample for every series the alert watches, through its ``and``s and
    arithmetic: empty means a metric is missing or the two sides' labels never match.
    Comparisons inside label matchers (``{status!~"2.."}``) and strings are left alone.
    """
    out: list[str] = []
    braces = 0
    quote = ""
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
            i += 1
            continue
        m = _COMPARISON.match(expr, i) if braces == 0 else None
        if m:
            out.append(m.group())
            i = m.end()
            if not re.match(r"\s*bool\b", expr[i:]):
                out.append(" bool")
            continue
        if c in "\"'`":
            quote = c
        braces += {"{": 1, "}": -1}.get(c, 0)
        out.append(c)
        i += 1
    return "".join(out)


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bkvmesh:[A-Za-z0-9_:]+", expr))


def _rules() -> list[tuple[str, dict]]:
    return [
        (path.name, rule)
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_without_thresholds():
    assert _without_thresholds("a > 0.9") == "a > bool 0.9"
    assert _without_thresholds('x{s!~"2.."} >= y and z>=bool 2') == (
        'x{s!~"2.."} >= bool y and z>=bool 2'
    )
    assert _without_thresholds('up{job="a>b"} == 0') == 'up{job="a>b"} == bool 0'


def test_scrape_target_is_up(prometheus):
    deadline = time.monotonic() + 10
    while True:
        r = prometheus.http.get("/api/v1/targets").json()["data"]["activeTargets"]
        assert len(r) == 1, r
        if r[0]["health"] == "up":
            break
        assert time.monotonic() < deadline, f"target not up: {r[0]}"
        time.sleep(1)
    result = prometheus.query_with_data(f'up{{job="{JOB}"}} == 1', "up")
    assert result, "target up"
    # The template variable's query: every model of the app has its replicas' series.
    result = prometheus.query_with_data(
        "count by (model_name) (kvmesh:num_requests_running)", "model_name variable"
    )
    assert {s["metric"]["model_name"] for s in result} >= {"tiny", "tiny-b", "tiny-q"}


def test_every_dashboard_query_returns_data(prometheus):
    dash = json.loads(DASHBOARD.read_text())
    failures = []
    count = 0
    for panel, target in _targets(dash):
        expr = _grafana_to_promql(target["expr"])
        count += 1
        try:
            prometheus.query_with_data(expr, f"panel {panel['title']!r} ({target['refId']})")
        except AssertionError as exc:
            failures.append(str(exc))
    assert count >= 20, count
    assert not failures, "\n".join(failures)


def test_every_rule_evaluates_and_returns_data(prometheus):
    # Prometheus itself evaluated each rule every second: none may have failed (a
    # many-to-many match, for one, shows only at evaluation).
    loaded = prometheus.rules()
    assert len(loaded) == len(_rules())
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad, bad

    failures = []
    for file, rule in _rules():
        if "record" in rule:
            # The expression, and the series the rule engine recorded from it.
            exprs = [rule["expr"], rule["record"]]
        else:
            exprs = [_without_thresholds(rule["expr"])]
        name = rule.get("record") or rule["alert"]
        # Each metric a rule reads exists on its own too (clearer than a whole expression).
        exprs += sorted(_metric_names(rule["expr"]))
        for expr in exprs:
            try:
                prometheus.query_with_data(expr, f"{file}: {name}")
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, "\n".join(failures)
