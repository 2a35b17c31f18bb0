"""A tiny megatron-core GPT built from the sparse spec: TP/PP equivalence, hard mode, reshard."""

import re
import shutil

import pytest
import torch

from maskllm_megatron.cpu_shims import cuda_literals

SEQ, MBS, VOCAB, MICROBATCHES = 16, 2, 128, 4


def _config(glu: bool, query_groups=None):
    from maskllm_megatron.model.config import ModelConfig, TransformerFields

    extra = dict(gated_linear_unit=True, activation="silu", normalization="RMSNorm",
                 num_query_groups=query_groups) if glu else {}
    return ModelConfig(TransformerFields(num_layers=2, hidden_size=64, num_attention_heads=4,
                                         ffn_hidden_size=128, add_bias_linear=True, **extra),
                       vocab_size=VOCAB, max_sequence_length=SEQ)


def _build(glu, query_groups=None, pattern=(2, 4), mode="learn", sparse=None, seed=11):
    from megatron.core import parallel_state as ps

    from maskllm_megatron.core.nm import NMPattern
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.layers import MaskSettings, SamplingState, attach_sampling
    from maskllm_megatron.model.spec import SPARSE_LAYER_KINDS

    torch.manual_seed(0)
    model = build_model(_config(glu, query_groups),
                        MaskSettings(pattern=NMPattern(*pattern), mode=mode),
                        tp=ps.get_tensor_model_parallel_world_size(),
                        pp=ps.get_pipeline_model_parallel_world_size(),
                        sparse_layers=SPARSE_LAYER_KINDS if sparse is None else sparse)
    state = SamplingState(seed=seed, iteration=5, tau=1.0, kappa=100.0)
    attach_sampling(model, state)
    return model, state


def _batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (MBS, SEQ), generator=gen) for _ in range(MICROBATCHES)]


def _inputs():
    position_ids = torch.arange(SEQ).expand(MBS, SEQ)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return position_ids, causal


def _train_step(model, state):
    """Forward+backward of MICROBATCHES micro-batches through megatron's schedule."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    counter = iter(range(MICROBATCHES))
    position_ids, causal = _inputs()

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        state.microbatch = next(counter)
        output = model(tokens, position_ids, causal, labels=tokens)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm": loss.detach().clone()}

        return output, loss_func

    with cuda_literals():  # megatron's schedules write device="cuda"
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(_batches()), model=[model],
            num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    mean = float(torch.stack([d["lm"] for d in losses]).mean()) if losses else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mean)
    return next(v for v in everyone if v is not None)


def case_save_reference(path, glu):
    from maskllm_megatron.checkpoint.model import save_model

    model, _ = _build(glu, query_groups=2)
    save_model(model, path)


def case_train_step(path, glu):
    import torch.distributed as dist

    from maskllm_megatron.checkpoint.model import global_tensors, load_model

    model, state = _build(glu, query_groups=2, seed=99)  # different init: the load must win
    load_model(model, path)
    loss = _train_step(model, state)
    grads = global_tensors(model, suffixes=(".mask_logits",), grads=True)
    return (loss, grads) if dist.get_rank() == 0 else None


@pytest.mark.parametrize("glu", [False, True], ids=["gelu", "swiglu-gqa"])
def test_gpt_loss_and_logit_grads_equal_across_tp_and_pp(dist4, tmp_path, glu):
    path = str(tmp_path / "ref")
    dist4.run(case_save_reference, path, glu)
    ref_loss, ref_grads = dist4.run(case_train_step, path, glu)[0]
    # four sparse kinds, megatron stacks the 2 layers on a leading axis
    assert len(ref_grads) == 4 and all(g.shape[0] == 2 for g in ref_grads.values())
    assert all(g[layer].abs().sum() > 0 for g in ref_grads.values() for layer in range(2))
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        loss, grads = dist4.run(case_train_step, path, glu, tp=tp, pp=pp)[0]
        assert loss == pytest.approx(ref_loss, rel=1e-5), (tp, pp)
        assert grads.keys() == ref_grads.keys()
        for key, want in ref_grads.items():
            scale = want.abs().max().item()
            torch.testing.assert_close(grads[key], want, rtol=1e-4, atol=1e-5 * scale,
                                       msg=f"{key} at TP={tp} PP={pp}")


def case_hard_equals_dense():
    from maskllm_megatron.core.nm import hard_mask_from_logits
    from maskllm_megatron.model.layers import set_mask_mode, sparse_layers

    model, _ = _build(glu=True, query_groups=2)
    tokens = _batches()[0]
    position_ids, causal = _inputs()
    set_mask_mode(model, "hard")
    with torch.no_grad(), cuda_literals():
        hard = model(tokens, position_ids, causal)
        for _, layer in sparse_layers(model):
            mask = hard_mask_from_logits(layer.mask_logits, layer.mask_settings.pattern)
            layer.weight.mul_(mask.to(layer.weight.dtype))
        set_mask_mode(model, "dense")
        dense = model(tokens, position_ids, causal)
    torch.testing.assert_close(hard, dense, rtol=0, atol=0)
    return True


def test_hard_mode_equals_dense_model_with_masked_weights(dist4):
    dist4.run(case_hard_equals_dense, tp=2)


def case_save_trained(path, fixed):
    import torch.distributed as dist

    from maskllm_megatron.checkpoint.model import global_tensors, save_model
    from maskllm_megatron.model.layers import fix_masks, sparse_layers

    model, _ = _build(glu=True, query_groups=4)
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    with torch.no_grad():  # content no initialisation could reproduce
        for _, layer in sparse_layers(model):
            layer.mask_logits.add_(torch.randn(layer.mask_logits.shape, generator=gen))
    if fixed:
        fix_masks(model)
    save_model(model, path)
    return global_tensors(model, suffixes=(".mask_logits", ".mask_indices", ".weight"))


def case_load(path, fixed):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from maskllm_megatron.checkpoint.model import global_tensors, load_model

    model, _ = _build(glu=True, query_groups=4, mode="fixed" if fixed else "learn", seed=5)
    own = model.sharded_state_dict

    def with_te_extra_state(*args, **kwargs):  # what TE's attention adds (fp8 metadata)
        sharded = own(*args, **kwargs)
        key = "decoder.layers.self_attention.core_attention._extra_state"
        sharded[key] = ShardedObject(key, None, (1,), (0,), replica_id=0)
        return sharded

    model.sharded_state_dict = with_te_extra_state  # a checkpoint without it still loads
    load_model(model, path)
    return global_tensors(model, suffixes=(".mask_logits", ".mask_indices", ".weight"))


@pytest.mark.parametrize("fixed", [False, True], ids=["logits", "fixed-masks"])
def test_checkpoint_saved_at_tp2_pp2_loads_at_tp1_and_tp4(dist4, tmp_path, fixed):
    path = str(tmp_path / "ckpt")
    saved = dist4.run(case_save_trained, path, fixed, tp=2, pp=2)[0]
    suffix = ".mask_indices" if fixed else ".mask_logits"
    masks = [k for k in saved if k.endswith(suffix)]
    assert len(masks) == 4 and all(saved[k].shape[0] == 2 for k in masks)
    for tp in (1, 4):
        loaded = dist4.run(case_load, path, fixed, tp=tp)[0]
        assert loaded.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), f"{key} differs after loading at TP={tp}"


def case_load_errors(path, other):
    from maskllm_megatron.checkpoint.model import load_model

    errors = {}
    model, _ = _build(glu=True, query_groups=4, pattern=(1, 4))
    for name, target in (("pattern", path), ("shape", other)):
        try:
            load_model(model, target)
        except ValueError as err:
            errors[name] = str(err)
    dense, _ = _build(glu=True, query_groups=4, sparse=())
    from maskllm_megatron.checkpoint.model import save_model

    save_model(dense, other + "-dense")
    sparse, _ = _build(glu=True, query_groups=4)
    try:
        load_model(sparse, other + "-dense")
    except ValueError as err:
        errors["missing"] = str(err)
    load_model(sparse, other + "-dense", missing_masks="keep")  # starting from a dense model
    return errors


def test_mismatched_checkpoints_are_clear_errors(dist4, tmp_path):
    path = str(tmp_path / "ckpt")
    dist4.run(case_save_trained, path, False, tp=2)
    other = str(tmp_path / "no-sidecar")
    shutil.copytree(path, other)
    (tmp_path / "no-sidecar" / "maskllm.json").unlink()
    errors = dist4.run(case_load_errors, path, other, tp=2)[0]
    assert "holds 2:4 masks" in errors["pattern"] and "1:4" in errors["pattern"]
    assert re.search(r"global shape \[2, \d+, 16, 6\].*expects \[2, \d+, 16, 4\] for 1:4",
                     errors["shape"])
    assert "no mask tensors" in errors["missing"] and "mask_logits" in errors["missing"]


def case_ddp_buffers_hold_no_frozen_weight():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from maskllm_megatron.model.layers import sparse_layers

    model, _ = _build(glu=True, query_groups=2)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    in_buffers = {id(p) for buffer in ddp.buffers for p in buffer.params}
    layers = [layer for _, layer in sparse_layers(model)]
    assert layers and all(id(layer.weight) not in in_buffers for layer in layers)
    assert all(id(layer.mask_logits) in in_buffers for layer in layers)
    return len(in_buffers)


def test_frozen_weights_get_no_data_parallel_gradient_buffer(dist4):
    dist4.run(case_ddp_buffers_hold_no_frozen_weight, tp=2)


def case_prior_from(path):
    import torch.distributed as dist

    from maskllm_megatron.checkpoint.model import global_tensors
    from maskllm_megatron.checkpoint.prior import apply_prior_checkpoint

    model, _ = _build(glu=True, query_groups=4, seed=21)
    apply_prior_checkpoint(model, path, strength=3.0)
    logits = global_tensors(model, suffixes=(".mask_logits",))
    return logits if dist.get_rank() == 0 else None


@pytest.mark.parametrize("fixed", [False, True], ids=["from-logits", "from-fixed-masks"])
def test_prior_from_an_earlier_run_at_another_layout(dist4, tmp_path, fixed):
    path = str(tmp_path / "earlier")
    saved = dist4.run(case_save_trained, path, fixed, tp=2, pp=2)[0]
    logits = dist4.run(case_prior_from, path, tp=1)[0]
    for key, value in logits.items():
        prior = saved[key.replace(".mask_logits", ".mask_indices")] if fixed \
            else saved[key].argmax(-1)
        agree = (value.argmax(-1) == prior.long()).float().mean().item()
        assert agree > 0.9, (key, agree)  # +-0.03 boost against N(0, 0.01) initial logits
