"""Sparse TP layers on gloo ranks against a single-process reference with the full weight."""

import pytest
import torch
import torch.nn.functional as F

from maskllm_megatron.core.nm import NMPattern


def case_column_row_tp2(sequence_parallel: bool):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig

    from maskllm_megatron.model.layers import (
        MaskSettings,
        SamplingState,
        SparseColumnParallelLinear,
        SparseRowParallelLinear,
        sampling,
    )
    from maskllm_megatron.sampling import NoiseKey, sample_masked_weight

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                              sequence_parallel=sequence_parallel, params_dtype=torch.float32)
    settings = MaskSettings(pattern=NMPattern(2, 4))
    init = lambda w: torch.nn.init.normal_(w, std=0.5)  # noqa: E731
    torch.manual_seed(0)
    col = SparseColumnParallelLinear(32, 48, config=cfg, init_method=init, bias=True,
                                     gather_output=False, keep_master_weight_for_test=True,
                                     tp_comm_buffer_name="qkv", mask_settings=settings)
    row = SparseRowParallelLinear(48, 16, config=cfg, init_method=init, bias=True,
                                  input_is_parallel=True, skip_bias_add=False,
                                  keep_master_weight_for_test=True, tp_comm_buffer_name="proj",
                                  mask_settings=settings)
    with torch.no_grad():  # non-zero biases so that keeping them is checked
        col.bias.normal_()
        row.bias.normal_()
    state = SamplingState(seed=7, iteration=3, microbatch=1, tau=2.0, kappa=50.0)
    for layer_id, layer in ((8, col), (9, row)):
        layer.layer_id = layer_id
        layer.init_mask_logits(seed=state.seed, std=0.05)
    assert not col.weight.requires_grad and not row.weight.requires_grad
    assert col.mask_logits.shape == (24 // tp * 2, 8, 6)
    assert row.mask_logits.partition_dim == 1 and col.mask_logits.partition_dim == 0

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 32, generator=gen)  # [seq, batch, hidden], same on every rank
    probe = torch.randn(8, 2, 16, generator=gen)
    x_in = x.chunk(tp, dim=0)[rank] if sequence_parallel else x
    with sampling(state) as sample:
        h, _ = col(x_in)
        y, _ = row(F.gelu(h))
    assert len(sample.terms) == 2 and not hasattr(col, "mask_reg")  # nothing left on layers
    reg_local = sample.regularizer()
    assert torch.equal(reg_local, sample.terms[0] + sample.terms[1])
    probe_local = probe.chunk(tp, dim=0)[rank] if sequence_parallel else probe
    ((y * probe_local).sum() + 0.3 * reg_local).backward()

    # single-process reference: full weights, full logits, no shard offsets
    full_logits = []
    for layer, axis in ((col, 0), (row, 1)):
        parts = [torch.empty_like(layer.mask_logits) for _ in range(tp)]
        dist.all_gather(parts, layer.mask_logits.detach(),
                        group=ps.get_tensor_model_parallel_group())
        full_logits.append(torch.cat(parts, dim=axis).requires_grad_())
    bias_parts = [torch.empty_like(col.bias) for _ in range(tp)]
    dist.all_gather(bias_parts, col.bias.detach(), group=ps.get_tensor_model_parallel_group())
    w1, r1 = sample_masked_weight(col.master_weight, full_logits[0], "2:4", tau=2.0, kappa=50.0,
                                  key=NoiseKey(7, 8, 3, 1), backend="torch")
    w2, r2 = sample_masked_weight(row.master_weight, full_logits[1], "2:4", tau=2.0, kappa=50.0,
                                  key=NoiseKey(7, 9, 3, 1), backend="torch")
    ref = F.linear(F.gelu(F.linear(x, w1, torch.cat(bias_parts))), w2, row.bias.detach())
    ((ref * probe).sum() + 0.3 * (r1 + r2)).backward()

    y_full = y
    if sequence_parallel:
        parts = [torch.empty_like(y) for _ in range(tp)]
        dist.all_gather(parts, y.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        y_full = torch.cat(parts, dim=0)
    torch.testing.assert_close(y_full.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    reg_total = reg_local.detach().clone()
    dist.all_reduce(reg_total, group=ps.get_tensor_model_parallel_group())
    torch.testing.assert_close(reg_total, (r1 + r2).detach(), rtol=1e-5, atol=0)
    for layer, axis, full in ((col, 0, full_logits[0]), (row, 1, full_logits[1])):
        want = full.grad.chunk(tp, dim=axis)[rank]
        scale = want.abs().max().item()
        torch.testing.assert_close(layer.mask_logits.grad, want, rtol=1e-5, atol=1e-5 * scale)
    assert col.weight.grad is None and row.weight.grad is None
    return float(y.detach().abs().sum())


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["plain", "sequence-parallel"])
def test_sparse_column_row_at_tp2_equal_full_weight_reference(dist4, sequence_parallel):
    dist4.run(case_column_row_tp2, sequence_parallel, tp=2)


def case_indivisible_row_shard():
    from megatron.core.model_parallel_config import ModelParallelConfig

    from maskllm_megatron.model.layers import SparseRowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    try:  # 24 inputs split over TP=2 gives 12 per rank: fine; 20 gives 10: not divisible by 4
        SparseRowParallelLinear(20, 8, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                input_is_parallel=True, skip_bias_add=False,
                                tp_comm_buffer_name="fc2")
    except ValueError as err:
        return str(err)
    return None


def test_indivisible_shard_is_a_clear_construction_error(dist4):
    messages = dist4.run(case_indivisible_row_shard, tp=2)
    for message in messages:
        assert message is not None
        assert "SparseRowParallelLinear (fc2)" in message and "[8, 10]" in message
        assert "tensor-parallel size 2" in message and "M=4" in message


def case_bad_layout():
    from maskllm_megatron import distributed

    try:
        distributed.set_model_parallel(3, 1)
    except ValueError as err:
        return str(err)
    return None


def test_a_layout_that_does_not_divide_the_world_is_refused(dist4):
    for message in dist4.run(case_bad_layout):
        assert message and "(3)" in message and "world size (4)" in message


def case_fused_grad_accumulation_glu_tp2():
    """A gated fc1 (two row segments per shard) and fc2 over two micro-batches: logits gradients
    added inside the sampler equal ``main_grad.add_(grad)`` after each micro-batch, bit for bit."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from maskllm_megatron.model.layers import (
        MaskSettings,
        SamplingState,
        SparseColumnParallelLinear,
        SparseRowParallelLinear,
        sampling,
    )

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            gated_linear_unit=True, tensor_model_parallel_size=tp,
                            use_cpu_initialization=True, params_dtype=torch.float32)
    init = lambda w: torch.nn.init.normal_(w, std=0.5)  # noqa: E731

    def build(fuse):
        torch.manual_seed(0)
        settings = MaskSettings(pattern=NMPattern(2, 4), fuse_grad_accumulation=fuse)
        fc1 = SparseColumnParallelLinear(32, 2 * 48, config=cfg, init_method=init, bias=False,
                                         gather_output=False, tp_comm_buffer_name="fc1",
                                         mask_settings=settings)
        fc2 = SparseRowParallelLinear(48, 32, config=cfg, init_method=init, bias=False,
                                      input_is_parallel=True, skip_bias_add=False,
                                      tp_comm_buffer_name="fc2", mask_settings=settings)
        for layer_id, layer in ((10, fc1), (11, fc2)):
            layer.layer_id = layer_id
            layer.init_mask_logits(seed=3, std=0.05)
            layer.mask_logits.main_grad = torch.full_like(layer.mask_logits, 0.25,
                                                          dtype=torch.bfloat16)
        return fc1, fc2

    results = []
    for fuse in (True, False):
        fc1, fc2 = build(fuse)
        assert fc1._glu and len(fc1._row_segments()) == 2
        gen = torch.Generator().manual_seed(1)
        for microbatch in range(2):
            x = torch.randn(6, 2, 32, generator=gen)
            state = SamplingState(seed=3, iteration=5, microbatch=microbatch, tau=2.0, kappa=60.0)
            with sampling(state) as sample:
                h, _ = fc1(x)
                gate, up = h.chunk(2, dim=-1)
                y, _ = fc2(F.silu(gate) * up)
            ((y * torch.randn(y.shape, generator=gen)).sum() + 0.2 * sample.regularizer()
             ).backward()
            for layer in (fc1, fc2):
                if fuse:
                    assert layer.mask_logits.grad is None
                else:  # what MaskAdamW's post-accumulate hook does
                    layer.mask_logits.main_grad.add_(layer.mask_logits.grad)
                    layer.mask_logits.grad = None
        results.append([layer.mask_logits.main_grad.clone() for layer in (fc1, fc2)])
    for fused, added in zip(*results, strict=True):
        assert fused.abs().sum() > 0 and torch.equal(fused, added)
    return rank


def test_fused_logits_grad_accumulation_equals_adding_the_gradient_at_tp2(dist4):
    assert sorted(dist4.run(case_fused_grad_accumulation_glu_tp2, tp=2)) == [0, 0, 1, 1]
