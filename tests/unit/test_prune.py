"""One-shot baselines against plain references: numpy for magnitude and Wanda, an unblocked
float64 SparseGPT written out here."""

import numpy as np
import pytest
import torch

from maskllm_megatron.core.nm import NMPattern, is_nm_sparse
from maskllm_megatron.pruning.oneshot import (
    check_method,
    damped_inverse_cholesky,
    magnitude_mask,
    sparsegpt,
    wanda_mask,
)


def _rng():
    return np.random.default_rng(int(torch.randint(0, 2**31, ())))  # the test's seed


def _numpy_topn(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n highest of each m consecutive scores (first wins a tie)."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = np.zeros_like(groups, dtype=bool)
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    np.put_along_axis(keep, order, True, axis=-1)
    return keep.reshape(rows, cols)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_magnitude_and_wanda_equal_numpy(nm):
    rng, pattern = _rng(), NMPattern(*nm)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    x = rng.standard_normal((300, 64)) * rng.uniform(0.1, 3, 64)  # tokens x features
    sq = (x ** 2).sum(0)
    got = magnitude_mask(torch.from_numpy(w), pattern).numpy()
    assert np.array_equal(got, _numpy_topn(np.abs(w), *nm))
    got = wanda_mask(torch.from_numpy(w), torch.from_numpy(sq), pattern).numpy()
    assert np.array_equal(got, _numpy_topn(np.abs(w) * np.sqrt(sq), *nm))
    assert is_nm_sparse(torch.from_numpy(w) * torch.from_numpy(got), pattern)


def _reference_sparsegpt(w, h, n, m, percdamp=0.01):
    """SparseGPT column by column (no lazy blocks), float64 numpy."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    keep = np.ones_like(w, dtype=bool)
    for j in range(w.shape[1]):
        if j % m == 0:
            score = w[:, j:j + m] ** 2 / np.diag(hinv)[j:j + m] ** 2
            drop = np.argsort(score, axis=1, kind="stable")[:, :m - n]
            np.put_along_axis(keep[:, j:j + m], drop, False, axis=1)
        q = w[:, j] * keep[:, j]
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= np.outer(err, hinv[j, j:])
        w[:, j] = q
    return keep, w


@pytest.mark.parametrize("nm,blocksize", [((2, 4), 16), ((2, 4), 128), ((4, 8), 24)])
def test_sparsegpt_equals_the_unblocked_float64_reference(nm, blocksize):
    rng, pattern = _rng(), NMPattern(*nm)
    rows, cols = 20, 72
    w = rng.standard_normal((rows, cols))
    x = rng.standard_normal((200, cols)) @ rng.standard_normal((cols, cols)) * 0.3
    h = x.T @ x
    h[:, 5] = h[5, :] = 0  # a dead input
    keep, updated = _reference_sparsegpt(w, h, *nm)
    for update in (False, True):
        mask, out = sparsegpt(torch.from_numpy(w), torch.from_numpy(h), pattern, update=update,
                              blocksize=blocksize)
        assert np.array_equal(mask.numpy(), keep)
        expected = updated if update else w * keep
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-9)
        assert is_nm_sparse(out, pattern)


def test_the_weight_update_lowers_the_reconstruction_error():
    rng, pattern = _rng(), NMPattern(2, 4)
    w = torch.from_numpy(rng.standard_normal((32, 64)))
    x = torch.from_numpy(rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)))
    h = x.T @ x
    errors = {}
    for update in (False, True):
        _, out = sparsegpt(w, h, pattern, update=update)
        errors[update] = float((x @ (w - out).T).square().sum())
    assert errors[True] < errors[False]


def test_an_indefinite_hessian_raises_the_damping_and_stays_finite():
    h = torch.diag(torch.tensor([1.0, 2.0, 1.0, -0.5] * 4, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="raising the damping"):
        upper = damped_inverse_cholesky(h)
    assert torch.isfinite(upper).all()
    w = torch.randn(4, 16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        mask, out = sparsegpt(w, h, NMPattern(2, 4), update=True)
    assert torch.isfinite(out).all() and is_nm_sparse(out, NMPattern(2, 4))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="magnitude, wanda, sparsegpt"):
        check_method("obs")
    with pytest.raises(ValueError, match="divisible|M"):
        magnitude_mask(torch.randn(4, 6), NMPattern(2, 4))
    with pytest.raises(ValueError, match="Hessian"):
        sparsegpt(torch.randn(4, 8), torch.eye(4), NMPattern(2, 4))
