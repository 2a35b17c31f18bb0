"""N:M semi-structured sparsity: candidates, checks, masks from logits or scores, priors, packing.

Groups of ``M`` consecutive weights run along the last (input, reduction) dimension of an
``[out, in]`` weight, which is the layout cuSPARSELt and TensorRT-LLM use for 2:4. A weight has
``in // M`` groups per row; per-group tensors are shaped ``[out, in // M, ...]``.

Every group keeps exactly ``N`` of its ``M`` weights. The ``C = comb(M, N)`` ways of choosing them
(the *candidates*) are enumerated lexicographically by kept position, so for 2:4 candidate 0 keeps
positions (0, 1) and candidate 5 keeps (2, 3). That order is the single definition of a
candidate index used by the logits, the sampler, packed masks and checkpoints.

This module is plain tensor math: no torch.distributed, no megatron.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from maskllm_megatron.errors import CheckpointError, InputError

MAX_M = 16  # a group's bit pattern indexes a 2**M lookup table


@dataclass(frozen=True)
class NMPattern:
    """An N:M pattern: keep ``n`` weights in every group of ``m`` consecutive input weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise InputError(f"N and M must be integers, got N={self.n!r}, M={self.m!r}")
        if self.m < 2 or self.m > MAX_M:
            raise InputError(f"M must be in [2, {MAX_M}], got N={self.n}, M={self.m}; choose "
                             "--M in that range")
        if self.n < 1 or self.n >= self.m:
            raise InputError(f"N must satisfy 1 <= N < M, got N={self.n}, M={self.m}; choose --N "
                             "below --M")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> "NMPattern":
        """``"2:4"`` -> ``NMPattern(2, 4)``."""
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise InputError(f"an N:M pattern looks like '2:4', got {text!r}") from None
        return cls(n, m)

    @property
    def num_candidates(self) -> int:
        return math.comb(self.m, self.n)

    def candidates(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """``[C, M]`` 0/1 table, row ``c`` is candidate ``c`` (lexicographic by kept positions).

        Cached per dtype and device (do not modify it): the samplers ask for it every
        micro-batch, and a host-to-device copy there would stall the GPU stream."""
        return _candidate_table_on(self.n, self.m, dtype, torch.device(device or "cpu"))

    def candidate_positions(self) -> torch.Tensor:
        """``[C, N]`` int64 kept positions of each candidate, ascending."""
        return _candidate_positions(self.n, self.m).clone()


@functools.cache
def _candidate_positions(n: int, m: int) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.int64)


@functools.cache
def _candidate_table_on(n: int, m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _candidate_table(n, m).to(dtype=dtype, device=device)


@functools.cache
def _candidate_table(n: int, m: int) -> torch.Tensor:
    pos = _candidate_positions(n, m)
    table = torch.zeros(pos.shape[0], m, dtype=torch.uint8)
    table.scatter_(1, pos, 1)
    return table


@functools.cache
def _code_to_candidate(n: int, m: int) -> torch.Tensor:
    """``[2**M]`` int64: a group's bit pattern (bit k = position k kept) -> candidate, or -1."""
    lut = torch.full((1 << m,), -1, dtype=torch.int64)
    weights = 1 << torch.arange(m, dtype=torch.int64)
    codes = (_candidate_table(n, m).to(torch.int64) * weights).sum(1)
    lut[codes] = torch.arange(codes.numel())
    return lut


def as_pattern(pattern: NMPattern | tuple[int, int] | str) -> NMPattern:
    if isinstance(pattern, NMPattern):
        return pattern
    if isinstance(pattern, str):
        return NMPattern.parse(pattern)
    n, m = pattern
    return NMPattern(int(n), int(m))


# ----------------------------------------------------------------------------- shapes and checks


def check_groupable(shape, pattern: NMPattern, what: str = "weight", dim: int = -1) -> None:
    """Raise ``InputError`` (a ``ValueError``) unless ``shape[dim]`` splits into whole groups
    of ``M``."""
    shape = tuple(shape)
    if len(shape) == 0 or shape[dim] % pattern.m != 0:
        raise InputError(
            f"{what} of shape {list(shape)} cannot hold {pattern} sparsity: dimension {dim} "
            f"({shape[dim] if shape else 'none'}) is not divisible by M={pattern.m} (N={pattern.n})"
        )


def check_logits(logits: torch.Tensor, pattern: NMPattern, weight_shape=None) -> None:
    """Mask logits are ``[out, in // M, C]``; raise ``InputError`` naming the shapes otherwise."""
    c = pattern.num_candidates
    expected = None
    if weight_shape is not None:
        check_groupable(weight_shape, pattern)
        expected = (weight_shape[0], weight_shape[1] // pattern.m, c)
    if logits.dim() != 3 or logits.shape[-1] != c or (
        expected is not None and tuple(logits.shape) != expected
    ):
        want = list(expected) if expected is not None else f"[out, in // {pattern.m}, {c}]"
        raise InputError(
            f"mask logits of shape {list(logits.shape)} do not fit {pattern} (N={pattern.n}, "
            f"M={pattern.m}, C={c} candidates): expected {want}"
        )


def _groups(t: torch.Tensor, pattern: NMPattern, dim: int = -1) -> torch.Tensor:
    """View ``t`` as ``[..., groups, M]`` with the grouped dimension moved last."""
    t = t.movedim(dim, -1)
    check_groupable(t.shape, pattern, what="tensor")
    return t.reshape(*t.shape[:-1], t.shape[-1] // pattern.m, pattern.m)


def is_nm_sparse(t: torch.Tensor, pattern: NMPattern, dim: int = -1) -> bool:
    """True when every group of ``M`` along ``dim`` has at most ``N`` non-zeros."""
    return bool((nonzeros_per_group(t, pattern, dim) <= pattern.n).all())


def nonzeros_per_group(t: torch.Tensor, pattern: NMPattern, dim: int = -1) -> torch.Tensor:
    """``[..., groups]`` count of non-zeros per group of ``M`` along ``dim``."""
    return (_groups(t, pattern, dim) != 0).sum(-1)


# ----------------------------------------------------------------------------- masks


def indices_to_mask(indices: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """``[out, G]`` candidate indices -> ``[out, G * M]`` bool mask."""
    table = pattern.candidates(torch.bool, indices.device)
    mask = table[indices.long()]
    return mask.reshape(*indices.shape[:-1], indices.shape[-1] * pattern.m)


def mask_to_indices(mask: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """``[out, in]`` mask with exactly N kept per group -> ``[out, in // M]`` int64 indices."""
    groups = _groups(mask, pattern).to(torch.int64)
    codes = (groups << torch.arange(pattern.m, device=mask.device)).sum(-1)
    indices = _code_to_candidate(pattern.n, pattern.m).to(mask.device)[codes]
    if (indices < 0).any():
        bad = int((indices < 0).sum())
        raise InputError(
            f"mask of shape {list(mask.shape)} is not an exact {pattern} mask: {bad} groups do not "
            f"keep exactly N={pattern.n} of M={pattern.m}"
        )
    return indices


def hard_indices_from_logits(logits: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """``[out, G, C]`` logits -> ``[out, G]`` argmax candidate (first maximum on ties)."""
    check_logits(logits, pattern)
    return logits.argmax(-1)


def hard_mask_from_logits(logits: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """``[out, G, C]`` logits -> ``[out, G * M]`` bool mask of each group's argmax candidate."""
    return indices_to_mask(hard_indices_from_logits(logits, pattern), pattern)


def mask_from_scores(scores: torch.Tensor, pattern: NMPattern, dim: int = -1) -> torch.Tensor:
    """Keep the ``N`` highest scores in every group of ``M`` along ``dim`` (bool mask).

    Ties keep the lower position, so results are deterministic and match a stable numpy argsort.
    """
    groups = _groups(scores, pattern, dim)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., : pattern.n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    moved = scores.movedim(dim, -1)
    return keep.reshape(moved.shape).movedim(-1, dim)


def candidate_overlap(mask: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """``[out, in]`` 0/1 mask -> ``[out, in // M, C]`` kept positions shared with each candidate."""
    groups = _groups(mask, pattern).to(torch.float32)
    return groups @ pattern.candidates(torch.float32, mask.device).T


def apply_prior(
    logits: torch.Tensor,
    prior_mask: torch.Tensor,
    pattern: NMPattern,
    strength: float,
    scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Bias logits towards a prior mask (magnitude, Wanda, SparseGPT, an earlier run).

    Generalises the original 2:4 rule ``logits += (overlap - 1) * std(logits) * strength``: the
    overlap of each candidate with the prior group is mapped linearly onto ``[-1, 1]``, so the
    prior candidate gains ``+strength * scale`` and the least-overlapping candidates (the
    complement, for 2:4) lose ``strength * scale``. For 2:4 this is exactly the original rule.
    ``scale`` defaults to ``logits.std()``; sharded callers pass the global std so that every
    tensor-parallel layout gets the same logits.
    """
    check_logits(logits, pattern, weight_shape=prior_mask.shape)
    overlap = candidate_overlap(prior_mask != 0, pattern)
    low = max(0, 2 * pattern.n - pattern.m)  # fewest kept positions two N-subsets can share
    unit = 2.0 * (overlap - low) / (pattern.n - low) - 1.0
    if scale is None:
        scale = logits.float().std()
    return logits + (unit * scale * strength).to(logits.dtype)


# ----------------------------------------------------------------------------- packing


@functools.cache
def packing_layout(num_candidates: int) -> tuple[int, int]:
    """``(word_bytes, groups_per_word)``: mixed-radix words that waste the fewest bits per group.

    A word of ``w`` bytes holds ``k`` candidate indices when ``C**k <= 2**(8w)``. 2:4 (C=6) packs
    3 groups per byte: 8 / 12 = 0.667 bit per weight against the entropy bound log2(6)/4 = 0.646.
    """
    best = None
    for word_bytes in (1, 2, 4, 8):
        k = 0
        while num_candidates ** (k + 1) <= 2 ** (8 * word_bytes):
            k += 1
        if k == 0:
            continue
        cost = 8 * word_bytes / k
        if best is None or cost < best[0] - 1e-12:
            best = (cost, word_bytes, k)
    if best is None:
        raise InputError(f"cannot pack {num_candidates} candidates into a 64-bit word")
    return best[1], best[2]


def bits_per_weight(pattern: NMPattern) -> float:
    """Storage cost of a packed mask, in bits per weight (excluding the tail word)."""
    word_bytes, k = packing_layout(pattern.num_candidates)
    return 8 * word_bytes / (k * pattern.m)


def pack_indices(indices, num_candidates: int) -> np.ndarray:
    """Flat candidate indices -> uint8 bytes, ``groups_per_word`` indices per little-endian word."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    idx = idx.reshape(-1).astype(np.uint64)
    if idx.size and (idx.max() >= num_candidates):
        raise ValueError(f"candidate index {int(idx.max())} out of range for C={num_candidates}")
    word_bytes, k = packing_layout(num_candidates)
    words = np.zeros(-(-idx.size // k) * k, dtype=np.uint64)
    words[: idx.size] = idx
    words = words.reshape(-1, k)
    value = np.zeros(words.shape[0], dtype=np.uint64)
    for digit in range(k - 1, -1, -1):  # Horner: digit 0 is the least significant
        value = value * np.uint64(num_candidates) + words[:, digit]
    return value.astype(f"<u{word_bytes}").view(np.uint8)


def unpack_indices(data: np.ndarray, num_candidates: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: the first ``count`` indices as int64."""
    word_bytes, k = packing_layout(num_candidates)
    data = np.ascontiguousarray(np.asarray(data, dtype=np.uint8))
    n_words = -(-count // k)
    if data.size != n_words * word_bytes:
        raise CheckpointError(
            f"packed mask has {data.size} bytes, expected {n_words * word_bytes} for {count} "
            f"groups of C={num_candidates} candidates"
        )
    value = data.view(f"<u{word_bytes}").astype(np.uint64)
    digits = np.empty((n_words, k), dtype=np.uint64)
    for digit in range(k):
        digits[:, digit] = value % np.uint64(num_candidates)
        value = value // np.uint64(num_candidates)
    if value.any():  # a word >= C**k cannot have come from pack_indices
        raise CheckpointError("packed mask is corrupted: a word decodes past the candidate "
                              "range; export it again")
    return torch.from_numpy(digits.reshape(-1)[:count].astype(np.int64))


@dataclass(frozen=True)
class PackedMask:
    """A hard N:M mask of an ``[out, in]`` weight as packed candidate indices."""

    data: np.ndarray  # uint8
    pattern: NMPattern
    shape: tuple[int, int]

    @property
    def num_groups(self) -> int:
        return self.shape[0] * (self.shape[1] // self.pattern.m)

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    def indices(self) -> torch.Tensor:
        """``[out, in // M]`` int64 candidate indices."""
        flat = unpack_indices(self.data, self.pattern.num_candidates, self.num_groups)
        return flat.reshape(self.shape[0], self.shape[1] // self.pattern.m)

    def mask(self) -> torch.Tensor:
        """``[out, in]`` bool mask."""
        return indices_to_mask(self.indices(), self.pattern)


def pack_mask(mask: torch.Tensor, pattern: NMPattern) -> PackedMask:
    """Pack an exact ``[out, in]`` N:M mask (``mask_to_indices`` rejects anything else)."""
    if mask.dim() != 2:
        raise ValueError(f"pack_mask expects an [out, in] mask, got shape {list(mask.shape)}")
    indices = mask_to_indices(mask != 0, pattern)
    return PackedMask(pack_indices(indices, pattern.num_candidates), pattern, tuple(mask.shape))
