import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # tests are small: avoid oversubscribing the 2 cores when pytest-xdist or ranks run beside
    torch.set_num_threads(int(os.environ.get("AIINFRA_TEST_THREADS", "2")))
    yield
