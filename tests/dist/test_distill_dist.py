"""Distillation from the model itself with its masks off (--kd-weight) on gloo ranks: the
doubled micro-batch's halves, the vocab-parallel loss and the logits gradient at TP=2 and PP=2
against a single-process float64 reference, weight 0 as the plain path, and the trainer."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from run_files import train_log as _log

from maskllm_megatron.cpu_shims import cuda_literals

SEQ, MBS, VOCAB, MICROBATCHES, SEED = 16, 2, 128, 2, 11


def _build(sequence_parallel=False):
    """A 2-layer SwiGLU GPT with GQA at this rank's layout, masks learning, everything but the
    logits frozen (as the trainer sets it)."""
    from megatron.core import parallel_state as ps

    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig, TransformerFields
    from maskllm_megatron.model.layers import MaskSettings, SamplingState, assign_layer_ids

    torch.manual_seed(0)
    cfg = ModelConfig(TransformerFields(num_layers=2, hidden_size=64, num_attention_heads=4,
                                        ffn_hidden_size=128, add_bias_linear=True,
                                        gated_linear_unit=True, activation="silu",
                                        normalization="RMSNorm", num_query_groups=2),
                      vocab_size=VOCAB, max_sequence_length=SEQ)
    model = build_model(cfg, MaskSettings(), tp=ps.get_tensor_model_parallel_world_size(),
                        pp=ps.get_pipeline_model_parallel_world_size(),
                        sequence_parallel=sequence_parallel)
    assign_layer_ids(model, logits_seed=SEED)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("mask_logits"))
    # dp_rank 0 on every rank: data-parallel replicas see the same data and noise
    return model, SamplingState(seed=SEED, iteration=5, tau=1.0, kappa=100.0)


def _dataset():
    gen = torch.Generator().manual_seed(3)
    samples = []
    for i in range(MBS * MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (SEQ + 1,), generator=gen)
        loss_mask = torch.ones(SEQ)
        loss_mask[: 3 * i] = 0  # some positions not counted
        samples.append(dict(tokens=tokens[:-1], labels=tokens[1:], loss_mask=loss_mask,
                            position_ids=torch.arange(SEQ)))
    return samples


def _batches():
    from maskllm_megatron.data.datasets import BatchLayout

    return BatchLayout(MBS, MBS * MICROBATCHES, 1)


def _logit_grads(model):
    from maskllm_megatron.checkpoint.model import global_tensors

    return global_tensors(model, suffixes=(".mask_logits",), grads=True)


def case_save(path):
    from maskllm_megatron.checkpoint.model import save_model

    save_model(_build()[0], path)


def case_kd_step(path, kd, sequence_parallel=False):
    """forward_backward (the trainer's step) with distillation at this rank's layout."""
    import torch.distributed as dist

    from maskllm_megatron.checkpoint.model import load_model
    from maskllm_megatron.training.step import forward_backward

    model, state = _build(sequence_parallel)
    load_model(model, path)
    loss, reg, extra = forward_backward(model, state, _dataset(), _batches(), 0, SEQ, 0.0,
                                        torch.device("cpu"), kd=kd)
    grads = _logit_grads(model)
    return (loss, extra, grads) if dist.get_rank() == 0 else None


def case_reference(path, kd):
    """The same step in float64 on one process, written with torch ops: the student is the
    model in learn mode, the teacher the model in dense mode (no doubled batch)."""
    import torch.distributed as dist

    from maskllm_megatron.checkpoint.model import load_model
    from maskllm_megatron.data.datasets import batch_for
    from maskllm_megatron.model.layers import sampling, set_mask_mode

    model, state = _build()
    load_model(model, path)
    model.double()
    a, temp = kd.weight, kd.temperature
    ces, kls = [], []
    for k in range(MICROBATCHES):
        batch = batch_for(_dataset(), _batches(), 0, k, 0)
        with sampling(dataclasses.replace(state, microbatch=k)), cuda_literals():
            student = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V]
        set_mask_mode(model, "dense")
        with torch.no_grad(), cuda_literals():
            teacher = model(batch["tokens"], batch["position_ids"], None)
        set_mask_mode(model, "learn")
        assert student.dtype == teacher.dtype == torch.float64 and student.shape[-1] == VOCAB
        ce = F.cross_entropy(student.flatten(0, 1), batch["labels"].flatten(),
                             reduction="none").view(batch["labels"].shape)
        log_q, log_p = F.log_softmax(student / temp, -1), F.log_softmax(teacher / temp, -1)
        kl = temp**2 * (log_p.exp() * (log_p - log_q)).sum(-1)
        mask = batch["loss_mask"].double()
        ces.append((ce * mask).sum() / mask.sum())
        kls.append((kl * mask).sum() / mask.sum())
        (((1 - a) * ces[-1] + a * kls[-1]) / MICROBATCHES).backward()
    grads = _logit_grads(model)
    if dist.get_rank():
        return None
    return float(torch.stack(ces).mean()), float(torch.stack(kls).mean()), grads


def test_kd_loss_and_logit_grads_equal_float64_reference_at_tp2_and_pp2(dist4, tmp_path):
    from maskllm_megatron.training.distill import Distillation

    path = str(tmp_path / "model")
    dist4.run(case_save, path)
    kd = Distillation(weight=0.3, temperature=2.0)
    ref_ce, ref_kl, ref_grads = dist4.run(case_reference, path, kd)[0]
    assert ref_kl > 1e-3 and len(ref_grads) == 4  # the masks change the logits
    assert all(g.dtype == torch.float64 and g.abs().sum() > 0 for g in ref_grads.values())
    for tp, pp, sp in ((2, 1, False), (2, 1, True), (1, 2, False)):
        loss, extra, grads = dist4.run(case_kd_step, path, kd, sp, tp=tp, pp=pp)[0]
        where = f"TP={tp} PP={pp}" + (" SP" if sp else "")
        assert loss == pytest.approx(ref_ce, rel=1e-5), where
        assert extra["kd_loss"] == pytest.approx(ref_kl, rel=1e-4), where
        assert grads.keys() == ref_grads.keys()
        for key, want in ref_grads.items():
            torch.testing.assert_close(grads[key].double(), want, rtol=1e-4,
                                       atol=1e-5 * want.abs().max().item(),
                                       msg=f"{key} at {where}")


def case_halves(sequence_parallel):
    """One forward of the doubled micro-batch: the student half equals the learn-mode model,
    the teacher half the dense model (masks off), and no gradient comes from the teacher."""
    from maskllm_megatron.data.datasets import batch_for
    from maskllm_megatron.model.layers import sampling, set_mask_mode, sparse_layers
    from maskllm_megatron.training.distill import doubled

    model, state = _build(sequence_parallel)
    batch = batch_for(_dataset(), _batches(), 0, 1, 0)
    tokens, positions = batch["tokens"], batch["position_ids"]
    with cuda_literals():
        with sampling(dataclasses.replace(state, teacher_half=True)) as both_sample:
            both = model(*doubled(batch), None)  # [2b, s, V / tp]
        with torch.no_grad():
            with sampling(state) as student_sample:
                student = model(tokens, positions, None)
            set_mask_mode(model, "dense")
            teacher = model(tokens, positions, None)
            set_mask_mode(model, "learn")
    assert both.shape == (2 * MBS, SEQ, VOCAB // 2) and both.requires_grad
    scale = teacher.abs().max().item()
    torch.testing.assert_close(both[:MBS].detach(), student, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(both[MBS:].detach(), teacher, rtol=1e-6, atol=1e-6 * scale)
    assert (both[:MBS] - both[MBS:]).abs().max() > 1e-2 * scale  # the masks do something
    # one regulariser term per sparse layer, from the student's sample only
    assert len(both_sample.terms) == len(student_sample.terms) == len(sparse_layers(model))
    gen = torch.Generator().manual_seed(5)
    (both[MBS:] * torch.randn(both[MBS:].shape, generator=gen)).sum().backward(retain_graph=True)
    grads = [layer.mask_logits.grad for _, layer in sparse_layers(model)]
    assert all(g is None or not g.any() for g in grads)
    (both[:MBS] * torch.randn(both[:MBS].shape, generator=gen)).sum().backward()
    assert all(layer.mask_logits.grad.any() for _, layer in sparse_layers(model))
    return True


def test_teacher_half_is_the_dense_model_and_gets_no_gradient(dist4):
    dist4.run(case_halves, True, tp=2)


def case_weight_zero():
    """kd weight 0 is the plain step: same loss and gradients bit for bit, batch not doubled."""
    from maskllm_megatron.model.layers import sparse_layers
    from maskllm_megatron.training.distill import Distillation
    from maskllm_megatron.training.step import forward_backward

    model, state = _build()
    seen = set()
    for _, layer in sparse_layers(model):
        layer.register_forward_pre_hook(lambda _, args: seen.add(args[0].shape[1]))
    results = []
    for kd in (None, Distillation(0.0, 2.0)):
        for _, layer in sparse_layers(model):
            layer.mask_logits.grad = None
        step = forward_backward(model, state, _dataset(), _batches(), 0, SEQ, 1e-3,
                                torch.device("cpu"), kd=kd)
        results.append((step, [layer.mask_logits.grad.clone() for _, layer in
                               sparse_layers(model)]))
    (plain, plain_grads), (zero, zero_grads) = results
    assert plain == zero and plain[2] == {}
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, zero_grads, strict=True))
    assert seen == {MBS}
    return plain[0]


def test_weight_zero_is_the_plain_step_bit_for_bit(dist4):
    dist4.run(case_weight_zero, tp=2)


def case_train(corpus, save, flags):
    from megatron.core import parallel_state as ps

    from maskllm_megatron.training.args import TrainArgs
    from maskllm_megatron.training.loop import train

    args = TrainArgs(model_config=str(corpus / "model"), data_path=[str(corpus / "data" / "docs")],
                     split="90,10,0", micro_batch_size=2, global_batch_size=4, seq_length=32,
                     train_iters=2, save=str(save), seed=3, progress=False,
                     tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                     pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
                     **flags)
    args.validate()
    return train(args)


def case_save_start(corpus, path):
    """A dense starting checkpoint: the same weights at every layout."""
    from maskllm_megatron.checkpoint.model import save_model
    from maskllm_megatron.distributed import current_layout
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig
    from maskllm_megatron.model.layers import assign_layer_ids

    layout = current_layout()
    model = build_model(ModelConfig.load(corpus / "model"), tp=layout.tp, pp=layout.pp)
    assign_layer_ids(model, logits_seed=3)
    save_model(model, path)


def test_trainer_logs_the_kd_term_and_keeps_the_lm_loss(dist4, corpus, tmp_path):
    """--kd-weight through train(): the logged loss is still the student's cross-entropy (the
    run without distillation logs the same first one: same masks, same data), and kd_loss is
    the new term; PP=2 x TP=2 equals TP=4."""
    start = tmp_path / "start"
    dist4.run(case_save_start, corpus, start, tp=4)
    dist4.run(case_train, corpus, tmp_path / "plain", {"load": str(start)}, tp=4)
    kd = {"kd_weight": 0.5, "kd_temperature": 2.0, "load": str(start)}
    dist4.run(case_train, corpus, tmp_path / "kd", kd, tp=4)
    dist4.run(case_train, corpus, tmp_path / "kd-pp", kd, tp=2, pp=2)
    plain, distilled, piped = _log(tmp_path / "plain"), _log(tmp_path / "kd"), _log(tmp_path /
                                                                                  "kd-pp")
    assert "kd_loss" not in plain[0] and distilled[0]["kd_loss"] > 0
    assert distilled[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert distilled[0]["grad_norm"] != pytest.approx(plain[0]["grad_norm"], rel=1e-3)
    for a, b in zip(distilled, piped, strict=True):
        for key in ("loss", "kd_loss", "reg", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
