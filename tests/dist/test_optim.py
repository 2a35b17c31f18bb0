"""ShardedAdamW on megatron's DDP buffers: float64 references at several data-parallel sizes,
narrow storage, gradient norm and clipping, moments that reshard, bytes per weight; and the
sampler's fused gradient accumulation under megatron's DDP."""

import math

import pytest
import torch
import torch.nn.functional as F

HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
SHAPES = [(5, 7, 6), (13,), (4, 4, 6)]
STEPS = 4


class _Params(torch.nn.Module):
    """A few trained parameters, as megatron's DDP wants a module with a config."""

    def __init__(self, dtype, seed):
        from megatron.core.transformer.transformer_config import TransformerConfig

        super().__init__()
        self.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                        use_cpu_initialization=True)
        gen = torch.Generator().manual_seed(seed)
        self.p = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in SHAPES)


def _grads(seed, dp_rank, step):
    gen = torch.Generator().manual_seed(seed * 1000 + step * 10 + dp_rank)
    return [torch.randn(s, generator=gen, dtype=torch.float64) * (step + 1) for s in SHAPES]


def _resolved_grads(seed, dp_rank, step):
    """Gradients whose data-parallel mean stays far from zero (0.5 (step + 1) or more, plus
    per-rank noise). Adam divides by the gradient's own size, so a mean that cancels below
    bf16's resolution of its summands (~0.4% of them) rounds to zero or flips sign and moves a
    value by a whole lr: that is bf16 reduction, not the optimizer (found at about one seed in
    three with plain random gradients), and these gradients keep it out of the comparison."""
    common = torch.Generator().manual_seed(seed * 1000 + step * 10 + 9)
    own = torch.Generator().manual_seed(seed * 1000 + step * 10 + dp_rank)
    grads = []
    for s in SHAPES:
        c = torch.randn(s, generator=common, dtype=torch.float64)
        noise = torch.randn(s, generator=own, dtype=torch.float64)
        grads.append((c.sign() * (0.5 + c.abs()) + 0.2 * noise) * (step + 1))
    return grads


def _reference(seed, dp, steps, weight_decay, clip=0.0, grads_fn=_grads):
    """AdamW in float64, written out, on the data-parallel mean gradient; clipped by the norm."""
    p = [x.detach().double().clone() for x in _Params(torch.float64, seed).p]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    (b1, b2), lr, eps = HYPER["betas"], HYPER["lr"], HYPER["eps"]
    norms = []
    for t in range(1, steps + 1):
        grads = [sum(g) / dp for g in zip(*(grads_fn(seed, r, t) for r in range(dp)),
                                          strict=True)]
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        norms.append(norm)
        if clip and norm > clip:
            grads = [g * (clip / (norm + 1e-6)) for g in grads]
        for i, g in enumerate(grads):
            p[i] *= 1 - lr * weight_decay
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g.square()
            p[i] -= lr / (1 - b1 ** t) * m[i] / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
    return p, m, v, norms


def _train(seed, dtype, fmt, weight_decay, clip=0.0, steps=STEPS, moments=None,
           grads_fn=_grads):
    """``steps`` of ShardedAdamW on this rank's gradients; small buckets, so that data-parallel
    slices cut through parameters. Returns (parameters, gathered moments, norms, slices)."""
    from megatron.core import parallel_state as ps

    from maskllm_megatron.training.grads import wrap_model
    from maskllm_megatron.training.optim import ShardedAdamW

    dp_rank = ps.get_data_parallel_rank()
    model = _Params(dtype, seed)
    chunk = wrap_model(model, fmt.main_grads_dtype, overlap_grad_reduce=True, bucket_size=40)
    opt = ShardedAdamW([chunk], fmt, weight_decay=weight_decay, **HYPER)
    if moments is not None:
        opt.load_moments({id(p): {k: v[i] for k, v in moments.items()}
                          for i, p in enumerate(model.p)}, step_count=0)
    norms = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        for param, g in zip(model.p, grads_fn(seed, dp_rank, t), strict=True):
            param.main_grad.copy_(g)  # what backward would have accumulated on this rank
        chunk.finish_grad_sync()  # megatron's reduce-scatter of the mean
        norms.append(opt.grad_norm())
        if clip:
            opt.clip_grads(clip, norms[-1])
        opt.step()
    gathered = opt.gather_moments()
    return ([p.detach().double().clone() for p in model.p],
            {name: [gathered[id(p)][name].double() for p in model.p]
             for name in ("exp_avg", "exp_avg_sq")}, norms, len(opt.slices))


def _f64():
    """float64 storage everywhere: the update itself is under test."""
    from maskllm_megatron.training.optim import StateFormat

    return StateFormat(torch.float64, torch.float64, torch.float64)


def case_float64(seed, weight_decay):
    from megatron.core import parallel_state as ps

    params, moments, norms, slices = _train(seed, torch.float64, _f64(), weight_decay)
    return params, moments, norms, slices, ps.get_data_parallel_world_size()


@pytest.mark.parametrize("tp", [1, 2, 4], ids=["dp4", "dp2", "dp1"])
def test_sharded_adamw_in_float64_is_adamw_on_the_mean_gradient(dist4, tp):
    seed = torch.randint(0, 2**20, ()).item()  # from the test's seed (conftest)
    for rank_result in dist4.run(case_float64, seed, 0.1, tp=tp):
        params, moments, norms, slices, dp = rank_result
        want, m, v, want_norms = _reference(seed, dp, STEPS, 0.1)
        assert slices >= 2, "several buckets, so slices cut through parameters"
        for got, ref in zip(params, want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
        for got, ref in zip(moments["exp_avg"] + moments["exp_avg_sq"], m + v, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
        # megatron's get_grad_norm_fp32 returns the norm through an fp32 tensor
        assert norms == pytest.approx(want_norms, rel=1e-6)


def case_fp32_clipped(seed, clip):
    from maskllm_megatron.training.optim import StateFormat

    fmt = StateFormat(torch.float32, torch.float32, torch.float32)
    return _train(seed, torch.float32, fmt, 0.0, clip=clip)[::2]


def test_megatron_clipping_by_the_global_norm(dist4):
    seed = torch.randint(0, 2**20, ()).item()
    want, _, _, want_norms = _reference(seed, 2, STEPS, 0.0, clip=2.5)
    assert any(n > 2.5 for n in want_norms)  # clipping is exercised
    for params, norms in dist4.run(case_fp32_clipped, seed, 2.5, tp=2):
        assert norms == pytest.approx(want_norms, rel=1e-5)
        for got, ref in zip(params, want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def case_bf16_storage(seed):
    from maskllm_megatron.training.optim import state_format

    return _train(seed, torch.float32, state_format(), 0.0, grads_fn=_resolved_grads)[0]


def test_bf16_storage_stays_close_to_exact(dist4):
    seed = torch.randint(0, 2**20, ()).item()
    want = _reference(seed, 4, STEPS, 0.0, grads_fn=_resolved_grads)[0]
    start = [p.detach().double() for p in _Params(torch.float64, seed).p]
    for got in dist4.run(case_bf16_storage, seed):
        # four steps of lr 3e-2 move a value by up to ~0.12; bf16 gradients and moments keep
        # ~3 significant digits of each step
        assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) < 2e-3
        assert max(float((g - s).abs().max()) for g, s in zip(got, start, strict=True)) > 0.05


def case_resume_at(seed, moments):
    return _train(seed, torch.float64, _f64(), 0.0, steps=1, moments=moments)[1]


def test_moments_written_at_one_dp_size_load_at_another(dist4):
    """Moments leave the optimizer laid out like their parameters and come back into any
    data-parallel slicing: the next step's moments are the reference's."""
    seed = torch.randint(0, 2**20, ()).item()
    gen = torch.Generator().manual_seed(seed)
    start = {name: [torch.rand(s, generator=gen, dtype=torch.float64) for s in SHAPES]
             for name in ("exp_avg", "exp_avg_sq")}
    (b1, b2) = HYPER["betas"]
    for tp in (1, 2):
        dp = 4 // tp
        g = [sum(x) / dp for x in zip(*(_grads(seed, r, 1) for r in range(dp)), strict=True)]
        for got in dist4.run(case_resume_at, seed, start, tp=tp):
            for i in range(len(SHAPES)):
                torch.testing.assert_close(got["exp_avg"][i],
                                           b1 * start["exp_avg"][i] + (1 - b1) * g[i])
                torch.testing.assert_close(got["exp_avg_sq"][i],
                                           b2 * start["exp_avg_sq"][i] + (1 - b2) * g[i] ** 2)


def case_state_bytes(flags):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    from maskllm_megatron.training.grads import wrap_model
    from maskllm_megatron.training.optim import ShardedAdamW, state_format

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                            use_cpu_initialization=True)
            self.logits = torch.nn.Parameter(torch.zeros(64, 32, 6))  # a 64 x 128 weight

    fmt = state_format(*flags)
    model = Logits()
    opt = ShardedAdamW([wrap_model(model, fmt.main_grads_dtype)], fmt)
    return sum(opt.state_bytes().values()) / (64 * 128), ps.get_data_parallel_world_size()


@pytest.mark.parametrize("flags,per_dp", [
    (("bf16", "bf16", "bf16"), lambda dp: 6 + 3 + 6 / dp),  # the default
    (("fp32", "fp32", "fp32"), lambda dp: 6 + 6 + 12 / dp),  # fp32 AdamW, sharded
])
def test_bytes_of_state_per_prunable_2_4_weight(dist4, flags, per_dp):
    for tp in (1, 4):
        for got, dp in dist4.run(case_state_bytes, flags, tp=tp):
            assert got == pytest.approx(per_dp(dp))
    assert per_dp(8) <= 10 or flags[0] == "fp32"  # the default meets 10 B at DP=8


def test_bad_format_flags_are_named():
    from maskllm_megatron.training.optim import state_format

    with pytest.raises(ValueError, match="--main-grads-dtype"):
        state_format("fp16")  # megatron's gradient clipping takes fp32 or bf16 buffers
    with pytest.raises(ValueError, match="--exp-avg-sq-dtype"):
        state_format(exp_avg_sq_dtype="fp8")


def case_fused_accumulation_under_ddp():
    """A gated fc1 and fc2 wrapped in megatron's DDP (overlapped reduce-scatter) over two
    micro-batches: the sampler adding into main_grad (megatron's dummy-gradient idiom) gives
    the same reduced gradients as DDP's hook adding the returned gradient, bit for bit."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from maskllm_megatron.core.nm import NMPattern
    from maskllm_megatron.model.layers import (
        MaskSettings,
        SamplingState,
        SparseColumnParallelLinear,
        SparseRowParallelLinear,
        sampling,
    )
    from maskllm_megatron.training.grads import wrap_model

    tp = ps.get_tensor_model_parallel_world_size()
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            gated_linear_unit=True, tensor_model_parallel_size=tp,
                            use_cpu_initialization=True, params_dtype=torch.float32)
    init = lambda w: torch.nn.init.normal_(w, std=0.5)  # noqa: E731

    class Block(torch.nn.Module):
        def __init__(self, fuse):
            super().__init__()
            self.config = cfg
            torch.manual_seed(0)
            settings = MaskSettings(pattern=NMPattern(2, 4), fuse_grad_accumulation=fuse)
            self.fc1 = SparseColumnParallelLinear(
                32, 2 * 48, config=cfg, init_method=init, bias=False, gather_output=False,
                tp_comm_buffer_name="fc1", mask_settings=settings)
            self.fc2 = SparseRowParallelLinear(
                48, 32, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                skip_bias_add=False, tp_comm_buffer_name="fc2", mask_settings=settings)
            for layer_id, layer in ((10, self.fc1), (11, self.fc2)):
                layer.layer_id = layer_id
                layer.init_mask_logits(seed=3, std=0.05)

        def forward(self, x):
            gate, up = self.fc1(x)[0].chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)[0]

    results = []
    for fuse in (True, False):
        block = Block(fuse)
        chunk = wrap_model(block, torch.bfloat16, overlap_grad_reduce=True, bucket_size=500)
        chunk.zero_grad_buffer()
        gen = torch.Generator().manual_seed(1 + ps.get_data_parallel_rank())
        for microbatch in range(2):
            state = SamplingState(seed=3, iteration=5, microbatch=microbatch, tau=2.0, kappa=60.0,
                                  dp_rank=ps.get_data_parallel_rank())
            context = chunk.no_sync() if microbatch == 0 else torch.enable_grad()
            with context:
                with sampling(state) as sample:
                    y = chunk(torch.randn(6, 2, 32, generator=gen))
                reg = sample.regularizer()
                ((y * torch.randn(y.shape, generator=gen)).sum() + 0.2 * reg).backward()
            for layer in (block.fc1, block.fc2):
                assert layer.mask_logits.grad is None  # DDP's hook cleared it
                assert layer.mask_logits.grad_added_to_main_grad == fuse
        chunk.finish_grad_sync()
        results.append([layer.mask_logits.main_grad.clone() for layer in (block.fc1, block.fc2)])
    for fused, added in zip(*results, strict=True):
        assert fused.abs().sum() > 0 and torch.equal(fused, added)
    return True


def test_fused_logits_grad_accumulation_under_megatron_ddp(dist4):
    assert all(dist4.run(case_fused_accumulation_under_ddp, tp=2))
