"""Test setup: the Triton kernels run on CPU tensors through the interpreter."""

import os

# Must be set before triton kernels are defined (at import of maskllm_megatron.sampling).
os.environ.setdefault("TRITON_INTERPRET", "1")
