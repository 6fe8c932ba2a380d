"""Per-step torch threads: a step with real work runs on the burst threads, a light one on the
base threads, and the requests finish as they would on fixed threads."""

from __future__ import annotations

import pytest
import torch

from kvmesh import SamplingParams
from kvmesh.replicas.llm_engine import LLMEngine
from kvmesh.replicas.step_threads import StepThreads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_each_steps_work(make_tiny_model, restore_threads, assert_all_blocks_free):
    engine = LLMEngine(
        model=str(make_tiny_model(num_hidden_layers=1)),
        block_size=4,
        num_kv_blocks=64,
        max_num_batched_tokens=16,
    )
    engine.step_threads = StepThreads(base=1, burst=2, burst_min_tokens=8)
    seen: list[tuple[int, int]] = []  # (tokens in the step, torch threads during its forward)
    forward = engine.runner.forward

    def recording(inputs):
        seen.append((int(inputs.input_ids.numel()), torch.get_num_threads()))
        return forward(inputs)

    engine.runner.forward = recording
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)
    # A 40-token prompt prefills in chunks of 16, 16 and 8 tokens; then single-token decodes.
    engine.add_request(None, params, prompt_token_ids=list(range(1, 41)))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [n for n, _ in seen] == [16, 16, 8, 1, 1, 1, 1, 1]
    assert all(threads == (2 if n >= 8 else 1) for n, threads in seen), seen
    (done,) = outputs
    assert len(done.outputs[0].token_ids) == 6
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base=0, burst=2), "thread counts"),
        (dict(base=1, burst=0), "thread counts"),
        (dict(base=1, burst=2, burst_min_tokens=0), "burst_min_tokens"),
    ],
)
def test_bad_thread_counts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepThreads(**kwargs)
