"""Test setup: the Triton kernels run on CPU tensors through the interpreter."""

import os

# Must be set before triton kernels are defined (at import of maskllm_megatron.sampling).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from dist_harness import DistributedPool  # noqa: E402


@pytest.fixture(scope="session")
def dist4():
    """Four gloo ranks for the whole session; each test sets its own TP x PP."""
    pool = DistributedPool(4)
    yield pool
    pool.close()
