"""attn_lib.plotting: labelled heatmaps, queries on rows and keys on columns."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import attn_lib  # noqa: E402


def test_plot_attention_labels_rows_as_queries_and_columns_as_keys():
    w = torch.softmax(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), -1)
    ax = attn_lib.plot_attention(
        w, queries=["q0", "q1"], keys=["a", "b", "c"], title="t"
    )
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("key", "query", "t")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q0", "q1"]
    assert ax.images[0].get_array().shape == (2, 3)
    plt.close("all")


def test_plot_mask_draws_booleans_and_refuses_floats():
    ax = attn_lib.plot_mask(attn_lib.causal_mask(3, 5))
    assert ax.images[0].get_array().shape == (3, 5)
    with pytest.raises(
        TypeError, match=r"mask must be boolean \(True = may attend\); got float32"
    ):
        attn_lib.plot_mask(torch.zeros(2, 2))
    plt.close("all")


def test_plot_attention_refuses_wrong_rank_and_label_count():
    with pytest.raises(
        ValueError, match=r"weights must be 2-D \(T, S\).*; got shape \(1, 2, 3\)"
    ):
        attn_lib.plot_attention(torch.zeros(1, 2, 3))
    with pytest.raises(
        ValueError,
        match=r"keys must have one label per column \(key\), 3 in all; got 2 labels",
    ):
        attn_lib.plot_attention(torch.zeros(2, 3), keys=["a", "b"])
    plt.close("all")
