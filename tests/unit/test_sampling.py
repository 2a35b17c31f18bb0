"""The Gumbel mask sampler: every backend against a float64 reference written here.

Against the reference, results are checked in ulps of the output dtype (``numerics``): bf16/fp16
outputs within one ulp, fp32 ones within one ulp plus a bound on the fp32 arithmetic's error,
because which neighbour a value next to a rounding boundary takes differs between CPUs. Bit
equality is asserted only where the design promises it: the noise, the hard mask's choice of
candidate, sharded against unsharded and any thread count with the same backend, and the fused
gradient accumulation against ``main_grad.add_(gradient)``.
"""

import os

import pytest
import torch
from numerics import assert_within_ulp

from maskllm_megatron.core import nm
from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.sampling import (
    NoiseKey,
    ShardGroups,
    hard_masked_weight,
    sample_masked_weight,
    select_backend,
)
from maskllm_megatron.sampling.noise import gumbel_noise

BACKENDS = ["torch", "cpu", "triton"]
PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(2, 8), NMPattern(4, 8)]


def scores(weight, logits, pattern, tau, kappa, key, shard=None):
    """Float64 ``z = (kappa * logits + g) / tau``, ``[groups, C]``."""
    out_dim, in_dim = weight.shape
    gpr = in_dim // pattern.m
    shard = (shard or ShardGroups()).resolve(out_dim, gpr)
    groups = shard.global_indices(0, out_dim, gpr)
    g = gumbel_noise(key, groups, pattern.num_candidates, torch.float64)
    return (kappa * logits.double().reshape(-1, pattern.num_candidates) + g) / tau


def reference(weight, logits, pattern, tau, kappa, key, hard=False, shard=None):
    """Float64, plain autograd, nothing fused: the definition the backends must reproduce."""
    out_dim, in_dim = weight.shape
    z = scores(weight, logits, pattern, tau, kappa, key, shard)
    y = torch.softmax(z, -1)
    if hard:
        one_hot = torch.nn.functional.one_hot(z.argmax(-1), pattern.num_candidates).double()
        y = one_hot - y.detach() + y
    mask = (y @ pattern.candidates(torch.float64)).reshape(out_dim, in_dim)
    out = weight.double() * mask
    # the regulariser is sum ||W.detach() * mask||^2 (the paper's): it moves the logits only
    return out, (weight.detach().double() * mask).square().sum()


def fp32_mask_error(weight, logits, pattern, tau, kappa, key):
    """A bound on the fp32 arithmetic's error in ``W * mask`` (a soft mask): the scores ``z`` are
    rounded three times (about ``3 * 2**-24 |z|`` each, and differences of two enter ``exp``),
    ``log``/``exp``, the sum and the division add a few fp32 ulps per softmax term, and the mask
    is a sum of terms <= 1: ``|W| * (8 max|z| + C + 8) * 2**-24``."""
    z = scores(weight, logits.detach(), pattern, tau, kappa, key).abs().max().item()
    return weight.detach().double().abs() * (8 * z + pattern.num_candidates + 8) * 2.0**-24


def random_case(pattern, rows=12, groups=10, seed=0, logit_std=0.01):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * pattern.m, generator=gen)
    logits = torch.randn(rows, groups, pattern.num_candidates, generator=gen) * logit_std
    return weight, logits


def run(backend, weight, logits, pattern, *, reg_weight=0.7, weight_grad=False, **kw):
    """Forward, a loss using both outputs, backward; returns (out, reg, d logits, d weight)."""
    logits = logits.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(weight_grad)
    out, reg = sample_masked_weight(weight, logits, pattern, backend=backend, **kw)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    loss = (out.double() * probe).sum() + reg_weight * reg.double()
    loss.backward()
    return out.detach(), reg.detach(), logits.grad, weight.grad


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "straight-through"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_torch_path_in_float64_equals_reference(pattern, hard):
    weight, logits = random_case(pattern, logit_std=0.05)
    key = NoiseKey(seed=5, layer=1, iteration=2).philox_key()
    kw = dict(tau=2.0, kappa=50.0, key=key, hard=hard)
    out, reg, dl, dw = run("torch", weight.double(), logits.double(), pattern, weight_grad=True,
                           **kw)
    w_ref = weight.double().requires_grad_()
    l_ref = logits.double().requires_grad_()
    o_ref, r_ref = reference(w_ref, l_ref, pattern, **kw)
    probe = torch.linspace(-1, 1, o_ref.numel(), dtype=torch.float64).reshape(o_ref.shape)
    ((o_ref * probe).sum() + 0.7 * r_ref).backward()
    torch.testing.assert_close(out, o_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reg, r_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dl, l_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, w_ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_fp32_backends_equal_float64_reference(backend, pattern):
    weight, logits = random_case(pattern, seed=3)
    key = NoiseKey(seed=11, iteration=4, microbatch=1).philox_key()
    kw = dict(tau=3.0, kappa=120.0, key=key)
    out, reg, dl, dw = run(backend, weight, logits, pattern, weight_grad=True, **kw)
    w_ref = weight.double().requires_grad_()
    l_ref = logits.double().requires_grad_()
    o_ref, r_ref = reference(w_ref, l_ref, pattern, **kw)
    probe = torch.linspace(-1, 1, o_ref.numel(), dtype=torch.float64).reshape(o_ref.shape)
    ((o_ref * probe).sum() + 0.7 * r_ref).backward()
    assert out.dtype == torch.float32 and dl.dtype == torch.float32
    assert_within_ulp(out, o_ref, torch.float32,
                      arithmetic=fp32_mask_error(weight, logits, pattern, **kw))
    torch.testing.assert_close(reg.double(), r_ref.detach(), rtol=1e-5, atol=1e-5)
    scale = l_ref.grad.abs().max().item()
    torch.testing.assert_close(dl.double(), l_ref.grad, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(dw.double(), w_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_hard_forward_is_an_exact_nm_mask(backend):
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, rows=16, groups=16, seed=4, logit_std=0.05)
    kw = dict(tau=1.0, kappa=100.0, key=NoiseKey(seed=2).philox_key(), hard=True)
    out, reg, dl, _ = run(backend, weight, logits, pattern, **kw)
    w_ref, l_ref = weight.double(), logits.double().requires_grad_()
    o_ref, r_ref = reference(w_ref, l_ref, pattern, **kw)
    probe = torch.linspace(-1, 1, o_ref.numel(), dtype=torch.float64).reshape(o_ref.shape)
    ((o_ref * probe).sum() + 0.7 * r_ref).backward()
    assert nm.is_nm_sparse(out, pattern)
    # no near-ties in this data (best two scores >= 0.03 apart; fp32 rounds them by ~1e-5), so
    # the argmax agrees group by group on every CPU
    best = scores(weight, logits, pattern, kw["tau"], kw["kappa"], kw["key"]).topk(2, -1).values
    assert (best[:, 0] - best[:, 1]).min() > 1e-3
    assert torch.equal(out != 0, o_ref != 0)
    assert_within_ulp(out, o_ref, torch.float32)  # W * 1 exactly; the reference W * (1 - y + y)
    scale = l_ref.grad.abs().max().item()
    torch.testing.assert_close(dl.double(), l_ref.grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(backend, dtype):
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, seed=6)
    weight = weight.to(dtype)
    kw = dict(tau=4.0, kappa=100.0, key=9)
    out, reg, dl, _ = run(backend, weight, logits, pattern, **kw)
    o_ref, r_ref = reference(weight.double(), logits.double(), pattern, **kw)
    assert out.dtype == dtype
    # W * mask computed in fp32 and rounded to nearest once: the correctly rounded value or, next
    # to a rounding boundary, its neighbour (which one differs between CPUs: not bitwise)
    slack = 0.0
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        slack = o_ref.abs() * 2.0**-20  # the interpreter truncates to bf16: < 1 ulp + fp32 error
    assert_within_ulp(out, o_ref, dtype, arithmetic=slack)
    torch.testing.assert_close(reg.double(), r_ref, rtol=1e-5, atol=0)
    assert torch.isfinite(dl).all()


def test_torch_path_gradcheck():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, rows=3, groups=2, logit_std=0.1)
    weight, logits = weight.double().requires_grad_(), logits.double().requires_grad_()

    def f(w, lg):
        return sample_masked_weight(w, lg, pattern, tau=1.5, kappa=4.0, key=3,
                                    backend="torch")

    # W * mask in both inputs; the regulariser sees W.detach() (the paper's), so it is checked
    # as a function of the logits only
    assert torch.autograd.gradcheck(lambda w, lg: f(w, lg)[0], (weight, logits), eps=1e-6,
                                    atol=1e-7)
    assert torch.autograd.gradcheck(lambda lg: f(weight.detach(), lg)[1], (logits,), eps=1e-6,
                                    atol=1e-7)


def test_weight_gets_no_gradient_unless_it_requires_one():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern)
    for backend in BACKENDS:
        out, reg, dl, dw = run(backend, weight, logits, pattern, tau=4.0, kappa=100.0, key=1)
        assert dw is None and dl is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shards", [2, 4])
def test_tensor_parallel_shards_draw_the_unsplit_sample(backend, shards):
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, rows=16, groups=16, seed=8)
    kw = dict(tau=2.0, kappa=100.0, key=NoiseKey(seed=1, layer=5).philox_key())
    full_out, full_reg, full_dl, _ = run(backend, weight, logits, pattern, **kw)
    gpr = logits.shape[1]
    # column parallel: rows split
    rows = weight.shape[0] // shards
    parts = [run(backend, weight[i * rows:(i + 1) * rows], logits[i * rows:(i + 1) * rows],
                 pattern, shard=ShardGroups(row_offset=i * rows, groups_per_row=gpr), **kw)
             for i in range(shards)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_out)
    torch.testing.assert_close(sum(p[1] for p in parts), full_reg, rtol=1e-6, atol=0)
    # row parallel: input columns split, group offsets move
    cols, gcols = weight.shape[1] // shards, gpr // shards
    parts = [run(backend, weight[:, i * cols:(i + 1) * cols],
                 logits[:, i * gcols:(i + 1) * gcols], pattern,
                 shard=ShardGroups(group_col_offset=i * gcols, groups_per_row=gpr), **kw)
             for i in range(shards)]
    assert torch.equal(torch.cat([p[0] for p in parts], dim=1), full_out)
    # the probe differs per shard, so compare gradients through a shared-probe run instead
    logits_full = logits.clone().requires_grad_()
    out, _ = sample_masked_weight(weight, logits_full, pattern, backend=backend, **kw)
    out.sum().backward()
    grads = []
    for i in range(shards):
        part = logits[:, i * gcols:(i + 1) * gcols].clone().requires_grad_()
        o, _ = sample_masked_weight(weight[:, i * cols:(i + 1) * cols], part, pattern,
                                    backend=backend, shard=ShardGroups(i * 0, i * gcols, gpr),
                                    **kw)
        o.sum().backward()
        grads.append(part.grad)
    assert torch.equal(torch.cat(grads, dim=1), logits_full.grad)


def test_hard_samples_follow_softmax_of_scaled_logits():
    """Gumbel-max: argmax(kappa * logits + g) ~ Categorical(softmax(kappa * logits))."""
    pattern = NMPattern(2, 4)
    base = torch.tensor([[0.0, 0.5, -0.3, 1.0, 0.2, -1.0], [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],
                         [2.0, -1.0, 0.0, 0.5, -0.5, 1.5]])
    kappa, draws = 1.0, 30000
    critical = 20.515  # chi-square, 5 degrees of freedom, p = 0.001
    for backend in BACKENDS:
        for row in base:
            logits = row.expand(draws, 1, 6).contiguous()
            weight = torch.ones(draws, 4)
            out, _ = sample_masked_weight(weight, logits, pattern, tau=1.0, kappa=kappa,
                                          key=NoiseKey(seed=17).philox_key(), hard=True,
                                          backend=backend)
            idx = nm.mask_to_indices(out != 0, pattern).reshape(-1)
            counts = torch.bincount(idx, minlength=6).double()
            expected = torch.softmax(kappa * row.double(), 0) * draws
            chi2 = ((counts - expected) ** 2 / expected).sum().item()
            assert chi2 < critical, (backend, row.tolist(), counts.tolist(), chi2)


def test_noise_depends_on_every_key_field_and_the_temperature_sharpens():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, rows=32, groups=32, logit_std=0.0)
    base = NoiseKey(seed=1, layer=2, iteration=3, microbatch=4, dp_rank=0)
    outs = []
    for key in (base, NoiseKey(1, 2, 3, 4, 1), NoiseKey(1, 2, 4, 4, 0), NoiseKey(1, 3, 3, 4, 0)):
        out, _ = sample_masked_weight(weight, logits, pattern, tau=0.5, kappa=1.0, key=key,
                                      hard=True)
        outs.append(out)
    for other in outs[1:]:
        assert not torch.equal(outs[0], other)
    again, _ = sample_masked_weight(weight, logits, pattern, tau=0.5, kappa=1.0, key=base,
                                    hard=True)
    assert torch.equal(again, outs[0])
    # low tau: the soft mask approaches a hard one (max soft index near 1)
    soft, _ = sample_masked_weight(torch.ones(64, 64), torch.zeros(64, 16, 6), pattern,
                                   tau=0.01, kappa=1.0, key=1)
    assert ((soft - soft.round()).abs() < 1e-3).float().mean() > 0.95


def test_eval_mode_uses_the_argmax_candidate():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern)
    out = hard_masked_weight(weight, logits, pattern)
    want = weight * pattern.candidates()[logits.argmax(-1)].reshape(weight.shape)
    assert torch.equal(out, want)
    assert nm.is_nm_sparse(out, pattern)


def test_bad_input_is_rejected_with_clear_errors():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern)
    with pytest.raises(ValueError, match=r"\[12, 10, 5\].*N=2, M=4"):
        sample_masked_weight(weight, logits[..., :5], pattern, tau=1, kappa=1, key=0)
    with pytest.raises(ValueError, match=r"\[12, 39\].*M=4"):
        sample_masked_weight(weight[:, :39], logits, pattern, tau=1, kappa=1, key=0)
    with pytest.raises(ValueError, match="positive"):
        sample_masked_weight(weight, logits, pattern, tau=0.0, kappa=1, key=0)
    with pytest.raises(ValueError, match="choose from"):
        sample_masked_weight(weight, logits, pattern, tau=1, kappa=1, key=0, backend="cuda")



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backward_accumulates_into_main_grad_like_adding_the_returned_gradient(backend, dtype):
    """Gradient-accumulation fusion: two micro-batches added into a pre-filled buffer equal
    ``main_grad.add_(logits.grad)`` after each, and (fp32) the float64 reference gradients."""
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, rows=20, groups=30, seed=21, logit_std=0.03)
    start = (torch.randn(logits.shape, generator=torch.Generator().manual_seed(22)) * 1e-2)
    start = start.to(dtype)
    keys = [NoiseKey(seed=4, microbatch=k).philox_key() for k in range(2)]
    kw = dict(tau=2.0, kappa=80.0)

    fused = start.clone()
    param = logits.clone().requires_grad_(True)
    for key in keys:
        out, reg = sample_masked_weight(weight, param, pattern, key=key, backend=backend,
                                        main_grad=fused, **kw)
        probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        ((out.double() * probe).sum() + 0.7 * reg.double()).backward()  # run()'s loss
    assert param.grad is None  # nothing logits-sized was returned

    added = start.clone()
    reference_sum = torch.zeros(logits.shape, dtype=torch.float64)
    magnitude = start.double().abs()  # what each rounding is relative to
    for key in keys:
        _, _, dl, _ = run(backend, weight, logits, pattern, key=key, **kw)
        added.add_(dl)
        magnitude += dl.double().abs()
        l_ref = logits.double().requires_grad_()
        o_ref, r_ref = reference(weight.double(), l_ref, pattern, key=key, **kw)
        probe = torch.linspace(-1, 1, o_ref.numel(), dtype=torch.float64).reshape(o_ref.shape)
        ((o_ref * probe).sum() + 0.7 * r_ref).backward()
        reference_sum += l_ref.grad
    if backend == "triton" and dtype != torch.float32:
        # the interpreter's fp32 -> half cast truncates where torch rounds: an ulp per addition
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        assert ((fused.double() - added.double()).abs() <= 2 * ulp * magnitude).all()
    else:
        assert torch.equal(fused, added)
    if dtype == torch.float32:
        scale = reference_sum.abs().max().item()
        torch.testing.assert_close((fused.double() - start.double()), reference_sum, rtol=1e-4,
                                   atol=1e-5 * scale)


def test_main_grad_must_fit_the_logits():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern)
    logits.requires_grad_(True)
    for bad in (torch.zeros(12, 10, 5), torch.zeros(12, 20, 6)[:, ::2],
                torch.zeros(12, 10, 6, dtype=torch.int32),
                torch.zeros(12, 10, 6, dtype=torch.float64)):  # fp64 only for fp64 logits
        with pytest.raises(ValueError, match=r"shaped like the logits \[12, 10, 6\]"):
            sample_masked_weight(weight, logits, pattern, tau=1, kappa=1, key=0, main_grad=bad)
    buffer = torch.zeros(12, 10, 6, dtype=torch.float64)  # the float64 reference path accepts it
    out, _ = sample_masked_weight(weight.double(), logits.double().detach().requires_grad_(),
                                  pattern, tau=1, kappa=1, key=0, main_grad=buffer)
    out.sum().backward()
    assert buffer.abs().sum() > 0

def test_auto_backend_on_cpu_is_the_fused_kernel():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern)
    assert select_backend(weight, logits, pattern) == "cpu"
    assert select_backend(weight.double(), logits.double(), pattern) == "torch"


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "straight-through"])
@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)], ids=str)
def test_kernels_equal_the_pytorch_path_element_by_element(pattern, hard):
    """Same noise in every backend: the fused kernels track the PyTorch path to fp32 rounding."""
    weight, logits = random_case(pattern, rows=24, groups=40, seed=12, logit_std=0.02)
    kw = dict(tau=0.7, kappa=300.0, key=NoiseKey(seed=3, layer=9, dp_rank=2).philox_key(),
              hard=hard)
    base = run("torch", weight, logits, pattern, weight_grad=True, **kw)
    for backend in ("cpu", "triton"):
        got = run(backend, weight, logits, pattern, weight_grad=True, **kw)
        torch.testing.assert_close(got[0], base[0], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got[1], base[1], rtol=2e-6, atol=0)
        scale = base[2].abs().max().item()
        torch.testing.assert_close(got[2], base[2], rtol=1e-4, atol=2e-6 * scale)
        torch.testing.assert_close(got[3], base[3], rtol=2e-6, atol=2e-6)


def test_cpu_kernel_is_independent_of_the_thread_count():
    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, rows=64, groups=50, seed=13)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run("cpu", weight, logits, pattern, tau=2.0, kappa=100.0, key=4))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_torch_path_chunks_do_not_change_the_result(monkeypatch):
    from maskllm_megatron.sampling import torch_path

    pattern = NMPattern(2, 4)
    weight, logits = random_case(pattern, rows=9, groups=10, seed=14)
    kw = dict(tau=2.0, kappa=100.0, key=6, weight_grad=True)
    whole = run("torch", weight, logits, pattern, **kw)
    monkeypatch.setattr(torch_path, "CHUNK_GROUPS", 7)  # one row per chunk: 9 chunks
    chunked = run("torch", weight, logits, pattern, **kw)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regulariser_moves_the_logits_not_the_weights(backend):
    """The paper's regulariser is sum ||W.detach() * mask||^2: with --train-weights it must not
    push |W| up (the loss subtracts it), only keep the logits' gradients alive."""
    pattern = PATTERNS[0]
    weight, logits = random_case(pattern, seed=8)
    kw = dict(tau=2.0, kappa=80.0, key=NoiseKey(seed=3, iteration=1).philox_key())
    _, _, dl_with, dw_with = run(backend, weight, logits, pattern, weight_grad=True,
                                 reg_weight=0.9, **kw)
    _, _, dl_without, dw_without = run(backend, weight, logits, pattern, weight_grad=True,
                                       reg_weight=0.0, **kw)
    assert torch.equal(dw_with, dw_without)
    assert not torch.allclose(dl_with, dl_without)
