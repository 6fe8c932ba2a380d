"""The batched sampler: a mixed batch gives every row what it gets alone, greedy rows are
exactly the argmax of their (penalised) logits, penalty statistics stay right as they are
extended step by step, and random draws follow the filtered distribution."""

from __future__ import annotations

import random

import pytest
import torch

from kvmesh import SamplingParams
from kvmesh.replicas.sampler import PenaltyState, SamplingRow, penalty_state, sample, sample_row

VOCAB = 512
EOS = [2]


def _mixed_params(i: int) -> SamplingParams:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4),
        dict(temperature=0.7, top_p=0.9, seed=100 + i),
        dict(temperature=1.0, top_k=20, seed=100 + i),
        dict(temperature=0.8, min_p=0.1, seed=100 + i),
        dict(temperature=1.1, frequency_penalty=0.5, presence_penalty=-0.3, seed=100 + i),
        dict(temperature=0.6, top_p=0.8, top_k=30, repetition_penalty=0.9, seed=100 + i),
        dict(temperature=1.3, logprobs=4, seed=100 + i),
        dict(temperature=0.0, logprobs=0, min_tokens=3),
        dict(temperature=0.9, min_tokens=2, stop_token_ids=[5, 6], seed=100 + i),
    ]
    return SamplingParams(max_tokens=64, **kinds[i % len(kinds)])


def _request(i: int, params: SamplingParams, prompt: list[int]) -> SamplingRow:
    req = SamplingRow(f"r{i}", list(prompt), params)
    if not params.greedy:
        req.generator = torch.Generator().manual_seed(params.seed or 0)
    return req


def _prompts(n: int) -> list[list[int]]:
    rnd = random.Random(7)
    return [[rnd.randrange(VOCAB) for _ in range(rnd.randrange(1, 12))] for _ in range(n)]


def test_mixed_batch_rows_match_each_row_sampled_alone():
    """Same seed, same history: the same token and logprobs whatever the batch, step by step
    (the penalty statistics are extended incrementally on both sides)."""
    n = 23
    prompts = _prompts(n)
    batch = [_request(i, _mixed_params(i), prompts[i]) for i in range(n)]
    alone = [_request(i, _mixed_params(i), prompts[i]) for i in range(n)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        logits = torch.randn(n, VOCAB, generator=gen) * 4
        got = sample(logits, batch, EOS)
        for i in range(n):
            want = sample_row(logits[i], alone[i], EOS)
            assert got[i] == want, (i, got[i], want)
            token = want[0]
            batch[i].token_ids.append(token)
            alone[i].token_ids.append(token)


def test_seeded_row_is_independent_of_its_companions():
    """The seeded row's tokens do not change when its companions (and their number) do."""
    prompt = [11, 12, 13]

    def run(companions: int) -> list[int]:
        mine, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
        params = SamplingParams(temperature=0.9, top_p=0.95, top_k=64, seed=42, max_tokens=64)
        me = _request(0, params, prompt)
        others = [_request(j + 1, _mixed_params(j), [j % VOCAB]) for j in range(companions)]
        tokens = []
        for _ in range(8):
            rows = [*others, me]
            logits = torch.cat(
                [
                    torch.randn(companions, VOCAB, generator=theirs),
                    torch.randn(1, VOCAB, generator=mine),  # my row: the same values each run
                ]
            )
            results = sample(logits, rows, EOS)
            token = results[-1][0]
            tokens.append(token)
            for req, res in zip(rows, results, strict=True):
                req.token_ids.append(res[0])
        return tokens

    assert run(0) == run(5) == run(17)


def _reference_greedy(row: torch.Tensor, req: SamplingRow) -> int:
    """The greedy rule, written out densely on one row (as the per-row sampler did)."""
    p = req.params
    row = torch.nan_to_num(row.float(), nan=float("-inf"), posinf=3.4e38 / 4).clamp(max=3.4e38 / 4)
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(VOCAB, dtype=torch.bool)
        seen[torch.tensor(req.token_ids)] = True
        rp = p.repetition_penalty
        row = torch.where(seen, torch.where(row > 0, row / rp, row * rp), row)
    if p.frequency_penalty or p.presence_penalty:
        counts = torch.bincount(
            torch.tensor(req.output_token_ids, dtype=torch.long), minlength=VOCAB
        ).float()
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    if req.num_output_tokens < p.min_tokens:
        row = row.clone()
        row[torch.tensor([*EOS, *(p.stop_token_ids or [])])] = float("-inf")
    return int(row.argmax())


@pytest.mark.parametrize("seed", range(4))
def test_greedy_rows_are_exactly_the_argmax(seed):
    rnd = random.Random(seed)
    n = 16
    reqs = []
    for i in range(n):
        greedy = i % 2 == 0
        params = SamplingParams(
            temperature=0.0 if greedy else 0.8,
            repetition_penalty=rnd.choice([1.0, 1.2, 0.7]),
            frequency_penalty=rnd.choice([0.0, 0.5, -1.0]),
            presence_penalty=rnd.choice([0.0, 1.5]),
            min_tokens=rnd.choice([0, 0, 5]),
            seed=i,
            max_tokens=64,
        )
        req = _request(i, params, [rnd.randrange(VOCAB) for _ in range(5)])
        req.token_ids += [rnd.randrange(20) for _ in range(rnd.randrange(0, 30))]
        reqs.append(req)
    # Near-ties everywhere: a rounding difference would show as a different argmax.
    logits = (torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 1e-3).round(
        decimals=4
    )
    results = sample(logits, reqs, EOS)
    for i in range(0, n, 2):
        assert results[i][0] == _reference_greedy(logits[i], reqs[i]), i
    plain = [_request(i, SamplingParams(temperature=0.0, logprobs=1), [1]) for i in range(n)]
    got = [t for t, _ in sample(logits, plain, EOS)]  # the general path (logprobs asked)
    assert got == logits.argmax(dim=-1).tolist()


def test_penalty_state_extended_step_by_step_equals_a_fresh_one():
    rnd = random.Random(1)
    prompt = [rnd.randrange(50) for _ in range(20)]
    req = SamplingRow("x", prompt, SamplingParams(repetition_penalty=1.1))
    for step in range(60):
        burst = 1 if step % 7 else 3  # several tokens at once too
        req.token_ids += [rnd.randrange(60) for _ in range(burst)]
        kept = penalty_state(req, VOCAB, torch.device("cpu"))
    fresh = PenaltyState(req, torch.device("cpu"))
    fresh.extend(req.token_ids, VOCAB)

    def dense(state: PenaltyState) -> tuple[torch.Tensor, torch.Tensor]:
        seen = torch.zeros(VOCAB, dtype=torch.bool)
        counts = torch.zeros(VOCAB)
        seen[state.ids[: state.size]] = True
        counts[state.ids[: state.size]] = state.counts[: state.size]
        return seen, counts

    want_seen = torch.zeros(VOCAB, dtype=torch.bool)
    want_seen[torch.tensor(req.token_ids)] = True
    want_counts = torch.bincount(torch.tensor(req.output_token_ids), minlength=VOCAB).float()
    for state in (kept, fresh):
        seen, counts = dense(state)
        assert torch.equal(seen, want_seen) and torch.equal(counts, want_counts)


def test_draws_follow_the_filtered_distribution():
    """Many independently seeded rows of one distribution: frequencies match its softmax,
    and top-k / top-p / min-p masked tokens are never drawn."""
    n, vocab = 4000, 8
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -8.0])
    logits = base.repeat(n, 1)

    def draw(**kw) -> torch.Tensor:
        reqs = []
        for i in range(n):
            req = SamplingRow(f"d{i}", [1], SamplingParams(seed=i, **kw))
            req.generator = torch.Generator().manual_seed(i)
            reqs.append(req)
        tokens = torch.tensor([t for t, _ in sample(logits, reqs, [])])
        return torch.bincount(tokens, minlength=vocab).float() / n

    freq = draw(temperature=1.0)
    assert torch.allclose(freq, torch.softmax(base, -1), atol=0.03), freq
    assert (draw(temperature=1.0, top_k=3)[3:] == 0).all()
    probs = torch.softmax(base, -1)
    keep = int(((probs.cumsum(0) - probs) < 0.7).sum())
    top_p = draw(temperature=1.0, top_p=0.7)
    assert (top_p[keep:] == 0).all() and (top_p[:keep] > 0).all()
    min_p = draw(temperature=1.0, min_p=0.3)
    assert (min_p[probs < 0.3 * probs.max()] == 0).all()
    hot = draw(temperature=0.5)
    assert torch.allclose(hot, torch.softmax(base / 0.5, -1), atol=0.03), hot


@pytest.mark.parametrize("vocab", [49152, 32007])
@pytest.mark.parametrize("native", [True, False])
def test_cpu_argmax_is_torch_argmax_with_ties_and_a_tail(vocab, native, monkeypatch):
    """The CPU argmax (the C++ one-pass kernel, or the chunked torch twin) returns torch's
    index, the first maximum, also for ties across vectors and chunks and for maxima in the
    tail past the last whole vector or chunk."""
    from kvmesh.kernels import cpu_native, torch_ops

    if native and cpu_native.native_ops() is None:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {cpu_native.STATUS}")
    monkeypatch.setattr(torch_ops, "USE_CPU_NATIVE", native)
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(16, vocab, generator=gen)
    x[1, [300, 9000]] = 9.0  # a tie: the first wins
    x[2, vocab - 1] = 9.0  # in the tail (32007 % 256 = 7)
    x[3, [5, vocab - 2]] = 9.0  # a tie between the body and the tail
    x[4] = float("-inf")
    x[4, 77] = -1e30
    x[5] = 0.0  # all equal: index 0
    x[6, [16 * 7 + 3, 16 * 9 + 3]] = 9.0  # a tie within one vector lane
    x[7, [16 * 9 + 3, 16 * 9 + 5]] = 9.0  # a tie across lanes of one vector
    x[8, [16 * 9 + 5, 16 * 11 + 2]] = 9.0  # the later vector, the lower lane
    assert torch.equal(torch_ops.argmax_rows(x), x.argmax(dim=-1))
    short = x[:, :37]  # shorter than the chunked path takes: torch's own
    assert torch.equal(torch_ops.argmax_rows(short), short.argmax(dim=-1))
    if native:  # the kernel itself on rows shorter than a vector and with a tail
        ops = cpu_native.native_ops()
        for n in (1, 5, 16, 37):
            part = x[:, :n].contiguous()
            assert torch.equal(ops.argmax_rows(part), part.argmax(dim=-1))


def _use_native(native: bool, monkeypatch) -> None:
    from kvmesh.kernels import cpu_native, torch_ops

    if native and cpu_native.native_ops() is None:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {cpu_native.STATUS}")
    monkeypatch.setattr(torch_ops, "USE_CPU_NATIVE", native)


@pytest.mark.parametrize("native", [True, False])
def test_draws_over_a_real_vocabulary_follow_the_softmax(native, monkeypatch):
    """The CDF search over a 49k vocabulary with mass spread over many chunks (the C++ draw
    and its torch twin): frequencies match the softmax, and a token masked inside a chunk is
    never drawn."""
    _use_native(native, monkeypatch)
    n, vocab = 6000, 49152 + 5
    gen = torch.Generator().manual_seed(3)
    base = torch.full((vocab,), -30.0)
    hot = torch.randperm(vocab, generator=gen)[:12]  # spread over many chunks, one in the tail
    hot[-1] = vocab - 2
    base[hot] = torch.linspace(0.0, 2.0, 12)
    masked = hot[5].item()
    base[masked] = float("-inf")
    reqs = []
    for i in range(n):
        req = SamplingRow(f"v{i}", [1], SamplingParams(temperature=1.0, seed=i))
        req.generator = torch.Generator().manual_seed(i)
        reqs.append(req)
    tokens = torch.tensor([t for t, _ in sample(base.repeat(n, 1), reqs, [])])
    freq = torch.bincount(tokens, minlength=vocab).float() / n
    assert freq[masked] == 0
    assert torch.allclose(freq[hot], torch.softmax(base, -1)[hot], atol=0.02), freq[hot]


def test_cpu_draw_kernel_inverts_the_same_cdf_as_its_twin(monkeypatch):
    """The C++ draw and the torch twin, at the same uniforms, over rows of a real vocabulary
    (with a tail past the last whole chunk, masked entries and several temperatures): the same
    token wherever the uniform is not within float rounding of a boundary of the CDF; a
    masked token never, also at uniforms next to 0 and 1; an all-masked row gives an index."""
    from kvmesh.kernels import cpu_native, torch_ops

    ops = cpu_native.native_ops()
    if ops is None:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {cpu_native.STATUS}")
    gen = torch.Generator().manual_seed(5)
    vocab = 49152 + 37
    x = torch.randn(24, vocab, generator=gen) * 3
    x[:, ::7] = float("-inf")  # masked everywhere, including chunk ends
    x[5, 40000:] = float("-inf")
    x[6] = float("-inf")
    x[6, 123] = 0.0  # one selectable token
    rows = torch.tensor([0, 3, 5, 6, 7, 9, 11, 12, 13, 20, 22, 23, 3, 3])
    temps = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.05, 1.0, 1.0, 0.8, 1.3, 1.0, 3.0, 0.7, 1.0, 1.0])
    row_max = x.amax(dim=-1)[rows]
    uniforms = torch.rand(len(rows), generator=gen, dtype=torch.float64)
    uniforms[-2], uniforms[-1] = 0.0, 1.0 - 2.0**-53
    no_top_p = torch.ones(len(rows))
    got = ops.sample_rows(x, rows, temps, row_max, uniforms, no_top_p)
    monkeypatch.setattr(torch_ops, "USE_CPU_NATIVE", False)
    twin = torch_ops.sample_rows(x, rows, temps, row_max, uniforms, no_top_p)
    assert (got == twin).float().mean() >= 0.9, (got, twin)
    for i, token in enumerate(got.tolist()):
        assert x[rows[i], token] > float("-inf"), (i, token)
        # the drawn token's CDF interval holds the uniform (to float rounding)
        p = torch.softmax(x[rows[i]].double() / temps[i].double(), -1)
        lo = p[:token].sum().item()
        assert lo - 1e-5 <= uniforms[i].item() <= lo + p[token].item() + 1e-5, (i, token)
    assert got[3].item() == 123
    dead = torch.full((1, 300), float("-inf"))
    one = torch.ones(1)
    first = torch.zeros(1, dtype=torch.long)
    token = ops.sample_rows(dead, first, one, torch.zeros(1), uniforms[:1], one)
    assert 0 <= token.item() < 300
    with pytest.raises(RuntimeError, match="outside"):
        ops.sample_rows(x, torch.tensor([24]), one, row_max[:1], uniforms[:1], one)
    with pytest.raises(RuntimeError, match="uniforms"):
        ops.sample_rows(x, rows[:1], one, row_max[:1], uniforms[:1].float(), one)


def _top_p_drop_by_full_sort(sub, ks, top_p):
    """The reference: top-k then top-p over each row's full sort, in float64."""
    drop = torch.ones_like(sub, dtype=torch.bool)
    for r in range(sub.shape[0]):
        values, order = torch.sort(sub[r].double(), descending=True)
        values[int(ks[r]) :] = float("-inf")
        probs = torch.softmax(values, -1)
        gone = (probs.cumsum(-1) - probs) >= float(top_p[r])
        gone[0] = False
        gone |= values == float("-inf")
        drop[r, order] = gone
    return drop


def test_top_p_from_a_window_drops_what_a_full_sort_drops():
    """Peaked rows (the nucleus inside the first window), flat ones (past it: the next window
    or the full sort), with top-k inside, between and past the windows, and masked entries."""
    from kvmesh.kernels.torch_ops import TOP_P_WINDOWS, top_p_drop

    gen = torch.Generator().manual_seed(11)
    vocab = 49152 + 5
    scales = [8.0, 4.0, 2.0, 1.0, 0.3, 0.05] * 3  # peaked ... nearly flat
    sub = torch.randn(len(scales), vocab, generator=gen) * torch.tensor(scales)[:, None]
    sub[4, ::3] = float("-inf")
    ks = torch.tensor([vocab] * 6 + [50, 300, 5000, 100, vocab, 3000] + [vocab] * 6)
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.99, 0.7, 0.9] * 2 + [0.2, 0.6, 0.8, 0.9, 0.97, 1e-6])
    got = top_p_drop(sub, ks, top_p)
    want = _top_p_drop_by_full_sort(sub, ks, top_p)
    # Float rounding may move the cut by one token where its mass-before equals top_p to ~1e-6.
    for r, t in (got != want).nonzero().tolist():
        values = sub[r].double()
        survivors = values >= torch.sort(values, descending=True).values[int(ks[r]) - 1]
        probs = torch.softmax(values.masked_fill(~survivors, float("-inf")), -1)
        before = probs[values > values[t]].sum().item()
        assert abs(before - float(top_p[r])) < 1e-4, (r, t)
    assert (got != want).sum() <= 2
    # every row keeps its most likely token, and the flat rows needed more than one window
    assert not got[torch.arange(len(scales)), sub.argmax(-1)].any()
    kept = (~want).sum(-1)
    assert kept[5] > TOP_P_WINDOWS[0] and kept[0] < TOP_P_WINDOWS[0]


def test_cpu_draw_kernel_applies_top_p_as_its_twin(monkeypatch):
    """Top-p inside the C++ draw (a bisection on the weights' exponent, then a sort of one
    band) and the torch twin (windows of the largest values): every drawn token is one the
    full-sort reference keeps (but at a cut within float rounding of top_p), and at the same
    uniforms the two draw the same token nearly always; peaked and flat rows, masked entries,
    tiny and large top_p."""
    from kvmesh.kernels import cpu_native, torch_ops

    ops = cpu_native.native_ops()
    if ops is None:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {cpu_native.STATUS}")
    gen = torch.Generator().manual_seed(9)
    vocab = 49152 + 11
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.3, 0.05, 3.0, 3.0])
    x = torch.randn(len(scales), vocab, generator=gen) * scales[:, None]
    x[3, ::5] = float("-inf")
    top_ps = [0.9, 0.5, 0.95, 0.8, 0.7, 0.9, 1e-6, 0.999]
    draws = 40
    rows = torch.arange(len(scales)).repeat_interleave(draws)
    temps = torch.full((len(rows),), 0.9)
    row_max = x.amax(dim=-1)[rows]
    uniforms = torch.rand(len(rows), generator=gen, dtype=torch.float64)
    top_p = torch.tensor(top_ps).repeat_interleave(draws)
    got = ops.sample_rows(x, rows, temps, row_max, uniforms, top_p)
    monkeypatch.setattr(torch_ops, "USE_CPU_NATIVE", False)
    twin = torch_ops.sample_rows(x, rows, temps, row_max, uniforms, top_p)
    assert (got == twin).float().mean() >= 0.95
    for r in range(len(scales)):
        scaled = (x[r] / 0.9)[None]
        keep = ~_top_p_drop_by_full_sort(scaled, [vocab], [top_ps[r]])[0]
        probs = torch.softmax(scaled[0].double(), -1)
        for token in got[rows == r].tolist():
            if not keep[token]:  # only at the cut: the mass before it is top_p, to rounding
                before = probs[scaled[0] > scaled[0, token]].sum().item()
                assert abs(before - top_ps[r]) < 1e-4, (r, token)
    assert (got[rows == 6] == x[6].argmax()).all()  # top_p ~0: the most likely token only


def test_top_p_mask_of_a_row_does_not_depend_on_its_companions():
    """A row's top-p mask, alone or among rows with other top-k, top-p and flatness (which
    take other windows): the same mask, bit for bit."""
    from kvmesh.kernels.torch_ops import top_p_drop

    gen = torch.Generator().manual_seed(2)
    vocab = 49152
    scales = torch.tensor([6.0, 3.0, 0.5, 0.05, 3.0, 1.0])
    sub = torch.randn(len(scales), vocab, generator=gen) * scales[:, None]
    ks = torch.tensor([vocab, 100, vocab, vocab, 3000, 277])
    top_p = torch.tensor([0.9, 0.8, 0.95, 0.5, 0.9, 1e-6])
    together = top_p_drop(sub, ks, top_p)
    for r in range(len(scales)):
        alone = top_p_drop(sub[r : r + 1], ks[r : r + 1], top_p[r : r + 1])
        assert torch.equal(alone[0], together[r]), r
        pair = top_p_drop(sub[[r, 0]], ks[[r, 0]], top_p[[r, 0]])
        assert torch.equal(pair[0], together[r]), r
