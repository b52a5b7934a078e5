"""LLMEngine (add_request / step / abort) and LLM, its offline front end.

One step is: Scheduler.schedule() -> Batch -> ModelRunner.run(batch) -> token ids ->
Scheduler.update(batch, token ids) -> detokenize, stop strings -> RequestOutputs.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from dataclasses import dataclass, field
from typing import cast

import torch

from aiinfra.infer.attention import KVCache
from aiinfra.infer.block_manager import BlockManager
from aiinfra.infer.fused import fuse_for_inference
from aiinfra.infer.model_runner import ModelRunner, profile_kv_cache_memory
from aiinfra.infer.sampling_params import SamplingParams
from aiinfra.infer.scheduler import Scheduler, SchedulerConfig
from aiinfra.infer.sequence import Request, Sequence
from aiinfra.models import LlamaForCausalLM, ModelConfig, load_model, load_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20}
_UNITS["gib"] = 2**30


def parse_bytes(value: int | str, name: str = "kv_cache_memory") -> int:
    """Bytes from an int or a string such as "2GiB", "512MiB", "1.5GB"."""
    if isinstance(value, bool):
        raise TypeError(f"{name} ({value!r}) must be bytes or a size string like '2GiB'")
    if isinstance(value, int):
        num = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} ({value!r}) must be bytes or a size like '2GiB' or '512MiB'")
        num = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if num <= 0:
        raise ValueError(f"{name} ({value!r}) must be positive")
    return num


_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
DEFAULT_CPU_KV_CACHE_MEMORY = "2GiB"
_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str  # model folder
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    block_size: int = 16
    # None: 2GiB on CPU; on CUDA, what gpu_memory_utilization leaves after weights and activations
    kv_cache_memory: int | str | None = None
    # CUDA: the fraction of the card's memory this engine may use (weights, activations, KV)
    gpu_memory_utilization: float = _DEFAULT_GPU_MEMORY_UTILIZATION
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps (CPU is always eager)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # CPU: torch threads; default all cores this process may use

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"device ({self.device!r}) must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device ({self.device!r}) needs CUDA, which this machine lacks")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            names = ", ".join(["auto", *_DTYPES])
            raise ValueError(f"dtype ({self.dtype!r}) must be one of {names}")
        if self.block_size <= 0:
            raise ValueError(f"block_size ({self.block_size}) must be positive")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, int | float) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization ({util!r}) must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len ({self.max_model_len}) must be positive")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads ({self.num_threads}) must be positive")
        _ = self.scheduler  # validates max_num_seqs / max_num_batched_tokens

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens
        )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]  # cumulative: all generated so far
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # len == params.n
    finished: bool
    num_cached_tokens: int = 0


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks referenced by sequences
    prefix_cache_hit_rate: float  # prompt tokens served from the cache / prompt tokens admitted
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_blocks: int
    num_free_blocks: int
    # token slots holding tokens / slots in the running sequences' blocks
    kv_cache_token_utilization: float = field(default=0.0)


class LLMEngine:
    """Owns the model runner, scheduler and block manager; serves requests one step at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device, self.dtype = config.torch_device, config.torch_dtype
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
        model, self.model_config = load_model(config.model, device=self.device, dtype=self.dtype)
        model.eval()
        if self.device.type == "cuda":
            # merged qkv / gate_up and Triton element-wise kernels: ~10 launches per layer, not ~40
            model = fuse_for_inference(model)
        self.tokenizer = load_tokenizer(config.model)
        mc: ModelConfig = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's "
                f"max_position_embeddings ({mc.max_position_embeddings})"
            )
        per_block = KVCache.bytes_per_block(
            mc.num_layers, config.block_size, mc.num_kv_heads, mc.dim_per_head, self.dtype
        )
        num_blocks = self._num_kv_blocks(model, per_block)
        kv_cache = KVCache.allocate(
            num_layers=mc.num_layers,
            num_blocks=num_blocks + 1,  # + the scratch block that padded decode rows write to
            block_size=config.block_size,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.dim_per_head,
            dtype=self.dtype,
            device=self.device,
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.model_runner = ModelRunner(model, mc, kv_cache)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.model_runner.init_decode_graphs(
                max_num_seqs=config.max_num_seqs,
                max_model_len=self.max_model_len,
                scratch_block=num_blocks,
                capture=True,
            )
        self.eos_token_id = (
            mc.eos_token_id if mc.eos_token_id is not None else self.tokenizer.eos_token_id
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info(
            "engine on %s (%s): %d KV blocks of %d tokens (%d bytes each), %s",
            self.device,
            str(self.dtype).removeprefix("torch."),
            num_blocks,
            config.block_size,
            per_block,
            "CUDA graphs for decode" if self.model_runner.graph_runner else "eager",
        )

    def _num_kv_blocks(self, model: LlamaForCausalLM, per_block: int) -> int:
        """KV blocks from kv_cache_memory, or on CUDA (when it is None) from the memory that
        gpu_memory_utilization of the card leaves after the weights and a profiled full-budget
        step (as vLLM sizes it)."""
        config = self.config
        util = config.gpu_memory_utilization
        if self.device.type == "cuda" and config.kv_cache_memory is None:
            budget = profile_kv_cache_memory(
                model,
                gpu_memory_utilization=util,
                num_tokens=config.max_num_batched_tokens,
                num_seqs=config.max_num_seqs,
                max_model_len=self.max_model_len,
                block_size=config.block_size,
            )
            source = f"gpu_memory_utilization ({util})"
        else:
            if util != _DEFAULT_GPU_MEMORY_UTILIZATION:
                why = "on CPU" if self.device.type == "cpu" else "with kv_cache_memory set"
                logger.warning("gpu_memory_utilization (%s) is ignored %s", util, why)
            budget = parse_bytes(config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY)
            source = f"kv_cache_memory ({config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY!r})"
        if budget < per_block:
            raise ValueError(
                f"{source} leaves {max(budget, 0)} bytes for the KV cache: "
                f"not one block ({per_block} bytes)"
            )
        return budget // per_block

    # --- requests ----------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params ({params!r}) must be SamplingParams")
        if request_id in self.requests:
            raise ValueError(f"request_id ({request_id!r}) is already running")
        self._check_prompt(prompt_token_ids)
        num_prompt = len(prompt_token_ids)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - num_prompt
            if max_tokens < 1:
                raise ValueError(
                    f"prompt length ({num_prompt}) leaves no room in max_model_len "
                    f"({self.max_model_len})"
                )
        elif num_prompt + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt length ({num_prompt}) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})"
            )
        bm = self.block_manager
        if bm.num_blocks_for(num_prompt + max_tokens) > bm.num_blocks:
            raise ValueError(
                f"prompt length ({num_prompt}) + max_tokens ({max_tokens}) needs more KV blocks "
                f"than the cache has ({bm.num_blocks} of {bm.block_size} tokens)"
            )
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=i,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                eos_token_id=None if params.ignore_eos else self.eos_token_id,
                max_tokens=max_tokens,
                generator=gen,
            )
            seqs.append(seq)
        req = Request(request_id, list(prompt_token_ids), params, seqs, next(self._arrivals))
        self.requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)

    def _check_prompt(self, prompt_token_ids: list[int]) -> None:
        if not isinstance(prompt_token_ids, list | tuple) or not prompt_token_ids:
            raise ValueError(f"prompt_token_ids ({prompt_token_ids!r}) must be a non-empty list")
        vocab = self.model_config.vocab_size
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(
                    f"prompt_token_ids has token id {t!r} outside the vocabulary [0, {vocab})"
                )

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sampled = self.model_runner.run(batch)
        progressed = self.scheduler.update(batch, sampled.token_ids)
        if sampled.logprobs is not None:
            for seq, lp in zip(progressed, sampled.logprobs, strict=True):
                if lp is not None and seq.logprobs is not None:
                    seq.logprobs.append(lp)
        self.generation_tokens_total += len(progressed)
        touched: dict[str, Request] = {}
        for seq in progressed:
            if seq.num_output_tokens == 1 and seq.index == 0:
                self.prompt_tokens_total += seq.num_prompt_tokens
            if seq.params.detokenize:
                self._detokenize(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for req in touched.values():
            outputs.append(self._make_output(req))
            if outputs[-1].finished:
                del self.requests[req.request_id]
        return outputs

    def _detokenize(self, seq: Sequence) -> None:
        """Incremental detokenization (as vLLM's): decode a short window of tokens and emit text
        only once it no longer ends in an incomplete character; then check stop strings."""
        out = seq.output_token_ids
        skip = seq.params.skip_special_tokens
        prefix = self.tokenizer.decode(
            out[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip
        )
        full = self.tokenizer.decode(out[seq.prefix_offset :], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(out)
        elif seq.finish_reason is not None:
            seq.text += full[len(prefix) :]  # flush what is left, replacement characters included
        stops = seq.params.stop
        if not stops:
            return
        # a stop string may straddle the previous text: search from the new text minus its length
        start = max(0, seq.stop_checked_len - max(len(s) for s in stops) + 1)
        seq.stop_checked_len = len(seq.text)
        hits = [(i, s) for s in stops if (i := seq.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            seq.text = seq.text[:i]
            if seq.is_finished:
                seq.finish_reason, seq.stop_reason = "stop", s
            else:
                self.scheduler.finish(seq, "stop", s)

    def _make_output(self, req: Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=s.output_token_ids,
                finish_reason=s.finish_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                stop_reason=s.stop_reason,
            )
            for s in req.seqs
        ]
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            outputs=completions,
            finished=req.is_finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
        )

    def get_stats(self) -> EngineStats:
        sched, bm = self.scheduler, self.block_manager
        running = sched.running
        slots = sum(len(s.block_table) for s in running) * bm.block_size
        held = sum(s.num_computed_tokens for s in running)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(sched.waiting),
            kv_cache_usage=bm.usage,
            prefix_cache_hit_rate=bm.hit_rate,
            num_preemptions=sched.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_token_utilization=held / slots if slots else 0.0,
        )


class LLM:
    """Offline generation: LLM(model_dir, **EngineConfig fields).generate(prompts, params)."""

    def __init__(self, model: str, **engine_config_fields: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_config_fields))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts."""
        if isinstance(prompts, str) or not isinstance(prompts, list):
            raise TypeError(f"prompts ({type(prompts).__name__}) must be a list")
        if isinstance(params, list) and len(params) != len(prompts):
            raise ValueError(
                f"params has {len(params)} entries for {len(prompts)} prompts; give one or as many"
            )
        ids: list[str] = []
        try:
            for i, p in enumerate(prompts):
                prompt_ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
                ids.append(f"offline-{next(self._ids)}")
                self.engine.add_request(
                    ids[-1],
                    cast(list[int], prompt_ids),
                    params[i] if isinstance(params, list) else params,
                )
        except (ValueError, TypeError):
            for rid in ids:  # all or nothing: a bad prompt leaves no request behind
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in ids]
