"""MaskAdamW against float64 references: plain AdamW, per-group second moments, narrow storage."""

import pytest
import torch

from maskllm_megatron import optim
from maskllm_megatron.optim import FULL, MaskAdamW, StateFormat, mask_state_format

HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)


def _run(fmt, grads, start, weight_decay=0.0):
    param = torch.nn.Parameter(start.clone())
    opt = MaskAdamW([{"params": [param], "format": fmt}], weight_decay=weight_decay, **HYPER)
    for g in grads:
        opt.zero_grad()
        (param * g).sum().backward()  # d/dparam = g, through the main_grad hook
        opt.step()
    return param.detach(), opt


def _reference(grads, start, per_group, weight_decay=0.0):
    """Adam(W) in float64, written out; per_group shares v across the last axis."""
    p = start.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros(p.shape[:-1] + (1,) if per_group else p.shape, dtype=torch.float64)
    (b1, b2), lr, eps = HYPER["betas"], HYPER["lr"], HYPER["eps"]
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p *= 1 - lr * weight_decay
        m = b1 * m + (1 - b1) * g
        g2 = g.square().mean(-1, keepdim=True) if per_group else g.square()
        v = b2 * v + (1 - b2) * g2
        p -= lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    start = torch.randn(5, 7, 6, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 7, 6, generator=gen, dtype=torch.float64) * (i + 1)
             for i in range(6)]
    return start, grads


def test_full_format_in_float64_is_torch_adamw(problem):
    start, grads = problem
    got, _ = _run(FULL, grads, start, weight_decay=0.1)
    ref = torch.nn.Parameter(start.clone())
    adamw = torch.optim.AdamW([ref], weight_decay=0.1, foreach=False, **HYPER)
    for g in grads:
        ref.grad = g.clone()
        adamw.step()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_group", [False, True])
def test_float64_storage_matches_the_written_out_reference(problem, per_group):
    start, grads = problem
    f64 = torch.float64
    got, opt = _run(StateFormat(f64, f64, f64, per_group), grads, start, weight_decay=0.05)
    torch.testing.assert_close(got, _reference(grads, start, per_group, 0.05),
                               rtol=1e-12, atol=1e-12)
    sq = next(iter(opt.state.values()))["exp_avg_sq"]
    assert sq.shape == ((5, 7, 1) if per_group else (5, 7, 6))


def test_bf16_storage_stays_close_to_exact(problem):
    start, grads = problem
    exact = _reference(grads, start.float(), per_group=False)
    got, opt = _run(mask_state_format(), grads, start.float())
    slot = next(iter(opt.state.values()))
    assert slot["exp_avg"].dtype == slot["exp_avg_sq"].dtype == torch.bfloat16
    # six steps of lr 3e-2 move a logit by up to ~0.18; bf16 gradients and exp_avg keep ~3
    # significant digits of each step
    assert (got.double() - exact).abs().max() < 2e-3
    assert (got.double() - start).abs().max() > 0.05  # and the steps did move it


def test_chunking_does_not_change_the_result(problem, monkeypatch):
    start, grads = problem
    for fmt in (mask_state_format(), mask_state_format(second_moment="group")):
        monkeypatch.setattr(optim, "_CHUNK", 1 << 22)
        whole, _ = _run(fmt, grads, start.float())
        monkeypatch.setattr(optim, "_CHUNK", 13)  # 13 logits, or 2 groups; a ragged tail
        chunked, _ = _run(fmt, grads, start.float())
        assert torch.equal(whole, chunked)


def test_gradients_accumulate_into_main_grad_only():
    param = torch.nn.Parameter(torch.randn(3, 4, 6))
    opt = MaskAdamW([{"params": [param], "format": mask_state_format("fp32")}])
    g1, g2 = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    (param * g1).sum().backward()
    (param * g2).sum().backward()  # a second micro-batch
    assert param.grad is None
    torch.testing.assert_close(param.main_grad, g1 + g2)
    opt.zero_grad()
    assert not param.main_grad.any()


def test_the_samplers_fused_accumulation_and_the_hook_give_the_same_main_grad():
    """The sparse layers hand the sampler ``main_grad`` slices; autograd then still runs the
    parameter's accumulator (hook) without a gradient, which must add nothing."""
    from maskllm_megatron.sampling import sample_masked_weight

    weight = torch.randn(8, 16)
    start = torch.randn(8, 4, 6) * 0.05
    results = []
    for fuse in (True, False):
        param = torch.nn.Parameter(start.clone())
        MaskAdamW([{"params": [param], "format": mask_state_format()}])  # bf16 main_grad
        for key in (1, 2):  # two micro-batches; two row segments like a gated fc1
            outs = [sample_masked_weight(weight[a:b], param[a:b], "2:4", tau=2.0, kappa=50.0,
                                         key=key, main_grad=param.main_grad[a:b] if fuse
                                         else None)[0] for a, b in ((0, 4), (4, 8))]
            (torch.cat(outs) * torch.linspace(-1, 1, weight.numel()).reshape(8, 16)).sum(
                ).backward()
            assert param.grad is None
        results.append(param.main_grad.clone())
    assert results[0].abs().sum() > 0 and torch.equal(results[0], results[1])


@pytest.mark.parametrize("flags,expected", [
    ((), 15.0),  # the default: fp32 logits, bf16 gradients and moments
    (("bf16", "bf16", "fp32", "group"), 13.0),
    (("fp32", "fp32", "fp32", "element"), 24.0),  # plain fp32 AdamW
])
def test_bytes_of_state_per_prunable_2_4_weight(flags, expected):
    out, groups = 16, 32  # a 16 x 128 weight
    logits = torch.nn.Parameter(torch.zeros(out, groups, 6))
    opt = MaskAdamW([{"params": [logits], "format": mask_state_format(*flags)}])
    assert sum(opt.state_bytes().values()) / (out * groups * 4) == expected


def test_bad_format_flags_are_named():
    with pytest.raises(ValueError, match="--main-grads-dtype"):
        mask_state_format("fp8")
    with pytest.raises(ValueError, match="--second-moment"):
        mask_state_format(second_moment="row")
