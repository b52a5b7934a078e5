import pytest

from aiinfra.models import create_random_model_dir, get_preset


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A seeded random `tiny` model folder (HF format, byte tokenizer) shared by the engine tests."""
    return str(create_random_model_dir(get_preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=0))
