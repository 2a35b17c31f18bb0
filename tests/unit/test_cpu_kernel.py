"""The C++ kernel's build: it leaves the process's floating-point environment alone, and its cache
key tells CPUs apart."""

import math
import sys

import numpy as np
import pytest
import torch

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.sampling import cpu_kernel, sample_masked_weight

# not cpu_kernel.available(): that would load the kernel at collection, before the checks
needs_kernel = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C++ compiler")

F32_SUBNORMAL = 1e-40  # below float32's smallest normal, 2**-126 ~ 1.18e-38
F64_SUBNORMAL = 5e-324  # float64's smallest subnormal


def subnormals_survive() -> dict[str, bool]:
    """Each check is false under flush-to-zero (a result below the normal range becomes 0) or
    denormals-are-zero (a subnormal input reads as 0): the x86 MXCSR bits, arm64's FPCR.FZ."""
    tiny32, tiny64 = np.finfo(np.float32).tiny, np.finfo(np.float64).tiny
    one, four = 1.0, 4.0  # names, not literals: Python folds constant expressions at compile time
    big = torch.full((1 << 16,), F32_SUBNORMAL)  # large enough for torch's vectorised kernels
    return {
        "numpy f32 subnormal * 1 (DAZ)": np.float32(F32_SUBNORMAL) * np.float32(1) != 0,
        "numpy f32 tiny / 4 (FTZ)": tiny32 / np.float32(4) != 0,
        "numpy f64 subnormal * 1 (DAZ)": np.float64(F64_SUBNORMAL) * np.float64(1) != 0,
        "numpy f64 tiny / 4 (FTZ)": tiny64 / np.float64(4) != 0,
        "python float subnormal * 1": F64_SUBNORMAL * one != 0,
        "python float tiny / 4": sys.float_info.min / four != 0,
        "math.ldexp(1, -1070) * 1": math.ldexp(one, -1070) * one != 0,
        "torch f32 subnormal * 1": bool((torch.tensor([F32_SUBNORMAL]) * 1.0 != 0).all()),
        "torch f32 subnormal * 1, vectorised": bool((big * 1.0 != 0).all()),
        "torch f32 tiny / 4": bool((torch.tensor([tiny32]) / 4.0 != 0).all()),
        "torch f64 subnormal * 1": bool(
            (torch.tensor([F64_SUBNORMAL], dtype=torch.float64) * 1.0 != 0).all()),
    }


@needs_kernel
def test_loading_and_running_the_kernel_keeps_subnormals():
    """GCC's crtfastmath.o (linked in by -ffast-math) would set FTZ/DAZ for the whole process as
    soon as the library is loaded: SparseGPT's float64 Hessian work and test references would
    then flush subnormals. Loading, forward and backward must leave them alone."""
    before = [name for name, ok in subnormals_survive().items() if not ok]
    assert not before, f"flushed before this test ran the kernel (an earlier load?): {before}"
    assert cpu_kernel.load() is not None
    pattern = NMPattern(2, 4)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(8, 16).to(dtype).requires_grad_()
        logits = (torch.randn(8, 4, 6) * 0.01).requires_grad_()
        main_grad = torch.zeros(logits.shape)
        out, reg = sample_masked_weight(weight, logits, pattern, tau=2.0, kappa=50.0, key=3,
                                        backend="cpu")
        (out.float().sum() + reg).backward()
        out, reg = sample_masked_weight(weight, logits, pattern, tau=2.0, kappa=50.0, key=4,
                                        backend="cpu", main_grad=main_grad)
        (out.float().sum() + reg).backward()
        assert torch.isfinite(logits.grad).all() and main_grad.abs().sum() > 0
    flushed = [name for name, ok in subnormals_survive().items() if not ok]
    assert not flushed, f"the C++ kernel changed the process's float environment: {flushed}"
