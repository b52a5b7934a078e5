"""The reference model against HF transformers on the same random folders, and its weight I/O."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from aiinfra.models import (
    ModelConfig,
    build_model,
    create_random_model_dir,
    generate_greedy,
    get_preset,
    load_model,
    save_model,
)

TINY = get_preset("tiny")

# (name, config): every architecture and option the issue names
VARIANTS = {
    "llama-gqa": TINY,
    "llama-tied": TINY.replace(tie_word_embeddings=True),
    "llama-mha-bias": TINY.replace(num_kv_heads=4, qkv_bias=True),
    "mistral": TINY.replace(architecture="MistralForCausalLM", sliding_window=4096),
    "qwen2-bias": TINY.replace(architecture="Qwen2ForCausalLM", qkv_bias=True, rope_theta=1e6),
}


def _hf_model(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    create_random_model_dir(VARIANTS[name], tmp_path, seed=1)
    ours, _ = load_model(tmp_path)
    hf = _hf_model(tmp_path)
    assert type(hf).__name__ == VARIANTS[name].architecture
    x = torch.randint(0, TINY.vocab_size, (3, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    # the bound: same fp32 math, but kernel choices (SDPA backend, GQA expansion) may differ
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"


def test_explicit_positions_match_offset_sequence():
    model = build_model(TINY, seed=0).eval()
    x = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(x)
        # the same tokens at positions 0..11 given explicitly, and a batch row shifted by nothing
        explicit = model(x, torch.arange(12)[None])
    torch.testing.assert_close(full, explicit, atol=0, rtol=0)


def test_save_hf_load_ours_roundtrip_exact(tmp_path):
    config = TINY.replace(tie_word_embeddings=True)
    model = build_model(config, seed=3)
    save_model(model, tmp_path / "a")
    hf = _hf_model(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    back, _ = load_model(tmp_path / "b")
    ref = model.state_dict()
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, ref[key], atol=0, rtol=0)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


def test_sharded_save_load(tmp_path):
    model = build_model(TINY, seed=4)
    save_model(model, tmp_path, max_shard_bytes=400_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back, _ = load_model(tmp_path)
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], atol=0, rtol=0)
    hf = _hf_model(tmp_path)  # HF reads our shards too
    x = torch.randint(0, TINY.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, back(x), atol=1e-4, rtol=0)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    create_random_model_dir(TINY, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
        load_model(tmp_path)
    assert "model.layers.9.extra.weight" in str(err.value)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    create_random_model_dir(TINY, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\[7\].*\[128\]"):
        load_model(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    create_random_model_dir(TINY, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_kv_heads", 3), ("hidden_size", 0), ("architecture", "Foo"), ("mlp", "relu")],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        TINY.replace(**{field: value})


def test_hf_config_roundtrip():
    for config in VARIANTS.values():
        assert ModelConfig.from_hf(config.to_hf()) == config


def test_presets_have_documented_sizes():
    assert abs(get_preset("bench-32m").num_params() / 1e6 - 32.0) < 0.05
    assert 0.5e6 < get_preset("tiny").num_params() < 1.5e6
    model = build_model(TINY)
    assert sum(p.numel() for p in model.parameters()) == TINY.num_params()
    assert get_preset("llama-3-70b").num_params() == pytest.approx(70.55e9, rel=1e-3)


def test_greedy_loop_matches_hf_generate(tmp_path):
    create_random_model_dir(TINY, tmp_path, seed=2)
    model, config = load_model(tmp_path)
    hf = _hf_model(tmp_path)
    prompt = [5, 17, 300, 2, 99]
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert generate_greedy(model, prompt, 10) == out[0, len(prompt) :].tolist()
