"""The sparse-weight regulariser in the trainer's forward_backward at TP=2 and PP=2, against a
single-process float64 reference on the full layers: every stage and TP shard counts its own
layers once, and the logits' gradient from the lambda term is
``-lambda * d sum ||W * M~||^2 / d logits`` (MaskLLM's sign)."""

import pytest
import torch

SEQ, MBS, VOCAB, MICROBATCHES = 16, 2, 128, 2
SEED, ITERATION, TAU, KAPPA, LAMBDA = 11, 5, 1.0, 100.0, 0.5


def _reference_reg(weight, logits, pattern, key):
    """Float64 ``sum ||W * (softmax((kappa * logits + g) / tau) @ candidates)||^2`` of a whole
    layer, written here: noise drawn at the full layer's group indices."""
    from maskllm_megatron.sampling import ShardGroups
    from maskllm_megatron.sampling.noise import gumbel_noise

    out_dim, in_dim = weight.shape
    gpr, c = in_dim // pattern.m, pattern.num_candidates
    groups = ShardGroups().resolve(out_dim, gpr).global_indices(0, out_dim, gpr)
    g = gumbel_noise(key.philox_key(), groups, c, torch.float64)
    y = torch.softmax((KAPPA * logits.reshape(-1, c) + g) / TAU, dim=-1)
    mask = (y @ pattern.candidates(torch.float64)).reshape(out_dim, in_dim)
    return (weight.double() * mask).square().sum()


def case_regularizer_against_float64():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from maskllm_megatron.core.nm import NMPattern
    from maskllm_megatron.data.datasets import BatchLayout
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig, TransformerFields
    from maskllm_megatron.model.layers import (
        MaskSettings,
        SamplingState,
        assign_layer_ids,
        sparse_layers,
    )
    from maskllm_megatron.sampling import NoiseKey
    from maskllm_megatron.training.step import forward_backward

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    pattern = NMPattern(2, 4)
    torch.manual_seed(0)
    cfg = ModelConfig(TransformerFields(num_layers=2, hidden_size=64, num_attention_heads=4,
                                        ffn_hidden_size=128, add_bias_linear=True),
                      vocab_size=VOCAB, max_sequence_length=SEQ)
    model = build_model(cfg, MaskSettings(pattern=pattern), tp=tp,
                        pp=ps.get_pipeline_model_parallel_world_size())
    assign_layer_ids(model, logits_seed=SEED)
    for name, param in model.named_parameters():  # as the trainer: only the logits learn
        param.requires_grad_(name.endswith("mask_logits"))
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (MBS * dp * MICROBATCHES, SEQ + 1), generator=gen)
    dataset = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(SEQ),
                "position_ids": torch.arange(SEQ)} for t in tokens]
    batches = BatchLayout(MBS, MBS * dp * MICROBATCHES, dp)
    state = SamplingState(seed=SEED, iteration=ITERATION, dp_rank=dp_rank, tau=TAU, kappa=KAPPA)
    layers = [layer for _, layer in sparse_layers(model)]
    assert len(layers) == 4 * 2 // ps.get_pipeline_model_parallel_world_size()

    def step(reg_weight):
        for layer in layers:
            layer.mask_logits.grad = None
        loss, reg, _ = forward_backward(model, state, dataset, batches, ITERATION, SEQ, reg_weight,
                                     torch.device("cpu"))
        return loss, reg, [layer.mask_logits.grad.clone() for layer in layers]

    lm_loss, reg_off, grads_off = step(0.0)
    loss, reg, grads = step(LAMBDA)
    assert loss == lm_loss and reg == reg_off  # the same samples; the term is not in "loss"

    def full(tensor, axis):  # the unsharded layer's tensor, gathered over TP
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=axis)

    local_ref = torch.zeros((), dtype=torch.float64)  # this stage's layers, whole
    for layer, got_on, got_off in zip(layers, grads, grads_off, strict=True):
        axis = layer.partition_axis
        weight = full(layer.weight.detach(), axis).double()
        logits = full(layer.mask_logits.detach(), axis).double().requires_grad_()
        ref = sum(_reference_reg(weight, logits, pattern,
                                 NoiseKey(seed=SEED, layer=layer.layer_id, iteration=ITERATION,
                                          microbatch=k, dp_rank=dp_rank))
                  for k in range(MICROBATCHES)) / MICROBATCHES
        ref.backward()
        local_ref += ref.detach()
        want = -LAMBDA * logits.grad.chunk(tp, dim=axis)[tp_rank]  # the lambda term's gradient
        got = (got_on - got_off).double()  # the LM gradient is the same in both steps
        scale = want.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale,
                                   msg=f"{layer.kind} (layer id {layer.layer_id})")
    total = local_ref.clone()  # each stage's layers once; the TP shards hold the same value
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    total /= dp
    assert reg == pytest.approx(float(total), rel=1e-5)
    return reg


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2-pp2"])
def test_regularizer_value_and_logit_gradient_equal_float64(dist4, tp, pp):
    values = dist4.run(case_regularizer_against_float64, tp=tp, pp=pp)
    assert len(set(values)) == 1  # the same on every rank
