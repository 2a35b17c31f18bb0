"""One training step and the forward passes around it, on megatron's pipeline schedules.

The language-model loss is written once (:func:`masked_lm_loss`); training, validation and
pruning's calibration all reach the model through :func:`forward_backward` and
:func:`forward_passes`. Each model chunk gets its own iterator of ``(micro-batch index, batch)``
(:func:`microbatch_iterators`), so the index that keys a forward call's noise is the schedule's
own, also under megatron's interleaved (virtual pipeline) schedule. The sparse-weight
regulariser enters the loss with the paper's sign, defined once (:data:`REGULARIZER_SIGN`,
applied by :func:`add_regularizer`). With distillation (:mod:`.distill`) each micro-batch is
doubled (student, teacher) and the loss is :func:`.distill.distillation_loss`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from maskllm_megatron import distributed
from maskllm_megatron.cpu_shims import cuda_literals
from maskllm_megatron.data.datasets import batch_for
from maskllm_megatron.model.layers import SamplingState, sampling, set_mask_mode, sparse_layers
from maskllm_megatron.training.distill import Distillation, distillation_loss, doubled


def masked_lm_loss(output_tensor: torch.Tensor, loss_mask: torch.Tensor):
    """Mean per-token LM loss over the tokens ``loss_mask`` keeps: megatron's loss_func
    contract, ``(loss, {"lm loss": loss})``."""
    mask = loss_mask.float()
    loss = (output_tensor.float() * mask).sum() / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


class _AuxLoss(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends ``scale`` into ``aux`` (megatron's
    MoE aux-loss idiom): adds ``scale * aux`` to the loss on any pipeline stage."""

    @staticmethod
    def forward(ctx, output, aux, scale):
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_device = aux.shape, aux.device
        return output

    @staticmethod
    def backward(ctx, grad_output):
        ones = torch.ones(ctx.aux_shape, dtype=torch.float32, device=ctx.aux_device)
        return grad_output, (ones * ctx.scale).reshape(ctx.aux_shape), None


REGULARIZER_SIGN = -1.0
"""The sign of the sparse-weight regulariser in the training loss, as in MaskLLM (Fang et al.,
NeurIPS 2024, arXiv 2409.17481) and its original training loop:
``loss = LM - lambda(t) * sum_layers ||W * M~||^2`` with ``lambda(t) = --weight-reg * (1 - t/T)``
(:func:`regularizer_weight`). Subtracting it rewards masks that keep large-magnitude weights, so
the gradients of the logits stay alive; its gradient into the soft mask is ``-2 lambda W^2 M~``.
The sign is the method's: ``--weight-reg`` is the magnitude and may not be negative."""


def regularizer_weight(weight_reg: float, iteration: int, train_iters: int) -> float:
    """``lambda(t) = weight_reg * (1 - t/T)``: the paper's linear decay to 0 over the run."""
    return weight_reg * (1.0 - iteration / train_iters)


def add_regularizer(output: torch.Tensor, reg: torch.Tensor, reg_weight: float,
                    num_microbatches: int, config=None) -> torch.Tensor:
    """``output`` (unchanged) whose backward also adds this micro-batch's share of
    ``REGULARIZER_SIGN * reg_weight * reg`` to the loss: this stage's (and TP shard's) layers,
    on any pipeline stage. ``config`` (the model's): megatron's loss scale, as it scales the
    LM loss, applies to the term too (fp16). Nothing is added when ``reg_weight`` is 0."""
    if reg_weight == 0:
        return output
    scale = REGULARIZER_SIGN * reg_weight / num_microbatches
    grad_scale_func = getattr(config, "grad_scale_func", None)
    if grad_scale_func is not None:
        scale = grad_scale_func(torch.full((1,), scale, dtype=torch.float32, device=reg.device))
    return _AuxLoss.apply(output, reg, scale)


def model_chunks(model) -> list:
    """A model or a list of virtual-pipeline chunks, as the list megatron's schedules take."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def microbatch_iterators(model, num_microbatches: int,
                         batch_of: Callable[[int], object]) -> list[Iterator[tuple[int, object]]]:
    """One iterator of ``(micro-batch index, batch_of(index))`` per model chunk: megatron's
    schedules hand chunk ``c``'s iterator to each forward call of chunk ``c``, and every
    schedule (interleaved ones too) runs a chunk through the micro-batches in order."""
    return [((k, batch_of(k)) for k in range(num_microbatches)) for _ in model_chunks(model)]


def forward_backward(model, state: SamplingState, dataset, batches, iteration: int,
                     seq_length: int, reg_weight: float, device,
                     kd: Distillation | None = None) -> tuple[float, float, dict[str, float]]:
    """megatron's forward-backward over this iteration's micro-batches; (LM loss, regulariser
    ``sum ||W * M~||^2`` over every stage's and TP shard's layers, extra losses), each averaged
    over micro-batches and data parallel, the same on every rank. The loss it differentiates
    is ``LM + REGULARIZER_SIGN * reg_weight * regulariser`` (:func:`add_regularizer`).
    ``state`` is the iteration's sampling state; each forward call samples at its own
    micro-batch. ``kd`` (weight > 0): each micro-batch runs doubled, student and teacher, the
    LM term becomes :func:`.distill.distillation_loss` and the extra losses hold ``kd_loss``
    (its ``T**2 * KL`` term); the LM loss reported is the student's cross-entropy either way."""
    regs: list[torch.Tensor] = []
    if kd is not None and kd.weight == 0:
        kd = None  # off: the plain micro-batch, exactly as without distillation

    def forward_step(data_iterator, model):
        k, batch = next(data_iterator)
        if kd is not None:
            with sampling(dataclasses.replace(state, microbatch=k, teacher_half=True)) as sample:
                output = model(*doubled(batch), None)  # vocab-parallel logits on the last stage
            loss_func = functools.partial(distillation_loss, labels=batch["labels"],
                                          loss_mask=batch["loss_mask"], kd=kd)
        else:
            with sampling(dataclasses.replace(state, microbatch=k)) as sample:
                output = model(batch["tokens"], batch["position_ids"], None,
                               labels=batch["labels"])
            loss_func = functools.partial(masked_lm_loss, loss_mask=batch["loss_mask"])
        reg = sample.regularizer()
        if reg is not None:
            regs.append(reg.detach())
            output = add_regularizer(output, reg, reg_weight, batches.num_microbatches,
                                     getattr(model, "config", None))
        return output, loss_func

    data = microbatch_iterators(
        model, batches.num_microbatches,
        lambda k: batch_for(dataset, batches, iteration, k, state.dp_rank, device))
    with cuda_literals():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model_chunks(model),
            num_microbatches=batches.num_microbatches, seq_length=seq_length,
            # the p2p tensors between pipeline stages carry the doubled micro-batch
            micro_batch_size=batches.micro_batch_size * (2 if kd is not None else 1),
            forward_only=False)
    keys = ("lm loss", "kd loss") if kd is not None else ("lm loss",)
    totals = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
    if losses:  # the loss lives on the last stage: share it along the pipeline
        for i, key in enumerate(keys):
            totals[i] = torch.stack([d[key] for d in losses]).double().mean()
    if regs:
        totals[-1] = torch.stack(regs).double().mean()
    dist.all_reduce(totals[:-1], group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(totals[-1:], group=ps.get_model_parallel_group())  # every stage, TP shard
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    *means, reg = (totals / ps.get_data_parallel_world_size()).tolist()
    extra = {"kd_loss": means[1]} if kd is not None else {}
    return means[0], reg, extra


@torch.no_grad()
def validation_loss(chunk, state, dataset, batches, seq_length, iters: int) -> float:
    """Mean LM loss with hard (argmax) masks on ``iters`` validation batches."""
    device = distributed.device()
    modes = {id(layer): layer.mode for _, layer in sparse_layers(chunk)}
    if any(mode == "learn" for mode in modes.values()):
        set_mask_mode(chunk, "hard")
    try:
        total = forward_passes(chunk, dataset, batches, seq_length, iters, state.dp_rank)
    finally:
        for _, layer in sparse_layers(chunk):
            layer.mode = modes[id(layer)]
    value = torch.tensor([sum(total) / len(total) if total else 0.0], dtype=torch.float64,
                         device=device)
    dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return float(value) / ps.get_data_parallel_world_size()


def forward_passes(model, dataset, batches, seq_length: int, iterations: int = 1,
                   dp_rank: int = 0) -> list[float]:
    """Forward-only over ``iterations`` global batches through megatron's schedule (any PP);
    returns the LM losses of the micro-batches on the last stage (empty elsewhere)."""
    device = distributed.device()
    losses: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        _, batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, functools.partial(masked_lm_loss, loss_mask=batch["loss_mask"])

    for it in range(iterations):
        data = microbatch_iterators(
            model, batches.num_microbatches,
            lambda k, it=it: batch_for(dataset, batches, it, k, dp_rank, device))
        with torch.no_grad(), cuda_literals():
            result = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=model_chunks(model),
                num_microbatches=batches.num_microbatches, seq_length=seq_length,
                micro_batch_size=batches.micro_batch_size, forward_only=True)
        losses.extend(d["lm loss"] for d in result or [])
    return torch.stack(losses).tolist() if losses else []  # one host sync
