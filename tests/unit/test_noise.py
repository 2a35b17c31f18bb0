"""The counter-based noise: Random123 known answers, an independent numpy Philox, Triton bits."""

import numpy as np
import pytest
import torch

from maskllm_megatron.sampling import noise, triton_kernel
from maskllm_megatron.sampling.noise import NoiseKey, ShardGroups

# Random123 Philox4x32-10 known-answer vectors: (counter, key, output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def numpy_philox(counters, key):
    """Independent Philox4x32-10 in numpy uint64 arithmetic."""
    c = [np.asarray(v, dtype=np.uint64) for v in counters]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & mask, p1 & mask,
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & mask, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox_known_answers(counter, key, want):
    c = [torch.tensor([v], dtype=torch.int64) for v in counter]
    got = noise.philox4x32(key[0] | (key[1] << 32), *c)
    assert [int(x) for x in got] == list(want)


@pytest.mark.parametrize("counter,key,want", KAT)
def test_cpu_kernel_philox_known_answers(counter, key, want):
    """The compiled C++ kernel draws from the same generator, bit for bit."""
    from maskllm_megatron.sampling import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C++ compiler")
    assert cpu_kernel.philox4x32(key[0] | (key[1] << 32), counter) == want


def test_cpu_kernel_philox_matches_numpy_on_random_counters():
    from maskllm_megatron.sampling import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(0)
    key = int(rng.integers(0, 2**63))
    counters = rng.integers(0, 2**32, size=(4, 64), dtype=np.uint64)
    want = numpy_philox(counters, key)
    got = [cpu_kernel.philox4x32(key, tuple(int(c) for c in counters[:, i])) for i in range(64)]
    assert [tuple(int(w[i]) for w in want) for i in range(64)] == got


def test_philox_matches_numpy_on_random_counters():
    rng = np.random.default_rng(0)
    counters = [rng.integers(0, 2**32, 5000, dtype=np.uint64) for _ in range(4)]
    key = int(rng.integers(0, 2**63)) * 2 + 1
    want = numpy_philox(counters, key)
    got = noise.philox4x32(key, *[torch.from_numpy(c.astype(np.int64)) for c in counters])
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.numpy().astype(np.uint64), w)


def test_noise_layout_counter_is_global_group_and_candidate_block():
    key = NoiseKey(seed=7, layer=3).philox_key()
    groups = torch.tensor([0, 1, 2**32 + 5, 123456789012])
    bits = noise.noise_bits(key, groups, 6)
    q = groups.numpy().astype(np.uint64)
    zero = np.zeros_like(q)
    block0 = numpy_philox([q & np.uint64(0xFFFFFFFF), q >> np.uint64(32), zero, zero], key)
    block1 = numpy_philox([q & np.uint64(0xFFFFFFFF), q >> np.uint64(32), zero + 1, zero], key)
    want = np.stack(block0 + block1[:2], axis=-1)
    assert np.array_equal(bits.numpy().astype(np.uint64), want)


def test_uniforms_are_exact_and_strictly_inside_0_1():
    bits = torch.tensor([0, 511, 512, 2**32 - 1], dtype=torch.int64)
    u = noise.bits_to_uniform(bits)
    assert u.dtype == torch.float32
    assert u.tolist() == [0.5 * 2**-23, 0.5 * 2**-23, 1.5 * 2**-23, 1 - 0.5 * 2**-23]
    g = noise.gumbel_noise(1, torch.arange(10000), 6)
    assert torch.isfinite(g).all()
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance = pi^2 / 6
    assert abs(g.mean().item() - 0.5772) < 0.02
    assert abs(g.var().item() - np.pi**2 / 6) < 0.05


def test_every_key_field_changes_the_stream():
    base = NoiseKey(seed=1, layer=2, iteration=3, microbatch=4, dp_rank=5)
    keys = {base.philox_key()}
    for field in ("seed", "layer", "iteration", "microbatch", "dp_rank", "stream"):
        changed = NoiseKey(**{**base.__dict__, field: getattr(base, field) + 1})
        keys.add(changed.philox_key())
    assert len(keys) == 7
    assert base.philox_key() == NoiseKey(1, 2, 3, 4, 5).philox_key()
    with pytest.raises(ValueError, match="non-negative"):
        NoiseKey(seed=-1).philox_key()


def test_shard_global_indices():
    shard = ShardGroups(row_offset=2, group_col_offset=3, groups_per_row=10).resolve(2, 4)
    assert shard.global_indices(0, 2, 4).tolist() == [23, 24, 25, 26, 33, 34, 35, 36]
    with pytest.raises(ValueError, match="does not fit"):
        ShardGroups(group_col_offset=8, groups_per_row=10).resolve(2, 4)


if triton_kernel.triton is not None:
    triton, tl = triton_kernel.triton, triton_kernel.tl
    noise_bits_block = triton_kernel.noise_bits_block

    @triton.jit
    def dump(q_ptr, out_ptr, key, BLOCK: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr):
        g = tl.arange(0, BLOCK)
        q = tl.load(q_ptr + g)
        bits = noise_bits_block(key, q, BLOCK, CP, NB)
        cols = tl.arange(0, CP)
        tl.store(out_ptr + g[:, None] * CP + cols[None, :], bits.to(tl.int64))


def test_triton_noise_bits_equal_the_torch_stream():
    groups = torch.tensor([0, 1, 7, 2**32 + 3, 2**40 + 11, 99, 5, 6], dtype=torch.int64)
    for key in (NoiseKey(seed=3).philox_key(), 2**63 + 12345, 77):
        for c in (6, 4, 28):
            cp = triton.next_power_of_2(c)
            out = torch.zeros(8, cp, dtype=torch.int64)
            dump[(1,)](groups, out, key, BLOCK=8, CP=cp, NB=triton.cdiv(c, 4))
            assert torch.equal(out[:, :c], noise.noise_bits(key, groups, c))
