"""Fuzz the live app against its own OpenAPI document (schemathesis).

Every operation of ``router/openapi.py``'s document, in positive mode (requests the document
calls valid) and negative mode (requests it calls invalid), against the session's real Ray
Serve app and its tiny real models, in two bounded, reproducible phases:

* coverage: schemathesis' deterministic boundary cases (each optional field alone, minimum and
  maximum values and lengths, each constraint broken in turn, undeclared methods);
* fuzzing: ``MAX_EXAMPLES`` derandomised Hypothesis examples per operation and mode.

Every response must be: no 5xx but a 503 with ``Retry-After`` (a 429 needs one too); a
documented status, content type and headers; a body matching the document (every SSE event,
too); strict JSON (no ``NaN`` / ``Infinity``); a stream that ends in ``[DONE]`` without an
error event. Invalid requests must be refused with a 400 (401 without a key, 413 when too
big); an undeclared method with a 405 and ``Allow``. Afterwards a normal request still
succeeds and every replica's KV blocks are free again.

Examples are steered only where needed to keep the run fast and reaching the engine: positive
ones cap ``max_tokens`` / ``max_completion_tokens`` / ``min_tokens`` at ``MAX_GEN_TOKENS`` (a
chat request without a limit would generate until the context is full) and mostly name a
served model (any other name is only ever a 404); negative ones swap a well-formed but unknown
model name for a served one, so that the 404 does not hide the invalid part.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from kvmesh.router.openapi import openapi_schema
from kvmesh.router.protocol import MAX_NAME_CHARS

pytestmark = pytest.mark.slow

DOC = openapi_schema()
MAX_EXAMPLES = 30
"""Fuzzing examples per operation and mode; operations without inputs stop at their few."""
MAX_GEN_TOKENS = 8
SERVED_MODELS = ["tiny", "tiny-b", "tiny-q", "tiny-canary"]
REQUEST_TIMEOUT_S = 20
"""Far above what any steered request needs (well under a second): past it, a hang."""
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]
CONFIG = {
    "max-stream-events": 100_000,  # read every stream to its end
    # Reproductions in full: the test key is no secret, and "*token*" fields are no tokens.
    "output": {"sanitization": {"enabled": False}},
    "checks": {
        "negative_data_rejection": {"expected-statuses": ["400", "401", "413"]},
    },
}
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def _has_inputs(operation: dict) -> bool:
    """Anything negative mode can break: a body, parameters or a required API key."""
    secured = operation.get("security", DOC.get("security")) not in (None, [])
    return bool(operation.get("requestBody") or operation.get("parameters") or secured)


RUNS = [
    pytest.param(f"{method.upper()} {path}", mode, id=f"{operation['operationId']}-{mode.value}")
    for path, item in DOC["paths"].items()
    for method, operation in item.items()
    for mode in MODES
    if mode is GenerationMode.POSITIVE or _has_inputs(operation)
]


# ---- steering -------------------------------------------------------------------------------
def _well_formed_name(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= MAX_NAME_CHARS


def _capped(value: Any) -> Any:
    """A whole number over ``MAX_GEN_TOKENS`` becomes it; anything else (invalid) stays."""
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    return MAX_GEN_TOKENS if whole and value > MAX_GEN_TOKENS else value


def steer(case: Case, model: str | None) -> Case:
    """Keep generation short and make most requests reach a served model.

    Each change replaces a value the document calls valid with another valid one, so a
    negative case stays negative: lengths over ``MAX_GEN_TOKENS`` are capped, a chat request
    without a limit gets one (else it generates until the context is full: a minute here),
    and the model is the one drawn (positive; None keeps the generated name) or, in negative
    mode, a served one when the generated name is well-formed but unknown."""
    body = case.body
    if not isinstance(body, dict) or not ("prompt" in body or "messages" in body):
        return case
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if key in body:
            body[key] = _capped(body[key])
    if "messages" in body and body.get("max_tokens") is body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_GEN_TOKENS
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if negative:
        if _well_formed_name(body.get("model")) and body["model"] not in SERVED_MODELS:
            body["model"] = SERVED_MODELS[0]
    elif model is not None:
        body["model"] = model
    case.body = body
    return case


# ---- checks beyond schemathesis' ------------------------------------------------------------
def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_not_json)


def sse_events(text: str) -> list[str]:
    """The ``data`` payloads of a ``text/event-stream`` body (one data line per event)."""
    assert text.endswith("\n\n"), f"the stream does not end with a whole event: {text[-200:]!r}"
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, f"bad SSE event {block!r}"
        events.append(block[len("data: ") :])
    return events


def check_wire(case: Case, response: schemathesis.Response) -> None:
    status = response.status_code
    headers = {name.lower(): values[-1] for name, values in response.headers.items()}
    text = response.content.decode("utf-8", errors="replace")
    where = f"{case.method} {case.path} -> {status}\n{case.as_curl_command()}\n{text[:2000]}"
    assert status < 500 or status == 503, f"server error: {where}"
    if status in (429, 503):
        assert headers.get("retry-after", "").isdigit(), f"no Retry-After: {where}"
    ctype = headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            strict_json(text)
        except ValueError as exc:
            raise AssertionError(f"the body is not strict JSON ({exc}): {where}") from None
    elif ctype.startswith("text/event-stream"):
        assert not response.stream_cut_short, f"the stream was cut short: {where}"
        events = sse_events(text)
        assert events[-1:] == ["[DONE]"], f"the stream does not end with [DONE]: {where}"
        assert "[DONE]" not in events[:-1], f"[DONE] before the end: {where}"
        for data in events[:-1]:
            try:
                event = strict_json(data)
            except ValueError as exc:
                msg = f"event {data!r} is not strict JSON ({exc}): {where}"
                raise AssertionError(msg) from None
            assert "error" not in event, f"the stream failed: {data}\n{where}"


# ---- the runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(serve_app) -> schemathesis.BaseSchema:
    served = httpx.get(f"{serve_app.url}/openapi.json", timeout=30)
    assert served.status_code == 200, served.text
    assert served.json() == json.loads(json.dumps(DOC)), "the app serves another document"
    config = schemathesis.Config.from_dict(CONFIG)
    return schemathesis.openapi.from_dict(served.json(), config=config)


@pytest.fixture(scope="module")
def call(serve_app):
    """Send a case to the app with the API key, and check the response."""
    auth = {"Authorization": f"Bearer {serve_app.api_key}"}
    with requests.Session() as session:

        def send(case: Case) -> None:
            response = case.call(
                base_url=serve_app.url, session=session, headers=auth, timeout=REQUEST_TIMEOUT_S
            )
            check_wire(case, response)
            case.validate_response(response, checks=CHECKS, headers=auth)

        yield send


def operation_of(api, label: str):
    method, path = label.split(" ", 1)
    return api[path][method]


def _kind(failure: str) -> str:
    """What went wrong, without the case: schemathesis' failure titles, else the first line."""
    titles = [line for line in failure.splitlines() if line.startswith("- ")]
    return "\n".join(titles) or failure.split("\n", 1)[0]


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_coverage_phase(api, call, label: str, mode: GenerationMode) -> None:
    """Schemathesis' deterministic boundary cases; every failing case is collected."""
    operation = operation_of(api, label)
    cases = api.iter_coverage_cases(
        operation,
        generation_modes=[mode],
        generation_config=api.config.generation_for(operation=operation),
    )
    failures: dict[str, list[str]] = {}
    for i, case in enumerate(cases):
        model = SERVED_MODELS[i % len(SERVED_MODELS)] if i % 5 else None
        try:
            call(steer(case, model))
        except (Exception, FailureGroup) as exc:
            failures.setdefault(_kind(str(exc)), []).append(str(exc))
    report = [f"{len(found)} case(s) like this:\n{found[0]}" for found in failures.values()]
    assert not failures, "\n\n".join(report)


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_fuzz_phase(api, call, label: str, mode: GenerationMode) -> None:
    """``MAX_EXAMPLES`` derandomised Hypothesis examples; stops at the first failure."""
    cases = operation_of(api, label).as_strategy(generation_mode=mode)
    models = st.sampled_from([*SERVED_MODELS, None])  # None: keep the generated name

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a slow failure shrinks for minutes
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=st.builds(steer, cases, models))
    def run(case: Case) -> None:
        call(case)

    run()


def test_serves_normally_after_fuzzing(serve_app) -> None:
    """After both phases (file order): the app still answers and no KV block is held."""
    with serve_app.client() as client:
        r = client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "The capital of France is", "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1

        deadline = time.monotonic() + 10
        while True:
            snaps = client.get("/debug/replicas").json()
            held = {
                s["replica"]: (s["stats"]["kv_blocks_free"], s["stats"]["kv_blocks_total"])
                for s in snaps
                if s["stats"]["kv_blocks_free"] != s["stats"]["kv_blocks_total"]
            }
            if snaps and not held:
                break
            assert time.monotonic() < deadline, f"KV blocks still held (free, total): {held}"
            time.sleep(0.25)
        assert {s["model"] for s in snaps} >= {"tiny", "tiny-b", "tiny-q"}
