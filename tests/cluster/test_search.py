"""Layout search: the ranking is the brute-force ranking of estimate(), only fitting layouts
survive, and the explanation names the term that decides."""

import pytest

from aiinfra.cluster.hardware import get_node
from aiinfra.cluster.search import candidate_layouts, compare_sizes, explain, search
from aiinfra.cluster.topology import ClusterSpec
from aiinfra.cluster.training import estimate
from aiinfra.models.config import ModelConfig, get_preset
from aiinfra.parallel.config import ParallelConfig


def test_search_matches_brute_force():
    model = get_preset("llama-3-8b")
    cluster = ClusterSpec.for_gpus(get_node("h100"), 64)
    result = search(model, cluster, 256, 4096)
    layouts = candidate_layouts(model, 64, 8, 256, 4096)
    plans = [estimate(model, p, cluster) for p in layouts]
    fitting = [p for p in plans if p.fits]
    assert result.num_considered == len(layouts)
    assert len(result.plans) == len(fitting) and result.num_too_big == len(plans) - len(fitting)
    assert result.best.step_time_s == pytest.approx(min(p.step_time_s for p in fitting))
    times = [p.step_time_s for p in result.plans]
    assert times == sorted(times)
    assert all(p.memory.total <= 0.9 * p.memory_capacity for p in result.plans)
    assert "beats" in result.explanation
    for p in layouts:  # every candidate is a valid layout of the cluster
        assert p.world_size == 64 and 256 % (p.dp * p.micro_batch_size) == 0


def test_nothing_fits_is_reported():
    model = get_preset("llama-3-405b")
    result = search(model, ClusterSpec.for_gpus(get_node("a100-40gb"), 8), 8, 8192)
    assert result.best is None and "no layout fits" in result.explanation
    with pytest.raises(ValueError, match="global_batch_size"):
        search(model, ClusterSpec.for_gpus(get_node("h100"), 64), 3, 8192)


def test_explanation_names_nvlink_when_tp_crosses_nodes():
    model = ModelConfig(vocab_size=51200, hidden_size=12288, intermediate_size=4 * 12288,
                        num_layers=96, num_heads=96, num_kv_heads=96, mlp="gelu")  # fmt: skip
    cluster = ClusterSpec.for_gpus(get_node("dgx-a100"), 128)
    base = dict(global_batch_size=64, seq_len=2048, recompute="selective", sequence_parallel=True)
    tp8 = estimate(model, ParallelConfig(tp=8, pp=8, dp=2, **base), cluster)
    tp16 = estimate(model, ParallelConfig(tp=16, pp=4, dp=2, **base), cluster)
    assert tp8.step_time_s < tp16.step_time_s
    text = explain(tp8, tp16, cluster)
    assert "tp=8 keeps TP traffic on NVLink" in text


def test_compare_sizes_time_vs_cost():
    model = get_preset("llama-3-8b")
    cluster = ClusterSpec.for_gpus(get_node("h100"), 8)
    by_time = compare_sizes(model, cluster, [16, 64, 256], 512, 4096, 1e12, "time")
    by_cost = compare_sizes(model, cluster, [16, 64, 256], 512, 4096, 1e12, "cost")
    # more GPUs finish sooner but scale sub-linearly, so they cost more GPU-hours
    assert [o.num_gpus for o in by_time] == [256, 64, 16]
    assert [o.num_gpus for o in by_cost] == [16, 64, 256]
    for o in by_time:
        best = search(model, ClusterSpec.for_gpus(get_node("h100"), o.num_gpus), 512, 4096).best
        assert o.days == pytest.approx(1e12 / best.tokens_per_s / 86400)
        assert o.gpu_hours == pytest.approx(o.days * 24 * o.num_gpus)
    # a size whose data-parallel degree cannot split the batch comes last, with the reason
    odd = compare_sizes(model, cluster, [1024, 8], 3, 4096, 1e12)
    assert [o.num_gpus for o in odd] == [8, 1024]  # 1024 GPUs cannot split a batch of 3
    assert odd[-1].result.best is None and odd[-1].days == float("inf")
    assert "global_batch_size" in odd[-1].result.explanation
    with pytest.raises(ValueError, match="objective"):
        compare_sizes(model, cluster, [8], 8, 4096, 1e12, "speed")  # type: ignore[arg-type]
