"""attn_lib.train: the shared training loop learns and repeats exactly."""

import pytest
import torch

from attn_lib.train import fit, set_seed


def _run():
    set_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    batches = lambda step: (x, y)  # noqa: E731
    loss_fn = lambda m, x, y: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
    return model, fit(model, loss_fn, batches, steps=200, lr=0.05, progress=False)


def test_fit_reduces_loss_and_leaves_model_in_eval_mode():
    model, losses = _run()
    assert len(losses) == 200
    assert losses[-1] < 0.01 * losses[0]
    assert not model.training


def test_fit_is_repeatable():
    assert _run()[1] == _run()[1]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"steps must be a positive int; got 0"):
        fit(torch.nn.Linear(1, 1), None, None, steps=0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative int; got -1"):
        set_seed(-1)
