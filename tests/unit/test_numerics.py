"""The test helper that compares results with float64 references in ulps of the output dtype."""

import pytest
import torch
from numerics import assert_within_ulp, ulp

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def steps(values: torch.Tensor, k: int) -> torch.Tensor:
    """``values`` moved ``k`` representable numbers away from zero (k < 0: towards zero)."""
    return (values.view(INT_VIEW[values.dtype]) + k).view(values.dtype)


def samples(dtype):
    """Exact values of ``dtype``: ordinary ones of both signs, near powers of two, the smallest
    normal, subnormals."""
    info = torch.finfo(dtype)
    values = torch.tensor([1.0, 1.3, -2.7, 3.0, 1000.5, -0.011, 0.75, 5.5e-3], dtype=torch.float64)
    values = values.to(dtype)
    tiny = torch.tensor([info.tiny, info.tiny * 3, -info.tiny * 5.5], dtype=dtype)
    subnormal = torch.tensor([info.eps * info.tiny * 3, info.tiny / 4, -info.tiny / 3],
                             dtype=dtype)
    return torch.cat([values, tiny, subnormal])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ulp_is_the_spacing_of_the_dtype(dtype):
    x = samples(dtype)
    up = steps(x, 1)
    assert torch.equal(ulp(x, dtype), (up.double() - x.double()).abs())
    info = torch.finfo(dtype)
    assert ulp(torch.zeros(3), dtype).eq(info.eps * info.tiny).all()  # the subnormal spacing
    assert ulp(torch.tensor([1.0]), dtype).item() == info.eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_ulp_passes_two_fail(dtype):
    ref = samples(dtype)
    assert_within_ulp(ref, ref.double(), dtype)
    for k in (1, -1):
        assert_within_ulp(steps(ref, k), ref.double(), dtype)
    for k in (2, -2):
        # two steps down from a power of two are one ulp of the binade below: skip those
        moved = steps(ref, k)
        keep = (k > 0) | (torch.frexp(ref.double().abs())[0] != 0.5)
        with pytest.raises(AssertionError, match="beyond 1 ulp"):
            assert_within_ulp(moved[keep], ref.double()[keep], dtype)
        for i in torch.nonzero(keep).flatten().tolist():  # each one alone fails too
            with pytest.raises(AssertionError):
                assert_within_ulp(moved[i:i + 1], ref.double()[i:i + 1], dtype)
        assert_within_ulp(moved, ref.double(), dtype, ulps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inexact_references_and_zero(dtype):
    """A float64 value between two representable ones: both neighbours are within one ulp, the
    next ones out are not."""
    low = samples(dtype)[:8].abs()
    high = steps(low, 1)
    ref = low.double() + 0.3 * (high.double() - low.double())
    for got in (low, high):
        assert_within_ulp(got, ref, dtype)
    with pytest.raises(AssertionError):
        assert_within_ulp(steps(high, 1), ref, dtype)
    with pytest.raises(AssertionError):
        assert_within_ulp(steps(low, -1)[1:2], ref[1:2], dtype)  # 1.3: 1.3 ulp below
    zero = torch.zeros(2, dtype=dtype)
    smallest = steps(zero, 1) * torch.tensor([1.0, -1.0]).to(dtype)
    assert_within_ulp(smallest, torch.zeros(2, dtype=torch.float64), dtype)
    with pytest.raises(AssertionError):
        assert_within_ulp(steps(smallest, 1), torch.zeros(2, dtype=torch.float64), dtype)


def test_dtype_shape_specials_and_arithmetic_bound():
    ref = torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float64)
    assert_within_ulp(ref.float(), ref, torch.float32)
    with pytest.raises(AssertionError, match="result is"):
        assert_within_ulp(ref.float(), ref, torch.bfloat16)
    with pytest.raises(AssertionError, match="NaN"):
        assert_within_ulp(torch.tensor([1.0, float("inf"), 2.0]), ref, torch.float32)
    got = torch.tensor([1.0 + 2**-20, 4.0])
    want = torch.tensor([1.0, 4.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="beyond 1 ulp"):
        assert_within_ulp(got, want, torch.float32)
    assert_within_ulp(got, want, torch.float32, arithmetic=2**-20)
    assert_within_ulp(got, want, torch.float32, arithmetic=torch.tensor([2**-20, 0.0]))
