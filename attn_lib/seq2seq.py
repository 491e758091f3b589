"""A small encoder-decoder that translates number words, built on cross-attention.

The data are number words written by ``num2words`` (installed, offline): the
source is one language (``"twenty-one"``), the target another
(``"vingt et un"``). The model is a pre-norm Transformer with one attention
head per layer: the encoder reads the source with self-attention, the decoder
reads its own prefix with causal self-attention and the source with
:class:`attn_lib.CrossAttention`.

Shapes: ``B`` sentences, ``S`` source tokens, ``T`` target tokens, ``E`` width.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .cross_attention import CrossAttention
from .functional import attention
from .masks import padding_mask

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

_TOKEN = re.compile(r"[^\s,-]+|[,-]")


def tokenize(text: str) -> list[str]:
    """Split number words into words, with ``-`` and ``,`` as tokens of their own.

    Example:
        >>> tokenize("one thousand, twenty-one")
        ['one', 'thousand', ',', 'twenty', '-', 'one']
    """
    return _TOKEN.findall(text)


def detokenize(tokens: Iterable[str]) -> str:
    """Undo :func:`tokenize`: ``detokenize(tokenize(s)) == s`` for num2words text.

    Example:
        >>> detokenize(['one', 'thousand', ',', 'twenty', '-', 'one'])
        'one thousand, twenty-one'
    """
    text = " ".join(tokens)
    return text.replace(" - ", "-").replace(" ,", ",")


def number_pairs(
    numbers: Iterable[int], *, src: str = "en", tgt: str = "fr"
) -> list[tuple[list[str], list[str]]]:
    """Token lists ``(source, target)`` for each number, written by ``num2words``.

    Args:
        numbers: non-negative ints.
        src: the source language code of ``num2words`` (``"en"``, ``"de"``, ...).
        tgt: the target language code.

    Example:
        >>> number_pairs([21])
        [(['twenty', '-', 'one'], ['vingt', 'et', 'un'])]
    """
    from num2words import num2words  # an optional dependency, used offline

    return [
        (tokenize(num2words(n, lang=src)), tokenize(num2words(n, lang=tgt)))
        for n in numbers
    ]


def split_numbers(
    n: int, *, held_out: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split ``0 .. n-1`` at random, repeatably, into (train, held-out) numbers.

    Example:
        >>> train, test = split_numbers(10, held_out=0.2)
        >>> len(train), len(test), sorted(train + test) == list(range(10))
        (8, 2, True)
    """
    _checks.positive_int(n, "n")
    if not 0.0 < held_out < 1.0:
        _checks.fail("held_out", "be in (0, 1)", repr(held_out))
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1.0 - held_out)))
    return sorted(order[:cut].tolist()), sorted(order[cut:].tolist())


class Vocab:
    """Token <-> id. Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; words
    follow in sorted order.

    Example:
        >>> vocab = Vocab([["vingt", "et", "un"]])
        >>> vocab.itos[3:], vocab.encode(["vingt", "un"])
        (['et', 'un', 'vingt'], [5, 4])
        >>> vocab.decode([1, 5, 3, 4, 2, 4])  # from <bos>, up to <eos>
        ['vingt', 'et', 'un']
    """

    def __init__(self, sentences: Iterable[Sequence[str]]) -> None:
        words = sorted({w for sentence in sentences for w in sentence})
        self.itos = [PAD, BOS, EOS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens``; an unknown token raises ``KeyError`` naming it."""
        unknown = [t for t in tokens if t not in self.stoi]
        if unknown:
            raise KeyError(f"tokens must be in the vocabulary; got {unknown}")
        return [self.stoi[t] for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``, stopping at the first ``<eos>``, skipping specials."""
        out = []
        for i in ids:
            if i == self.stoi[EOS]:
                break
            if i >= 3:
                out.append(self.itos[i])
        return out

    def batch(
        self,
        sentences: Sequence[Sequence[str]],
        *,
        bos: bool = False,
        eos: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad encoded sentences into ``ids (B, L)``; also return ``lengths (B,)``."""
        rows = [[BOS] * bos + list(s) + [EOS] * eos for s in sentences]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # (B, L)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(self.encode(row))
        return ids, lengths


class _SelfAttention(nn.Module):
    """One-head self-attention; ``causal`` uses ``attention(is_causal=True)``."""

    def __init__(self, embed_dim: int, *, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # 3 x (B, 1, T, E)
        out = attention(q, k, v, mask=mask, is_causal=self.causal)  # (B, 1, T, E)
        return self.out(out.squeeze(1))  # (B, T, E)


def _mlp(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dim, 4 * embed_dim),
        nn.GELU(),
        nn.Linear(4 * embed_dim, embed_dim),
    )


class _EncoderLayer(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attn = _SelfAttention(embed_dim, causal=False)
        self.mlp = _mlp(embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class _DecoderLayer(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(3))
        self.self_attn = _SelfAttention(embed_dim, causal=True)
        self.cross_attn = CrossAttention(embed_dim)
        self.mlp = _mlp(embed_dim)

    def forward(self, y, memory, mask):
        """Return the new ``y (B, T, E)`` and the cross weights ``(B, T, S)``."""
        y = y + self.self_attn(self.norms[0](y))
        read, weights = self.cross_attn(
            self.norms[1](y), memory, mask=mask, return_weights=True
        )
        y = y + read
        return y + self.mlp(self.norms[2](y)), weights


class Seq2Seq(nn.Module):
    r"""Encoder-decoder Transformer with one head per attention layer.

    .. math:: h = \mathrm{Encoder}(x_{1..S}),\quad
              p(y_t \mid y_{<t}, x) = \mathrm{softmax}(W\,
              \mathrm{Decoder}(y_{<t}, h)_t)

    Every decoder layer holds a causal self-attention over the target prefix
    and a :class:`attn_lib.CrossAttention` whose queries are the target
    positions and whose keys and values are the encoder outputs ``h``.

    Args:
        src_vocab: number of source token ids (id 0 is padding).
        tgt_vocab: number of target token ids.
        embed_dim: model width ``E``.
        num_layers: encoder layers, and decoder layers.
        max_len: longest sequence (learned position embeddings).

    Shape:
        - src: ``(B, S)`` ids, right-padded; src_lengths: ``(B,)``.
        - tgt: ``(B, T)`` ids starting with ``<bos>``.
        - output: logits ``(B, T, tgt_vocab)``; with ``return_weights``, also
          one cross-attention weight tensor ``(B, T, S)`` per decoder layer.

    Limitations:
        Learned positions: sequences longer than ``max_len`` are refused.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        embed_dim: int = 64,
        num_layers: int = 2,
        max_len: int = 32,
    ) -> None:
        super().__init__()
        for value, name in ((src_vocab, "src_vocab"), (tgt_vocab, "tgt_vocab")):
            _checks.positive_int(value, name)
        self.max_len = _checks.positive_int(max_len, "max_len")
        layers = _checks.positive_int(num_layers, "num_layers")
        self.src_embed = nn.Embedding(src_vocab, embed_dim)
        self.tgt_embed = nn.Embedding(tgt_vocab, embed_dim)
        self.pos = nn.Embedding(max_len, embed_dim)
        self.encoder = nn.ModuleList(_EncoderLayer(embed_dim) for _ in range(layers))
        self.decoder = nn.ModuleList(_DecoderLayer(embed_dim) for _ in range(layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, tgt_vocab)

    def _embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            _checks.fail(
                "sequences", f"be at most max_len={self.max_len} long", ids.shape[1]
            )
        positions = torch.arange(ids.shape[1], device=ids.device)  # (L,)
        return table(ids) + self.pos(positions)  # (B, L, E)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor):
        """Encoder outputs ``memory (B, S, E)`` and the source ``mask (B, 1, 1, S)``."""
        mask = padding_mask(src_lengths, src.shape[1])  # (B, 1, 1, S)
        h = self._embed(self.src_embed, src)
        for layer in self.encoder:
            h = layer(h, mask)
        return self.enc_norm(h), mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor):
        """Logits ``(B, T, V)`` and the cross weights of every layer."""
        y = self._embed(self.tgt_embed, tgt)
        weights = []
        for layer in self.decoder:
            y, w = layer(y, memory, mask)
            weights.append(w)
        return self.head(self.dec_norm(y)), weights

    def forward(self, src, src_lengths, tgt, *, return_weights: bool = False):
        """Logits ``(B, T, V)`` (and the cross weights, one ``(B, T, S)`` per layer)."""
        memory, mask = self.encode(src, src_lengths)
        logits, weights = self.decode(tgt, memory, mask)
        return (logits, weights) if return_weights else logits


def seq2seq_loss(model: Seq2Seq, src, src_lengths, tgt_in, tgt_out) -> torch.Tensor:
    """Mean cross-entropy of the next target token; padding (id 0) is ignored."""
    logits = model(src, src_lengths, tgt_in)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=0)


@torch.no_grad()
def greedy_decode(
    model: Seq2Seq, src: torch.Tensor, src_lengths: torch.Tensor, *, max_len: int = 24
) -> torch.Tensor:
    """Translate by picking the most likely next token until ``<eos>``.

    Returns ids ``(B, L)`` without ``<bos>``; rows that ended early are
    filled with ``<eos>`` (id 2). The encoder runs once; the decoder re-reads
    its whole prefix at each step (a cache would avoid that; see the KV-cache
    chapter).
    """
    memory, mask = model.encode(src, src_lengths)
    ys = torch.full((src.shape[0], 1), 1, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits, _ = model.decode(ys, memory, mask)  # (B, t, V)
        nxt = logits[:, -1].argmax(-1).masked_fill(done, 2)  # (B,)
        ys = torch.cat([ys, nxt[:, None]], dim=1)  # (B, t + 1)
        done |= nxt == 2
        if done.all():
            break
    return ys[:, 1:]


def translate(
    model: Seq2Seq,
    sentences: Sequence[Sequence[str]],
    src_vocab: Vocab,
    tgt_vocab: Vocab,
) -> list[list[str]]:
    """Greedy translations of token lists, as token lists (the model is put in eval)."""
    model.eval()
    src, lengths = src_vocab.batch(sentences)
    ids = greedy_decode(model, src, lengths)
    return [tgt_vocab.decode(row.tolist()) for row in ids]


@torch.no_grad()
def cross_weights(
    model: Seq2Seq,
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    src_vocab: Vocab,
    tgt_vocab: Vocab,
) -> list[torch.Tensor]:
    """The cross-attention weights of every decoder layer for one sentence pair.

    The decoder reads ``<bos>`` and ``tgt_tokens``; row ``t`` is the query
    that predicts target token ``t`` (the last row predicts ``<eos>``), column
    ``j`` is source token ``j``. The model is put in eval mode.

    Returns:
        One tensor ``(T + 1, S)`` per decoder layer, ``T = len(tgt_tokens)``.
    """
    model.eval()
    src, lengths = src_vocab.batch([src_tokens])  # (1, S)
    tgt, _ = tgt_vocab.batch([tgt_tokens], bos=True)  # (1, T + 1)
    _, weights = model(src, lengths, tgt, return_weights=True)
    return [w[0] for w in weights]  # (T + 1, S) each
