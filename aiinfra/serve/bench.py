"""Online serving benchmark against any OpenAI-compatible server (ours, vLLM's, ...).

Requests arrive as a seeded Poisson process at `request_rate` (or all at once), optionally capped at
`max_concurrency` in flight, and stream from /v1/completions (token-id prompts, temperature 0,
ignore_eos). Per request: TTFT, TPOT = (E2E - TTFT) / (output tokens - 1), the inter-token latencies
between chunks, and E2E; goodput counts the requests within both SLOs, as vLLM's benchmark_serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    max_tokens: int
    start_s: float = 0.0  # since the benchmark started
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def poisson_arrivals(n: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times (s) of n requests: exponential gaps of mean 1/rate; all 0 for an infinite rate."""
    if not request_rate > 0:
        raise ValueError(f"request_rate ({request_rate}) must be positive (inf: all at once)")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


def summarize(values_s: list[float]) -> dict[str, float | None]:
    """mean / median / p90 / p99 in milliseconds (None when there are no values: valid JSON)."""
    v = np.asarray([x for x in values_s if not math.isnan(x)], dtype=np.float64) * 1e3
    if v.size == 0:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


async def _send(
    session: aiohttp.ClientSession, url: str, body: dict, result: RequestResult, t_bench: float
) -> None:
    t0 = time.perf_counter()
    result.start_s = t0 - t_bench
    last = t0
    num_chunks, usage_tokens = 0, None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return
            async for raw in resp.content:  # one SSE line at a time
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        result.ttft_s = now - t0
                    else:
                        result.itl_s.append(now - last)
                    last, num_chunks = now, num_chunks + 1
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
    except (TimeoutError, aiohttp.ClientError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return
    result.e2e_s = last - t0
    # a chunk may carry several tokens when the client reads slower than the engine steps
    result.output_tokens = usage_tokens if usage_tokens is not None else num_chunks


async def _run(
    base: str,
    requests: list[dict],
    arrivals: list[float],
    *,
    max_concurrency: int | None,
    model: str | None,
    api_key: str | None,
) -> tuple[list[RequestResult], float, str, float | None]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = max_concurrency or len(requests)
    # aiohttp, as vLLM's benchmark_serving: its streaming reader costs the client (which shares
    # the machine with the server) several times less CPU than httpx's
    connector = aiohttp.TCPConnector(limit=limit)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=600.0)
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout, read_bufsize=1 << 16
    ) as client:
        if model is None:
            async with client.get(base + "/v1/models") as r:
                r.raise_for_status()
                model = (await r.json())["data"][0]["id"]
        assert model is not None
        cpu_before = await _server_cpu_seconds(client, base)
        gate = asyncio.Semaphore(limit)
        results = [RequestResult(len(r["prompt_token_ids"]), r["max_tokens"]) for r in requests]
        t_bench = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t_bench)))
            body = {
                "model": model,
                "prompt": requests[i]["prompt_token_ids"],
                "max_tokens": requests[i]["max_tokens"],
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with gate:
                await _send(client, base + "/v1/completions", body, results[i], t_bench)

        await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - t_bench
        cpu_after = await _server_cpu_seconds(client, base)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return results, duration, model, cpu


async def _server_cpu_seconds(client: aiohttp.ClientSession, base: str) -> float | None:
    """The server's process_cpu_seconds_total from /metrics (ours and vLLM's export it), if any."""
    try:
        async with client.get(base + "/metrics") as r:
            text = await r.text() if r.status == 200 else ""
    except aiohttp.ClientError:
        return None
    for line in text.splitlines():
        if line.startswith("process_cpu_seconds_total "):
            return float(line.split()[1])
    return None


def run_online_bench(
    url: str,
    requests: list[dict],
    *,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    model: str | None = None,
    api_key: str | None = None,
    plot_path: str | Path | None = None,
    seed: int = 0,
    print_table: bool = True,
) -> dict[str, Any]:
    """Run the workload against `url` (with or without /v1) and return the figures as a dict."""
    if not requests:
        raise ValueError("requests is empty")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency ({max_concurrency}) must be >= 1")
    base = url.rstrip("/").removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"url ({url!r}) must start with http:// or https://")
    arrivals = poisson_arrivals(len(requests), request_rate, seed)
    client_cpu_start = time.process_time()
    results, duration, model, server_cpu_s = asyncio.run(
        _run(
            base,
            requests,
            arrivals,
            max_concurrency=max_concurrency,
            model=model,
            api_key=api_key,
        )
    )
    result = _report(results, duration, request_rate, max_concurrency, slo_ttft_ms, slo_tpot_ms)
    result["model"], result["url"] = model, base
    # this load generator's own CPU seconds: on one machine it competes with the server for cores
    result["client_cpu_seconds"] = time.process_time() - client_cpu_start
    # CPU seconds the server process used while serving the run (None if it does not export them)
    result["server_cpu_seconds"] = server_cpu_s
    result["output_tok_per_server_cpu_s"] = (
        result["output_tokens"] / server_cpu_s if server_cpu_s else None
    )
    if print_table:
        _print_table(result)
    if plot_path is not None:
        plot_cdf(results, plot_path)
    return result


def _report(
    results: list[RequestResult],
    duration: float,
    request_rate: float,
    max_concurrency: int | None,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    good = [
        r
        for r in ok
        if (slo_ttft_ms is None or r.ttft_s * 1e3 <= slo_ttft_ms)
        and (slo_tpot_ms is None or not r.tpot_s * 1e3 > slo_tpot_ms)  # NaN TPOT (1 token) passes
    ]
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": [r.error for r in results if r.error is not None][:5],
        "request_rate": request_rate if math.isfinite(request_rate) else "inf",
        "max_concurrency": max_concurrency,
        "seconds": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_tok_per_s": output_tokens / duration,
        "total_tok_per_s": (input_tokens + output_tokens) / duration,
        "ttft_ms": summarize([r.ttft_s for r in ok]),
        "tpot_ms": summarize([r.tpot_s for r in ok]),
        "itl_ms": summarize([x for r in ok for x in r.itl_s]),
        "e2e_ms": summarize([r.e2e_s for r in ok]),
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "goodput_req_per_s": len(good) / duration
        if slo_ttft_ms is not None or slo_tpot_ms is not None
        else None,
        "requests": [_request_record(r) for r in results],
    }


def _request_record(r: RequestResult) -> dict[str, Any]:
    record = {**asdict(r), "tpot_s": r.tpot_s, "num_chunks": len(r.itl_s) + 1}
    del record["itl_s"]  # one float per token: too much for the JSON
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    head = Table(title=f"online benchmark: {result['model']} at {result['url']}")
    head.add_column("metric")
    head.add_column("value", justify="right")
    head.add_row("requests (completed / failed)", f"{result['completed']} / {result['failed']}")
    head.add_row("request rate (req/s)", str(result["request_rate"]))
    head.add_row("duration (s)", f"{result['seconds']:.2f}")
    head.add_row("request throughput (req/s)", f"{result['request_throughput']:.2f}")
    head.add_row("output throughput (tok/s)", f"{result['output_tok_per_s']:.1f}")
    head.add_row("total throughput (tok/s)", f"{result['total_tok_per_s']:.1f}")
    if result["goodput_req_per_s"] is not None:
        head.add_row("goodput (req/s)", f"{result['goodput_req_per_s']:.2f}")
    head.add_row("client CPU time (s)", f"{result['client_cpu_seconds']:.1f}")
    if result["server_cpu_seconds"] is not None:
        head.add_row("server CPU time (s)", f"{result['server_cpu_seconds']:.1f}")
        head.add_row("output tok / server CPU s", f"{result['output_tok_per_server_cpu_s']:.1f}")
    lat = Table(title="latency (ms)")
    for col in ("", "mean", "median", "p90", "p99"):
        lat.add_column(col, justify="right")
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = result[f"{name}_ms"]
        cells = ("-" if s[k] is None else f"{s[k]:.1f}" for k in ("mean", "median", "p90", "p99"))
        lat.add_row(name.upper(), *cells)
    console = Console()
    console.print(head)
    console.print(lat)
    for e in result["errors"]:
        console.print(f"[red]error:[/red] {e}")


def plot_cdf(results: list[RequestResult], path: str | Path) -> None:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E (ms) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.error is None]
    series = {
        "TTFT": [r.ttft_s for r in ok],
        "TPOT": [r.tpot_s for r in ok],
        "ITL": [x for r in ok for x in r.itl_s],
        "E2E": [r.e2e_s for r in ok],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=True):
        v = np.sort(np.asarray([x for x in values if not math.isnan(x)]) * 1e3)
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of tokens")
        ax.grid(alpha=0.3)
    fig.suptitle(f"latency CDFs ({len(ok)} requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
