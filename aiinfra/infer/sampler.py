"""Sampler: next tokens for a whole mixed batch at once, each row with its own SamplingParams.

Order of the logit processing, per row: repetition / frequency / presence penalties, min_tokens
(EOS and stop ids masked), temperature, then the filters on probabilities min_p, top_k, top_p
(each on the distribution the previous one left), then a draw. Temperature 0 rows take the argmax
of the penalized logits. Draws use the exponential race (argmax p_i / E_i with E_i ~ Exp(1) is a
sample of p), so a seeded row draws its noise from its own generator and is reproducible whatever
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aiinfra.infer.sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None] | None  # per row when any row asked for logprobs


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [M, V] of the M sampling sequences (in batch order) -> one token per row."""
        logits = logits.float()
        params = [s.params for s in seqs]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = process_logits(logits, seqs)
        is_greedy = [p.is_greedy for p in params]
        if all(is_greedy):
            tokens = logits.argmax(dim=-1)
        else:
            probs = filtered_probs(logits, seqs)
            noise = torch.empty_like(probs).exponential_()
            for i, s in enumerate(seqs):
                if s.generator is not None:
                    noise[i] = torch.empty_like(noise[i]).exponential_(generator=s.generator)
            # Exp(1) can round to 0; a zero-probability token must still lose (0 / tiny = 0)
            sampled = (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)
            greedy = torch.tensor(is_greedy, device=logits.device)
            tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
        lps = None
        if raw_logprobs is not None:
            lps = _gather_logprobs(raw_logprobs, tokens, seqs)
        return SamplerOutput(tokens.tolist(), lps)


def process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Penalties and min_tokens: the logits greedy rows take the argmax of."""
    params = [s.params for s in seqs]
    if any(p.has_penalties for p in params):
        logits = apply_penalties(logits, seqs)
    if any(p.min_tokens for p in params):
        logits = _mask_early_stops(logits, seqs)
    return logits


def filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then min_p / top_k / top_p: the (unnormalized) distribution a row draws from.
    Greedy rows are computed at temperature 1 and ignored by the caller."""
    params = [s.params for s in seqs]
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    return filter_probs(
        probs,
        min_p=[p.min_p for p in params],
        top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params],
    )


def filter_probs(
    probs: torch.Tensor, *, min_p: list[float], top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """min_p, then top_k, then top_p on rows of probabilities; returns unnormalized kept mass."""
    M, V = probs.shape
    dev = probs.device
    if any(m > 0 for m in min_p):
        mp = torch.tensor(min_p, device=dev)[:, None]
        probs = probs.masked_fill(probs < mp * probs.amax(dim=-1, keepdim=True), 0.0)
    use_k = any(0 < k < V for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if use_k:
        k = torch.tensor([k if k > 0 else V for k in top_k], device=dev)
        rank = torch.arange(V, device=dev)[None, :]
        sorted_probs = sorted_probs.masked_fill(rank >= k[:, None], 0.0)
    if use_p:
        mass = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        before = mass.cumsum(dim=-1) - mass  # mass of the strictly more likely tokens
        p = torch.tensor(top_p, device=dev)[:, None]
        # keep the smallest prefix reaching top_p; the first token is always kept
        drop = before >= p
        drop[:, 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; repetition penalty (CTRL, as HF and
    vLLM) on every token seen, prompt included."""
    M, V = logits.shape
    dev = logits.device
    out_counts = _token_counts([s.output_token_ids for s in seqs], V, dev)
    seen = _token_counts([s.prompt_token_ids for s in seqs], V, dev) > 0
    seen |= out_counts > 0
    params = [s.params for s in seqs]
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    index = torch.from_numpy(np.repeat(np.arange(len(rows)) * vocab, lengths) + flat).to(device)
    counts = torch.zeros(len(rows) * vocab, device=device)
    counts.index_add_(0, index, torch.ones(index.shape[0], device=device))
    return counts.view(len(rows), vocab)


def _mask_early_stops(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    logits = logits.clone()
    for i, s in enumerate(seqs):
        if s.num_output_tokens >= s.params.min_tokens:
            continue
        stops = list(s.params.stop_token_ids or [])
        if s.eos_token_id is not None:
            stops.append(s.eos_token_id)
        stops = [t for t in stops if t < logits.shape[1]]
        if stops:
            logits[i, stops] = float("-inf")
    return logits


def _gather_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
) -> list[dict[int, float] | None]:
    ks = [s.params.logprobs for s in seqs]
    k_max = max(k for k in ks if k is not None)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    top_vals, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
    top_v = top_vals.tolist() if top_vals is not None else None
    top_i = top_ids.tolist() if top_ids is not None else None
    out: list[dict[int, float] | None] = []
    tok_list = tokens.tolist()
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        d = {tok_list[i]: chosen[i]}
        if k and top_i is not None and top_v is not None:
            for t, v in zip(top_i[i][:k], top_v[i][:k], strict=True):
                d.setdefault(t, v)
        out.append(d)
    return out
