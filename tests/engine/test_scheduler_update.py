"""The scheduler's update step as a pure function of (state, step output), property-tested
without a model: random prompts sharing prefixes, random tokens (end-of-sequence among them),
random sampling faults, aborts, stop-string stops and the preemptions a small pool forces.
After every step the books balance; at the end every KV block is free, and the runner (a fake
that only follows ``new_requests`` / ``finished_request_ids``) holds nothing."""

from __future__ import annotations

import copy
import random

from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvmesh import SamplingParams
from kvmesh.replicas.block_hash import BlockHasher
from kvmesh.replicas.kv.block_pool import NULL_BLOCK_ID
from kvmesh.replicas.kv.manager import KVCacheManager
from kvmesh.replicas.request import Request, RequestStatus
from kvmesh.replicas.scheduler import Scheduler
from kvmesh.replicas.step_types import RunnerOutput, SchedulerOutput

EOS = 2
BLOCK = 4
PREFIXES = [[5 + i for i in range(9)], [40 + i for i in range(6)], []]


def make_scheduler(sliding_window: int | None, caching: bool, prefill_cap: int = 0) -> Scheduler:
    kv = KVCacheManager(10, BlockHasher.for_model("m", BLOCK), caching, sliding_window)
    return Scheduler(
        kv,
        6,
        12,
        True,
        eos_token_ids=[EOS],
        max_model_len=48,
        long_prefill_token_threshold=prefill_cap,
    )


class FakeRunner:
    """Follows the runner's side of the seam: which requests it keeps sampling state for."""

    def __init__(self) -> None:
        self.rows: set[str] = set()

    def execute(self, sched: SchedulerOutput, rng: random.Random, doomed: set[str]):
        for rid in sched.finished_request_ids:
            self.rows.discard(rid)
        for new in sched.new_requests:
            assert new.request_id not in self.rows
            self.rows.add(new.request_id)
        sampled = {}
        for chunk in sched.chunks:
            assert chunk.request_id in self.rows
            assert all(b != NULL_BLOCK_ID for b in chunk.block_ids[-1:])  # where it writes
            if chunk.sample:
                if chunk.request_id in doomed:
                    sampled[chunk.request_id] = RuntimeError("row fault")
                else:
                    token = EOS if rng.random() < 0.03 else rng.randrange(3, 60)
                    sampled[chunk.request_id] = (token, None)
        return RunnerOutput(sampled)


def fingerprint(s: Scheduler) -> tuple:
    kv = s.kv
    reqs = tuple(
        (r.request_id, r.status, r.num_computed_tokens, tuple(r.token_ids), r.finish_reason)
        for r in sorted(s.requests.values(), key=lambda r: r.request_id)
    )
    return (
        reqs,
        tuple(r.request_id for r in s.waiting),
        tuple(r.request_id for r in s.running),
        tuple(sorted((rid, tuple(kv.block_ids(s.requests[rid]))) for rid in kv.req_blocks)),
        tuple(kv.pool._free),
        frozenset(kv.cached_block_hashes()),
        s.num_generated_tokens,
        s.pending_prefill_tokens(),
        tuple(s._finished_ids),
    )


def check_books(s: Scheduler) -> None:
    kv = s.kv
    kv.check_invariants()
    assert set(s.requests) == {r.request_id for r in [*s.waiting, *s.running]}
    assert all(r.status == RequestStatus.RUNNING for r in s.running)
    assert all(r.status == RequestStatus.WAITING for r in s.waiting)
    assert set(kv.req_blocks) <= {r.request_id for r in s.running}
    for req in s.running:
        assert len(kv.req_blocks[req.request_id]) * BLOCK >= req.num_computed_tokens
        assert req.num_output_tokens <= req.max_tokens
    # The running sums equal what a full walk gives.
    got = s.pending_prefill_tokens()  # (looks up the estimates of new arrivals first)
    want = sum(max(r.num_prompt_tokens - r.num_computed_tokens, 0) for r in s.running)
    want += sum(max(r.num_prompt_tokens - (r.cached_estimate or 0), 0) for r in s.waiting)
    assert got == want


def step(s: Scheduler, runner: FakeRunner, rng: random.Random, doomed: set[str]) -> None:
    sched = s.schedule()
    if not sched:
        return
    result = runner.execute(sched, rng, doomed)
    if sched.preempted_request_ids:
        event("preempted")
    twin = copy.deepcopy(s)
    updates = s.update_from_output(sched, result)
    # Pure: the same state and the same step output give the same updates and state.
    assert twin.update_from_output(sched, result) == updates
    assert fingerprint(twin) == fingerprint(s)
    for update in updates:
        if update.finished:
            event(f"finished: {update.finish_reason}")
        assert update.request_id not in s.requests or not update.finished
        if update.request_id in doomed:
            assert update.finish_reason == "error" and update.phase == "sample"
        if update.finish_reason == "stop" and update.stop_reason is None:
            assert update.new_token_ids == [EOS]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 12), st.integers(1, 20)),
        st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 4), st.integers(8, 20)),
        st.tuples(st.just("step")),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("stop"), st.integers(0, 30)),  # a stop string, found downstream
        st.tuples(st.just("fault"), st.integers(0, 30)),  # the request's row raises
    ),
    min_size=4,
    max_size=40,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    ops=ops,
    seed=st.integers(0, 10_000),
    sliding_window=st.sampled_from([None, 6]),
    caching=st.booleans(),
    prefill_cap=st.sampled_from([0, 3]),
)
def test_update_is_pure_and_every_block_comes_back(ops, seed, sliding_window, caching, prefill_cap):
    s = make_scheduler(sliding_window, caching, prefill_cap)
    runner, rng = FakeRunner(), random.Random(seed)
    added: list[str] = []
    doomed: set[str] = set()
    for n, item in enumerate(ops):
        if item[0] == "add":
            _, prefix, suffix, max_tokens = item
            prompt = PREFIXES[prefix] + [rng.randrange(3, 60) for _ in range(suffix)]
            params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=0)
            rid = f"r{n}"
            s.add(Request(rid, prompt, params, max_tokens))
            added.append(rid)
        elif item[0] == "step":
            step(s, runner, rng, doomed)
        elif added:
            rid = added[item[1] % len(added)]
            if item[0] == "fault":
                doomed.add(rid)
            else:
                reason = "abort" if item[0] == "abort" else "stop"
                ended = s.finish_requests([rid], reason, "</s>" if reason == "stop" else None)
                assert ended == ([rid] if ended else [])
        check_books(s)
    for _ in range(1000):
        if not s.has_work():
            break
        step(s, runner, rng, doomed)
        check_books(s)
    assert not s.has_work() and not s.requests
    assert s.kv.num_blocks_free == s.kv.num_blocks_total
    assert not s.kv.req_blocks
    # What the next step would hand the runner: the last finished ids.
    runner.execute(SchedulerOutput(finished_request_ids=s._finished_ids), rng, doomed)
    s._finished_ids = []
    assert not runner.rows


def test_a_long_prompt_leaves_room_for_a_request_behind_it():
    """Budget 12: uncapped, a 20-token prompt takes the whole first two steps and a 3-token
    request arriving behind it waits; capped at 4 tokens per request per step, both run in
    the first step and the short one samples its first token there."""
    long_prompt, short_prompt = list(range(3, 23)), [30, 31, 32]
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=0)
    for cap, want in ((0, {"long": 12}), (4, {"long": 4, "short": 3})):
        s = make_scheduler(None, caching=True, prefill_cap=cap)
        s.add(Request("long", long_prompt, params, 4))
        s.add(Request("short", short_prompt, params, 4))
        sched = s.schedule()
        assert {c.request_id: c.num_tokens for c in sched.chunks} == want
        assert any(c.sample for c in sched.chunks) == (cap > 0)
        for rid in ("long", "short"):
            s.finish_requests([rid], "abort", None)
        assert s.kv.num_blocks_free == s.kv.num_blocks_total


def test_one_long_prompt_prefills_at_a_time_and_short_ones_pass_the_waiting_one():
    """Cap 4, budget 12: of two 10-token prompts only the first prefills while it needs more
    than one chunk (sharing every step would finish both late); a 3-token request behind the
    second runs in the first step. The second starts in the step the first takes its last
    chunk, and everything prefills in the original order otherwise."""
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=0, ignore_eos=True)
    s = make_scheduler(None, caching=False, prefill_cap=4)
    s.add(Request("long1", list(range(3, 13)), params, 4))
    s.add(Request("long2", list(range(20, 30)), params, 4))
    s.add(Request("short", [30, 31, 32], params, 4))
    runner, rng = FakeRunner(), random.Random(0)
    steps = []
    while s.has_work() and len(steps) < 20:
        sched = s.schedule()
        steps.append({c.request_id: c.num_tokens for c in sched.chunks})
        s.update_from_output(sched, runner.execute(sched, rng, set()))
    assert steps[:4] == [
        {"long1": 4, "short": 3},
        {"long1": 4, "short": 1},
        {"long1": 2, "short": 1, "long2": 4},
        {"long1": 1, "short": 1, "long2": 4},
    ]
    assert s.kv.num_blocks_free == s.kv.num_blocks_total

    # Two at once when allowed: both long prompts share the first step.
    s = make_scheduler(None, caching=False, prefill_cap=4)
    s.max_long_partial_prefills = 2
    s.add(Request("long1", list(range(3, 13)), params, 4))
    s.add(Request("long2", list(range(20, 30)), params, 4))
    sched = s.schedule()
    assert {c.request_id: c.num_tokens for c in sched.chunks} == {"long1": 4, "long2": 4}
    for rid in ("long1", "long2"):
        s.finish_requests([rid], "abort", None)
    assert s.kv.num_blocks_free == s.kv.num_blocks_total
