import itertools
import math

import numpy as np
import pytest
import torch

from maskllm_megatron.core import nm
from maskllm_megatron.core.nm import NMPattern

PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(2, 8), NMPattern(4, 8), NMPattern(3, 4),
            NMPattern(1, 2)]


@pytest.mark.parametrize("n,m,count", [(2, 4, 6), (1, 4, 4), (2, 8, 28), (4, 8, 70)])
def test_candidate_table_is_lexicographic_enumeration(n, m, count):
    table = NMPattern(n, m).candidates()
    assert table.shape == (count, m)
    assert (table.sum(1) == n).all()
    # independent enumeration: all 0/1 vectors with n ones, ordered by their kept positions
    vectors = [v for v in itertools.product([0, 1], repeat=m) if sum(v) == n]
    vectors.sort(key=lambda v: tuple(i for i, b in enumerate(v) if b))
    assert table.tolist() == [list(v) for v in vectors]


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6, 8])
def test_candidate_table_holds_every_m_bit_mask_with_n_ones_once(m):
    """Against the masks found by counting set bits of every M-bit integer: nothing missing,
    nothing extra, no duplicates; and the lookup from a group's bits finds each row's index."""
    for n in range(1, m):
        pattern = NMPattern(n, m)
        expected = {code for code in range(1 << m) if bin(code).count("1") == n}
        rows = [sum(bit << k for k, bit in enumerate(row))
                for row in pattern.candidates(torch.int64).tolist()]
        assert len(rows) == len(set(rows)) == pattern.num_candidates
        assert set(rows) == expected, (n, m)
        masks = torch.tensor([[(code >> k) & 1 for k in range(m)] for code in rows]).bool()
        assert nm.mask_to_indices(masks, pattern).flatten().tolist() == list(range(len(rows)))


def test_2_4_table_matches_the_original_hand_written_order():
    assert NMPattern(2, 4).candidates(torch.int64).tolist() == [
        [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (-1, 4)])
def test_invalid_patterns_name_n_and_m(n, m):
    with pytest.raises(ValueError, match=f"N={n}, M={m}"):
        NMPattern(n, m)


def test_parse():
    assert NMPattern.parse("2:4") == NMPattern(2, 4)
    with pytest.raises(ValueError, match="2:4"):
        NMPattern.parse("2-4")


def test_indivisible_input_dimension_is_a_clear_error():
    p = NMPattern(2, 4)
    with pytest.raises(ValueError, match=r"\[8, 10\].*M=4.*N=2"):
        nm.check_groupable((8, 10), p)
    with pytest.raises(ValueError, match=r"\[3, 10\]"):
        nm.mask_from_scores(torch.randn(3, 10), p)


def test_logits_of_wrong_shape_are_rejected():
    p = NMPattern(2, 4)
    nm.check_logits(torch.zeros(8, 4, 6), p, weight_shape=(8, 16))
    for bad in [(8, 4, 5), (8, 3, 6), (8, 24), (4, 4, 6)]:
        with pytest.raises(ValueError, match=r"N=2, M=4"):
            nm.check_logits(torch.zeros(bad), p, weight_shape=(8, 16))


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_mask_from_scores_matches_numpy_top_n(pattern):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(7, 6 * pattern.m, generator=g)
    scores[0, : pattern.m] = 1.0  # a tied group: the lower positions win
    mask = nm.mask_from_scores(scores, pattern)
    s = scores.numpy().reshape(7, -1, pattern.m)
    order = np.argsort(-s, axis=-1, kind="stable")[..., : pattern.n]
    ref = np.zeros_like(s, dtype=bool)
    np.put_along_axis(ref, order, True, axis=-1)
    assert np.array_equal(mask.numpy(), ref.reshape(7, -1))
    assert mask[0, : pattern.m].tolist() == [True] * pattern.n + [False] * (pattern.m - pattern.n)
    assert nm.is_nm_sparse(scores * mask, pattern)


def test_mask_from_scores_along_dim0_and_is_nm_along_dim():
    p = NMPattern(2, 4)
    scores = torch.randn(8, 5)
    mask = nm.mask_from_scores(scores, p, dim=0)
    assert mask.shape == (8, 5)
    assert nm.is_nm_sparse(mask, p, dim=0)
    assert (nm.nonzeros_per_group(mask, p, dim=0) == 2).all()


def test_is_nm_sparse_detects_a_violation():
    p = NMPattern(2, 4)
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    assert nm.is_nm_sparse(w, p)
    w[0, 1] = 3.0
    assert not nm.is_nm_sparse(w, p)
    assert nm.nonzeros_per_group(w, p).tolist() == [[3, 2]]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_hard_mask_from_logits_and_index_round_trip(pattern):
    logits = torch.randn(5, 7, pattern.num_candidates)
    mask = nm.hard_mask_from_logits(logits, pattern)
    want = pattern.candidates(torch.bool)[logits.argmax(-1)].reshape(5, -1)
    assert torch.equal(mask, want)
    assert torch.equal(nm.mask_to_indices(mask, pattern), logits.argmax(-1))


def test_mask_to_indices_rejects_non_exact_groups():
    p = NMPattern(2, 4)
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="1 groups"):
        nm.mask_to_indices(mask, p)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_candidate_overlap_matches_brute_force(pattern):
    mask = nm.indices_to_mask(torch.randint(0, pattern.num_candidates, (3, 4)), pattern)
    overlap = nm.candidate_overlap(mask, pattern)
    table = pattern.candidates(torch.int64)
    groups = mask.reshape(3, 4, pattern.m).to(torch.int64)
    for r, j, c in itertools.product(range(3), range(4), range(pattern.num_candidates)):
        assert overlap[r, j, c] == int((groups[r, j] & table[c]).sum())


# ----------------------------------------------------------------------------- priors


def test_prior_reproduces_the_original_2_4_rule():
    p = NMPattern(2, 4)
    logits = torch.randn(6, 8, 6) * 0.01
    prior = nm.mask_from_scores(torch.randn(6, 32), p)
    got = nm.apply_prior(logits, prior, p, strength=3.0)
    overlap = nm.candidate_overlap(prior, p)
    want = logits + (overlap - 1) * logits.std() * 3.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_prior_boosts_the_prior_candidate_most_and_least_overlap_least(pattern):
    logits = torch.zeros(4, 5, pattern.num_candidates)
    idx = torch.randint(0, pattern.num_candidates, (4, 5))
    prior = nm.indices_to_mask(idx, pattern)
    got = nm.apply_prior(logits, prior, pattern, strength=2.0, scale=0.5)
    assert torch.equal(got.argmax(-1), idx)
    assert torch.allclose(got.amax(-1), torch.full((4, 5), 1.0))
    assert torch.allclose(got.amin(-1), torch.full((4, 5), -1.0))


# ----------------------------------------------------------------------------- packing


def test_2_4_packs_below_0_67_bit_per_weight():
    p = NMPattern(2, 4)
    bpw = nm.bits_per_weight(p)
    assert math.log2(6) / 4 <= bpw <= 0.67
    packed = nm.pack_mask(nm.indices_to_mask(torch.randint(0, 6, (64, 96)), p), p)
    assert packed.nbytes * 8 / (64 * 384) <= 0.67


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("count", [1, 2, 3, 17, 1000])
def test_packing_round_trip_exact(pattern, count):
    idx = torch.randint(0, pattern.num_candidates, (count,))
    idx[0] = pattern.num_candidates - 1
    data = nm.pack_indices(idx, pattern.num_candidates)
    assert data.dtype == np.uint8
    assert torch.equal(nm.unpack_indices(data, pattern.num_candidates, count), idx)
    word_bytes, per_word = nm.packing_layout(pattern.num_candidates)
    assert data.size == -(-count // per_word) * word_bytes
    # close to the entropy bound
    assert nm.bits_per_weight(pattern) < math.log2(pattern.num_candidates) / pattern.m + 0.2


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_pack_mask_round_trip(pattern):
    mask = nm.indices_to_mask(torch.randint(0, pattern.num_candidates, (9, 11)), pattern)
    packed = nm.pack_mask(mask, pattern)
    assert packed.shape == (9, 11 * pattern.m)
    assert torch.equal(packed.mask(), mask)


def test_corrupted_packed_masks_are_detected():
    p = NMPattern(2, 4)
    data = nm.pack_indices(torch.randint(0, 6, (30,)), 6)
    with pytest.raises(ValueError, match="bytes"):
        nm.unpack_indices(data[:-1], 6, 30)
    bad = data.copy()
    bad[0] = 255  # 255 > 6**3 - 1: not a valid word
    with pytest.raises(ValueError, match="corrupted"):
        nm.unpack_indices(bad, 6, 30)
    with pytest.raises(ValueError, match="exact"):
        nm.pack_mask(torch.ones(2, 8, dtype=torch.bool), p)
