"""Sampler against a straightforward per-request reference (plain Python over the vocabulary),
and the draws against their distribution; seeded rows reproducible whatever the batch."""

import math
import random
from collections import Counter

import pytest
import torch

from aiinfra.infer.sampler import Sampler, filtered_probs, process_logits
from aiinfra.infer.sampling_params import SamplingParams
from aiinfra.infer.sequence import Sequence

V = 40


def _seq(params: SamplingParams, prompt: list[int], output: list[int], eos: int | None = None):
    s = Sequence(
        seq_id=0,
        request_id="r",
        index=0,
        prompt_token_ids=prompt,
        params=params,
        eos_token_id=eos,
        max_tokens=params.max_tokens or 100,
    )
    s.token_ids.extend(output)
    if params.seed is not None:
        s.generator = torch.Generator().manual_seed(params.seed)
    return s


def reference_probs(logits: list[float], s: Sequence) -> list[float]:
    """One request, plain Python, in the documented order."""
    p = s.params
    x = list(logits)
    counts = Counter(s.output_token_ids)
    seen = set(s.prompt_token_ids) | set(counts)
    for t in range(len(x)):
        if t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    if s.num_output_tokens < p.min_tokens:
        for t in [
            *(p.stop_token_ids or []),
            *([s.eos_token_id] if s.eos_token_id is not None else []),
        ]:
            x[t] = -math.inf
    temp = p.temperature or 1.0
    m = max(x)
    e = [math.exp((v - m) / temp) if v > -math.inf else 0.0 for v in x]
    z = sum(e)
    probs = [v / z for v in e]
    if p.min_p > 0:
        threshold = p.min_p * max(probs)
        probs = [v if v >= threshold else 0.0 for v in probs]
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    keep = order[: p.top_k] if p.top_k > 0 else order
    if p.top_p < 1.0:
        total = sum(probs[t] for t in keep)
        kept, cum = [], 0.0
        for t in keep:
            if cum >= p.top_p:
                break
            kept.append(t)
            cum += probs[t] / total
        keep = kept
    out = [0.0] * len(probs)
    for t in keep:
        out[t] = probs[t]
    z = sum(out)
    return [v / z for v in out]


def _random_case(rng: random.Random) -> tuple[SamplingParams, list[int], list[int]]:
    params = SamplingParams(
        temperature=rng.choice([0.3, 0.7, 1.0, 1.8]),
        top_k=rng.choice([0, -1, 1, 3, 10]),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.1]),
        min_p=rng.choice([0.0, 0.05, 0.3]),
        presence_penalty=rng.choice([0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.3, 1.5]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        min_tokens=rng.choice([0, 5]),
        stop_token_ids=[rng.randrange(V)],
        max_tokens=50,
    )
    prompt = [rng.randrange(V) for _ in range(rng.randint(1, 10))]
    output = [rng.randrange(V) for _ in range(rng.randint(0, 10))]
    return params, prompt, output


def test_processed_distribution_matches_per_request_reference():
    rng = random.Random(0)
    torch.manual_seed(0)
    seqs = [_seq(*_random_case(rng), eos=rng.randrange(V)) for _ in range(64)]
    logits = torch.randn(len(seqs), V) * 3
    probs = filtered_probs(process_logits(logits, seqs), seqs)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    for i, s in enumerate(seqs):
        ref = torch.tensor(reference_probs(logits[i].tolist(), s))
        # fp32 batch math against a float64 Python loop
        torch.testing.assert_close(probs[i].double(), ref.double(), atol=1e-5, rtol=1e-4)


def test_greedy_rows_take_the_penalized_argmax():
    rng = random.Random(1)
    seqs = []
    for _ in range(16):
        params, prompt, output = _random_case(rng)
        params = SamplingParams(
            temperature=0.0,
            repetition_penalty=params.repetition_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
        )
        seqs.append(_seq(params, prompt, output))
    logits = torch.randn(len(seqs), V)
    tokens = Sampler()(logits, seqs).token_ids
    for i, s in enumerate(seqs):
        ref = reference_probs(logits[i].tolist(), s)
        assert tokens[i] == max(range(V), key=lambda t: ref[t])


def test_draws_follow_the_filtered_distribution():
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, seed=None)
    logits = torch.randn(1, V) * 2
    seq = _seq(params, [1], [])
    ref = reference_probs(logits[0].tolist(), seq)
    n = 4000
    batch = [seq] * n
    tokens = Sampler()(logits.expand(n, V), batch).token_ids
    freq = Counter(tokens)
    assert all(ref[t] > 0 for t in freq)  # nothing outside top-k / top-p is ever drawn
    for t in range(V):
        # binomial standard deviation at n=4000 is at most 0.008: 5 sigma
        assert abs(freq[t] / n - ref[t]) < 0.04


def test_seeded_rows_are_reproducible_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.randn(5, V)

    def draw(rows):
        out = []
        seq = _seq(params, [1], [])
        for _ in range(20):  # the row's generator advances step after step
            others = [_seq(SamplingParams(temperature=1.0), [2], []) for _ in rows[1:]]
            out.append(Sampler()(logits[rows], [seq, *others]).token_ids[0])
        return out

    assert draw([0]) == draw([0, 1, 2, 3]) == draw([0, 4])
    assert len(set(draw([0]))) > 1  # it does sample


def test_logprobs_hold_the_chosen_and_top_tokens():
    logits = torch.randn(2, V)
    seqs = [
        _seq(SamplingParams(temperature=0.0, logprobs=3), [1], []),
        _seq(SamplingParams(temperature=0.0), [1], []),
    ]
    out = Sampler()(logits, seqs)
    assert out.logprobs is not None and out.logprobs[1] is None
    lp = out.logprobs[0]
    ref = torch.log_softmax(logits[0], dim=-1)
    assert set(lp) == set(ref.topk(3).indices.tolist())  # greedy: the chosen one is the top one
    for t, v in lp.items():
        assert v == pytest.approx(ref[t].item(), abs=1e-6)
