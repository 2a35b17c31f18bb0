"""Distillation from the model itself with its masks off, in the same forward pass.

The loss of one micro-batch is ``(1 - a) * CE + a * T**2 * KL(softmax(t / T) || softmax(s / T))``
per token (the masked mean over ``loss_mask``, like :func:`.step.masked_lm_loss`): ``s`` are the
student's (masked model's) logits, ``t`` the teacher's (the same weights, masks off), ``a`` the
``--kd-weight`` and ``T`` the ``--kd-temperature``. The ``T**2`` factor (Hinton et al. 2015)
keeps the KL's gradient, ``T * (softmax(s/T) - softmax(t/T))``, on the scale of the
cross-entropy's as ``T`` changes.

The teacher costs no second copy of the weights: the micro-batch is doubled along the batch
axis (:func:`doubled`) and, inside ``sampling(state)`` with ``teacher_half=True``, every sparse
layer runs the first half with ``W * mask`` and the second half with ``W`` under no_grad
(:mod:`maskllm_megatron.model.layers`). The rest of the model (embeddings, norms, attention,
output layer; frozen) is shared. The doubled micro-batch flows through megatron's pipeline
schedule like any other (its p2p shapes say ``2 x micro_batch_size``); the loss is taken on
the last stage from the vocab-parallel logits ``[2b, s, V / TP]``: cross-entropy with
megatron's ``vocab_parallel_cross_entropy``, the KL with the same max / sum-exp all-reduces
over the tensor-parallel group (:func:`vocab_parallel_kl_div`); the vocabulary is never
gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


@dataclass(frozen=True)
class Distillation:
    """``weight`` (``a``) in [0, 1] and ``temperature`` (``T``) > 0 of the distillation loss;
    weight 0 is off (:func:`.step.forward_backward` then runs the plain micro-batch)."""

    weight: float
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {self.weight}")
        if not self.temperature > 0.0:
            raise ValueError(f"distillation temperature must be positive, got {self.temperature}")


def distillation(weight: float, temperature: float = 1.0) -> Distillation | None:
    """The settings of ``--kd-weight`` / ``--kd-temperature``; None (off) for weight 0."""
    return Distillation(weight, temperature) if weight > 0 else None


def doubled(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, position_ids)`` ``[2b, s]``: the student's micro-batch, then the teacher's."""
    return (torch.cat([batch["tokens"], batch["tokens"]]),
            torch.cat([batch["position_ids"], batch["position_ids"]]))


def _tp_group():
    """The tensor-parallel group, or None outside a process group (one process: TP = 1)."""
    return ps.get_tensor_model_parallel_group(check_initialized=False)


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _log_softmax_(x: torch.Tensor, group) -> torch.Tensor:
    """In place: ``x - logsumexp(x)`` over the vocabulary split along the last axis over
    ``group`` (the max and the sum of exponentials all-reduced, megatron's cross-entropy
    idiom)."""
    top = x.max(dim=-1).values
    _all_reduce(top, group, dist.ReduceOp.MAX)
    x.sub_(top.unsqueeze(-1))
    sum_exp = x.exp().sum(dim=-1)
    _all_reduce(sum_exp, group)
    return x.sub_(sum_exp.log_().unsqueeze(-1))


class _VocabParallelKL(torch.autograd.Function):
    """Per-token ``T**2 * KL(softmax(t/T) || softmax(s/T))`` of vocab-parallel logits ``s``
    (student) and ``t`` (teacher, no gradient); backward: ``T * (softmax(s/T) - softmax(t/T))``
    times the incoming gradient, this rank's vocabulary shard only."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, group):
        dtype = torch.promote_types(student.dtype, torch.float32)
        log_q = _log_softmax_(student.to(dtype).div(temperature), group)  # fresh tensors
        log_p = _log_softmax_(teacher.to(dtype).div(temperature), group)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(dim=-1)  # this shard's share of the sum over V
        _all_reduce(kl, group)
        ctx.save_for_backward(log_q.exp_().sub_(p).mul_(temperature))  # dKL/ds, T**2 scaled
        ctx.student_dtype = student.dtype
        return kl.mul_(temperature**2)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.unsqueeze(-1)).to(ctx.student_dtype), None, None, None


def vocab_parallel_kl_div(student: torch.Tensor, teacher: torch.Tensor,
                          temperature: float = 1.0, group=None) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` per position (``[...]`` of
    logits ``[..., V / TP]`` split over the tensor-parallel ``group``, default megatron's),
    computed in at least fp32; the gradient goes to ``student`` only."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {list(student.shape)} and teacher logits "
                         f"{list(teacher.shape)} differ in shape")
    return _VocabParallelKL.apply(student, teacher.detach(), float(temperature),
                                  _tp_group() if group is None else group)


def distillation_loss(output_tensor: torch.Tensor, labels: torch.Tensor,
                      loss_mask: torch.Tensor, kd: Distillation):
    """megatron's loss_func contract for a doubled micro-batch: ``output_tensor`` are the
    vocab-parallel logits ``[2b, s, V / TP]`` (student first), ``labels`` and ``loss_mask``
    ``[b, s]``. Returns ``((1 - a) * CE + a * T**2 * KL`` averaged over the kept tokens,
    ``{"lm loss": CE, "kd loss": T**2 * KL}``)."""
    b = labels.shape[0]
    if output_tensor.shape[0] != 2 * b:
        raise RuntimeError(f"distillation expects logits of a doubled micro-batch (2 x {b}), "
                           f"got {list(output_tensor.shape)}")
    student, teacher = output_tensor[:b], output_tensor[b:].detach()
    kl = vocab_parallel_kl_div(student, teacher, kd.temperature)
    # megatron's cross-entropy works in place on fp32 logits: hand it its own copy
    ce = vocab_parallel_cross_entropy(student.to(torch.float32, copy=True), labels)
    mask = loss_mask.float()
    count = mask.sum()
    ce_mean = (ce.float() * mask).sum() / count
    kl_mean = (kl.float() * mask).sum() / count
    loss = (1.0 - kd.weight) * ce_mean + kd.weight * kl_mean
    return loss, {"lm loss": ce_mean.detach().clone(), "kd loss": kl_mean.detach().clone()}
