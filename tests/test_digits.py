"""attn_lib.digits: token sequences from real digits, a small model that learns them."""

import pytest
import torch

from attn_lib import digits
from attn_lib.train import fit, set_seed


def test_rows_are_the_image_and_patches_are_2x2_blocks():
    images = torch.arange(64.0).view(1, 8, 8)
    assert torch.equal(digits.image_to_tokens(images, "rows"), images)
    patches = digits.image_to_tokens(images, "patches")  # (1, 16, 4)
    assert patches.shape == (1, 16, 4)
    assert patches[0, 0].tolist() == [0, 1, 8, 9]  # top-left block
    assert patches[0, 1].tolist() == [2, 3, 10, 11]  # its right neighbour
    assert patches[0, 4].tolist() == [16, 17, 24, 25]  # first block of row 2
    assert patches.sum() == images.sum()


def test_load_gives_a_repeatable_disjoint_split_of_real_digits():
    x_train, y_train, x_test, y_test = digits.load_digit_sequences()
    assert x_train.shape == (1348, 8, 8) and x_test.shape == (449, 8, 8)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(y_test.tolist()) == set(range(10))
    again = digits.load_digit_sequences()
    assert torch.equal(again[2], x_test) and torch.equal(again[3], y_test)
    train_rows = {tuple(r) for r in x_train.flatten(1).tolist()}
    test_rows = [tuple(r) for r in x_test.flatten(1).tolist()]
    assert sum(r in train_rows for r in test_rows) < 0.05 * len(test_rows)
    other = digits.load_digit_sequences(seed=1)
    assert not torch.equal(other[3], y_test)


def test_batches_depend_on_the_step_only():
    x, y = torch.arange(100.0).view(50, 2, 1), torch.arange(50)
    batches = digits.batch_sampler(x, y, batch_size=8, seed=3)
    first, again = batches(5), digits.batch_sampler(x, y, batch_size=8, seed=3)(5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(first[0][:, 0, 0], 2 * first[1].float())  # pairs kept
    assert not torch.equal(batches(6)[1], first[1])


def test_model_shapes_and_per_head_weights():
    model = digits.DigitsTransformer(16, 4, embed_dim=16, num_heads=4, num_layers=3)
    model.eval()  # in training, the weights returned are those after dropout
    logits, maps = model(torch.rand(5, 16, 4), return_weights=True)
    assert logits.shape == (5, 10) and len(maps) == 3
    assert all(w.shape == (5, 4, 16, 16) for w in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(5, 4, 16))


def test_a_short_training_run_learns_the_digits():
    x_train, y_train, x_test, y_test = digits.load_digit_sequences()
    set_seed(0)
    model = digits.DigitsTransformer(embed_dim=32, num_heads=4, num_layers=1)
    before = digits.accuracy(model, x_test, y_test)
    batches = digits.batch_sampler(x_train, y_train, batch_size=64)
    fit(model, digits.classification_loss, batches, steps=150, progress=False)
    after = digits.accuracy(model, x_test, y_test)
    assert before < 0.3 and after > 0.8


def test_errors_are_pinned():
    with pytest.raises(ValueError, match=r"tokens must be one of 'rows', 'patches'"):
        digits.image_to_tokens(torch.zeros(1, 8, 8), "pixels")
    with pytest.raises(
        ValueError, match=r"images must have shape \(N, 8, 8\); got shape \(1, 4, 4\)"
    ):
        digits.image_to_tokens(torch.zeros(1, 4, 4))
    with pytest.raises(
        ValueError, match=r"x must have shape \(B, 8, 8\); got shape \(2, 16, 4\)"
    ):
        digits.DigitsTransformer()(torch.zeros(2, 16, 4))
    with pytest.raises(ValueError, match=r"x and y must have the same length"):
        digits.batch_sampler(torch.zeros(3, 1, 1), torch.zeros(4))
