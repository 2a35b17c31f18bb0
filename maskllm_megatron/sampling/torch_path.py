"""The sampler in PyTorch operations: the readable definition, the float64 path, the fallback.

Works on any device and dtype. Rows are processed in chunks of about ``CHUNK_GROUPS`` groups so
that temporaries (noise, soft index) stay bounded whatever the layer size; nothing but the
inputs is kept for backward, which recomputes the soft index from the same noise keys.
Computation runs in float64 when the logits are float64 (gradcheck, references), else float32.
"""

from __future__ import annotations

import torch

from maskllm_megatron.sampling.noise import gumbel_noise

CHUNK_GROUPS = 1 << 15


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, groups_per_row: int):
    step = max(1, CHUNK_GROUPS // max(1, groups_per_row))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def soft_index(logits: torch.Tensor, spec, row_start: int, row_stop: int):
    """``(y, idx)`` for local rows ``[row_start, row_stop)``: ``y = softmax((kappa*l + g)/tau)``
    as ``[rows, G, C]`` in the compute dtype, and the argmax candidate ``[rows, G]``."""
    dtype = _compute_dtype(logits)
    rows, gpr, c = row_stop - row_start, logits.shape[1], logits.shape[2]
    groups = spec.shard.global_indices(row_start, row_stop, gpr, device=logits.device)
    g = gumbel_noise(spec.key, groups, c, dtype).reshape(rows, gpr, c)
    z = (spec.kappa * logits[row_start:row_stop].to(dtype) + g) / spec.tau
    return torch.softmax(z, dim=-1), z.argmax(-1)


def _group_mask(y, idx, candidates, hard: bool):
    if hard:
        return candidates[idx]
    return (y.unsqueeze(-1) * candidates).sum(-2)


def forward(weight: torch.Tensor, logits: torch.Tensor, spec):
    """``(W * mask, sum((W * mask)**2))``; ``W * mask`` in the weight's dtype."""
    dtype = _compute_dtype(logits)
    candidates = spec.pattern.candidates(dtype, weight.device)
    out = torch.empty_like(weight)
    reg = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start, stop in _row_chunks(weight.shape[0], logits.shape[1]):
        y, idx = soft_index(logits, spec, start, stop)
        mask = _group_mask(y, idx, candidates, spec.hard)
        w = weight[start:stop].to(dtype).reshape(mask.shape)
        masked = w * mask
        out[start:stop] = masked.reshape(stop - start, -1).to(weight.dtype)
        reg += masked.double().square().sum()
        del y, idx, mask, w, masked
    return out, reg.to(dtype if dtype == torch.float64 else torch.float32)


def backward(grad_out, grad_reg, weight, logits, spec, need_weight_grad: bool, into=None):
    """``(d logits, d weight or None)`` given ``d(W * mask)`` and ``d reg`` (scalar or None).

    With ``into`` (a buffer shaped like the logits) the logits gradient is added to it chunk by
    chunk instead, and ``None`` is returned for it."""
    dtype = _compute_dtype(logits)
    candidates = spec.pattern.candidates(dtype, weight.device)
    scale = spec.kappa / spec.tau
    greg = 0.0 if grad_reg is None else grad_reg.to(dtype)
    grad_logits = torch.empty_like(logits) if into is None else None
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    for start, stop in _row_chunks(weight.shape[0], logits.shape[1]):
        y, idx = soft_index(logits, spec, start, stop)
        mask = _group_mask(y, idx, candidates, spec.hard)
        w = weight[start:stop].to(dtype).reshape(mask.shape)
        go = grad_out[start:stop].to(dtype).reshape(mask.shape)
        d_mask = go * w + 2 * greg * w * w * mask
        if grad_weight is not None:
            d_w = go * mask  # the regulariser acts on W.detach() (the paper's): no W term
            grad_weight[start:stop] = d_w.reshape(stop - start, -1).to(weight.dtype)
        d_y = (d_mask.unsqueeze(-2) * candidates).sum(-1)  # [rows, G, C]
        d_z = y * (d_y - (y * d_y).sum(-1, keepdim=True))
        d_logits = (scale * d_z).to(logits.dtype)
        if into is None:
            grad_logits[start:stop] = d_logits
        else:
            into[start:stop].add_(d_logits)
    return grad_logits, grad_weight
