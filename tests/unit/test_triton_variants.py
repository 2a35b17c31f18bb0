"""The Triton sampler's variants: one compiled variant per configuration whatever the key, sizes,
offsets and alignment of a call; the occupancy model; misaligned views; streamed schedules."""

import pytest
import torch

pytest.importorskip("triton", reason="the AOT check compiles with triton's own compiler")

from maskllm_megatron.core.nm import NMPattern  # noqa: E402
from maskllm_megatron.sampling import (  # noqa: E402
    NoiseKey,
    ShardGroups,
    sample_masked_weight,
    triton_aot,
    triton_kernel,
)


def test_occupancy_follows_the_register_file():
    # 137 registers, 4 warps: 4608 registers per warp, 14 warps fit, 3 blocks = 12 warps
    assert triton_aot.occupancy(137, 0, 4, 90) == 12 / 64
    assert triton_aot.occupancy(64, 0, 4, 90) == 0.5
    assert triton_aot.occupancy(32, 0, 4, 80) == 1.0
    assert triton_aot.occupancy(32, 100 * 1024, 4, 80) == 4 / 64  # one block: shared memory
    assert triton_aot.occupancy(16, 0, 1, 90) == 32 / 64  # 32 blocks at most


# Calls that must all land in one variant: keys of every Triton integer type (i32, i64, u64,
# ==1, %16), shapes and shard offsets of either, kappa/tau, and misaligned views of the inputs.
VARIATIONS = [
    dict(key=0),
    dict(key=1, rows=1, groups=1),
    dict(key=16, rows=3, groups=16, kappa=16.0, tau=1.0),
    dict(key=2**31 + 1, rows=7, groups=5, shard=ShardGroups(1, 0, None), offset=1),
    dict(key=2**32 + 16, rows=2, groups=3, shard=ShardGroups(2**20, 16, 64), offset=3),
    dict(key=2**63 + 5, rows=16, groups=1, shard=ShardGroups(16, 1, 17), tau=0.5, offset=2),
    dict(key=2**64 - 1, rows=5, groups=32, kappa=2.0 ** 70),
]


def test_one_variant_per_configuration():
    for call in triton_aot.calls():
        keys = {triton_aot.variant_key(*triton_aot.launch(call, **v)) for v in VARIATIONS}
        assert keys == {triton_aot.variant_key(*triton_aot.launch(call))}, call


def test_variants_differ_only_by_pattern_and_dtypes():
    """Soft/hard, weight gradient and fp32 accumulation are run-time switches: the compiled
    variants are forward x (pattern, weight dtype) and backward x (.., gradient dtype)."""
    groups = triton_aot.variants()
    identities = {(c.kernel, c.pattern, c.dtype, c.main_grad or "fp32")
                  for members in groups.values() for c in members[:1]}
    targets = {m for m in triton_aot.MAIN_GRADS if m is not None}
    assert len(groups) == len(identities) == (
        len(triton_aot.PATTERNS) * len(triton_aot.DTYPES) * (1 + len(targets)))


def test_a_misaligned_pointer_would_be_another_variant():
    """The alignment the launcher guarantees is what keeps the variant: Triton does specialise
    pointers on 16-byte alignment."""
    call = triton_aot.calls()[0]
    kernel, args, meta = triton_aot.launch(call)
    shifted = torch.zeros(args[0].numel() + 1, dtype=args[0].dtype)[1:].view(args[0].shape)
    assert triton_aot.variant_key(kernel, (shifted, *args[1:]), meta) != \
        triton_aot.variant_key(kernel, args, meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_give_the_aligned_result(dtype):
    """Odd-offset views (e.g. ``main_grad[start:stop]`` of a gated layer) are copied or staged
    to aligned memory; the result, main_grad included, is the same bit for bit."""
    pattern = NMPattern(2, 4)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 20, generator=gen)
    logits = torch.randn(6, 5, 6, generator=gen) * 0.05
    start = torch.randn(6, 5, 6, generator=gen).to(dtype)

    def odd(t):
        return torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape)

    results = []
    for view in (lambda t: t.clone(), odd):
        main_grad = view(start)
        param = view(logits).requires_grad_()
        assert (main_grad.data_ptr() % triton_kernel.ALIGN == 0) == (view is not odd)
        out, reg = sample_masked_weight(view(weight), param, pattern, tau=2.0, kappa=50.0,
                                        key=NoiseKey(seed=1).philox_key(), backend="triton",
                                        main_grad=main_grad)
        (out.sum() + reg).backward()
        results.append((out, reg, main_grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pattern", [NMPattern(1, 3), NMPattern(3, 5)], ids=str)
def test_patterns_outside_the_schedule_table_take_the_streamed_schedule(pattern):
    """Odd M and odd C (one-column tiles) run the streamed kernels, equal to the torch path."""
    assert not triton_kernel.launch_config(pattern)["UNROLLED"]
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(7, 6 * pattern.m, generator=gen).to(torch.bfloat16)
    logits = torch.randn(7, 6, pattern.num_candidates, generator=gen) * 0.05
    start = torch.randn(logits.shape, generator=gen).to(torch.bfloat16)
    results = []
    for backend in ("triton", "torch"):
        param, main_grad = logits.clone().requires_grad_(), start.clone()
        out, reg = sample_masked_weight(weight, param, pattern, tau=0.5, kappa=40.0,
                                        key=2**63 + 3, backend=backend, main_grad=main_grad)
        (out.float().sum() + reg).backward()
        results.append((out.float(), reg, main_grad.float()))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-5)
