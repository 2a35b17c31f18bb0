"""Fused Triton kernels for the Gumbel mask sampler (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

One program handles ``BLOCK`` consecutive groups of a weight shard:

* forward reads the logits ``[BLOCK, C]`` and the frozen weight ``[BLOCK, M]``, draws the noise
  with ``tl.philox`` (counter layout in ``noise.py``), and writes ``W * mask`` plus one partial
  sum of ``(W * mask)**2`` per program. Nothing is saved for backward but the key.
* backward recomputes the soft index from the same key and writes ``d logits`` (or adds it to
  the optimizer's ``main_grad`` buffer) and ``d W`` when asked, in one pass.

Bytes moved per call are what the weight, logits and outputs occupy; see ``bench/`` for the
floor this implies on an H100.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: GPU images and the dev extra have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | None = None) -> bool:
    if triton is None:
        return False
    if device is not None and device.type == "cpu":
        return INTERPRET
    return INTERPRET or torch.cuda.is_available()


def _block_size(cp: int, mp: int) -> int:
    # The interpreter runs programs one after another (numpy inside): few large blocks are fast.
    budget = (1 << 17) if INTERPRET else 8192
    return max(16, min(4096, triton.next_power_of_2(max(1, budget // (cp * mp)))))


if triton is not None:

    @triton.jit
    def _noise_bits(key, q, BLOCK: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr):
        """``[BLOCK, CP]`` uint32 Philox words: column c is word c % 4 of counter block c // 4."""
        cols = tl.arange(0, CP)
        lane = cols % 4
        q_lo = (q & 0xFFFFFFFF).to(tl.uint32)
        q_hi = (q >> 32).to(tl.uint32)
        zero = tl.zeros([BLOCK], dtype=tl.uint32)
        bits = tl.zeros([BLOCK, CP], dtype=tl.uint32)
        for b in tl.static_range(NB):
            r0, r1, r2, r3 = tl.philox(key, q_lo, q_hi, zero + b, zero)
            word = tl.where(lane[None, :] == 0, r0[:, None],
                            tl.where(lane[None, :] == 1, r1[:, None],
                                     tl.where(lane[None, :] == 2, r2[:, None], r3[:, None])))
            bits = tl.where((cols // 4 == b)[None, :], word, bits)
        return bits

    @triton.jit
    def _soft_index(logits_ptr, g, gmask, key, gpr, row_offset, gcol_offset, groups_per_row,
                    kappa, tau, C: tl.constexpr, BLOCK: tl.constexpr, CP: tl.constexpr,
                    NB: tl.constexpr):
        """Soft index ``y`` ``[BLOCK, CP]`` (zero in padding) and the argmax candidate."""
        q = (row_offset + g // gpr) * groups_per_row + gcol_offset + g % gpr
        cols = tl.arange(0, CP)
        cmask = cols < C
        logit = tl.load(logits_ptr + g[:, None] * C + cols[None, :],
                        mask=gmask[:, None] & cmask[None, :], other=0.0)
        bits = _noise_bits(key, q, BLOCK, CP, NB)
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        z = (kappa * logit - tl.log(-tl.log(u))) / tau
        z = tl.where(cmask[None, :], z, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        y = e / tl.sum(e, axis=1)[:, None]
        return y, tl.argmax(z, axis=1)

    @triton.jit
    def _group_mask(y, idx, cand, CP: tl.constexpr, HARD: tl.constexpr):
        if HARD:
            cols = tl.arange(0, CP)
            sel = tl.where(cols[None, :] == idx[:, None], 1.0, 0.0)
        else:
            sel = y
        return tl.sum(sel[:, :, None] * cand[None, :, :], axis=1)

    @triton.jit
    def _load_candidates(cand_ptr, C: tl.constexpr, M: tl.constexpr, CP: tl.constexpr,
                         MP: tl.constexpr):
        cols = tl.arange(0, CP)
        kk = tl.arange(0, MP)
        return tl.load(cand_ptr + cols[:, None] * M + kk[None, :],
                       mask=(cols[:, None] < C) & (kk[None, :] < M), other=0.0)

    @triton.jit
    def _forward_kernel(w_ptr, logits_ptr, cand_ptr, out_ptr, reg_ptr, n_groups, gpr, row_offset,
                        gcol_offset, groups_per_row, key, kappa, tau, C: tl.constexpr,
                        M: tl.constexpr, CP: tl.constexpr, MP: tl.constexpr, NB: tl.constexpr,
                        HARD: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        g = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        gmask = g < n_groups
        y, idx = _soft_index(logits_ptr, g, gmask, key, gpr, row_offset, gcol_offset,
                             groups_per_row, kappa, tau, C, BLOCK, CP, NB)
        mask = _group_mask(y, idx, _load_candidates(cand_ptr, C, M, CP, MP), CP, HARD)
        kk = tl.arange(0, MP)
        offs = g[:, None] * M + kk[None, :]
        wmask = gmask[:, None] & (kk[None, :] < M)
        w = tl.load(w_ptr + offs, mask=wmask, other=0.0).to(tl.float32)
        out = w * mask
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=wmask)
        tl.store(reg_ptr + pid, tl.sum(tl.sum(out * out, axis=1), axis=0))

    @triton.jit
    def _backward_kernel(grad_out_ptr, w_ptr, logits_ptr, cand_ptr, grad_reg_ptr,
                         grad_logits_ptr, grad_w_ptr, n_groups, gpr, row_offset, gcol_offset,
                         groups_per_row, key, kappa, tau, C: tl.constexpr, M: tl.constexpr,
                         CP: tl.constexpr, MP: tl.constexpr, NB: tl.constexpr,
                         HARD: tl.constexpr, WGRAD: tl.constexpr, ACCUMULATE: tl.constexpr,
                         BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        g = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        gmask = g < n_groups
        y, idx = _soft_index(logits_ptr, g, gmask, key, gpr, row_offset, gcol_offset,
                             groups_per_row, kappa, tau, C, BLOCK, CP, NB)
        cand = _load_candidates(cand_ptr, C, M, CP, MP)
        mask = _group_mask(y, idx, cand, CP, HARD)
        kk = tl.arange(0, MP)
        offs = g[:, None] * M + kk[None, :]
        wmask = gmask[:, None] & (kk[None, :] < M)
        w = tl.load(w_ptr + offs, mask=wmask, other=0.0).to(tl.float32)
        go = tl.load(grad_out_ptr + offs, mask=wmask, other=0.0).to(tl.float32)
        greg = tl.load(grad_reg_ptr)
        d_mask = go * w + 2.0 * greg * w * w * mask
        if WGRAD:
            d_w = go * mask + 2.0 * greg * w * mask * mask
            tl.store(grad_w_ptr + offs, d_w.to(grad_w_ptr.dtype.element_ty), mask=wmask)
        d_y = tl.sum(d_mask[:, None, :] * cand[None, :, :], axis=2)
        d_z = y * (d_y - tl.sum(y * d_y, axis=1)[:, None])
        cols = tl.arange(0, CP)
        gl_offs = g[:, None] * C + cols[None, :]
        gl_mask = gmask[:, None] & (cols[None, :] < C)
        d_logits = (kappa / tau) * d_z
        if ACCUMULATE:  # megatron's gradient-accumulation fusion: add into main_grad
            d_logits += tl.load(grad_logits_ptr + gl_offs, mask=gl_mask, other=0.0).to(tl.float32)
        tl.store(grad_logits_ptr + gl_offs, d_logits.to(grad_logits_ptr.dtype.element_ty),
                 mask=gl_mask)


def _launch_meta(weight, spec):
    p = spec.pattern
    c = p.num_candidates
    cp, mp = triton.next_power_of_2(c), triton.next_power_of_2(p.m)
    n_groups = weight.numel() // p.m
    block = _block_size(cp, mp)
    grid = (triton.cdiv(n_groups, block),)
    meta = dict(C=c, M=p.m, CP=cp, MP=mp, NB=triton.cdiv(c, 4), HARD=bool(spec.hard), BLOCK=block)
    scalars = (n_groups, weight.shape[1] // p.m, spec.shard.row_offset,
               spec.shard.group_col_offset, spec.shard.groups_per_row, spec.key,
               float(spec.kappa), float(spec.tau))
    return grid, meta, scalars


def forward(weight: torch.Tensor, logits: torch.Tensor, spec):
    weight, logits = weight.contiguous(), logits.contiguous().float()
    grid, meta, scalars = _launch_meta(weight, spec)
    out = torch.empty_like(weight)
    partials = torch.empty(grid[0], dtype=torch.float32, device=weight.device)
    cand = spec.pattern.candidates(torch.float32, weight.device)
    _forward_kernel[grid](weight, logits, cand, out, partials, *scalars, **meta)
    return out, partials.double().sum().float()


def backward(grad_out, grad_reg, weight, logits, spec, need_weight_grad: bool, into=None):
    """``(d logits, d weight or None)``; with ``into`` the logits gradient is added to that
    contiguous buffer (any float dtype) in the same pass and ``None`` is returned for it."""
    weight, logits = weight.contiguous(), logits.contiguous().float()
    grad_out = grad_out.to(weight.dtype).contiguous()
    grid, meta, scalars = _launch_meta(weight, spec)
    if into is not None and not into.is_contiguous():
        raise ValueError("the Triton sampler accumulates into contiguous buffers only")
    target = torch.empty_like(logits) if into is None else into
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    if grad_reg is None:
        grad_reg = torch.zeros((), dtype=torch.float32, device=weight.device)
    grad_reg = grad_reg.reshape(1).float()
    cand = spec.pattern.candidates(torch.float32, weight.device)
    _backward_kernel[grid](grad_out, weight, logits, cand, grad_reg, target,
                           grad_weight if grad_weight is not None else target, *scalars,
                           WGRAD=need_weight_grad, ACCUMULATE=into is not None, **meta)
    return (None if into is not None else target), grad_weight
