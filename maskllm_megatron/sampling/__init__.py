"""Differentiable N:M mask sampling: ``W * (softmax((kappa*logits + g)/tau) @ candidates)``.

For a weight shard ``W`` ``[out, in]`` with mask logits ``[out, in // M, C]`` (fp32):

* ``y = softmax((kappa * logits + g) / tau)`` per group, ``g`` Gumbel noise keyed as in
  :mod:`.noise` (so every tensor-parallel layout draws the same sample);
* soft mask ``= y @ candidates`` (``hard=True``: the argmax candidate in the forward pass,
  gradients through the soft ``y``: straight-through Gumbel);
* output ``W * mask`` in W's dtype, and the regulariser ``sum((W * mask)**2)`` from the same pass.

Backends compute the same function: the Triton kernel (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), the fused C++ kernel (CPU), and the chunked PyTorch path (any device,
float64 too). None of them stores the noise or the soft index for backward: it is recomputed
from the key. The weight gets a gradient only when it requires one (joint fine-tuning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from maskllm_megatron.core.nm import NMPattern, as_pattern, check_logits, hard_mask_from_logits
from maskllm_megatron.sampling import cpu_kernel, torch_path, triton_kernel
from maskllm_megatron.sampling.noise import NoiseKey, ShardGroups

BACKENDS = ("auto", "triton", "cpu", "torch")

__all__ = ["BACKENDS", "NoiseKey", "RowSegment", "SampleSpec", "ShardGroups",
           "hard_masked_weight", "sample_masked_weight", "select_backend"]


@dataclass(frozen=True)
class SampleSpec:
    """Everything a backend needs besides the tensors. ``key`` is the 64-bit Philox key."""

    pattern: NMPattern
    tau: float
    kappa: float
    key: int
    shard: ShardGroups = field(default_factory=ShardGroups)
    hard: bool = False


def select_backend(weight: torch.Tensor, logits: torch.Tensor, pattern: NMPattern,
                   backend: str = "auto") -> str:
    """The backend that will run: an explicit choice is checked, ``auto`` picks the fastest."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sampler backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "triton" and not triton_kernel.available(weight.device):
        raise RuntimeError("the Triton sampler needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) "
                           "and an installed triton")
    if backend == "cpu" and not cpu_kernel.supports(weight, logits, pattern):
        raise RuntimeError("the C++ sampler needs CPU tensors, fp32 logits, fp32/bf16/fp16 "
                           "weights and a C++ compiler")
    if backend != "auto":
        return backend
    if weight.device.type == "cuda" and triton_kernel.available(weight.device) \
            and logits.dtype == torch.float32:
        return "triton"
    if cpu_kernel.supports(weight, logits, pattern):
        return "cpu"
    return "torch"


_IMPLEMENTATIONS = {"triton": triton_kernel, "cpu": cpu_kernel, "torch": torch_path}


class _GumbelMask(torch.autograd.Function):
    """Saves only references to the inputs (no new memory); backward recomputes from the key.

    ``segments`` are ``(row_start, row_stop, SampleSpec)``: blocks of rows placed apart in the
    unsharded layer (a gated fc1's gate and up halves), sampled in one autograd node so the
    logits receive one gradient. With a ``main_grad`` buffer, backward adds the logits gradient
    into it and returns none (megatron's gradient-accumulation fusion): no logits-sized
    gradient is allocated. For a parameter that megatron's DDP manages (it carries
    ``grad_added_to_main_grad``) backward follows megatron's own fused-wgrad idiom instead: it
    flags the parameter and returns an uninitialised gradient, so DDP's hook runs on the
    device's autograd thread and skips the addition."""

    @staticmethod
    def forward(ctx, logits, weight, segments, backend, main_grad):
        impl = _IMPLEMENTATIONS[backend]
        outs, regs = [], []
        for start, stop, spec in segments:
            out, reg = impl.forward(weight[start:stop], logits[start:stop], spec)
            outs.append(out)
            regs.append(reg)
        ctx.save_for_backward(logits, weight)
        ctx.segments, ctx.impl, ctx.main_grad = segments, impl, main_grad
        ctx.ddp_param = logits if hasattr(logits, "grad_added_to_main_grad") else None
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), sum(regs)

    @staticmethod
    def backward(ctx, grad_out, grad_reg):
        logits, weight = ctx.saved_tensors
        need_logits, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not need_logits and not need_weight:
            return None, None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(weight)
        into = ctx.main_grad if need_logits else None
        logit_parts, weight_parts = [], []
        for start, stop, spec in ctx.segments:
            part_logits, part_weight = ctx.impl.backward(
                grad_out[start:stop], grad_reg, weight[start:stop], logits[start:stop], spec,
                need_weight, into=None if into is None else into[start:stop])
            logit_parts.append(part_logits)
            weight_parts.append(part_weight)
        grad_logits = grad_weight = None
        if need_weight:
            grad_weight = weight_parts[0] if len(weight_parts) == 1 else torch.cat(weight_parts)
        if need_logits and into is None:
            grad_logits = logit_parts[0] if len(logit_parts) == 1 else torch.cat(logit_parts)
        elif need_logits and ctx.ddp_param is not None:
            ctx.ddp_param.grad_added_to_main_grad = True
            grad_logits = torch.empty_like(logits)
        return grad_logits, grad_weight, None, None, None


RowSegment = tuple[int, int, ShardGroups]


def sample_masked_weight(
    weight: torch.Tensor,
    logits: torch.Tensor,
    pattern: NMPattern | tuple[int, int] | str,
    *,
    tau: float,
    kappa: float,
    key: NoiseKey | int,
    shard: ShardGroups | None = None,
    segments: Sequence[RowSegment] | None = None,
    hard: bool = False,
    backend: str = "auto",
    main_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a mask and apply it: returns ``(W * mask, sum((W * mask)**2))``.

    ``weight`` ``[out, in]`` (frozen unless it requires grad), ``logits`` ``[out, in // M, C]``;
    ``shard`` places a tensor-parallel shard in the unsharded layer, or ``segments`` (row start,
    row stop, placement) place blocks of its rows separately; ``key`` selects the noise.
    ``main_grad``: a contiguous buffer shaped like the logits (fp32, bf16 or fp16) that backward
    adds the logits gradient to, in the same pass, instead of returning it; the result equals
    ``main_grad.add_(grad)`` bit for bit and ``logits.grad`` stays ``None``.
    """
    pattern = as_pattern(pattern)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {list(weight.shape)}")
    check_logits(logits, pattern, weight_shape=weight.shape)
    if tau <= 0:
        raise ValueError(f"Gumbel temperature tau must be positive, got {tau}")
    if shard is not None and segments is not None:
        raise ValueError("give a shard placement or row segments, not both")
    rows, gpr = weight.shape[0], logits.shape[1]
    segments = list(segments) if segments is not None else [(0, rows, shard or ShardGroups())]
    bounds = [(start, stop) for start, stop, _ in segments]
    starts = [0] + [stop for _, stop in bounds[:-1]]
    if [start for start, _ in bounds] != starts or bounds[-1][1] != rows \
            or any(stop <= start for start, stop in bounds):
        raise ValueError(f"row segments must tile rows 0..{rows} in order, got {bounds}")
    philox_key = key.philox_key() if isinstance(key, NoiseKey) else int(key)
    specs = tuple((start, stop, SampleSpec(pattern, float(tau), float(kappa), philox_key,
                                           placement.resolve(stop - start, gpr), bool(hard)))
                  for start, stop, placement in segments)
    if main_grad is not None:
        # float64 buffers only for float64 logits (the reference path); kernels write the rest
        dtypes = (torch.float32, torch.bfloat16, torch.float16) + (
            (torch.float64,) if logits.dtype == torch.float64 else ())
        if (main_grad.shape != logits.shape or main_grad.device != logits.device
                or main_grad.dtype not in dtypes or not main_grad.is_contiguous()):
            raise ValueError(
                f"main_grad must be a contiguous float buffer shaped like the logits "
                f"{list(logits.shape)} on {logits.device}; got {main_grad.dtype} "
                f"{list(main_grad.shape)} on {main_grad.device} "
                f"(contiguous={main_grad.is_contiguous()})")
        if main_grad.requires_grad:
            raise ValueError("main_grad is a gradient buffer and must not require grad")
    chosen = select_backend(weight, logits, pattern, backend)
    return _GumbelMask.apply(logits, weight, specs, chosen, main_grad)


def hard_masked_weight(weight: torch.Tensor, logits: torch.Tensor,
                       pattern: NMPattern | tuple[int, int] | str) -> torch.Tensor:
    """Eval mode: ``W * mask`` of each group's argmax candidate, no noise (no logits gradient)."""
    pattern = as_pattern(pattern)
    check_logits(logits, pattern, weight_shape=weight.shape)
    return weight * hard_mask_from_logits(logits.detach(), pattern).to(weight.dtype)
