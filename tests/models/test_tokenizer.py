from __future__ import annotations

import transformers

from aiinfra.models import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "héllo wörld ✓ 日本", "  two  spaces\nand\ttabs", ""]


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode("a", add_bos=True) == [256, 97]
    assert tok.decode([256, 104, 105, 257]) == "hi"
    assert tok.decode([104, 257], skip_special_tokens=False) == "h<|eos|>"


def test_saved_tokenizer_json_equals_byte_tokenizer(tmp_path):
    ByteTokenizer().save(tmp_path)
    ours, hf_file = ByteTokenizer(), load_tokenizer(tmp_path)
    assert isinstance(hf_file, HFTokenizer)
    assert (hf_file.bos_token_id, hf_file.eos_token_id) == (256, 257)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf_file.encode(text) == ours.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        assert hf_file.decode(ours.encode(text)) == text
    assert hf_file.chat_template is not None


def test_folder_without_tokenizer_json_uses_bytes(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
