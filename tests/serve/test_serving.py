"""Streaming deltas: text that may still change (a stop string forming, a partial UTF-8 character)
is held back, and the concatenated deltas equal the final text."""

from __future__ import annotations

import pytest

from aiinfra.infer import CompletionOutput
from aiinfra.models import ByteTokenizer
from aiinfra.serve.protocol import APIError, ChatMessage
from aiinfra.serve.serving import OpenAIServing, _Choice, _take_delta


def out(text: str, ids: list[int], finish: str | None = None) -> CompletionOutput:
    return CompletionOutput(index=0, text=text, token_ids=ids, finish_reason=finish)


def test_hold_back_for_a_forming_stop_string():
    c = _Choice(0)
    hold = len("STOP") - 1
    d1 = _take_delta(c, out("hello S", [1, 2]), hold)
    assert (d1.text, d1.token_ids) == ("hell", [1, 2])  # "o S" could be the start of "STOP"
    d2 = _take_delta(c, out("hello ST", [1, 2, 3]), hold)
    assert (d2.text, d2.token_ids, d2.text_offset) == ("o", [3], 4)
    d3 = _take_delta(c, out("hello ", [1, 2, 3, 4], "stop"), hold)  # the engine cut "STOP" off
    assert (d3.text, d3.finish_reason) == (" ", "stop")
    assert d1.text + d2.text + d3.text == "hello "
    assert _take_delta(c, out("hello ", [1, 2, 3, 4], "stop"), hold) is None  # finished once


def test_hold_back_a_partial_utf8_character_but_still_send_its_token():
    c = _Choice(0)
    d1 = _take_delta(c, out("a\ufffd", [97, 0xC3]), 0)
    assert (d1.text, d1.token_ids) == ("a", [97, 0xC3])  # the token is sent, its text waits
    d2 = _take_delta(c, out("aé", [97, 0xC3, 0xA9]), 0)
    assert (d2.text, d2.token_ids) == ("é", [0xA9])
    d3 = _take_delta(c, out("aé\ufffd", [97, 0xC3, 0xA9, 0xFF], "length"), 0)
    assert d3.text == "\ufffd" and d3.finish_reason == "length"  # flushed when finished


def test_no_chunk_without_progress():
    c = _Choice(0)
    assert _take_delta(c, out("", []), 0) is None
    assert _take_delta(c, out("x", [5]), 0).text == "x"
    assert _take_delta(c, out("x", [5]), 0) is None


def _serving(tokenizer) -> OpenAIServing:
    from types import SimpleNamespace

    engine = SimpleNamespace(tokenizer=tokenizer, max_model_len=64)
    return OpenAIServing(engine, metrics=None, served_model_name="m")  # type: ignore[arg-type]


def test_chat_template_default_and_from_the_tokenizer():
    msgs = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="hi")]
    # no chat_template on the tokenizer: the documented default (models.tokenizer)
    assert _serving(ByteTokenizer()).render_chat(msgs, True) == (
        "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n"
    )
    tok = ByteTokenizer()
    tok.chat_template = (  # type: ignore[attr-defined]
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    assert _serving(tok).render_chat(msgs, False) == "<|bos|>[system:s][user:hi]"
    tok.chat_template = "{{ raise_exception('only user turns') }}"  # type: ignore[attr-defined]
    with pytest.raises(APIError) as e:
        _serving(tok).render_chat(msgs, True)
    assert e.value.status == 400 and "only user turns" in e.value.message
