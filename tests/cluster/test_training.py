"""Training estimates against published figures: Megatron-LM's scaling table, GPT-3's training time,
ZeRO's memory table, and the closed forms of Narayanan et al. 2021 and Korthikanti et al. 2022."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiinfra.cluster.hardware import get_node
from aiinfra.cluster.topology import ClusterSpec
from aiinfra.cluster.training import (
    EstimateOptions,
    activation_bytes_per_layer,
    estimate,
    model_state_bytes,
    step_flops,
    training_days,
)
from aiinfra.models.config import ModelConfig, get_preset
from aiinfra.parallel.config import ParallelConfig


def gpt(h: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=51200, hidden_size=h, intermediate_size=4 * h, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, mlp="gelu",
    )  # fmt: skip


# Narayanan et al. 2021, Table 1 (A100 80GB DGX nodes, seq 2048, vocab 51200, full recompute).
# The issue names the 1.7B, 18B and 1T rows; the other seven rows check the same constants.
MEGATRON = [
    # (h, layers, heads, gpus, tp, pp, batch, measured TFLOP/s per GPU)
    (2304, 24, 24, 32, 1, 1, 512, 137),
    (3072, 30, 32, 64, 2, 1, 512, 138),
    (4096, 36, 32, 128, 4, 1, 512, 142),
    (6144, 40, 48, 256, 8, 1, 1024, 135),
    (8192, 48, 64, 512, 8, 2, 1536, 138),
    (10240, 60, 80, 1024, 8, 4, 1792, 140),
    (12288, 80, 96, 1536, 8, 8, 2304, 148),
    (16384, 96, 128, 1920, 8, 16, 2160, 155),
    (20480, 105, 128, 2520, 8, 35, 2520, 163),
    (25600, 128, 160, 3072, 8, 64, 3072, 163),
]


@pytest.mark.parametrize(
    ("h", "layers", "heads", "gpus", "tp", "pp", "batch", "measured"), MEGATRON
)
def test_megatron_tflops_per_gpu(h, layers, heads, gpus, tp, pp, batch, measured):
    model = gpt(h, layers, heads)
    cluster = ClusterSpec.for_gpus(get_node("dgx-a100"), gpus)
    parallel = ParallelConfig(
        dp=gpus // (tp * pp), tp=tp, pp=pp, micro_batch_size=1, global_batch_size=batch,
        seq_len=2048, recompute="full",
    )  # fmt: skip
    # Megatron 2021 ran unfused (non-Flash) attention with a separate softmax and dropout
    plan = estimate(model, parallel, cluster, EstimateOptions(flash_attention=False))
    assert plan.fits
    # the acceptance band: a first-principles model, not a fit, within +-10%
    assert plan.tflops_per_gpu == pytest.approx(measured, rel=0.10)
    if gpus == 3072:  # 502 PFLOP/s aggregate
        assert plan.tflops_per_gpu * gpus / 1e3 == pytest.approx(502, rel=0.10)


def test_flops_match_narayanan_formula():
    model = gpt(6144, 40, 48)
    B, s, L, h, V = 1024, 2048, 40, 6144, 51200
    for recompute, c in (("full", 96), ("none", 72)):
        parallel = ParallelConfig(dp=8, global_batch_size=B, seq_len=s, recompute=recompute)
        hw, model_flops = step_flops(model, parallel)
        # 96*B*s*l*h^2*(1 + s/6h + V/16lh); without recompute the layer part is 3/4 of that while
        # the logits layer (never recomputed) stays 6*B*s*h*V
        layers = c * B * s * L * h**2 * (1 + s / (6 * h))
        assert hw == pytest.approx(layers + 6 * B * s * h * V, rel=1e-12)
        if recompute == "full":
            assert hw == pytest.approx(96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h)))
        assert model_flops == pytest.approx(
            72 * B * s * L * h**2 * (1 + s / (6 * h)) + 6 * B * s * h * V
        )


def test_gpt3_training_time_about_34_days():
    # Narayanan et al. 2021 section 5.1: 175B on 300B tokens, 1024 A100s at 140 TFLOP/s: ~34 days
    days = training_days(175e9, 300e9, 1024, 140, recompute=True)
    assert days == pytest.approx(34, abs=0.5)  # "about 34": the paper rounds
    # the same from the exact FLOPs of the gpt3-175b shape (attention and logits add ~3%)
    model = get_preset("gpt3-175b")
    parallel = ParallelConfig(dp=1, global_batch_size=1, seq_len=2048, recompute="full")
    hw, _ = step_flops(model, parallel)
    exact_days = hw / 2048 * 300e9 / (1024 * 140e12) / 86400
    assert exact_days == pytest.approx(34, rel=0.06)


@pytest.mark.parametrize(("stage", "gb"), [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_memory_table(stage, gb):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)
    total = sum(model_state_bytes(7.5e9, 64, stage, 12)) / 1e9
    assert total == pytest.approx(gb, abs=0.05)  # the paper prints one decimal


def test_activation_memory_matches_korthikanti():
    # Korthikanti et al. 2022, Table 2, per layer: sbh(34 + 5as/h) with no parallelism,
    # sbh(10 + 24/t + 5as/(ht)) with TP, sbh/t(34 + 5as/h) with TP+SP, sbh/t*34 with selective
    # recompute + SP, 2sbh for full recompute
    model = gpt(6144, 40, 48)
    s, b, h, a, t = 2048, 2, 6144, 48, 8
    sbh = s * b * h

    def act(tp, sp, recompute):
        p = ParallelConfig(tp=tp, micro_batch_size=b, seq_len=s, sequence_parallel=sp)
        return activation_bytes_per_layer(model, p, False, recompute)

    assert act(1, False, "none") == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert act(t, False, "none") == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert act(t, True, "none") == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert act(t, True, "selective") == pytest.approx(sbh / t * 34)
    assert act(t, False, "full") == pytest.approx(2 * sbh)


def test_pipeline_in_flight_memory_and_interleaving():
    # 1F1B keeps p micro-batches in flight on the first stage, so its activations are
    # L layers' worth whatever p is; interleaving multiplies them by 1 + (p-1)/(p*v)
    model = gpt(6144, 48, 48)
    opts = EstimateOptions(flash_attention=False)
    base = dict(tp=8, micro_batch_size=1, global_batch_size=64, seq_len=2048, recompute="selective",
                sequence_parallel=True)  # fmt: skip
    per_layer = activation_bytes_per_layer(model, ParallelConfig(**base), False, "selective")
    for pp, v in ((4, 1), (4, 2), (8, 3)):
        cluster = ClusterSpec.for_gpus(get_node("dgx-a100"), 8 * pp)
        plan = estimate(model, ParallelConfig(pp=pp, interleave=v, **base), cluster, opts)
        expected = per_layer * 48 * (1 + (pp - 1) / (pp * v) if v > 1 else 1)
        assert plan.memory.activations == pytest.approx(expected)


def test_step_time_terms_behave():
    model = gpt(6144, 40, 48)
    cluster = ClusterSpec.for_gpus(get_node("dgx-a100"), 64)
    opts = EstimateOptions()

    def plan(**kw):
        base = dict(dp=8, tp=8, global_batch_size=64, seq_len=2048, sequence_parallel=True)
        return estimate(model, ParallelConfig(**(base | kw)), cluster, opts)

    none, full = plan(recompute="none"), plan(recompute="full")
    assert full.time.compute > none.time.compute and full.tflops_per_gpu > 0
    assert full.mfu < none.mfu  # recomputation is not useful work
    assert full.memory.activations < none.memory.activations
    # bubble (p-1)/v micro-batch slots: pipelining with 8 micro-batches, then interleaving it
    pp = estimate(
        model, ParallelConfig(dp=4, tp=8, pp=2, global_batch_size=64, seq_len=2048), cluster, opts
    )
    ppv = estimate(
        model,
        ParallelConfig(dp=4, tp=8, pp=2, interleave=2, global_batch_size=64, seq_len=2048),
        cluster,
        opts,
    )
    m = 64 // 4
    assert pp.time.bubble == pytest.approx((pp.time.compute + pp.time.tp_comm) / m)
    assert ppv.time.bubble == pytest.approx(pp.time.bubble / 2)
    # ZeRO-3 trades memory for weight all-gathers
    z0, z3 = plan(zero_stage=0), plan(zero_stage=3)
    assert z3.memory.total < z0.memory.total and z3.time.dp_comm >= z0.time.dp_comm
    assert z0.days_to_train(1e9) == pytest.approx(1e9 / z0.tokens_per_s / 86400)
    assert 0 < z0.host_cpu.dpu_freed_share < 1 and z0.checkpoint_write_s > 0


def test_checkpoint_write_time_uses_the_slower_of_fs_and_nics():
    model = get_preset("llama-3-8b")
    node = get_node("dgx-h100")
    fast_fs = ClusterSpec(node=node, num_nodes=2, storage_bandwidth_gbps=1e6)
    slow_fs = ClusterSpec(node=node, num_nodes=2, storage_bandwidth_gbps=10)
    nbytes = model.num_params() * 14  # bf16 weights + fp32 master, m, v
    p = ParallelConfig(dp=16, global_batch_size=16, seq_len=1024)
    nic_bw = 2 * 2 * node.nic.bytes_per_s  # 2 nodes x 2 storage NICs
    assert estimate(model, p, fast_fs).checkpoint_write_s == pytest.approx(nbytes / nic_bw)
    assert estimate(model, p, slow_fs).checkpoint_write_s == pytest.approx(nbytes / 10e9)


def test_bad_layouts_raise():
    model = gpt(6144, 40, 48)
    cluster = ClusterSpec.for_gpus(get_node("dgx-a100"), 64)
    with pytest.raises(ValueError, match="must equal"):
        estimate(model, ParallelConfig(dp=2, tp=8, seq_len=2048), cluster)
    with pytest.raises(ValueError, match="num_heads"):
        estimate(model, ParallelConfig(dp=2, tp=32, seq_len=2048), cluster)
    with pytest.raises(ValueError, match="num_layers"):
        estimate(model, ParallelConfig(dp=1, tp=4, pp=16, seq_len=2048), cluster)
    with pytest.raises(ValueError, match="dtype"):
        EstimateOptions(dtype="fp4")  # type: ignore[arg-type]


def test_notes_flag_tp_across_nodes_and_memory():
    model = get_preset("gpt3-175b")
    cluster = ClusterSpec.for_gpus(get_node("a100"), 1024)
    wide = ParallelConfig(tp=16, pp=8, dp=8, global_batch_size=1536, seq_len=2048,
                          recompute="full", sequence_parallel=True)  # fmt: skip
    notes = estimate(model, wide, cluster).notes
    assert any("tp=16 spans 2 nodes" in n for n in notes)
    flat = ParallelConfig(tp=8, dp=128, global_batch_size=1536, seq_len=2048)
    plan = estimate(model, flat, cluster)
    assert not plan.fits and plan.notes[0].startswith("needs")


@settings(max_examples=40, deadline=None)
@given(
    tp=st.sampled_from([1, 2, 4, 8]),
    pp=st.sampled_from([1, 2, 4, 5]),
    mb=st.sampled_from([1, 2, 4]),
    v=st.sampled_from([1, 2]),
    sp=st.booleans(),
)
def test_invariants_over_layouts(tp, pp, mb, v, sp):
    model = gpt(6144, 40, 48)
    cluster = ClusterSpec.for_gpus(get_node("dgx-a100"), 320)
    dp = 320 // (tp * pp)
    if v > 1 and pp == 1:
        return
    plans = {}
    for zero in (0, 1, 2, 3):
        for rc in ("none", "selective", "full"):
            layout = ParallelConfig(
                dp=dp, tp=tp, pp=pp, zero_stage=zero, micro_batch_size=mb,
                global_batch_size=dp * mb * 4 * pp, seq_len=2048, recompute=rc, interleave=v,
                sequence_parallel=sp,
            )  # fmt: skip
            plans[zero, rc] = estimate(
                model, layout, cluster, EstimateOptions(flash_attention=False)
            )
    for plan in plans.values():
        # no layout beats the hardware: hardware FLOPs at the full bf16 peak bound the step
        assert plan.step_time_s >= plan.hardware_flops / (320 * 312e12)
        assert plan.mfu <= plan.tflops_per_gpu * 1e12 / plan.peak_flops + 1e-12
    for rc in ("none", "selective", "full"):
        totals = [plans[z, rc].memory.total for z in (0, 1, 2, 3)]
        assert totals == sorted(totals, reverse=True)
    for zero in (0, 1, 2, 3):
        acts = [plans[zero, rc].memory.activations for rc in ("none", "selective", "full")]
        assert acts == sorted(acts, reverse=True)
        times = [plans[zero, rc].time.compute for rc in ("none", "selective", "full")]
        assert times == sorted(times)
