"""attn_lib.reference: the NumPy float64 oracles."""

import numpy as np
import pytest

from attn_lib import reference


def test_softmax_rows_sum_to_one_and_survive_huge_scores():
    x = np.array([[1000.0, 1000.0, -1000.0], [1.0, 2.0, 3.0]])
    w = reference.softmax(x)
    np.testing.assert_allclose(w.sum(-1), [1.0, 1.0])
    np.testing.assert_allclose(w[0], [0.5, 0.5, 0.0])
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(w[1], e / e.sum())


def test_softmax_all_neg_inf_row_is_zero_not_nan():
    w = reference.softmax([[-np.inf, -np.inf], [0.0, -np.inf]])
    np.testing.assert_array_equal(w, [[0.0, 0.0], [1.0, 0.0]])


def test_softmax_other_axis():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(reference.softmax(x, axis=0).sum(0), np.ones(3))


def test_sdpa_matches_formula_on_unequal_lengths():
    rng = np.random.default_rng(0)
    q, k, v = (
        rng.normal(size=(7, 5)),
        rng.normal(size=(13, 5)),
        rng.normal(size=(13, 3)),
    )
    out, w = reference.scaled_dot_product_attention(q, k, v)
    scores = q @ k.T / np.sqrt(5)
    expected = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    np.testing.assert_allclose(w, expected)
    np.testing.assert_allclose(out, expected @ v)
    assert out.shape == (7, 3) and w.shape == (7, 13)


def test_sdpa_fully_masked_query_gets_zeros():
    q = np.array([[1.0], [1.0]])
    k = np.array([[1.0], [2.0]])
    v = np.array([[10.0], [20.0]])
    mask = np.array([[True, True], [False, False]])
    out, w = reference.scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(out, [[17.310586], [0.0]], atol=1e-6)
    np.testing.assert_array_equal(w[1], [0.0, 0.0])


def test_sdpa_scale_argument():
    q = k = np.eye(2)
    v = np.array([[1.0], [3.0]])
    out, _ = reference.scaled_dot_product_attention(q, k, v, scale=100.0)
    np.testing.assert_allclose(out, [[1.0], [3.0]], atol=1e-12)


def test_sdpa_rejects_float_mask():
    q = np.ones((2, 4))
    with pytest.raises(
        TypeError, match=r"mask must be a bool array \(True = may attend\); got float64"
    ):
        reference.scaled_dot_product_attention(q, q, q, np.ones((2, 2)))


def test_sdpa_rejects_mismatched_shapes():
    with pytest.raises(
        ValueError,
        match=r"q and k must have the same last dim D; got q \(2, 4\) and k \(3, 5\)",
    ):
        reference.scaled_dot_product_attention(
            np.ones((2, 4)), np.ones((3, 5)), np.ones((3, 1))
        )
    with pytest.raises(ValueError, match=r"k and v must have the same length S"):
        reference.scaled_dot_product_attention(
            np.ones((2, 4)), np.ones((3, 4)), np.ones((2, 1))
        )
    with pytest.raises(
        ValueError, match=r"mask must be broadcastable to \(2, 3\); got shape \(3, 3\)"
    ):
        reference.scaled_dot_product_attention(
            np.ones((2, 4)), np.ones((3, 4)), np.ones((3, 1)), np.ones((3, 3), bool)
        )


# --- tiled_attention: the online softmax -------------------------------------------


def _qkv(rng, t=7, s=13, d=5, dv=3, lead=(2,)):
    return (
        rng.normal(size=(*lead, t, d)),
        rng.normal(size=(*lead, s, d)),
        rng.normal(size=(*lead, s, dv)),
    )


@pytest.mark.parametrize("block_size", range(1, 15))
def test_tiled_equals_plain_for_every_block_size(block_size):
    rng = np.random.default_rng(block_size)
    q, k, v = _qkv(rng)
    mask = rng.random((7, 13)) < 0.6
    mask[2] = False  # a query that may attend to nothing
    expected, _ = reference.scaled_dot_product_attention(q, k, v, mask)
    out = reference.tiled_attention(q, k, v, mask, block_size=block_size)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    np.testing.assert_array_equal(out[:, 2], 0.0)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4])
def test_tiled_with_fully_masked_blocks(block_size):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, s=12)
    mask = np.ones((7, 12), dtype=bool)
    mask[:, :4] = False  # the first blocks see nothing: the running max stays -inf
    mask[:, 8:] = False  # and the last ones too
    expected, _ = reference.scaled_dot_product_attention(q, k, v, mask)
    out = reference.tiled_attention(q, k, v, mask, block_size=block_size)
    np.testing.assert_allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_tiled_with_scores_far_below_and_above_zero(scale):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng)
    k = k - 40.0 * q.mean(-2, keepdims=True)  # most scores far below zero
    expected, _ = reference.scaled_dot_product_attention(q, k, v, scale=scale)
    for block_size in (1, 4, 13):
        out = reference.tiled_attention(q, k, v, scale=scale, block_size=block_size)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, expected, atol=1e-10)


def test_tiled_all_blocks_masked_gives_zeros_not_nan():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng)
    out = reference.tiled_attention(q, k, v, np.zeros((7, 13), bool), block_size=4)
    np.testing.assert_array_equal(out, 0.0)


def test_tiled_refuses_bad_arguments():
    q = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"block_size must be a positive int; got 0"):
        reference.tiled_attention(q, q, q, block_size=0)
    with pytest.raises(TypeError, match=r"mask must be a bool array"):
        reference.tiled_attention(q, q, q, np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"mask must be broadcastable to \(3, 3\)"):
        reference.tiled_attention(q, q, q, np.ones((2, 3), bool))
