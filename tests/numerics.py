"""Comparing a backend's result with a float64 reference in units in the last place (ulps).

A kernel that computes in fp32 and rounds once to bf16/fp16 gives the correctly rounded value
or, when the exact value lies within its own fp32 error of a rounding boundary, the neighbour:
which one differs between CPUs (vector ``expf``, FMA contraction), so the contract is *within
one ulp of the output dtype*, not bit equality. (``float64_tensor.to(torch.bfloat16)`` is not
even correctly rounded itself: torch converts through fp32, rounding twice.)
"""

from __future__ import annotations

import torch


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s representable numbers in the binade of each ``|value|``,
    float64: ``eps * 2**(exponent - 1)``; zero and subnormal values get the subnormal spacing
    ``eps * tiny``. Works for dtypes torch has no ``nextafter`` for (bf16)."""
    info = torch.finfo(dtype)
    magnitude = values.detach().double().abs().clamp_min(info.tiny)
    _, exponent = torch.frexp(magnitude)  # magnitude = mantissa * 2**exponent, mantissa in [.5, 1)
    return torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1)


def assert_within_ulp(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                      ulps: float = 1, arithmetic: torch.Tensor | float = 0.0) -> None:
    """``|actual - reference| <= ulps * ulp(reference) + arithmetic`` element by element.

    ``dtype`` is the output dtype the ulp is counted in (``actual`` must have it); ``reference``
    is the exact (float64) value. ``arithmetic`` is an absolute bound on the error of the
    computation itself (fp32 ``exp``, sums) for fp32 outputs, where it exceeds an ulp, or for a
    cast that truncates; leave it 0 for bf16/fp16 outputs rounded to nearest. Infinities and NaNs
    must sit at the same places with the same values.
    """
    assert actual.dtype == dtype, f"result is {actual.dtype}, expected {dtype}"
    assert actual.shape == reference.shape, f"shapes {actual.shape} != {reference.shape}"
    got, want = actual.detach().double().cpu(), reference.detach().double().cpu()
    special = ~torch.isfinite(want) | ~torch.isfinite(got)
    assert torch.equal(got[special].nan_to_num(), want[special].nan_to_num()) and torch.equal(
        got[special].isnan(), want[special].isnan()), "infinities or NaNs differ"
    got, want = got[~special], want[~special]
    arithmetic = torch.as_tensor(arithmetic, dtype=torch.float64).cpu()
    if arithmetic.dim():
        arithmetic = arithmetic.expand(special.shape)[~special]
    error = (got - want).abs()
    bound = ulps * ulp(want, dtype) + arithmetic
    bad = error > bound
    if bad.any():
        worst = int(torch.argmax(error / bound))
        extra = " + the arithmetic bound" if arithmetic.any() else ""
        in_ulps = (error[worst] / ulp(want[worst], dtype)).item()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} values beyond {ulps} ulp of {dtype}{extra}; "
            f"worst: got {got[worst].item()!r}, reference {want[worst].item()!r}, "
            f"{in_ulps:.3g} ulp off")
