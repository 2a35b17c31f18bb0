"""Fused Triton kernels for the Gumbel mask sampler (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

One program handles ``BLOCK`` consecutive groups of a weight shard, one group per thread:

* forward reads the logits and the frozen weight, draws the noise with ``tl.philox`` (counter
  layout in ``noise.py``), and writes ``W * mask`` plus one partial sum of ``(W * mask)**2`` per
  program. Nothing is saved for backward but the key.
* backward recomputes the soft index from the same key and writes ``d logits`` (or adds it to
  the optimizer's ``main_grad`` buffer) and ``d W`` when asked, in one pass.

Layout: per-group values are ``[BLOCK]`` vectors, one element per thread, and the candidate
table is folded into the code. Rows are read and written as ``[BLOCK, width]`` tiles of at most
16 bytes, one vector access per thread, and split into columns in registers. No ``[BLOCK, C, M]``
products, no candidates padded to a power of two. Two schedules (``launch_config``):

* ``UNROLLED`` (2:4, 1:4): the ``C`` scores of a group stay in registers and the noise is drawn
  once per kernel; about 32 registers per thread, full occupancy (triton 3.9, sm_80/sm_90).
* streamed (2:8, 4:8 and any other pattern): a loop over blocks of four candidates (one Philox
  call each) with an online softmax, kept positions read from a ``[C]`` table of bit words;
  backward draws the noise a second time instead of holding ``C`` scores per thread. About 56
  registers at ``C = 70``, where scores in registers took 255 and spilled.

``triton_aot`` compiles every configuration the launcher can pick and checks registers/spills.

Compiled variants: every call-level value (sizes, offsets, the 64-bit key, ``kappa``, ``tau``,
the hard / weight-gradient / accumulate switches) is a typed argument Triton does not
specialise, and every buffer passed is 16-byte aligned (``_aligned``). A configuration (pattern,
weight dtype, gradient-target dtype) thus compiles once, not again for a new key or shard.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from maskllm_megatron.core.nm import NMPattern

try:  # triton is optional: GPU images and the dev extra have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ALIGN = 16  # bytes: pointers are specialised on it, so every buffer passed is aligned
INT32_MAX = 2**31 - 1
# Call-level arguments: typed by annotation, never specialised (no ==1, %16 or i32/i64 variants).
PER_CALL = ("n_groups", "gpr", "row_offset", "gcol_offset", "groups_per_row", "key", "kappa",
            "tau", "hard", "wgrad", "accumulate")
# GPU schedule per (N, M): (num_warps, scores held in registers); one group per thread.
SCHEDULES = {(2, 4): (4, True), (1, 4): (4, True), (2, 8): (4, False), (4, 8): (4, False)}
INTERPRET_BLOCK = 4096  # the interpreter runs programs one after another: few large ones


def available(device: torch.device | None = None) -> bool:
    if triton is None:
        return False
    if device is not None and device.type == "cpu":
        return INTERPRET
    return INTERPRET or torch.cuda.is_available()


def launch_config(pattern: NMPattern, interpret: bool = INTERPRET) -> dict:
    """Constexprs and launch options for a pattern: what the launcher passes and AOT compiles.
    Each rounding is its own operation (no FMA contraction), as in the PyTorch path."""
    num_warps, unrolled = SCHEDULES.get((pattern.n, pattern.m), (4, False))
    block = INTERPRET_BLOCK if interpret else 32 * num_warps
    return dict(N=pattern.n, M=pattern.m, UNROLLED=unrolled, BLOCK=block, num_warps=num_warps,
                enable_fp_fusion=False)


@functools.lru_cache(maxsize=64)
def candidate_words(pattern: NMPattern, device: torch.device) -> torch.Tensor:
    """``[C]`` int32, bit ``k`` of word ``c`` set when candidate ``c`` keeps position ``k``."""
    bits = pattern.candidates(torch.int32, device) << torch.arange(pattern.m, dtype=torch.int32,
                                                                   device=device)
    return bits.sum(1, dtype=torch.int32)


if triton is not None:

    @triton.constexpr_function
    def _num_candidates(n, m):
        return NMPattern(n, m).num_candidates

    @triton.constexpr_function
    def _keeps(n, m, c, k):
        """Whether candidate ``c`` of the n:m pattern keeps position ``k`` (``nm`` order)."""
        return k in NMPattern(n, m).candidate_positions()[c].tolist()

    @triton.constexpr_function
    def _width(count, bits):
        """Tile width for rows of ``count`` values: the most that fit 16 bytes and divide it."""
        width = 128 // bits
        while count % width:
            width //= 2
        return width

    @triton.constexpr_function
    def _block_width(count, bits):
        """Tile width within a block of four candidates: also divides four."""
        return _width(math.gcd(count, 4), bits)

    @triton.jit
    def _columns(tile, W: tl.constexpr):
        """The ``W`` columns of a ``[BLOCK, W]`` tile (a thread's own row: register moves)."""
        if W == 1:
            cols = (tl.reshape(tile, [tile.shape[0]]),)
        elif W == 2:
            a, b = tl.split(tile)
            cols = (a, b)
        elif W == 4:
            even, odd = tl.split(tl.reshape(tile, [tile.shape[0], 2, 2]))
            a, c = tl.split(even)
            b, d = tl.split(odd)
            cols = (a, b, c, d)
        else:
            tl.static_assert(W == 8)
            even, odd = tl.split(tl.reshape(tile, [tile.shape[0], 4, 2]))
            e = _columns(even, 4)
            o = _columns(odd, 4)
            cols = (e[0], o[0], e[1], o[1], e[2], o[2], e[3], o[3])
        return cols

    @triton.jit
    def _tile(cols, W: tl.constexpr):
        """Inverse of ``_columns``: the ``[BLOCK, W]`` tile of ``W`` columns."""
        if W == 1:
            tile = tl.reshape(cols[0], [cols[0].shape[0], 1])
        elif W == 2:
            tile = tl.join(cols[0], cols[1])
        elif W == 4:
            pairs = tl.join(tl.join(cols[0], cols[2]), tl.join(cols[1], cols[3]))
            tile = tl.reshape(pairs, [cols[0].shape[0], 4])
        else:
            tl.static_assert(W == 8)
            even = _tile((cols[0], cols[2], cols[4], cols[6]), 4)
            odd = _tile((cols[1], cols[3], cols[5], cols[7]), 4)
            tile = tl.reshape(tl.join(even, odd), [cols[0].shape[0], 8])
        return tile

    @triton.jit
    def _load_tile(ptr, g, gmask, start, COUNT: tl.constexpr, W: tl.constexpr):
        """Columns ``start .. start + W`` of rows ``g`` of a ``[*, COUNT]`` array, as fp32."""
        offs = g[:, None] * COUNT + (start + tl.arange(0, W))[None, :]
        return _columns(tl.load(ptr + offs, mask=gmask, other=0.0).to(tl.float32), W)

    @triton.jit
    def _store_tile(ptr, g, gmask, start, cols, accumulate, COUNT: tl.constexpr,
                    W: tl.constexpr):
        """Store (or with ``accumulate``, add to) columns ``start .. start + W``."""
        offs = g[:, None] * COUNT + (start + tl.arange(0, W))[None, :]
        tile = _tile(cols, W)
        if accumulate != 0:  # megatron's gradient-accumulation fusion: add into main_grad
            tile += tl.load(ptr + offs, mask=gmask, other=0.0).to(tl.float32)
        tl.store(ptr + offs, tile.to(ptr.dtype.element_ty), mask=gmask)

    @triton.jit
    def _load_rows(ptr, g, gmask, COUNT: tl.constexpr):
        """Rows ``g`` of a ``[*, COUNT]`` array as a tuple of ``COUNT`` fp32 columns."""
        W: tl.constexpr = _width(COUNT, ptr.dtype.element_ty.primitive_bitwidth)
        cols = ()
        for j in tl.static_range(COUNT // W):
            cols = cols + _load_tile(ptr, g, gmask[:, None], j * W, COUNT, W)
        return cols

    @triton.jit
    def _store_rows(ptr, g, gmask, cols, accumulate, COUNT: tl.constexpr):
        W: tl.constexpr = _width(COUNT, ptr.dtype.element_ty.primitive_bitwidth)
        for j in tl.static_range(COUNT // W):
            _store_tile(ptr, g, gmask[:, None], j * W, cols[j * W:(j + 1) * W], accumulate,
                        COUNT, W)

    @triton.jit
    def _philox_block(key, q, b):
        """The four Philox words of counter ``(q lo, q hi, b, 0)``: candidates ``4b .. 4b+3``."""
        q_lo = (q & 0xFFFFFFFF).to(tl.uint32)
        q_hi = (q >> 32).to(tl.uint32)
        zero = tl.zeros_like(q_lo)
        return tl.philox(key, q_lo, q_hi, zero + b, zero)

    @triton.jit
    def noise_bits_block(key, q, BLOCK: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr):
        """``[BLOCK, CP]`` uint32 words, column c = word c % 4 of counter block c // 4: the
        layout of ``noise.noise_bits``, to check the kernels' stream against the others."""
        cols = tl.arange(0, CP)
        bits = tl.zeros([BLOCK, CP], dtype=tl.uint32)
        for b in tl.static_range(NB):
            words = _philox_block(key, q, b)
            for i in tl.static_range(4):
                bits = tl.where((cols == 4 * b + i)[None, :], words[i][:, None], bits)
        return bits

    @triton.jit
    def _score(logit, bits, kappa, inv_tau):
        """``(kappa * logit + g) / tau`` with ``g = -log(-log(u))`` from the word's top 23 bits,
        rounded step by step as the C++ kernel and PyTorch on CUDA do (times ``1 / tau``)."""
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        return (kappa * logit - tl.log(-tl.log(u))) * inv_tau

    @triton.jit
    def _groups(n_groups, gpr, row_offset, gcol_offset, groups_per_row, BLOCK: tl.constexpr):
        """Local group index (int64, for addresses), its bound mask and its global index q."""
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row = g // gpr
        q = (row_offset + row).to(tl.int64) * groups_per_row + (gcol_offset + g - row * gpr)
        return g.to(tl.int64), g < n_groups, q

    # -- unrolled schedule: all C scores of a group in registers ----------------------------

    @triton.jit
    def _scores(logits_ptr, g, gmask, q, key, kappa, inv_tau, C: tl.constexpr):
        """The ``C`` scores of each group, a tuple."""
        logits = _load_rows(logits_ptr, g, gmask, C)
        zs = ()
        for b in tl.static_range((C + 3) // 4):
            words = _philox_block(key, q, b)
            for i in tl.static_range(4):
                if 4 * b + i < C:
                    zs = zs + (_score(logits[4 * b + i], words[i], kappa, inv_tau),)
        return zs

    @triton.jit
    def _unrolled_masks(zs, N: tl.constexpr, M: tl.constexpr):
        """``(soft mask, hard mask, softmax)``: ``softmax(z) @ candidates`` and the mask of
        the first highest-scoring candidate as ``M`` columns each, and ``softmax(z)``."""
        C: tl.constexpr = len(zs)
        top = zs[0]
        best = tl.zeros(top.shape, tl.int32)
        for c in tl.static_range(1, C):
            best = tl.where(zs[c] > top, c, best)
            top = tl.maximum(top, zs[c])
        es = ()
        total = tl.zeros_like(top)
        for c in tl.static_range(C):
            es = es + (tl.exp(zs[c] - top),)
            total += es[c]
        ys = ()
        for c in tl.static_range(C):
            ys = ys + (es[c] / total,)
        soft = ()
        hard = ()
        for k in tl.static_range(M):
            acc = tl.zeros_like(top)
            kept = tl.zeros_like(top)
            for c in tl.static_range(C):
                if _keeps(N, M, c, k):
                    acc += ys[c]
                    kept = tl.where(best == c, 1.0, kept)
            soft = soft + (acc,)
            hard = hard + (kept,)
        return soft, hard, ys

    # -- streamed schedule: blocks of four candidates, online softmax -----------------------

    @triton.jit
    def _block_scores(logits_ptr, g, gmask, q, key, kappa, inv_tau, b, C: tl.constexpr):
        """Scores of candidates ``4b .. 4b+3`` (``-inf`` past ``C``), ``b`` a loop index."""
        W: tl.constexpr = _block_width(C, 32)
        words = _philox_block(key, q, b)
        logits = ()
        for j in tl.static_range(4 // W):
            logits = logits + _load_tile(logits_ptr, g, gmask[:, None] & (4 * b + j * W < C),
                                         4 * b + j * W, C, W)
        zs = ()
        for i in tl.static_range(4):
            z = _score(logits[i], words[i], kappa, inv_tau)
            zs = zs + (tl.where(4 * b + i < C, z, float("-inf")),)
        return zs

    @triton.jit
    def _streamed_masks(logits_ptr, cand_ptr, g, gmask, q, key, kappa, inv_tau, C: tl.constexpr,
                        M: tl.constexpr):
        """One pass over the candidates: ``(soft mask, hard mask, max score, softmax sum)``."""
        top = tl.full(q.shape, float("-inf"), tl.float32)
        total = tl.zeros_like(top)
        acc = ()
        for _ in tl.static_range(M):
            acc = acc + (tl.zeros_like(top),)
        best = top
        word = tl.zeros(top.shape, tl.int32)
        for b in tl.range((C + 3) // 4):
            zs = _block_scores(logits_ptr, g, gmask, q, key, kappa, inv_tau, b, C)
            new_top = tl.maximum(tl.maximum(top, tl.maximum(zs[0], zs[1])),
                                 tl.maximum(zs[2], zs[3]))
            scale = tl.exp(top - new_top)
            total = total * scale
            scaled = ()
            for k in tl.static_range(M):
                scaled = scaled + (acc[k] * scale,)
            acc = scaled
            for i in tl.static_range(4):
                bits = tl.load(cand_ptr + 4 * b + i, mask=4 * b + i < C, other=0)
                e = tl.exp(zs[i] - new_top)
                total += e
                summed = ()
                for k in tl.static_range(M):
                    summed = summed + (tl.where((bits >> k) & 1 != 0, acc[k] + e, acc[k]),)
                acc = summed
                word = tl.where(zs[i] > best, bits, word)
                best = tl.maximum(best, zs[i])
            top = new_top
        soft = ()
        hard = ()
        for k in tl.static_range(M):
            soft = soft + (acc[k] / total,)
            hard = hard + (((word >> k) & 1).to(tl.float32),)
        return soft, hard, top, total

    # -- kernels -----------------------------------------------------------------------------

    @triton.jit(do_not_specialize=PER_CALL)
    def forward_kernel(w_ptr, logits_ptr, cand_ptr, out_ptr, reg_ptr, n_groups: tl.int32,
                        gpr: tl.int32, row_offset: tl.int32, gcol_offset: tl.int32,
                        groups_per_row: tl.int32, key: tl.int64, kappa: tl.float32,
                        tau: tl.float32, hard: tl.int32, N: tl.constexpr, M: tl.constexpr,
                        UNROLLED: tl.constexpr, BLOCK: tl.constexpr):
        C: tl.constexpr = _num_candidates(N, M)
        inv_tau = tl.math.div_rn(1.0, tau)
        g, gmask, q = _groups(n_groups, gpr, row_offset, gcol_offset, groups_per_row, BLOCK)
        if UNROLLED:
            zs = _scores(logits_ptr, g, gmask, q, key, kappa, inv_tau, C)
            soft, hard_mask, _ = _unrolled_masks(zs, N, M)
        else:
            soft, hard_mask, _, _ = _streamed_masks(logits_ptr, cand_ptr, g, gmask, q, key,
                                                    kappa, inv_tau, C, M)
        w = _load_rows(w_ptr, g, gmask, M)
        out = ()
        sq = tl.zeros_like(w[0])
        for k in tl.static_range(M):
            o = w[k] * tl.where(hard != 0, hard_mask[k], soft[k])
            out = out + (o,)
            sq += o * o
        _store_rows(out_ptr, g, gmask, out, 0, M)
        tl.store(reg_ptr + tl.program_id(0), tl.sum(sq, axis=0))

    @triton.jit(do_not_specialize=PER_CALL)
    def backward_kernel(grad_out_ptr, w_ptr, logits_ptr, cand_ptr, grad_reg_ptr,
                         grad_logits_ptr, grad_w_ptr, n_groups: tl.int32, gpr: tl.int32,
                         row_offset: tl.int32, gcol_offset: tl.int32, groups_per_row: tl.int32,
                         key: tl.int64, kappa: tl.float32, tau: tl.float32, hard: tl.int32,
                         wgrad: tl.int32, accumulate: tl.int32, N: tl.constexpr,
                         M: tl.constexpr, UNROLLED: tl.constexpr, BLOCK: tl.constexpr):
        C: tl.constexpr = _num_candidates(N, M)
        inv_tau = tl.math.div_rn(1.0, tau)
        g, gmask, q = _groups(n_groups, gpr, row_offset, gcol_offset, groups_per_row, BLOCK)
        if UNROLLED:
            zs = _scores(logits_ptr, g, gmask, q, key, kappa, inv_tau, C)
            soft, hard_mask, ys = _unrolled_masks(zs, N, M)
        else:
            soft, hard_mask, top, total = _streamed_masks(logits_ptr, cand_ptr, g, gmask, q, key,
                                                          kappa, inv_tau, C, M)
        w = _load_rows(w_ptr, g, gmask, M)
        go = _load_rows(grad_out_ptr, g, gmask, M)
        greg = tl.load(grad_reg_ptr)
        d_mask = ()
        d_w = ()
        dot = tl.zeros_like(w[0])  # sum_c y_c d_y_c = sum_k soft_k d_mask_k
        for k in tl.static_range(M):
            mask = tl.where(hard != 0, hard_mask[k], soft[k])
            d_mask = d_mask + (go[k] * w[k] + 2.0 * greg * w[k] * w[k] * mask,)
            d_w = d_w + (go[k] * mask,)  # the regulariser acts on W.detach(): no W term
            dot += soft[k] * d_mask[k]
        if wgrad != 0:
            _store_rows(grad_w_ptr, g, gmask, d_w, 0, M)
        scale = tl.math.div_rn(kappa, tau)
        if UNROLLED:
            d_logits = ()
            for c in tl.static_range(C):
                d_y = tl.zeros_like(dot)
                for k in tl.static_range(M):
                    if _keeps(N, M, c, k):
                        d_y += d_mask[k]
                d_logits = d_logits + (scale * (ys[c] * (d_y - dot)),)
            _store_rows(grad_logits_ptr, g, gmask, d_logits, accumulate, C)
        else:  # draw the block's noise again: y_c from the max and sum of the first pass
            W: tl.constexpr = _block_width(C, grad_logits_ptr.dtype.element_ty.primitive_bitwidth)
            for b in tl.range((C + 3) // 4):
                zs = _block_scores(logits_ptr, g, gmask, q, key, kappa, inv_tau, b, C)
                d_logits = ()
                for i in tl.static_range(4):
                    bits = tl.load(cand_ptr + 4 * b + i, mask=4 * b + i < C, other=0)
                    d_y = tl.zeros_like(dot)
                    for k in tl.static_range(M):
                        d_y = tl.where((bits >> k) & 1 != 0, d_y + d_mask[k], d_y)
                    y = tl.exp(zs[i] - top) / total
                    d_logits = d_logits + (scale * (y * (d_y - dot)),)
                for j in tl.static_range(4 // W):
                    _store_tile(grad_logits_ptr, g, gmask[:, None] & (4 * b + j * W < C),
                                4 * b + j * W, d_logits[j * W:(j + 1) * W], accumulate, C, W)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 16-byte aligned address (a copy only for odd views)."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def as_int64(key: int) -> int:
    """A 64-bit Philox key as the int64 with the same bits: how the kernels take it."""
    return key - 2**64 if key >= 2**63 else key


def _scalars(weight: torch.Tensor, spec, block: int) -> tuple:
    p, shard = spec.pattern, spec.shard
    n_groups = weight.numel() // p.m
    ints = (n_groups, weight.shape[1] // p.m, shard.row_offset, shard.group_col_offset,
            shard.groups_per_row)
    if n_groups + block > INT32_MAX or max(ints) > INT32_MAX:
        raise ValueError("the Triton sampler indexes a shard's groups with 32-bit integers")
    return (*ints, as_int64(spec.key), float(spec.kappa), float(spec.tau), int(bool(spec.hard)))


def forward_launch(weight: torch.Tensor, logits: torch.Tensor, spec):
    """``(grid, args, meta, out, partials)`` of a forward call: what ``forward`` launches and
    ``triton_aot`` binds to find the compiled variant."""
    weight, logits = _aligned(weight), _aligned(logits.float())
    meta = launch_config(spec.pattern)
    grid = (triton.cdiv(weight.numel() // spec.pattern.m, meta["BLOCK"]),)
    out = torch.empty_like(weight)
    partials = torch.empty(grid[0], dtype=torch.float32, device=weight.device)
    cand = candidate_words(spec.pattern, weight.device)
    args = (weight, logits, cand, out, partials, *_scalars(weight, spec, meta["BLOCK"]))
    return grid, args, meta, out, partials


def backward_launch(grad_out, grad_reg, weight, logits, spec, need_weight_grad: bool,
                    into=None):
    """``(grid, args, meta, target, grad_weight, staged)`` of a backward call; ``staged`` is
    an aligned copy of ``into`` to copy back when ``into`` is a misaligned view, else None."""
    weight, logits = _aligned(weight), _aligned(logits.float())
    grad_out = _aligned(grad_out.to(weight.dtype))
    if into is not None and not into.is_contiguous():
        raise ValueError("the Triton sampler accumulates into contiguous buffers only")
    staged = None
    if into is None:
        target = torch.empty_like(logits)
    elif into.data_ptr() % ALIGN:
        target = staged = into.clone()
    else:
        target = into
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    if grad_reg is None:
        grad_reg = torch.zeros((), dtype=torch.float32, device=weight.device)
    grad_reg = _aligned(grad_reg.reshape(1).float())
    meta = launch_config(spec.pattern)
    grid = (triton.cdiv(weight.numel() // spec.pattern.m, meta["BLOCK"]),)
    # no weight gradient: an empty buffer of the weight's dtype keeps the same variant
    dummy = grad_weight if grad_weight is not None else weight.new_empty(0)
    args = (grad_out, weight, logits, candidate_words(spec.pattern, weight.device), grad_reg,
            target, dummy, *_scalars(weight, spec, meta["BLOCK"]), int(need_weight_grad),
            int(into is not None))
    return grid, args, meta, target, grad_weight, staged


def forward(weight: torch.Tensor, logits: torch.Tensor, spec):
    grid, args, meta, out, partials = forward_launch(weight, logits, spec)
    forward_kernel[grid](*args, **meta)
    return out, partials.double().sum().float()


def backward(grad_out, grad_reg, weight, logits, spec, need_weight_grad: bool, into=None):
    """``(d logits, d weight or None)``; with ``into`` the logits gradient is added to that
    contiguous buffer (any float dtype) in the same pass and ``None`` is returned for it."""
    grid, args, meta, target, grad_weight, staged = backward_launch(
        grad_out, grad_reg, weight, logits, spec, need_weight_grad, into)
    backward_kernel[grid](*args, **meta)
    if staged is not None:
        into.copy_(staged)
    return (None if into is not None else target), grad_weight
