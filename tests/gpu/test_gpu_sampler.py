"""The compiled Triton sampler on a CUDA device against the PyTorch path (``backend="torch"``).

* Noise: the kernels' Philox words equal ``noise.noise_bits`` bit for bit, and the sampled (hard)
  candidate equals the PyTorch path's in every group whose two best scores are not tied to
  within fp32 rounding (both compute the scores step by step the same way).
* Values: within one ulp of the output dtype plus a bound on the fp32 arithmetic's own error.
  That bound is nearly zero for hard masks; for soft ones it comes from the GPU's approximate
  ``exp`` and division (a few fp32 ulps per softmax term, summed over ``C`` candidates), so it
  only shows when the output itself is fp32.
* Variants: launches with many keys, shards, sizes and misaligned views leave one compiled
  kernel per configuration in Triton's cache.

Every test needs a GPU (marked ``gpu``: ``pytest -m gpu``); elsewhere they are skipped.
"""

import math

import pytest
import torch

from maskllm_megatron.core import nm
from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.sampling import (
    NoiseKey,
    ShardGroups,
    noise,
    sample_masked_weight,
    triton_aot,
    triton_kernel,
)

PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8), NMPattern(2, 8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MAIN_GRADS = [None, torch.float32, torch.bfloat16, torch.float16]
EPS32 = 2.0**-24  # half an fp32 ulp at 1: one rounding
KEY = NoiseKey(seed=7, layer=3, iteration=11).philox_key() | (1 << 63)  # > 2**63: int64 < 0
TAU, KAPPA, REG_WEIGHT = 0.7, 300.0, 0.7
ROWS, GROUPS = 37, 96  # 3552 groups: a ragged last program
SHARD = ShardGroups(row_offset=5, group_col_offset=3, groups_per_row=101)


def case(pattern, dtype, seed=0):
    """Weight (no zeros, so hard masks can be read off the output), logits, incoming grad."""
    gen = torch.Generator().manual_seed(seed)
    shape = (ROWS, GROUPS * pattern.m)
    weight = torch.randn(shape, generator=gen).sign() * (torch.rand(shape, generator=gen) + 0.5)
    logits = torch.randn(ROWS, GROUPS, pattern.num_candidates, generator=gen) * 0.02
    grad_out = torch.randn(shape, generator=gen)
    return weight.to("cuda", dtype), logits.cuda(), grad_out.to("cuda", dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at ``|x|`` (float64), subnormals included."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.double().abs().clamp_min(info.tiny))
    return torch.ldexp(torch.full_like(x, info.eps, dtype=torch.float64), exponent - 1)


def assert_within_ulp(got, want, arithmetic=0.0, where=None):
    """``|got - want| <= 1 ulp of got's dtype at |want| + arithmetic`` (an fp32 error bound)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.double() - want.double()).abs()
    bound = ulp(want, got.dtype) + arithmetic
    ok = diff <= bound if where is None else (diff <= bound) | ~where
    assert ok.all(), (f"{int((~ok).sum())} of {ok.numel()} beyond tolerance; worst excess "
                      f"{(diff - bound).max().item():.3g}")


def group_scores(logits, pattern):
    """float64 scores ``(kappa * logits + g) / tau`` per group, ``[ROWS * GROUPS, C]``."""
    shard = SHARD.resolve(ROWS, GROUPS)
    groups = shard.global_indices(0, ROWS, GROUPS)
    g = noise.gumbel_noise(KEY, groups, pattern.num_candidates, torch.float64)
    return (KAPPA * logits.double().cpu().reshape(-1, pattern.num_candidates) + g) / TAU


def agreeing_groups(got, want, logits, pattern):
    """Groups whose hard candidate agrees; any other must be a tie within fp32 rounding."""
    a = nm.mask_to_indices(got.cpu() != 0, pattern).reshape(-1)
    b = nm.mask_to_indices(want.cpu() != 0, pattern).reshape(-1)
    differ = a != b
    if differ.any():
        z = group_scores(logits, pattern)[differ]
        za, zb = z.gather(1, a[differ, None]), z.gather(1, b[differ, None])
        assert ((za - zb).abs() <= 16 * EPS32 * torch.maximum(za.abs(), zb.abs())).all()
    return (~differ).reshape(ROWS, GROUPS)


def per_weight(groups_mask, pattern):
    return groups_mask.repeat_interleave(pattern.m, dim=1).cuda()


def run(backend, weight, logits, grad_out, pattern, *, hard, wgrad, main_grad=None):
    """Forward and backward of ``out, reg`` with loss grads ``(grad_out, REG_WEIGHT)``."""
    param = logits.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(wgrad)
    out, reg = sample_masked_weight(w, param, pattern, tau=TAU, kappa=KAPPA, key=KEY,
                                    shard=SHARD, hard=hard, backend=backend, main_grad=main_grad)
    torch.autograd.backward([out, reg], [grad_out, torch.tensor(REG_WEIGHT, device="cuda")])
    return out.detach(), reg.detach(), param.grad, w.grad


if triton_kernel.triton is not None:
    triton, tl = triton_kernel.triton, triton_kernel.tl
    noise_bits_block = triton_kernel.noise_bits_block

    @triton.jit(do_not_specialize=["key"])
    def _dump_noise(q_ptr, out_ptr, key: tl.int64, BLOCK: tl.constexpr, CP: tl.constexpr,
                    NB: tl.constexpr):
        g = tl.arange(0, BLOCK)
        bits = noise_bits_block(key, tl.load(q_ptr + g), BLOCK, CP, NB)
        tl.store(out_ptr + g[:, None] * CP + tl.arange(0, CP)[None, :], bits.to(tl.int64))


@pytest.mark.gpu
def test_kernel_noise_equals_the_torch_stream_on_cuda():
    groups = torch.tensor([0, 1, 7, 2**32 + 3, 2**40 + 11, 99, 5, 6], device="cuda")
    for key in (KEY, 2**63 + 12345, 2**64 - 1, 77, 0):
        for c in (4, 6, 28, 70):
            cp = triton.next_power_of_2(c)
            out = torch.zeros(8, cp, dtype=torch.int64, device="cuda")
            _dump_noise[(1,)](groups, out, triton_kernel.as_int64(key), BLOCK=8, CP=cp,
                              NB=triton.cdiv(c, 4))
            assert torch.equal(out[:, :c].cpu(), noise.noise_bits(key, groups.cpu(), c))


@pytest.mark.gpu
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_forward_matches_the_pytorch_path(pattern, dtype, hard):
    weight, logits, _ = case(pattern, dtype)
    kw = dict(tau=TAU, kappa=KAPPA, key=KEY, shard=SHARD, hard=hard)
    with torch.no_grad():
        out, reg = sample_masked_weight(weight, logits, pattern, backend="triton", **kw)
        ref, ref_reg = sample_masked_weight(weight, logits, pattern, backend="torch", **kw)
    c = pattern.num_candidates
    if hard:  # an exact N:M mask of the same candidate: W * 1 or W * 0, no rounding
        agree = per_weight(agreeing_groups(out, ref, logits, pattern), pattern)
        assert nm.is_nm_sparse(out, pattern)
        assert torch.equal(out[agree], ref[agree])
    else:  # mask error <= C * 2**-20: every softmax term off by <= (1 + C y) * 2**-21
        assert_within_ulp(out, ref, weight.double().abs() * c * 2.0**-20)
    # reg: each (W * mask)^2 off by 2 |W|^2 * C * 2**-20, plus fp32 partial sums
    scale = weight.double().square().sum()
    assert abs(reg.double() - ref_reg.double()) <= (2 * c * 2.0**-20 + 2.0**-16) * scale


@pytest.mark.gpu
@pytest.mark.parametrize("main_grad", MAIN_GRADS, ids=lambda d: f"into-{d}" if d else "returned")
@pytest.mark.parametrize("wgrad", [False, True], ids=["frozen", "dW"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_backward_matches_the_pytorch_path(pattern, dtype, hard, wgrad, main_grad):
    weight, logits, grad_out = case(pattern, dtype, seed=1)
    start = None
    if main_grad is not None:
        gen = torch.Generator().manual_seed(2)
        start = (torch.randn(logits.shape, generator=gen) * 10).to("cuda", main_grad)
    results = {}
    for backend in ("triton", "torch"):
        buffer = None if start is None else start.clone()
        out, _, d_logits, d_w = run(backend, weight, logits, grad_out, pattern, hard=hard,
                                    wgrad=wgrad, main_grad=buffer)
        results[backend] = (out, d_logits if buffer is None else buffer, d_w)
    (out, got, got_w), (ref_out, want, want_w) = results["triton"], results["torch"]
    agree = agreeing_groups(out, ref_out, logits, pattern) if hard else \
        torch.ones(ROWS, GROUPS, dtype=torch.bool)
    # d logits = kappa/tau * y (d_y - dot): the softmax terms' error, relative to the largest
    c = pattern.num_candidates
    reference = results["torch"][1] if start is None else want.double() - start.double()
    arithmetic = c * 2.0**-18 * reference.double().abs().max()
    assert_within_ulp(got, want, arithmetic, where=agree[..., None].cuda().expand(want.shape))
    if wgrad:  # d W = dOut * mask (the regulariser sees W.detach()): the mask's error
        factors = grad_out.double().abs()
        mask_error = 0.0 if hard else c * 2.0**-20
        assert_within_ulp(got_w, want_w, factors * mask_error + 4 * EPS32 * factors,
                          where=per_weight(agree, pattern))
    else:
        assert got_w is None and want_w is None


# Per-call values that must not create variants: keys of each Triton integer type, shapes,
# shard offsets, kappa/tau, soft/hard, weight gradient on/off, misaligned views.
RUNTIME_VARIATIONS = [
    dict(key=0, rows=4, groups=8, hard=False, wgrad=False, offset=0),
    dict(key=1, rows=1, groups=1, hard=True, wgrad=True, offset=1),
    dict(key=16, rows=16, groups=16, hard=False, wgrad=True, offset=3),
    dict(key=2**31 + 1, rows=7, groups=5, hard=True, wgrad=False, offset=0,
         shard=ShardGroups(1, 2, 9)),
    dict(key=2**63 + 5, rows=33, groups=40, hard=False, wgrad=False, offset=2,
         shard=ShardGroups(2**20, 0, 40), tau=0.25),
    dict(key=2**64 - 1, rows=2, groups=3, hard=True, wgrad=True, offset=5, kappa=1.0),
]


def shifted(shape, dtype, offset, gen):
    """Random CUDA tensor viewed ``offset`` elements into its storage (misaligned if odd)."""
    flat = torch.randn(offset + math.prod(shape), generator=gen).to("cuda", dtype)
    return flat[offset:].view(shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_one_compiled_variant_per_configuration_at_run_time(pattern, dtype):
    device = torch.cuda.current_device()
    caches = [kernel.device_caches[device][0]
              for kernel in (triton_kernel.forward_kernel, triton_kernel.backward_kernel)]
    expected = {triton_aot.variant_key(*triton_aot.launch(call)) for call in (
        triton_aot.Call("forward", str(pattern), dtype, False),
        triton_aot.Call("backward", str(pattern), dtype, False, False, "bf16"))}
    before = set().union(*caches)
    for v in RUNTIME_VARIATIONS:
        rows, groups, c = v["rows"], v["groups"], pattern.num_candidates
        gen = torch.Generator().manual_seed(v["key"] % 1000)
        weight = shifted((rows, groups * pattern.m), triton_aot.DTYPES[dtype], v["offset"], gen)
        logits = shifted((rows, groups, c), torch.float32, v["offset"], gen)
        logits.mul_(0.05).requires_grad_(True)
        main_grad = shifted((rows, groups, c), torch.bfloat16, v["offset"], gen)
        weight.requires_grad_(v["wgrad"])
        out, reg = sample_masked_weight(weight, logits, pattern, tau=v.get("tau", 2.0),
                                        kappa=v.get("kappa", 50.0), key=v["key"],
                                        shard=v.get("shard"), hard=v["hard"],
                                        backend="triton", main_grad=main_grad)
        (out.float().sum() + reg).backward()
    torch.cuda.synchronize()
    now = set().union(*caches)
    assert expected <= now  # the variants launched are the ones AOT compiles ...
    assert now - before <= expected  # ... and nothing else was compiled for these calls
