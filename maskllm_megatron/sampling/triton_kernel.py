"""Fused Triton kernels for the Gumbel mask sampler (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

One program handles ``BLOCK`` consecutive groups of a weight shard, one group per thread:

* forward reads the logits and the frozen weight, draws the noise with ``tl.philox`` (counter
  layout in ``noise.py``), and writes ``W * mask`` plus one partial sum of ``(W * mask)**2`` per
  program. Nothing is saved for backward but the key.
* backward recomputes the soft index from the same key and writes ``d logits`` (or adds it to
  the optimizer's ``main_grad`` buffer) and ``d W`` when asked, in one pass.

Layout: every per-group quantity is a ``[BLOCK]`` vector and the ``C`` candidates are unrolled at
compile time, with the candidate table folded into the code (``_keeps``). Rows are loaded and
stored as ``[BLOCK, width]`` tiles of at most 16 bytes (one vector access per thread) and split
into columns in registers. So a thread holds one group's ``C`` scores and ``M`` weights, not the
``[BLOCK, C, M]`` products of a matrix formulation nor candidates padded to a power of two: the
2:4 kernels fit in 64 registers (50% occupancy on sm_80/sm_90) and 4:8 (``C = 70``) does not
spill. ``triton_aot`` compiles every configuration ``launch_config`` can return and checks this.

Compiled variants: each call-level value (sizes, offsets, the 64-bit key, ``kappa``, ``tau``
and the hard / weight-gradient / accumulate switches) is a typed, unspecialised argument, and
every buffer is 16-byte aligned (``_aligned``). So a configuration -- the pattern and the
weight, gradient-target dtypes -- compiles once, never again mid-training for a new key or shard.
"""

from __future__ import annotations

import os

import torch

from ..nm import NMPattern

try:  # triton is optional: GPU images and the dev extra have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ALIGN = 16  # bytes; pointers are specialised on it, so every buffer passed is aligned
INT32_MAX = 2**31 - 1
# Call-level arguments, never specialised (typed by annotation, no ==1 or %16 variants).
PER_CALL = ("n_groups", "gpr", "row_offset", "gcol_offset", "groups_per_row", "key", "kappa",
            "tau", "hard", "wgrad", "accumulate")
# GPU launch configuration per (N, M): (num_warps, ); one group per thread, BLOCK = 32 * warps.
NUM_WARPS = {(2, 4): 4, (1, 4): 4, (2, 8): 4, (4, 8): 4}
INTERPRET_BLOCK = 4096  # the interpreter runs programs one after another: few large ones


def available(device: torch.device | None = None) -> bool:
    if triton is None:
        return False
    if device is not None and device.type == "cpu":
        return INTERPRET
    return INTERPRET or torch.cuda.is_available()


def launch_config(pattern: NMPattern, interpret: bool = INTERPRET) -> dict:
    """Block size and launch options for a pattern: what the launcher uses and AOT compiles."""
    num_warps = NUM_WARPS.get((pattern.n, pattern.m), 4)
    block = INTERPRET_BLOCK if interpret else 32 * num_warps
    return dict(N=pattern.n, M=pattern.m, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)


if triton is not None:

    @triton.constexpr_function
    def _num_candidates(n, m):
        return NMPattern(n, m).num_candidates

    @triton.constexpr_function
    def _candidate_word(n, m, c):
        """Bit ``k`` set when candidate ``c`` of the n:m pattern keeps position ``k``."""
        return sum(1 << k for k in NMPattern(n, m).candidate_positions()[c].tolist())

    @triton.constexpr_function
    def _keeps(n, m, c, k):
        return bool(_candidate_word(n, m, c) >> k & 1)

    @triton.constexpr_function
    def _width(count, bits):
        """Columns per tile: the largest power of two <= 16 bytes that divides ``count``."""
        width = 128 // bits
        while count % width:
            width //= 2
        return width

    @triton.jit
    def _columns(tile, W: tl.constexpr):
        """The ``W`` columns of a ``[BLOCK, W]`` tile (one thread's row: register moves)."""
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
            e0, e1 = tl.split(tl.reshape(even, [tile.shape[0], 2, 2]))
            o0, o1 = tl.split(tl.reshape(odd, [tile.shape[0], 2, 2]))
            a, e = tl.split(e0)
            c, g = tl.split(e1)
            b, f = tl.split(o0)
            d, h = tl.split(o1)
            cols = (a, b, c, d, e, f, g, h)
        return cols

    @triton.jit
    def _tile(cols, W: tl.constexpr):
        """Inverse of ``_columns``: ``[BLOCK, W]`` from ``W`` columns."""
        if W == 1:
            tile = tl.reshape(cols[0], [cols[0].shape[0], 1])
        elif W == 2:
            tile = tl.join(cols[0], cols[1])
        elif W == 4:
            pairs = tl.join(tl.join(cols[0], cols[2]), tl.join(cols[1], cols[3]))
            tile = tl.reshape(pairs, [cols[0].shape[0], 4])
        else:
            tl.static_assert(W == 8)
            even = tl.join(tl.join(cols[0], cols[4]), tl.join(cols[2], cols[6]))
            odd = tl.join(tl.join(cols[1], cols[5]), tl.join(cols[3], cols[7]))
            tile = tl.reshape(tl.join(tl.reshape(even, [cols[0].shape[0], 4]),
                                      tl.reshape(odd, [cols[0].shape[0], 4])),
                              [cols[0].shape[0], 8])
        return tile

    @triton.jit
    def _load_rows(ptr, g, gmask, COUNT: tl.constexpr):
        """Rows ``g`` of a ``[*, COUNT]`` array as ``COUNT`` fp32 columns."""
        W: tl.constexpr = _width(COUNT, ptr.dtype.element_ty.primitive_bitwidth)
        cols = ()
        for j in tl.static_range(COUNT // W):
            offs = g[:, None] * COUNT + (j * W + tl.arange(0, W))[None, :]
            tile = tl.load(ptr + offs, mask=gmask[:, None], other=0.0).to(tl.float32)
            cols = cols + _columns(tile, W)
        return cols

    @triton.jit
    def _store_rows(ptr, g, gmask, cols, COUNT: tl.constexpr):
        W: tl.constexpr = _width(COUNT, ptr.dtype.element_ty.primitive_bitwidth)
        for j in tl.static_range(COUNT // W):
            offs = g[:, None] * COUNT + (j * W + tl.arange(0, W))[None, :]
            tile = _tile(cols[j * W:(j + 1) * W], W)
            tl.store(ptr + offs, tile.to(ptr.dtype.element_ty), mask=gmask[:, None])

    @triton.jit
    def _philox_block(key, q, b):
        """The four Philox words of counter ``(q lo, q hi, b, 0)``: candidates ``4b .. 4b+3``."""
        q_lo = (q & 0xFFFFFFFF).to(tl.uint32)
        q_hi = (q >> 32).to(tl.uint32)
        zero = tl.zeros_like(q_lo)
        return tl.philox(key, q_lo, q_hi, zero + b, zero)

    @triton.jit
    def _noise_bits(key, q, BLOCK: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr):
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
    def _groups(n_groups, gpr, row_offset, gcol_offset, groups_per_row, BLOCK: tl.constexpr):
        """Local group index (int64, for addresses), its bound mask and its global index q."""
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row = g // gpr
        q = (row_offset + row).to(tl.int64) * groups_per_row + (gcol_offset + g - row * gpr)
        return g.to(tl.int64), g < n_groups, q

    @triton.jit
    def _scores(logits_ptr, g, gmask, q, key, kappa, tau, C: tl.constexpr):
        """``z_c = (kappa * logit_c + gumbel_c) / tau`` for every candidate, a tuple of ``C``."""
        logits = _load_rows(logits_ptr, g, gmask, C)
        zs = ()
        for b in tl.static_range((C + 3) // 4):
            words = _philox_block(key, q, b)
            for i in tl.static_range(4):
                if 4 * b + i < C:
                    u = ((words[i] >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
                    zs = zs + (tl.math.div_rn(kappa * logits[4 * b + i] - tl.log(-tl.log(u)), tau),)
        return zs

    @triton.jit
    def _argmax_mask(zs, N: tl.constexpr, M: tl.constexpr):
        """Hard mask of the first highest-scoring candidate, ``M`` fp32 columns."""
        best = zs[0]
        word = tl.full(best.shape, _candidate_word(N, M, 0), tl.int32)
        for c in tl.static_range(1, len(zs)):
            take = zs[c] > best
            best = tl.where(take, zs[c], best)
            word = tl.where(take, _candidate_word(N, M, c), word)
        mask = ()
        for k in tl.static_range(M):
            mask = mask + (((word >> k) & 1).to(tl.float32),)
        return mask

    @triton.jit
    def _softmax(zs):
        top = zs[0]
        for c in tl.static_range(1, len(zs)):
            top = tl.maximum(top, zs[c])
        es = ()
        total = tl.zeros_like(top)
        for c in tl.static_range(len(zs)):
            e = tl.exp(zs[c] - top)
            es = es + (e,)
            total += e
        ys = ()
        for c in tl.static_range(len(zs)):
            ys = ys + (es[c] / total,)
        return ys

    @triton.jit
    def _soft_mask(ys, N: tl.constexpr, M: tl.constexpr):
        """``y @ candidates`` as ``M`` columns: the sum of ``y_c`` over candidates keeping k."""
        mask = ()
        for k in tl.static_range(M):
            acc = tl.zeros_like(ys[0])
            for c in tl.static_range(len(ys)):
                if _keeps(N, M, c, k):
                    acc += ys[c]
            mask = mask + (acc,)
        return mask

    @triton.jit(do_not_specialize=PER_CALL)
    def _forward_kernel(w_ptr, logits_ptr, out_ptr, reg_ptr, n_groups: tl.int32, gpr: tl.int32,
                        row_offset: tl.int32, gcol_offset: tl.int32, groups_per_row: tl.int32,
                        key: tl.int64, kappa: tl.float32, tau: tl.float32, hard: tl.int32,
                        N: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr):
        C: tl.constexpr = _num_candidates(N, M)
        g, gmask, q = _groups(n_groups, gpr, row_offset, gcol_offset, groups_per_row, BLOCK)
        zs = _scores(logits_ptr, g, gmask, q, key, kappa, tau, C)
        if hard != 0:
            mask = _argmax_mask(zs, N, M)
        else:
            mask = _soft_mask(_softmax(zs), N, M)
        w = _load_rows(w_ptr, g, gmask, M)
        out = ()
        sq = tl.zeros_like(w[0])
        for k in tl.static_range(M):
            o = w[k] * mask[k]
            out = out + (o,)
            sq += o * o
        _store_rows(out_ptr, g, gmask, out, M)
        tl.store(reg_ptr + tl.program_id(0), tl.sum(sq, axis=0))

    @triton.jit(do_not_specialize=PER_CALL)
    def _backward_kernel(grad_out_ptr, w_ptr, logits_ptr, grad_reg_ptr, grad_logits_ptr,
                         grad_w_ptr, n_groups: tl.int32, gpr: tl.int32, row_offset: tl.int32,
                         gcol_offset: tl.int32, groups_per_row: tl.int32, key: tl.int64,
                         kappa: tl.float32, tau: tl.float32, hard: tl.int32, wgrad: tl.int32,
                         accumulate: tl.int32, N: tl.constexpr, M: tl.constexpr,
                         BLOCK: tl.constexpr):
        C: tl.constexpr = _num_candidates(N, M)
        g, gmask, q = _groups(n_groups, gpr, row_offset, gcol_offset, groups_per_row, BLOCK)
        zs = _scores(logits_ptr, g, gmask, q, key, kappa, tau, C)
        ys = _softmax(zs)
        if hard != 0:
            mask = _argmax_mask(zs, N, M)
        else:
            mask = _soft_mask(ys, N, M)
        w = _load_rows(w_ptr, g, gmask, M)
        go = _load_rows(grad_out_ptr, g, gmask, M)
        greg = tl.load(grad_reg_ptr)
        d_mask = ()
        for k in tl.static_range(M):
            d_mask = d_mask + (go[k] * w[k] + 2.0 * greg * w[k] * w[k] * mask[k],)
        if wgrad != 0:
            d_w = ()
            for k in tl.static_range(M):
                d_w = d_w + (go[k] * mask[k] + 2.0 * greg * w[k] * mask[k] * mask[k],)
            _store_rows(grad_w_ptr, g, gmask, d_w, M)
        d_y = ()
        dot = tl.zeros_like(ys[0])
        for c in tl.static_range(C):
            acc = tl.zeros_like(ys[0])
            for k in tl.static_range(M):
                if _keeps(N, M, c, k):
                    acc += d_mask[k]
            d_y = d_y + (acc,)
            dot += ys[c] * acc
        d_logits = ()
        for c in tl.static_range(C):
            d_logits = d_logits + ((kappa / tau) * (ys[c] * (d_y[c] - dot)),)
        if accumulate != 0:  # megatron's gradient-accumulation fusion: add into main_grad
            before = _load_rows(grad_logits_ptr, g, gmask, C)
            summed = ()
            for c in tl.static_range(C):
                summed = summed + (d_logits[c] + before[c],)
            d_logits = summed
        _store_rows(grad_logits_ptr, g, gmask, d_logits, C)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 16-byte aligned address (a copy only for odd views)."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _scalars(weight: torch.Tensor, spec) -> tuple:
    p, shard = spec.pattern, spec.shard
    n_groups = weight.numel() // p.m
    ints = (n_groups, weight.shape[1] // p.m, shard.row_offset, shard.group_col_offset,
            shard.groups_per_row)
    block = launch_config(p)["BLOCK"]
    if n_groups + block > INT32_MAX or max(ints) > INT32_MAX:
        raise ValueError("the Triton sampler indexes a shard's groups with 32-bit integers")
    key = spec.key - 2**64 if spec.key >= 2**63 else spec.key  # the same 64 bits, as int64
    return (*ints, key, float(spec.kappa), float(spec.tau), int(bool(spec.hard)))


def forward_launch(weight: torch.Tensor, logits: torch.Tensor, spec):
    """``(grid, args, meta, out, partials)`` of one forward call: what ``forward`` launches and
    what ``triton_aot`` binds to find the compiled variant."""
    weight, logits = _aligned(weight), _aligned(logits.float())
    meta = launch_config(spec.pattern)
    grid = (triton.cdiv(weight.numel() // spec.pattern.m, meta["BLOCK"]),)
    out = torch.empty_like(weight)
    partials = torch.empty(grid[0], dtype=torch.float32, device=weight.device)
    return grid, (weight, logits, out, partials, *_scalars(weight, spec)), meta, out, partials


def backward_launch(grad_out, grad_reg, weight, logits, spec, need_weight_grad: bool,
                    into=None):
    """``(grid, args, meta, target, grad_weight, staged)`` of one backward call; ``staged`` is
    an aligned copy of ``into`` to copy back (``into`` is a misaligned view), else ``None``."""
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
    # without a weight gradient an empty buffer of the weight's dtype keeps the variant
    dummy = grad_weight if grad_weight is not None else weight.new_empty(0)
    args = (grad_out, weight, logits, grad_reg, target, dummy, *_scalars(weight, spec),
            int(need_weight_grad), int(into is not None))
    return grid, args, meta, target, grad_weight, staged


def forward(weight: torch.Tensor, logits: torch.Tensor, spec):
    grid, args, meta, out, partials = forward_launch(weight, logits, spec)
    _forward_kernel[grid](*args, **meta)
    return out, partials.double().sum().float()


def backward(grad_out, grad_reg, weight, logits, spec, need_weight_grad: bool, into=None):
    """``(d logits, d weight or None)``; with ``into`` the logits gradient is added to that
    contiguous buffer (any float dtype) in the same pass and ``None`` is returned for it."""
    grid, args, meta, target, grad_weight, staged = backward_launch(
        grad_out, grad_reg, weight, logits, spec, need_weight_grad, into)
    _backward_kernel[grid](*args, **meta)
    if staged is not None:
        into.copy_(staged)
    return (None if into is not None else target), grad_weight
