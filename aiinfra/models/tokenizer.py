"""Tokenizers: the byte tokenizer our own models use, and HF `tokenizer.json` through `tokenizers`.

The byte tokenizer is saved as a real `tokenizer.json` (byte-level BPE with no merges, id = byte
value), so HF's AutoTokenizer and `HFTokenizer` read our folders with the ids of `ByteTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

BYTE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TokenizerLike(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then <|bos|> 256, <|eos|> 257, <|pad|> 258."""

    BOS_ID = 256
    EOS_ID = 257

    def __init__(self) -> None:
        self.bos_token_id: int | None = self.BOS_ID
        self.eos_token_id: int | None = self.EOS_ID
        self.pad_token_id = self.BOS_ID + 2
        self.vocab_size = 256 + len(BYTE_SPECIAL_TOKENS)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special_tokens and i < self.vocab_size:
                out += BYTE_SPECIAL_TOKENS[i - 256].encode()
        return out.decode("utf-8", errors="replace")

    def to_hf(self) -> Tokenizer:
        byte_to_char = ByteLevel.alphabet()  # the 256 printable stand-ins, in GPT-2's byte order
        mapping = _bytes_to_unicode()
        vocab = {mapping[b]: b for b in range(256)}
        assert set(vocab) == set(byte_to_char)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
        return tok

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.to_hf().save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BYTE_SPECIAL_TOKENS[0],
            "eos_token": BYTE_SPECIAL_TOKENS[1],
            "pad_token": BYTE_SPECIAL_TOKENS[2],
            "add_bos_token": False,
            "model_max_length": 1_000_000,
            "chat_template": DEFAULT_CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the one ByteLevel uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


class HFTokenizer:
    """A `tokenizer.json` (any HF fast tokenizer) with special ids from tokenizer_config.json."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token_id = self._special_id(cfg.get("bos_token"))
        self.eos_token_id = self._special_id(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (add_bos or self.add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(model_dir: str | Path) -> TokenizerLike:
    """The folder's tokenizer.json when present, else the byte tokenizer."""
    if (Path(model_dir) / "tokenizer.json").exists():
        return HFTokenizer(model_dir)
    return ByteTokenizer()
