"""Every Triton sampler configuration, compiled ahead of time for sm_80 and sm_90 with Triton's
own compiler (no GPU needed): all build, none spills, 2:4 at >= 50% occupancy on sm_90."""

import pytest

pytest.importorskip("triton", reason="the AOT check compiles with triton's own compiler")

from maskllm_megatron.sampling import triton_aot  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    """One record per (variant, arch); compiled once per session (and cached by Triton)."""
    return triton_aot.compile_all()


def test_every_configuration_compiles_for_sm80_and_sm90(compiled):
    served = {(r["arch"], r["kernel"], r["pattern"], r["dtype"], mode)
              for r in compiled for mode in r["calls"]}
    want = {(arch, c.kernel, c.pattern, c.dtype, c.mode)
            for arch in triton_aot.ARCHS for c in triton_aot.calls()}
    assert served == want
    assert len(compiled) == len(triton_aot.ARCHS) * len(triton_aot.variants())


def test_no_configuration_spills(compiled):
    spilling = [r for r in compiled if r["spills"]]
    assert not spilling, spilling


def test_2_4_kernels_reach_half_occupancy_on_sm90(compiled):
    low = [r for r in compiled if r["pattern"] == "2:4" and r["arch"] == 90
           and r["occupancy"] < 0.5]
    assert not low, low
    assert all(r["block"] == 32 * r["num_warps"] for r in compiled)  # one group per thread


