"""Issue 9's fault kinds, one test family each, on every backend and every module.

Families here: fully masked query rows; mask polarity; float masks used as
scores; padding over keys; causal alignment when T != S; dropout at
evaluation; finite "large negative" fills; softmax temperature; head split and
merge. Positions and the online softmax are in test_contract_positions.py;
fp16 overflow, gradcheck and the 2x error rule in test_contract_numerics.py.
"""

from __future__ import annotations

import io
import math
import re
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _contract import (
    BACKENDS,
    MODULE_IDS,
    MODULES,
    build,
    call,
    has,
    inputs,
    key_length,
    need,
    runnable,
)
from conftest import numpy_reference, randn, random_mask

import attn_lib
from attn_lib import reference

F32 = torch.float32


def _qkv(gen, *lead, t=7, s=13, d=5, dv=3, device="cpu", dtype=F32):
    return (
        randn(gen, *lead, t, d, dtype=dtype, device=device),
        randn(gen, *lead, s, d, dtype=dtype, device=device),
        randn(gen, *lead, s, dv, dtype=dtype, device=device),
    )


def _as_heads(w: torch.Tensor) -> torch.Tensor:
    """Single-head modules return ``(B, T, S)``; view it as ``(B, 1, T, S)``."""
    return w.unsqueeze(1) if w.dim() == 3 else w


# === 1. fully masked query rows ===================================================


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_row_issue_example(backend):
    q = torch.tensor([[1.0], [1.0]])
    k = torch.tensor([[1.0], [2.0]])
    v = torch.tensor([[10.0], [20.0]])
    mask = torch.tensor([[True, True], [False, False]])
    runnable(backend, q)
    out = attn_lib.attention(q, k, v, mask=mask, backend=backend)
    expected = torch.tensor([[17.310586], [0.0]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)
    ref_out, _ = numpy_reference(q, k, v, mask)
    torch.testing.assert_close(ref_out, expected.double(), atol=1e-6, rtol=1e-7)


def _empty_rows_problem(gen, how, device):
    """q, k, v and keyword arguments under which queries 0 and 3 see no key."""
    q, k, v = _qkv(gen, 2, t=7, s=13, device=device)
    mask = random_mask(gen, 2, 7, 13, device=device)
    mask[..., 4] = True  # every other row sees something
    mask[:, [0, 3]] = False
    if how == "mask":
        return (q, k, v), {"mask": mask}
    bias = randn(gen, 2, 7, 13, dtype=F32, device=device)
    if how == "bias -inf":
        return (q, k, v), {"bias": bias.masked_fill(~mask, float("-inf"))}
    if how == "mask and bias":
        return (q, k, v), {"mask": mask, "bias": bias}
    # causal with T > S: the first T - S queries see nothing (bottom-right)
    q = randn(gen, 2, 16, 5, dtype=F32, device=device)
    return (q, k, v), {"is_causal": True}


HOW = ["mask", "bias -inf", "mask and bias", "causal T>S"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_zero_output_and_finite_zero_grads(backend, how, gen, device):
    (q, k, v), kw = _empty_rows_problem(gen, how, device)
    runnable(backend, q, kw.get("bias"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attn_lib.attention(q, k, v, backend=backend, **kw)
    _, weights = attn_lib.attention(q, k, v, backend="math", return_weights=True, **kw)
    empty = weights.sum(-1) == 0  # (B, T)
    assert empty.any() and not empty.all()
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all()

    (out * torch.randn(out.shape, generator=gen).to(device)).sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[empty] == 0).all()  # an empty row passes nothing back


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_same_with_and_without_weights(backend, how, gen, device):
    (q, k, v), kw = _empty_rows_problem(gen, how, device)
    runnable(backend, q, kw.get("bias"))
    out = attn_lib.attention(q, k, v, backend=backend, **kw)
    out_w, w = attn_lib.attention(q, k, v, return_weights=True, **kw)
    torch.testing.assert_close(out, out_w)
    torch.testing.assert_close(w @ v, out_w)
    sums = w.sum(-1)
    assert ((sums == 0) | torch.isclose(sums, torch.ones_like(sums))).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_empty_gives_zeros_and_zero_grads(backend, gen, device):
    q, k, v = (x.requires_grad_() for x in _qkv(gen, 2, device=device))
    runnable(backend, q)
    mask = attn_lib.padding_mask([0, 0], 13, device=device)[:, 0]  # (B, 1, S)
    out = attn_lib.attention(q, k, v, mask=mask, backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    for x in (q, k, v):
        assert (x.grad == 0).all()


def test_safe_softmax_empty_row_is_zero_with_zero_grad():
    scores = torch.tensor(
        [[0.5, float("-inf")], [float("-inf")] * 2], requires_grad=True
    )
    weights = attn_lib.safe_softmax(scores)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    weights.sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[1] == 0).all()
    naive = torch.softmax(scores.detach(), -1)  # what the guard is for
    assert torch.isnan(naive[1]).all()


def test_reference_empty_rows_are_zero(gen):
    q, k, v = _qkv(gen, t=4, s=6, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out, w = numpy_reference(q, k, v, mask)
    assert (out[2] == 0).all() and (w[2] == 0).all()
    if has("reference", "tiled_attention"):
        tiled = reference.tiled_attention(q.numpy(), k.numpy(), v.numpy(), mask.numpy())
        assert (tiled[2] == 0).all()


@pytest.mark.parametrize("case", MODULES, ids=MODULE_IDS)
def test_module_empty_row_zero_attention_and_finite_grads(case, gen, device):
    module = build(case, device=device)
    x, context = inputs(case, gen, device=device)
    s = key_length(case, 5, 7)
    mask = torch.ones(2, 1, 5, s, dtype=torch.bool, device=device)
    mask[0, :, 3] = False  # query 3 of batch 0 may attend to nothing
    x.requires_grad_()
    out, w = call(case, module, x, context, mask=mask, return_weights=True)
    plain = call(case, module, x, context, mask=mask)
    torch.testing.assert_close(out, plain)
    assert (_as_heads(w)[0, :, 3] == 0).all()
    # zero attention output -> the output projection's bias alone
    torch.testing.assert_close(out[0, 3], module.out_proj.bias)
    out[0, 3].sum().backward(retain_graph=True)
    assert (x.grad == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


# === 2. mask polarity between APIs ================================================


@pytest.mark.parametrize("backend", BACKENDS)
def test_true_means_may_attend(backend, gen, device):
    q, k, v = _qkv(gen, t=7, s=13, device=device)
    runnable(backend, q)
    pick = torch.randint(0, 13, (7,), generator=gen).to(device)
    mask = torch.nn.functional.one_hot(pick, 13).bool()  # (T, S): one key each
    out = attn_lib.attention(q, k, v, mask=mask, backend=backend)
    torch.testing.assert_close(out, v[pick])  # the only allowed key's value
    inverted = attn_lib.attention(q, k, v, mask=~mask, backend=backend)
    assert not torch.allclose(inverted, out)


def test_polarity_matches_sdpa_and_is_opposite_to_nn_multihead(gen):
    q, k, v = _qkv(gen, 1, t=7, s=13, d=4, dv=4)
    mask = random_mask(gen, 7, 13)
    mask[:, 0] = True
    ours = attn_lib.attention(q, k, v, mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # True = attend
    torch.testing.assert_close(ours, sdpa)
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True, bias=False)
    eye = torch.eye(4)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([eye, eye, eye]))
        mha.out_proj.weight.copy_(eye)
    # nn.MultiheadAttention: True = blocked, and no 1/sqrt(D) change here
    theirs, _ = mha(q, k, v, attn_mask=~mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    wrong, _ = mha(q, k, v, attn_mask=mask)
    assert not torch.allclose(ours, wrong, atol=1e-3)


def test_reference_mask_polarity_matches_attention(gen):
    q, k, v = _qkv(gen, t=7, s=13, dtype=torch.float64)
    mask = random_mask(gen, 7, 13)
    mask[:, 2] = True
    out, w = numpy_reference(q, k, v, mask)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(attn_lib.attention(q, k, v, mask=mask), out)


def test_torch_mask_converters_flip_polarity():
    from_torch = need("masks", "from_torch_mask")
    to_torch = need("masks", "to_torch_mask")
    to_kpm = need("masks", "to_torch_key_padding_mask")
    causal = attn_lib.causal_mask(4, 6)
    assert torch.equal(to_torch(causal), ~causal)
    assert torch.equal(from_torch(to_torch(causal)), causal)
    pad = attn_lib.padding_mask([2, 6], 6)
    kpm = to_kpm(pad)
    assert kpm.shape == (2, 6) and torch.equal(kpm, ~pad[:, 0, 0])
    assert torch.equal(from_torch(key_padding_mask=kpm), pad)


def test_mha_from_torch_with_inverted_masks(gen):
    mha_cls = need("multihead", "MultiHeadAttention")
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(12, 3, batch_first=True).eval().double()
    ours = mha_cls.from_torch(theirs).eval()
    x = randn(gen, 2, 7, 12)
    allowed = random_mask(gen, 7, 7)
    allowed[:, 0] = True
    keep = attn_lib.padding_mask([7, 4], 7)  # (B, 1, 1, S)
    expected, _ = theirs(
        x, x, x, attn_mask=~allowed, key_padding_mask=~keep[:, 0, 0], need_weights=False
    )
    torch.testing.assert_close(ours(x, mask=allowed & keep), expected)


# === 3. float masks silently used as additive scores ==============================


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.int64, torch.uint8]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_refuses_non_bool_masks(backend, dtype, gen):
    q, k, v = _qkv(gen, t=7, s=13)
    mask = random_mask(gen, 7, 13).to(dtype)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .*bias="):
        attn_lib.attention(q, k, v, mask=mask, backend=backend)


def test_additive_scores_go_through_bias(gen):
    q, k, v = _qkv(gen, t=7, s=13)
    mask = random_mask(gen, 7, 13)
    mask[:, 0] = True
    additive = torch.zeros(7, 13).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(
        attn_lib.attention(q, k, v, bias=additive),
        attn_lib.attention(q, k, v, mask=mask),
    )
    # the classic slip: a 0/1 float "mask" added to scores changes little or nothing
    assert not torch.allclose(
        attn_lib.attention(q, k, v, bias=mask.float()),
        attn_lib.attention(q, k, v, mask=mask),
    )


def test_reference_refuses_float_masks(gen):
    q, k, v = _qkv(gen, t=3, s=4, dtype=torch.float64)
    with pytest.raises(TypeError, match="mask must be a bool array"):
        reference.scaled_dot_product_attention(
            q.numpy(), k.numpy(), v.numpy(), torch.ones(3, 4).numpy()
        )


def test_chunked_refuses_float_masks(gen):
    chunked = need("chunked", "chunked_attention")
    q, k, v = _qkv(gen, t=3, s=4)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .*bias="):
        chunked(q, k, v, mask=torch.ones(3, 4))


@pytest.mark.parametrize("case", MODULES, ids=MODULE_IDS)
def test_modules_refuse_float_masks(case, gen):
    module = build(case)
    x, context = inputs(case, gen)
    mask = torch.zeros(1, 1, 5, key_length(case, 5, 7), dtype=torch.float64)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .*bias="):
        call(case, module, x, context, mask=mask)


# === 4. padding masks broadcast over keys, not queries ============================


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_masks_keys_for_every_query(backend, gen, device):
    q, k, v = _qkv(gen, 2, 3, t=7, s=13, device=device)
    runnable(backend, q)
    mask = attn_lib.padding_mask([13, 5], 13, device=device)  # (B, 1, 1, S)
    assert mask.shape == (2, 1, 1, 13)
    out = attn_lib.attention(q, k, v, mask=mask, backend=backend)
    _, w = attn_lib.attention(q, k, v, mask=mask, return_weights=True)
    assert (w[1, ..., 5:] == 0).all()  # no query gives a padded key weight
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7, device=device))
    # the values of padded keys cannot leak into any output
    v2 = v.clone()
    v2[1, :, 5:] = 1e3
    torch.testing.assert_close(
        attn_lib.attention(q, k, v2, mask=mask, backend=backend), out
    )


def test_padding_mask_over_queries_is_refused(gen):
    q, k, v = _qkv(gen, 2, 3, t=7, s=13)
    keep = attn_lib.padding_mask([13, 5], 13)
    over_queries = keep.transpose(-1, -2)  # (B, 1, S, 1): the slip
    with pytest.raises(
        ValueError, match=r"mask must be broadcastable to \(2, 3, 7, 13\)"
    ):
        attn_lib.attention(q, k, v, mask=over_queries)


@pytest.mark.parametrize("case", MODULES, ids=MODULE_IDS)
def test_module_padding_leaves_real_tokens_alone(case, gen):
    module = build(case).eval()
    x, context = inputs(case, gen, t=6, s=8)
    s = key_length(case, 6, 8)
    lengths = [s, s - 3]
    mask = attn_lib.padding_mask(lengths, s)
    out = call(case, module, x, context, mask=mask)
    if case.cross:
        context = context.clone()
        context[1, lengths[1] :] = 50.0
    else:
        x = x.clone()
        x[1, lengths[1] :] = 50.0
    again = call(case, module, x, context, mask=mask)
    real = lengths[1] if not case.cross else 6  # queries that are real tokens
    torch.testing.assert_close(again[:, :real], out[:, :real])


# === 5. causal alignment when T != S ==============================================


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_issue_example(backend):
    q, k = torch.zeros(3, 1), torch.zeros(2, 1)
    v = torch.tensor([[1.0], [2.0]])
    runnable(backend, q)
    out = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[0.0], [1.0], [1.5]]))


@pytest.mark.parametrize("t,s", [(7, 13), (13, 7), (1, 9), (9, 9)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_is_bottom_right_on_every_backend(backend, t, s, gen, device):
    q, k, v = _qkv(gen, 2, t=t, s=s, device=device)
    runnable(backend, q)
    i = torch.arange(t)[:, None]
    j = torch.arange(s)[None, :]
    rule = (j <= i + (s - t)).to(device)
    assert torch.equal(attn_lib.causal_mask(t, s, device=device), rule)
    out = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
    expected, _ = numpy_reference(q, k, v, rule)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(out, top_left, atol=1e-5) == (t == s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_last_queries_equal_decoding_rows(backend, gen, device):
    q, k, v = _qkv(gen, 2, t=9, s=9, device=device)
    runnable(backend, q)
    full = attn_lib.attention(q, k, v, is_causal=True, backend=backend)
    for m in (1, 3):
        tail = attn_lib.attention(q[:, -m:], k, v, is_causal=True, backend=backend)
        torch.testing.assert_close(tail, full[:, -m:])


@pytest.mark.parametrize(
    "case", [m for m in MODULES if m.causal], ids=[m.name for m in MODULES if m.causal]
)
def test_causal_module_prefix_ignores_later_tokens(case, gen):
    module = build(case).eval()
    x, _ = inputs(case, gen, t=7)
    out = call(case, module, x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 3, x.shape[-1], generator=gen, dtype=x.dtype)
    again = call(case, module, x2)
    torch.testing.assert_close(again[:, :4], out[:, :4])
    assert not torch.allclose(again[:, 4:], out[:, 4:])


# === 6. dropout active at evaluation ==============================================


@pytest.mark.parametrize("case", MODULES, ids=MODULE_IDS)
def test_eval_is_deterministic_and_dropout_only_trains(case, gen, device):
    module = build(case, dropout=0.5, device=device)
    plain = build(case, dropout=0.0, device=device).eval()  # same seed, same weights
    x, context = inputs(case, gen, device=device)
    module.eval()
    torch.manual_seed(1)
    a = call(case, module, x, context)
    torch.manual_seed(2)
    b = call(case, module, x, context)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, call(case, plain, x, context))
    module.train()
    torch.manual_seed(3)
    trained = call(case, module, x, context)
    assert not torch.allclose(trained, a)


def test_attention_without_dropout_is_deterministic(gen):
    q, k, v = _qkv(gen, t=7, s=13)
    torch.manual_seed(0)
    a = attn_lib.attention(q, k, v, dropout_p=0.0)
    torch.manual_seed(1)
    assert torch.equal(a, attn_lib.attention(q, k, v, dropout_p=0.0))


# === 7. finite "large negative" fill values =======================================

_LIB = Path(attn_lib.__file__).parent
_SENTINEL_TEXT = re.compile(r"^-?\s*(1e\d+|1\.0e\d+|\d{5,}(\.0*)?)$")


def _sentinels(source: str) -> list[str]:
    """Code (not comments or docstrings) that fills with a finite 'very negative' value."""
    found = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1].string if i else ""
        after = "".join(t.string for t in tokens[i + 1 : i + 3])
        if tok.type == tokenize.NUMBER and prev == "-":
            value = float(tok.string.replace("_", "")) if "j" not in tok.string else 0
            if value >= 1e4:
                found.append(f"line {tok.start[0]}: -{tok.string}")
        elif tok.type == tokenize.NAME and tok.string in ("finfo", "iinfo"):
            rest = "".join(t.string for t in tokens[i + 1 : i + 12])
            if re.search(r"\)\.(min|max)\b", rest) or after.startswith(".min"):
                found.append(f"line {tok.start[0]}: {tok.string}(...).min/max")
        elif tok.type == tokenize.STRING and prev == "(":
            text = tok.string.strip("\"'")
            if text.startswith("-") and _SENTINEL_TEXT.match(text):
                found.append(f"line {tok.start[0]}: {tok.string}")
    return found


def test_sentinel_scanner_catches_the_usual_forms():
    bad = (
        "s = s.masked_fill(m, -1e9)\n"
        "s = s.masked_fill(m, -10000.0)\n"
        "s = s.masked_fill(m, torch.finfo(s.dtype).min)\n"
        "s = s.masked_fill(m, float('-1e30'))\n"
        '"""docstring that says -1e9 is bad"""\n'
        "# a comment: -1e9\n"
        "ok = s.masked_fill(m, float('-inf'))\n"
    )
    assert len(_sentinels(bad)) == 4


@pytest.mark.parametrize("path", sorted(_LIB.glob("*.py")), ids=lambda p: p.name)
def test_no_finite_sentinel_fills_in_the_library(path):
    assert _sentinels(path.read_text()) == [], f"finite fill values in {path.name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_keys_get_exactly_zero_even_below_any_sentinel(backend, gen, device):
    _, k, v = _qkv(gen, t=4, s=6, device=device)
    q = torch.zeros(4, 5, device=device)  # equal scores: allowed keys share evenly
    runnable(backend, q)
    mask = torch.ones(4, 6, dtype=torch.bool, device=device)
    mask[:, 0] = False
    bias = torch.full((4, 6), -1e12, device=device)  # allowed, but far below -1e9
    out = attn_lib.attention(q, k, v, mask=mask, bias=bias, backend=backend)
    _, w = attn_lib.attention(q, k, v, mask=mask, bias=bias, return_weights=True)
    assert (w[:, 0] == 0).all()
    # a -1e9 fill would hand the masked key all the weight
    expected = v[1:].mean(0).expand(4, 3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_masks_stay_exact(backend, gen, device):
    q, k, v = _qkv(gen, 2, t=7, s=13, dtype=torch.float16, device=device)
    runnable(backend, q)
    mask = random_mask(gen, 7, 13, device=device)
    mask[:, 3] = True
    v2 = v.clone()
    v2[..., ~mask.any(0), :] = 100.0  # keys no query may see
    out = attn_lib.attention(q, k, v, mask=mask, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        attn_lib.attention(q, k, v2, mask=mask, backend=backend), out
    )


# === 8. the softmax temperature ===================================================


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_uses_the_query_key_dim(backend, gen, device):
    q, k, v = _qkv(gen, 2, t=7, s=13, d=16, dv=4, device=device)
    runnable(backend, q)
    out = attn_lib.attention(q, k, v, backend=backend)
    torch.testing.assert_close(
        out, attn_lib.attention(q, k, v, scale=0.25, backend=backend)
    )
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    for wrong in (1 / math.sqrt(4), 1 / math.sqrt(13), 1.0, 1 / 16):
        assert not torch.allclose(
            out, attn_lib.attention(q, k, v, scale=wrong, backend=backend), atol=1e-4
        )


def _module_weights(case, module, x, context):
    """The weights written out by hand: softmax(q k^T / sqrt(D)), heads split with a transpose."""
    b, t = x.shape[:2]
    h = case.heads
    hkv = getattr(module, "num_kv_heads", h)
    src = x if context is None else context
    q = module.q_proj(x)  # (B, T, H*D)
    k = module.k_proj(src)  # (B, S, Hkv*D)
    d = q.shape[-1] // h
    q = q.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
    k = k.view(b, -1, hkv, d).transpose(1, 2)  # (B, Hkv, S, D)
    k = k.repeat_interleave(h // hkv, dim=1)  # (B, H, S, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, T, S)
    if case.causal:
        scores = scores.masked_fill(
            ~attn_lib.causal_mask(t, k.shape[-2]), float("-inf")
        )
    return scores.softmax(-1), d


@pytest.mark.parametrize("case", MODULES, ids=MODULE_IDS)
def test_module_temperature_is_one_over_sqrt_head_dim(case, gen):
    module = build(case).eval()
    x, context = inputs(case, gen)
    _, w = call(case, module, x, context, return_weights=True)
    expected, d = _module_weights(case, module, x, context)
    torch.testing.assert_close(_as_heads(w), expected)
    hot, _ = _module_weights(case, module, x * math.sqrt(2.0), context)
    if context is None:  # scaling x by sqrt(2) scales scores by ~2: a wrong temperature
        assert not torch.allclose(_as_heads(w), hot, atol=1e-3)
    assert d == module.q_proj.out_features // case.heads


# === 9. head split/merge without the transpose ====================================


def test_split_heads_takes_feature_blocks_per_token(gen):
    split = need("multihead", "split_heads")
    merge = need("multihead", "merge_heads")
    x = randn(gen, 2, 7, 12)
    heads = split(x, 3)
    assert heads.shape == (2, 3, 7, 4)
    for h in range(3):
        torch.testing.assert_close(heads[:, h], x[..., 4 * h : 4 * h + 4])
    assert not torch.equal(heads, x.view(2, 3, 7, 4))  # the transpose-free slip
    assert torch.equal(merge(heads), x)


@pytest.mark.parametrize(
    "case",
    [m for m in MODULES if m.heads > 1],
    ids=[m.name for m in MODULES if m.heads > 1],
)
def test_multihead_modules_keep_batches_and_tokens_apart(case, gen):
    module = build(case).eval()
    x, context = inputs(case, gen, t=6, s=8)
    out = call(case, module, x, context)
    x2 = x.clone()
    x2[1] = torch.randn(x.shape[1:], generator=gen, dtype=x.dtype)
    torch.testing.assert_close(call(case, module, x2, context)[0], out[0])
    if not case.causal:  # without positions, self/cross-attention is equivariant
        perm = torch.randperm(6, generator=gen)
        torch.testing.assert_close(
            call(case, module, x[:, perm], context), out[:, perm]
        )


def test_multihead_matches_torch_with_several_heads_and_lengths(gen):
    mha_cls = need("multihead", "MultiHeadAttention")
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(12, 3, batch_first=True).eval().double()
    ours = mha_cls.from_torch(theirs).eval()
    x, c = randn(gen, 2, 7, 12), randn(gen, 2, 13, 12)
    expected, w = theirs(x, c, c, average_attn_weights=False)
    out, ours_w = ours(x, c, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ours_w, w)
