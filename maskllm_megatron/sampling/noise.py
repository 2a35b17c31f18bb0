"""The Gumbel noise: one counter-based stream shared by every backend.

The noise of candidate ``c`` of a group is a pure function of
``(seed, layer, iteration, micro-batch, data-parallel rank, global group index, c)``:

* the call-level fields are hashed on the host (SplitMix64) into one 64-bit Philox key;
* the counter is ``(q & 0xffffffff, q >> 32, c // 4, 0)`` where ``q`` is the group's index in the
  *unsharded* ``[out, in // M]`` layout, and Philox4x32-10 output word ``c % 4`` is used.

Because ``q`` is global, a layer split over any number of tensor-parallel shards draws exactly
the noise of the unsplit layer. The Triton kernel uses ``tl.philox`` (the same Random123
Philox4x32-10), the C++ kernel and :func:`philox4x32` below re-implement it; tests check all
three against the Random123 known-answer vectors and each other, bit for bit.

Uniforms use the top 23 bits, ``u = (bits >> 9 + 0.5) * 2**-23``, which is exact in fp32 and
never 0 or 1, so ``g = -log(-log(u))`` is always finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIFORM_SHIFT = 9  # keep 23 bits
UNIFORM_SCALE = 2.0**-23


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class NoiseKey:
    """Where in training a sample is drawn. Every field changes the whole noise stream.

    ``layer`` tells apart layers of the same shape; ``dp_rank`` makes each data-parallel replica
    draw its own samples (the original drew identical noise on every replica); ``stream``
    separates uses (0: Gumbel sampling, 1: logit initialisation).
    """

    seed: int = 0
    layer: int = 0
    iteration: int = 0
    microbatch: int = 0
    dp_rank: int = 0
    stream: int = 0

    def philox_key(self) -> int:
        """The 64-bit Philox key (k0 = low word, k1 = high word)."""
        h = 0
        for field in (self.seed, self.layer, self.iteration, self.microbatch, self.dp_rank,
                      self.stream):
            if field < 0:
                raise ValueError(f"noise key fields must be non-negative, got {self}")
            h = _splitmix64(h ^ (field & MASK64))
        return h


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit words of ``a * x`` for uint32 values held in int64 (no overflow)."""
    lo_prod = x * (a & 0xFFFF)
    hi_prod = x * (a >> 16)
    low = lo_prod + ((hi_prod & 0xFFFF) << 16)
    return (hi_prod >> 16) + (low >> 32), low & MASK32


def philox4x32(key: int, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Random123 Philox4x32-10 on int64 tensors holding uint32 counters; returns 4 words."""
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_ROUND_A, c0)
        hi1, lo1 = _mulhilo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def noise_bits(key: int, groups: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """``[len(groups), C]`` int64 (uint32 values) raw bits for global group indices ``groups``."""
    q = groups.to(torch.int64)
    lo, hi = q & MASK32, q >> 32
    zero = torch.zeros_like(q)
    words = []
    for block in range(-(-num_candidates // 4)):
        words.extend(philox4x32(key, lo, hi, zero + block, zero))
    return torch.stack(words[:num_candidates], dim=-1)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 bits -> fp32 uniforms in (0, 1), exact."""
    return ((bits >> UNIFORM_SHIFT).to(torch.float32) + 0.5) * UNIFORM_SCALE


def gumbel_noise(key: int, groups: torch.Tensor, num_candidates: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[len(groups), C]`` Gumbel(0, 1) noise, ``-log(-log(u))`` evaluated in ``dtype``."""
    u = bits_to_uniform(noise_bits(key, groups, num_candidates)).to(dtype)
    return -torch.log(-torch.log(u))


def counter_normal(key: int, groups: torch.Tensor, count: int) -> torch.Tensor:
    """``[len(groups), count]`` standard normals (Box-Muller on the same counter stream), so a
    tensor initialised from global group indices is identical for every sharding."""
    u = bits_to_uniform(noise_bits(key, groups, 2 * count)).double()
    radius = torch.sqrt(-2.0 * torch.log(u[:, :count]))
    return (radius * torch.cos(2.0 * torch.pi * u[:, count:])).float()


@dataclass(frozen=True)
class ShardGroups:
    """Where a weight shard's groups sit in the unsharded layer.

    The group at local row ``r``, local group column ``j`` has global index
    ``(row_offset + r) * groups_per_row + group_col_offset + j``. Column-parallel shards move
    ``row_offset``; row-parallel shards move ``group_col_offset``.
    """

    row_offset: int = 0
    group_col_offset: int = 0
    groups_per_row: int | None = None  # None: the shard is the whole layer

    def resolve(self, rows: int, local_groups_per_row: int) -> "ShardGroups":
        gpr = self.groups_per_row if self.groups_per_row is not None else local_groups_per_row
        if self.group_col_offset + local_groups_per_row > gpr or min(
            self.row_offset, self.group_col_offset
        ) < 0:
            raise ValueError(
                f"shard of {rows} x {local_groups_per_row} groups at offset "
                f"({self.row_offset}, {self.group_col_offset}) does not fit {gpr} groups per row"
            )
        return ShardGroups(self.row_offset, self.group_col_offset, gpr)

    def global_indices(self, row_start: int, row_stop: int, local_groups_per_row: int,
                       device=None) -> torch.Tensor:
        """Flat global group indices of local rows ``[row_start, row_stop)``."""
        rows = torch.arange(row_start, row_stop, device=device, dtype=torch.int64)
        cols = torch.arange(local_groups_per_row, device=device, dtype=torch.int64)
        q = (self.row_offset + rows)[:, None] * self.groups_per_row + self.group_col_offset + cols
        return q.reshape(-1)
