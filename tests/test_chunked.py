"""attn_lib.chunked_attention: against the NumPy reference, PyTorch and autograd."""

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import numpy_reference, randn, random_mask

import attn_lib
from attn_lib import chunked, functional, reference
from attn_lib.chunked import tile_plan


def _reference(q, k, v, mask=None):
    return numpy_reference(q, k, v, mask)[0]


def _explicit_causal(t, s, device="cpu"):
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= i + (s - t)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 7, 8, 13, 64])
@pytest.mark.parametrize("t,s", [(7, 13), (13, 7), (1, 1)])
def test_matches_reference_for_every_block_size(block_size, t, s, gen, device):
    q = randn(gen, 2, 3, t, 5, device=device)
    k = randn(gen, 2, 3, s, 5, device=device)
    v = randn(gen, 2, 3, s, 4, device=device)
    mask = random_mask(gen, 2, 1, t, s, device=device)
    out = attn_lib.chunked_attention(q, k, v, mask=mask, block_size=block_size)
    torch.testing.assert_close(out.cpu(), _reference(q, k, v, mask))


@pytest.mark.parametrize("block_size", [1, 3, 4, 13])
@pytest.mark.parametrize("t,s", [(7, 13), (13, 7), (7, 7)])
def test_causal_is_bottom_right_with_unequal_lengths(block_size, t, s, gen, device):
    q, k, v = (randn(gen, 2, n, 6, device=device) for n in (t, s, s))
    out = attn_lib.chunked_attention(q, k, v, is_causal=True, block_size=block_size)
    expected = _reference(q, k, v, _explicit_causal(t, s))
    torch.testing.assert_close(out.cpu(), expected)
    if t == s:  # the two alignments agree on square problems
        torch.testing.assert_close(
            out, F.scaled_dot_product_attention(q, k, v, is_causal=True)
        )


@pytest.mark.parametrize(
    "t,s,rows,cols",
    [
        (8, 8, 2, 2),
        (7, 13, 3, 3),
        (13, 7, 4, 4),
        (6, 6, 2, 2),
        (9, 9, 2, 4),
        (5, 12, 4, 3),
    ],
)
def test_causal_skips_keys_no_query_of_a_block_sees(t, s, rows, cols):
    tiles = tile_plan(t, s, block_size=(rows, cols), is_causal=True)
    allowed = _explicit_causal(t, s)
    for i0, i1, j0, j1, diagonal in tiles:
        assert allowed[i0:i1, j0:j1].any(0).all()  # every computed key is seen
        assert diagonal == (not bool(allowed[i0:i1, j0:j1].all()))
    covered = torch.zeros(t, s, dtype=torch.bool)
    for i0, i1, j0, j1, _ in tiles:
        covered[i0:i1, j0:j1] = True
    assert (covered | ~allowed).all()  # every allowed pair is in some tile
    assert covered.sum() < t * s


def test_tile_plan_without_causal_covers_everything_once():
    tiles = tile_plan(7, 10, block_size=(3, 4))
    count = torch.zeros(7, 10, dtype=torch.int)
    for i0, i1, j0, j1, masked in tiles:
        count[i0:i1, j0:j1] += 1
        assert not masked
    assert (count == 1).all() and len(tiles) == 3 * 3


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"t": -1, "s": 4}, "t must be a non-negative int; got -1"),
        ({"t": 4, "s": 2.0}, "s must be a non-negative int; got 2.0"),
        ({"t": 4, "s": 4, "block_size": (2, 0)}, "tuple of positive ints; got (2, 0)"),
    ],
)
def test_tile_plan_names_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tile_plan(**kwargs)
    with pytest.raises(TypeError, match="is_causal must be a bool; got 1"):
        tile_plan(4, 4, is_causal=1)
    with pytest.raises(ValueError, match="heads must be a positive int; got 0"):
        tile_plan(4, 4, block_size=2, heads=0)  # checked even when unused


def test_tiles_for_the_docstring_picture():
    picture = ["xx.. ....", "xxxx ....", "xxxx xx..", "xxxx xxxx"]
    drawn = [list(line.replace(" ", "")) for line in picture]
    tiles = tile_plan(8, 8, block_size=(2, 4), is_causal=True)
    for i0, _, j0, j1, _ in tiles:
        for j in range(j0, j1):
            assert drawn[i0 // 2][j] == "x"
            drawn[i0 // 2][j] = "seen"
    assert all(c in ("seen", ".") for line in drawn for c in line)
    assert "(2, 4)" in attn_lib.chunked_attention.__doc__
    assert all(line in attn_lib.chunked_attention.__doc__ for line in picture)


def test_matches_torch_sdpa_with_bias_mask_and_scale(gen, device):
    q, k, v = (randn(gen, 2, 3, n, 8, device=device) for n in (7, 13, 13))
    mask = random_mask(gen, 2, 1, 7, 13, device=device)
    mask[..., 0] = True  # torch's own kernel gives nan for an empty row
    bias = randn(gen, 3, 7, 13, device=device)
    out = attn_lib.chunked_attention(
        q, k, v, mask=mask, bias=bias, scale=0.3, block_size=4
    )
    additive = bias.masked_fill(~mask, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=0.3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("magnitude", [1.0, 50.0, 1000.0])
def test_scores_far_from_zero_and_growing_maxima(magnitude, gen):
    q = randn(gen, 7, 4) * magnitude
    k = torch.cat([randn(gen, 6, 4), randn(gen, 7, 4) * 3])  # later blocks score higher
    v = randn(gen, 13, 3)
    for size in (1, 2, 5):
        out = attn_lib.chunked_attention(q, k, v, block_size=size)
        torch.testing.assert_close(out, _reference(q, k, v))
        bias = torch.full((7, 13), -1e4, dtype=q.dtype)  # every score far below zero
        out = attn_lib.chunked_attention(q, k, v, bias=bias, block_size=size)
        torch.testing.assert_close(out, _reference(q, k, v))


@pytest.mark.parametrize("rise", [-20.0, 0.5, 7.9, 8.1, 30.0, 500.0])
@pytest.mark.parametrize("max_weight", [chunked.MAX_WEIGHT, 1.0, 1e30])
def test_maxima_rising_tile_by_tile(rise, max_weight, gen, monkeypatch):
    # each tile of 4 keys scores `rise` higher than the one before; the shift
    # moves when a tile's weights pass max_weight per key: at every tile when
    # that is 1, only on float32 overflow (to inf) when it is 1e30
    monkeypatch.setattr(chunked, "MAX_WEIGHT", max_weight)
    q, k, v = randn(gen, 2, 5, 8), randn(gen, 2, 16, 8), randn(gen, 2, 16, 3)
    bias = rise * (torch.arange(16) // 4).double()  # (S,)
    out = attn_lib.chunked_attention(q, k, v, bias=bias, block_size=(5, 4))
    expected = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=bias
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [-1000.0, 0.0, 1000.0])
def test_a_row_whose_first_tiles_are_masked_takes_its_shift_later(offset, gen):
    # keys 0-7 are masked; keys 8-15 score near `offset`: the row's shift must
    # come from them, not stay at the 0 it had while it saw nothing
    q, k, v = randn(gen, 3, 8), randn(gen, 16, 8), randn(gen, 16, 2)
    mask = torch.arange(16) >= 8
    bias = torch.full((16,), offset, dtype=q.dtype)
    out = attn_lib.chunked_attention(q, k, v, mask=mask, bias=bias, block_size=4)
    expected = F.scaled_dot_product_attention(q[None], k[None, 8:], v[None, 8:])[0]
    torch.testing.assert_close(out, expected)


def test_heads_split_into_groups_give_the_same_outputs_and_gradients(gen, monkeypatch):
    q, k, v = (randn(gen, 2, 3, n, 8).requires_grad_() for n in (9, 11, 11))
    bias = randn(gen, 3, 9, 11).requires_grad_()  # per head
    mask = random_mask(gen, 2, 1, 9, 11)  # per batch row
    mask[..., 0] = True
    results = []
    for tile_elements in (1, chunked.TILE_ELEMENTS):  # groups of 1-2 heads, or all 6
        monkeypatch.setattr(chunked, "TILE_ELEMENTS", tile_elements)
        out = attn_lib.chunked_attention(q, k, v, mask=mask, bias=bias, block_size=4)
        grads = torch.autograd.grad(out.sin().sum(), (q, k, v, bias))
        results.append((out, *grads))
    math = attn_lib.attention(q, k, v, mask=mask, bias=bias, backend="math")
    results.append((math, *torch.autograd.grad(math.sin().sum(), (q, k, v, bias))))
    for grouped, together, plain in zip(*results, strict=True):
        torch.testing.assert_close(grouped, together)
        torch.testing.assert_close(grouped, plain)


@pytest.mark.parametrize("via", ["mask", "bias", "causal", "tile"])
def test_empty_rows_give_zeros_and_zero_finite_grads(via, gen, device):
    q = randn(gen, 2, 5, 4, device=device).requires_grad_()
    k = randn(gen, 2, 3, 4, device=device).requires_grad_()
    v = randn(gen, 2, 3, 2, device=device).requires_grad_()
    kwargs, empty = {"block_size": 2}, [0, 1]
    if via in ("mask", "tile"):
        mask = torch.ones(2, 5, 3, dtype=torch.bool, device=device)
        mask[:, :2] = False
        if via == "tile":  # row 3 sees only the last key: its first tile is all masked
            mask[:, 3, :2] = False
        kwargs["mask"] = mask
    elif via == "bias":
        bias = torch.zeros(5, 3, dtype=q.dtype, device=device)
        bias[:2] = float("-inf")
        kwargs["bias"] = bias
    else:  # T=5 > S=3: the first two queries see no key
        kwargs["is_causal"] = True
    out = attn_lib.chunked_attention(q, k, v, **kwargs)
    assert torch.isfinite(out).all() and (out[:, empty] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, empty] == 0).all()


def test_fully_masked_tiles_between_visible_ones(gen):
    q, k, v = randn(gen, 6, 4), randn(gen, 12, 4), randn(gen, 12, 3)
    mask = torch.ones(6, 12, dtype=torch.bool)
    mask[:, 3:9] = False  # two whole tiles of size 3 see nothing
    out = attn_lib.chunked_attention(q, k, v, mask=mask, block_size=3)
    torch.testing.assert_close(out, _reference(q, k, v, mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 30.0])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_error_within_twice_torch(dtype, magnitude, causal, gen, device):
    t = 47 if causal else 33  # torch's is_causal is top-left: compare squares only
    q = randn(gen, 2, 4, t, 64, device=device) * magnitude
    k = randn(gen, 2, 4, 47, 64, device=device) * magnitude
    v = randn(gen, 2, 4, 47, 64, device=device)
    golden = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # float64
    lo = [x.to(dtype) for x in (q, k, v)]
    ours = attn_lib.chunked_attention(*lo, is_causal=causal, block_size=16)
    theirs = F.scaled_dot_product_attention(*lo, is_causal=causal)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    our_err = (ours.double() - golden).abs().max().item()
    torch_err = (theirs.double() - golden).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


def test_fp16_gradients_within_twice_torch_error(gen):
    q, k, v = (randn(gen, 2, n, 16) * 4 for n in (7, 13, 13))

    def grads(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        fn(*xs).double().square().sum().backward()
        return [x.grad for x in xs]

    golden = grads(F.scaled_dot_product_attention, torch.float64)
    ours = grads(lambda *x: attn_lib.chunked_attention(*x, block_size=4), torch.half)
    theirs = grads(F.scaled_dot_product_attention, torch.half)
    for g, a, b in zip(golden, ours, theirs, strict=True):
        assert a.dtype == torch.float16 and torch.isfinite(a).all()
        our_err = (a.double() - g).abs().max().item()
        torch_err = (b.double() - g).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, (our_err, torch_err)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [3, 16])
def test_gradcheck_with_mask_and_learned_bias(causal, block_size, gen):
    q = randn(gen, 2, 7, 4).requires_grad_()
    k = randn(gen, 2, 13, 4).requires_grad_()
    v = randn(gen, 2, 13, 3).requires_grad_()
    bias = randn(gen, 1, 7, 13).requires_grad_()
    mask = random_mask(gen, 2, 7, 13)
    mask[1, 2] = False  # one empty row

    def fn(q, k, v, bias):
        return attn_lib.chunked_attention(
            q, k, v, mask=mask, bias=bias, is_causal=causal, block_size=block_size
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_gradients_match_autograd_through_math(gen):
    q, k, v = (randn(gen, 3, n, 8).requires_grad_() for n in (7, 13, 13))
    bias = randn(gen, 7, 13).requires_grad_()
    grads = []
    for backend in ("math", "chunked"):
        out = attn_lib.attention(q, k, v, bias=bias, is_causal=True, backend=backend)
        grads.append(torch.autograd.grad(out.sin().sum(), (q, k, v, bias)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_permuting_keys_and_values_together_changes_nothing(gen):
    q, k, v = randn(gen, 7, 4), randn(gen, 13, 4), randn(gen, 13, 3)
    perm = torch.randperm(13, generator=gen)
    a = attn_lib.chunked_attention(q, k, v, block_size=4)
    b = attn_lib.chunked_attention(q, k[perm], v[perm], block_size=4)
    torch.testing.assert_close(a, b)


def test_inputs_are_not_modified(gen):
    q, k, v = randn(gen, 7, 4), randn(gen, 13, 4), randn(gen, 13, 3)
    bias, mask = randn(gen, 7, 13), random_mask(gen, 7, 13)
    copies = [t.clone() for t in (q, k, v, bias, mask)]
    attn_lib.chunked_attention(q, k, v, mask=mask, bias=bias, block_size=3)
    for a, b in zip((q, k, v, bias, mask), copies, strict=True):
        assert torch.equal(a, b)


def test_backend_chunked_runs_it_and_is_registered_on_import(gen):
    assert "chunked" in attn_lib.available_backends()
    q, k, v = randn(gen, 7, 4), randn(gen, 13, 4), randn(gen, 13, 3)
    out = attn_lib.attention(q, k, v, is_causal=True, backend="chunked")
    torch.testing.assert_close(out, attn_lib.chunked_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match=r"dropout_p must be 0 with backend='chunked'"):
        attn_lib.attention(q, k, v, dropout_p=0.1, backend="chunked")


def test_auto_falls_back_with_a_reason_warned_once(gen, monkeypatch):
    q, k, v = randn(gen, 7, 4), randn(gen, 13, 4), randn(gen, 13, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the usual path warns nothing
        plain = attn_lib.attention(q, k, v)
    monkeypatch.setattr(functional, "_sdpa_fallback_reason", lambda d: "test reason")
    monkeypatch.setattr(functional, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"runs 'chunked', not 'sdpa': test reason"):
        out = attn_lib.attention(q, k, v)
    torch.testing.assert_close(out, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        attn_lib.attention(q, k, v)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8", None])
def test_block_size_must_be_a_positive_int(bad):
    q = torch.ones(3, 4)
    pair = r"block_size must be a positive int or a \(rows, cols\) tuple of positive"
    if bad is not None:  # None asks chunked for its default
        with pytest.raises(ValueError, match=pair + r" ints; got "):
            attn_lib.chunked_attention(q, q, q, block_size=bad)
    with pytest.raises(ValueError, match=r"block_size must be a positive int; got "):
        reference.tiled_attention(
            np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 4)), block_size=bad
        )


@pytest.mark.parametrize("lead,heads", [((), 1), ((2,), 2), ((1, 3), 3), ((2, 8), 16)])
def test_default_tiles_grow_taller_for_fewer_heads(lead, heads, gen, monkeypatch):
    rows, cols = chunked.default_block_size(heads)
    assert cols == 512 and rows == 256 * max(1, 4 // heads)
    q, k, v = (randn(gen, *lead, n, 8) for n in (9, 9, 9))
    seen = []
    real = chunked._forward
    monkeypatch.setattr(
        chunked,
        "_forward",
        lambda *args: seen.append(args[-1]) or real(*args),
    )
    out = attn_lib.chunked_attention(q, k, v, is_causal=True)
    assert seen == [(rows, cols)]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected)
    assert tile_plan(9, 9, heads=heads) == tile_plan(9, 9, block_size=(rows, cols))


def test_default_block_size_checks_heads():
    with pytest.raises(
        ValueError, match=re.escape("heads must be a positive int; got 0")
    ):
        chunked.default_block_size(0)


@pytest.mark.parametrize("bad", [(0, 4), (4,), (4, 4, 4), [4, 4], (4, 4.0), (True, 2)])
def test_block_size_pairs_must_hold_two_positive_ints(bad):
    q = torch.ones(3, 4)
    with pytest.raises(
        ValueError, match=re.escape(f"tuple of positive ints; got {bad!r}")
    ):
        attn_lib.chunked_attention(q, q, q, block_size=bad)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("size", [(1, 7), (5, 2), (3, 64), (64, 3), 4])
def test_rectangular_tiles_match_torch_sdpa(gen, causal, size):
    q, k, v = (randn(gen, 2, 3, n, 8) for n in (11, 11, 11))
    out = attn_lib.chunked_attention(q, k, v, is_causal=causal, block_size=size)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, expected)


def test_bad_inputs_are_named():
    q = torch.ones(2, 7, 4)
    with pytest.raises(
        TypeError, match=r"mask must be a bool tensor .*pass an additive mask as bias="
    ):
        attn_lib.chunked_attention(q, q, q, mask=torch.zeros(7, 7))
    with pytest.raises(
        ValueError,
        match=r"mask must be broadcastable to \(2, 7, 7\); got shape \(3, 7\)",
    ):
        attn_lib.chunked_attention(q, q, q, mask=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"scale must be a finite positive float; got 0.0"
    ):
        attn_lib.chunked_attention(q, q, q, scale=0.0)
    with pytest.raises(ValueError, match=r"k and v must have the same length S"):
        attn_lib.chunked_attention(q, q, torch.ones(2, 5, 4))


def test_empty_queries_or_keys_give_the_plain_paths_result():
    q, k, v = torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 5)
    assert attn_lib.chunked_attention(q[:, :0], k, v).shape == (1, 0, 5)
    no_keys = attn_lib.chunked_attention(q, k[:, :0], v[:, :0])
    assert no_keys.shape == (1, 2, 5) and (no_keys == 0).all()
    via_backend = attn_lib.attention(q, k[:, :0], v[:, :0], backend="chunked")
    assert (via_backend == 0).all()
