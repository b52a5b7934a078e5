"""SamplingParams validation: errors name the field and the value."""

import pytest

from aiinfra.infer.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 0}, ValueError, r"n \(0\)"),
        ({"temperature": -0.1}, ValueError, r"temperature \(-0.1\)"),
        ({"temperature": 2.5}, ValueError, r"temperature \(2.5\)"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"top_p": 0.0}, ValueError, r"top_p \(0.0\)"),
        ({"top_p": 1.5}, ValueError, r"top_p \(1.5\)"),
        ({"top_k": -2}, ValueError, r"top_k \(-2\)"),
        ({"top_k": 1.5}, TypeError, r"top_k \(1.5\)"),
        ({"min_p": 1.1}, ValueError, r"min_p \(1.1\)"),
        ({"presence_penalty": 2.1}, ValueError, r"presence_penalty \(2.1\)"),
        ({"frequency_penalty": -3}, ValueError, r"frequency_penalty \(-3\)"),
        ({"repetition_penalty": 0.0}, ValueError, r"repetition_penalty \(0.0\)"),
        ({"max_tokens": 0}, ValueError, r"max_tokens \(0\)"),
        ({"min_tokens": -1}, ValueError, r"min_tokens \(-1\)"),
        ({"min_tokens": 5, "max_tokens": 2}, ValueError, r"min_tokens \(5\)"),
        ({"logprobs": 21}, ValueError, r"logprobs \(21\)"),
        ({"logprobs": -1}, ValueError, r"logprobs \(-1\)"),
        ({"stop": "x"}, TypeError, "stop"),
        ({"stop": [""]}, TypeError, "stop"),
        ({"stop_token_ids": [-1]}, ValueError, r"stop_token_ids \(-1\)"),
        ({"seed": "1"}, TypeError, "seed"),
        ({"temperature": "hot"}, TypeError, "temperature"),
    ],
)
def test_bad_values_are_rejected_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_edges_are_accepted():
    SamplingParams(
        n=3,
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=0.5,
        seed=0,
        stop=["a"],
        stop_token_ids=[0],
        max_tokens=None,
        logprobs=20,
    )
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams().has_penalties
