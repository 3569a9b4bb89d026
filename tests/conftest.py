import os

# The Triton interpreter must be chosen before triton is imported anywhere.
if os.environ.get("CONSOPT_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
