"""The online benchmark: arrivals, summaries against numpy and formulas, a run on our server."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from aiinfra.serve.bench import poisson_arrivals, run_online_bench, summarize
from tests.serve.conftest import MODEL_NAME


def test_poisson_arrivals_are_seeded_with_mean_gap_one_over_rate():
    a = poisson_arrivals(4000, 4.0, seed=1)
    assert a == poisson_arrivals(4000, 4.0, seed=1) and a != poisson_arrivals(4000, 4.0, seed=2)
    gaps = np.diff(a)
    # 4000 exponential gaps: the sample mean's standard error is 0.25 / sqrt(4000) ~ 0.004
    assert statistics.fmean(gaps) == pytest.approx(0.25, abs=0.02)
    assert statistics.stdev(gaps) == pytest.approx(0.25, abs=0.02)  # exponential: std == mean
    assert poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="request_rate"):
        poisson_arrivals(3, 0.0)


def test_summarize_in_ms():
    values = [0.001 * i for i in range(1, 101)]
    s = summarize(values + [math.nan])
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(np.percentile(np.arange(1, 101), 90))
    assert s["p99"] == pytest.approx(99.01)
    assert summarize([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_online_bench_against_the_server(server, tmp_path):
    rng = np.random.default_rng(0)
    requests = [
        {"prompt_token_ids": rng.integers(0, 500, size=int(n)).tolist(), "max_tokens": int(m)}
        for n, m in zip(rng.integers(5, 60, 12), rng.integers(2, 20, 12), strict=True)
    ]
    plot = tmp_path / "cdf.png"
    r = run_online_bench(
        server.url + "/v1",
        requests,
        request_rate=50.0,
        max_concurrency=4,
        slo_ttft_ms=1e6,
        slo_tpot_ms=1e-6,
        plot_path=plot,
        print_table=False,
    )
    assert (r["completed"], r["failed"], r["model"]) == (12, 0, MODEL_NAME)
    assert r["output_tokens"] == sum(q["max_tokens"] for q in requests)  # ignore_eos honoured
    assert r["input_tokens"] == sum(len(q["prompt_token_ids"]) for q in requests)
    assert r["output_tok_per_s"] == pytest.approx(r["output_tokens"] / r["seconds"])
    # the server is a thread of this process: its CPU time over the run is at most 2 cores' worth
    assert 0 < r["server_cpu_seconds"] < 2 * r["seconds"] + 1
    per = r["requests"]
    assert r["ttft_ms"]["median"] == pytest.approx(1e3 * np.median([p["ttft_s"] for p in per]))
    for p in per:
        assert 0 < p["ttft_s"] <= p["e2e_s"]
        assert p["tpot_s"] == pytest.approx((p["e2e_s"] - p["ttft_s"]) / (p["max_tokens"] - 1))
    # goodput by its definition; the 1 ns TPOT SLO fails every request whose tokens came in more
    # than one chunk (a short request can arrive in one chunk: TPOT 0)
    good = [p for p in per if p["ttft_s"] * 1e3 <= 1e6 and p["tpot_s"] * 1e3 <= 1e-6]
    assert r["goodput_req_per_s"] == pytest.approx(len(good) / r["seconds"])
    assert len(good) < len(per)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    json.dumps(r, allow_nan=False)  # the JSON the CLI writes is strict JSON


def test_online_bench_reports_http_errors(server):
    r = run_online_bench(
        server.url,
        [{"prompt_token_ids": [1, 2], "max_tokens": 10_000}],
        model=MODEL_NAME,
        print_table=False,
    )
    assert r["failed"] == 1 and "HTTP 400" in r["errors"][0]
