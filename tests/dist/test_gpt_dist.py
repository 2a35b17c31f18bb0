"""A tiny megatron-core GPT built from the sparse spec: TP/PP equivalence, hard mode, reshard."""

import re
import shutil

import pytest
import torch

from maskllm_megatron.cpu_shims import cuda_literals

SEQ, MBS, VOCAB, MICROBATCHES = 16, 2, 128, 4


def _config(glu: bool, query_groups=None, num_layers=2):
    from maskllm_megatron.model.config import ModelConfig, TransformerFields

    extra = dict(gated_linear_unit=True, activation="silu", normalization="RMSNorm",
                 num_query_groups=query_groups) if glu else {}
    return ModelConfig(TransformerFields(num_layers=num_layers, hidden_size=64,
                                         num_attention_heads=4, ffn_hidden_size=128,
                                         add_bias_linear=True, **extra),
                       vocab_size=VOCAB, max_sequence_length=SEQ)


def _build(glu, query_groups=None, pattern=(2, 4), mode="learn", sparse=None, seed=11,
           num_layers=2):
    """The model (a list of chunks under a virtual pipeline) and the step's sampling state."""
    from megatron.core import parallel_state as ps

    from maskllm_megatron.core.nm import NMPattern
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.layers import MaskSettings, SamplingState, assign_layer_ids
    from maskllm_megatron.model.spec import SPARSE_LAYER_KINDS

    torch.manual_seed(0)
    cfg = _config(glu, query_groups, num_layers)
    settings = MaskSettings(pattern=NMPattern(*pattern), mode=mode)
    chunks = ps.get_virtual_pipeline_model_parallel_world_size()

    def build(vp_stage=None):
        return build_model(cfg, settings, tp=ps.get_tensor_model_parallel_world_size(),
                           pp=ps.get_pipeline_model_parallel_world_size(), vp_stage=vp_stage,
                           sparse_layers=SPARSE_LAYER_KINDS if sparse is None else sparse,
                           virtual_pipeline_model_parallel_size=chunks)

    model = [build(stage) for stage in range(chunks)] if chunks else build()
    assign_layer_ids(model, logits_seed=seed)
    return model, SamplingState(seed=seed, iteration=5, tau=1.0, kappa=100.0)


def _batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (MBS, SEQ), generator=gen) for _ in range(MICROBATCHES)]


def _inputs():
    position_ids = torch.arange(SEQ).expand(MBS, SEQ)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return position_ids, causal


def _train_step(model, state):
    """Forward+backward of MICROBATCHES micro-batches through megatron's schedule (each chunk
    of a virtual pipeline with its own data iterator); the per-micro-batch losses."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from maskllm_megatron.model.layers import sampling
    from maskllm_megatron.training.step import microbatch_iterators, model_chunks

    batches = _batches()
    position_ids, causal = _inputs()

    def forward_step(data_iterator, model):
        k, tokens = next(data_iterator)
        with sampling(dataclasses.replace(state, microbatch=k)):
            output = model(tokens, position_ids, causal, labels=tokens)
        # the schedule's own micro-batch, which megatron sets on the layers it runs
        assert all(layer.current_microbatch == k for layer in model.decoder.layers), k

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm": loss.detach().clone()}

        return output, loss_func

    with cuda_literals():  # megatron's schedules write device="cuda"
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=microbatch_iterators(model, MICROBATCHES, batches.__getitem__),
            model=model_chunks(model), num_microbatches=MICROBATCHES, seq_length=SEQ,
            micro_batch_size=MBS, forward_only=False)
    per_microbatch = [float(d["lm"]) for d in losses] if losses else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, per_microbatch)
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


def case_save_four_layers(path):
    from maskllm_megatron.checkpoint.model import save_model

    model, _ = _build(glu=True, query_groups=2, num_layers=4)
    save_model(model, path)


def case_train_step_four_layers(path, virtual_pipeline):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from maskllm_megatron import distributed
    from maskllm_megatron.checkpoint.model import global_tensors, load_model
    from maskllm_megatron.training.step import model_chunks

    if virtual_pipeline:  # the pool set TP x PP; add the model chunks per pipeline rank
        distributed.set_model_parallel(ps.get_tensor_model_parallel_world_size(),
                                       ps.get_pipeline_model_parallel_world_size(),
                                       virtual_pipeline_model_parallel_size=virtual_pipeline)
    model, state = _build(glu=True, query_groups=2, num_layers=4, seed=99)
    assert len(model_chunks(model)) == (virtual_pipeline or 1)
    load_model(model, path)
    losses = _train_step(model, state)
    grads = global_tensors(model, suffixes=(".mask_logits",), grads=True)
    return (losses, grads) if dist.get_rank() == 0 else None


def test_interleaved_pipeline_samples_each_microbatch_as_pp1(dist4, tmp_path):
    """PP=2 with two interleaved chunks per rank (megatron's virtual pipeline schedule runs the
    chunks' micro-batches out of order): every micro-batch's loss and the logit gradients equal
    PP=1's, so each forward call sampled at its own micro-batch."""
    path = str(tmp_path / "ref")
    dist4.run(case_save_four_layers, path)
    ref_losses, ref_grads = dist4.run(case_train_step_four_layers, path, None)[0]
    assert len(ref_losses) == MICROBATCHES and len(set(ref_losses)) == MICROBATCHES
    losses, grads = dist4.run(case_train_step_four_layers, path, 2, pp=2)[0]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and all(g.shape[0] == 4 for g in grads.values())
    for key, want in ref_grads.items():
        assert all(want[layer].abs().sum() > 0 for layer in range(4)), key
        torch.testing.assert_close(grads[key], want, rtol=1e-4,
                                   atol=1e-5 * want.abs().max().item(), msg=key)


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
    (tmp_path / "no-sidecar" / "checksums.json").unlink()  # as an older version wrote it
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
