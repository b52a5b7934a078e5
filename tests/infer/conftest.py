import pytest

from aiinfra.models import create_random_model_dir, get_preset, load_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A seeded random `tiny` model folder (HF format, byte tokenizer) for the engine tests."""
    out = tmp_path_factory.mktemp("tiny")
    return str(create_random_model_dir(get_preset("tiny"), out, seed=0))


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The reference model on the tiny folder: the greedy loops the engine is checked against."""
    model, _ = load_model(tiny_dir)
    return model
