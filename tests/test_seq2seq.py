"""attn_lib.seq2seq: number-word data, the encoder-decoder, greedy decoding."""

from __future__ import annotations

import pytest
import torch
from num2words import num2words

from attn_lib import padding_mask
from attn_lib import seq2seq as s2s
from attn_lib.train import fit, set_seed


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread (and a busy machine thrashes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("lang", ["en", "fr", "de", "es"])
def test_tokenize_round_trips_num2words(lang):
    for n in [*range(0, 200), 1971, 2024, 80_081, 999_999]:
        text = num2words(n, lang=lang)
        tokens = s2s.tokenize(text)
        assert s2s.detokenize(tokens) == text
        assert all(t and " " not in t for t in tokens)


def test_number_pairs_are_num2words_text():
    (en, fr), (en2, fr2) = s2s.number_pairs([71, 1200])
    assert s2s.detokenize(en) == "seventy-one" and fr == ["soixante", "et", "onze"]
    assert s2s.detokenize(fr2) == num2words(1200, lang="fr")
    (de,) = s2s.number_pairs([21], src="de", tgt="es")
    assert de == (["einundzwanzig"], ["veintiuno"])


def test_split_is_repeatable_disjoint_and_complete():
    train, test = s2s.split_numbers(1000, held_out=0.1, seed=3)
    assert (train, test) == s2s.split_numbers(1000, held_out=0.1, seed=3)
    assert len(test) == 100 and not set(train) & set(test)
    assert sorted(train + test) == list(range(1000))
    assert s2s.split_numbers(1000, held_out=0.1, seed=4)[1] != test
    with pytest.raises(ValueError, match=r"held_out must be in \(0, 1\); got 1.5"):
        s2s.split_numbers(10, held_out=1.5)


def test_vocab_encodes_decodes_and_pads():
    vocab = s2s.Vocab([["b", "a"], ["c"]])
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "a", "b", "c"]
    assert vocab.decode(vocab.encode(["c", "a"]) + [2, 4]) == ["c", "a"]
    ids, lengths = vocab.batch([["a"], ["b", "c"]], bos=True, eos=True)
    assert ids.tolist() == [[1, 3, 2, 0], [1, 4, 5, 2]]
    assert lengths.tolist() == [3, 4]
    with pytest.raises(
        KeyError, match=r"tokens must be in the vocabulary; got \['z'\]"
    ):
        vocab.encode(["a", "z"])


def _model(seed=0, **kw):
    set_seed(seed)
    return s2s.Seq2Seq(11, 13, embed_dim=16, num_layers=2, **kw).eval()


def _batch(gen, lengths, s=None):
    s = max(lengths) if s is None else s
    src = torch.randint(3, 11, (len(lengths), s), generator=gen)
    src = src.masked_fill(~padding_mask(lengths, s)[:, 0, 0], 0)  # (B, S)
    return src, torch.tensor(lengths)


def test_model_shapes_and_cross_weights_ignore_padding(gen):
    model = _model()
    src, lengths = _batch(gen, [7, 3, 5], s=9)
    tgt = torch.randint(3, 13, (3, 6), generator=gen)
    logits, weights = model(src, lengths, tgt, return_weights=True)
    assert logits.shape == (3, 6, 13) and len(weights) == 2
    for w in weights:
        assert w.shape == (3, 6, 9)
        for b, n in enumerate(lengths.tolist()):
            assert torch.all(w[b, :, n:] == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 6))


def test_padding_the_source_changes_no_logit(gen):
    model = _model()
    src, lengths = _batch(gen, [7, 3])
    tgt = torch.randint(3, 13, (2, 5), generator=gen)
    padded = torch.cat([src, torch.full((2, 4), 7)], dim=1)  # junk, not id 0
    torch.testing.assert_close(model(padded, lengths, tgt), model(src, lengths, tgt))
    alone = model(src[1:, :3], lengths[1:], tgt[1:])
    torch.testing.assert_close(model(src, lengths, tgt)[1:], alone)


def test_decoder_is_causal(gen):
    model = _model()
    src, lengths = _batch(gen, [5, 4])
    tgt = torch.randint(3, 13, (2, 6), generator=gen)
    changed = tgt.clone()
    changed[:, 4:] = 3
    torch.testing.assert_close(
        model(src, lengths, changed)[:, :4], model(src, lengths, tgt)[:, :4]
    )


def test_greedy_decode_agrees_with_teacher_forced_argmax(gen):
    model = _model(seed=1)
    src, lengths = _batch(gen, [6, 2, 4])
    ys = s2s.greedy_decode(model, src, lengths, max_len=8)  # (B, L)
    inputs = torch.cat([torch.ones(3, 1, dtype=torch.long), ys[:, :-1]], dim=1)
    best = model(src, lengths, inputs).argmax(-1)  # (B, L)
    for b in range(3):
        row = ys[b].tolist()
        end = row.index(2) + 1 if 2 in row else len(row)
        assert best[b, :end].tolist() == row[:end]
        assert all(t == 2 for t in row[end:])


def test_loss_ignores_padding(gen):
    model = _model()
    src, lengths = _batch(gen, [5, 4])
    tgt_in = torch.randint(3, 13, (2, 4), generator=gen)
    tgt_out = torch.randint(3, 13, (2, 4), generator=gen)
    loss = s2s.seq2seq_loss(model, src, lengths, tgt_in, tgt_out)
    extra_in = torch.cat([tgt_in, torch.full((2, 3), 5)], dim=1)
    extra_out = torch.cat([tgt_out, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(
        s2s.seq2seq_loss(model, src, lengths, extra_in, extra_out), loss
    )


def test_a_small_model_learns_to_translate_numbers():
    pairs = s2s.number_pairs(range(100))
    sv, tv = s2s.Vocab(p[0] for p in pairs), s2s.Vocab(p[1] for p in pairs)
    src, lengths = sv.batch([p[0] for p in pairs])
    tgt, _ = tv.batch([p[1] for p in pairs], bos=True, eos=True)
    set_seed(0)
    model = s2s.Seq2Seq(len(sv), len(tv), embed_dim=32, num_layers=1)
    batch = (src, lengths, tgt[:, :-1], tgt[:, 1:])
    losses = fit(model, s2s.seq2seq_loss, lambda step: batch, steps=150, progress=False)
    assert losses[-1] < 0.1 * losses[0]
    got = s2s.translate(model, [p[0] for p in pairs], sv, tv)
    assert sum(g == p[1] for g, p in zip(got, pairs, strict=True)) >= 90


def test_bad_arguments_are_named(gen):
    with pytest.raises(ValueError, match=r"num_layers must be a positive int; got 0"):
        s2s.Seq2Seq(5, 5, num_layers=0)
    model = _model(max_len=4)
    src, lengths = _batch(gen, [5])
    with pytest.raises(ValueError, match=r"sequences must be at most max_len=4 long"):
        model(src, lengths, src)


def test_cross_weights_are_one_row_per_target_word_plus_eos():
    pairs = s2s.number_pairs([71, 342])
    sv, tv = s2s.Vocab(p[0] for p in pairs), s2s.Vocab(p[1] for p in pairs)
    model = s2s.Seq2Seq(len(sv), len(tv), embed_dim=16, num_layers=2)
    en, fr = pairs[1]
    weights = s2s.cross_weights(model, en, fr, sv, tv)
    assert len(weights) == 2 and not model.training
    src, lengths = sv.batch([en])
    tgt, _ = tv.batch([fr], bos=True)
    _, expected = model(src, lengths, tgt, return_weights=True)
    for w, e in zip(weights, expected, strict=True):
        assert w.shape == (len(fr) + 1, len(en))
        torch.testing.assert_close(w, e[0])
        torch.testing.assert_close(w.sum(-1), torch.ones(len(fr) + 1))
