"""A small decoder-only character language model built from ``CausalSelfAttention``.

Its training text is real English that every Python installation carries: the
docstrings of the standard library, read from this machine's own ``.py`` files
(no download). Shape legend: ``B`` batch, ``T`` tokens, ``E`` model width,
``V`` vocabulary size.
"""

from __future__ import annotations

import ast
import string
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .cache import KVCache
from .modules import CausalSelfAttention

_KEEP = set(string.printable) - set("\t\r\x0b\x0c")


def stdlib_docstrings(max_chars: int | None = None) -> str:
    """The docstrings of the standard library's top-level modules, as one text.

    Every top-level ``.py`` file of this interpreter's standard library is
    parsed (not imported) in sorted order; the docstrings of its module,
    classes and functions are joined with blank lines. Characters outside
    printable ASCII are dropped and tabs become spaces.

    Args:
        max_chars: keep only the first ``max_chars`` characters.

    Returns:
        The text. It depends on the Python version (3.11 gives about 0.9 M
        characters), so results quoted in the book hold for the book's machine.

    Example:
        >>> "Return" in stdlib_docstrings(100_000)
        True
    """
    if max_chars is not None:
        _checks.positive_int(max_chars, "max_chars")
    root = Path(sysconfig.get_paths()["stdlib"])
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in (n for n in ast.walk(tree) if isinstance(n, kinds)):
            doc = ast.get_docstring(node)
            if doc:
                doc = "".join(c for c in doc.replace("\t", "    ") if c in _KEEP)
                docs.append(doc)
                total += len(doc) + 2
        if max_chars is not None and total >= max_chars:
            break  # enough text: skip parsing the remaining files
    text = "\n\n".join(docs)
    return text if max_chars is None else text[:max_chars]


class CharVocab:
    """A character vocabulary: one token id per distinct character, in sorted order.

    Example:
        >>> vocab = CharVocab("hello")
        >>> vocab.decode(vocab.encode("hole"))
        'hole'
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            _checks.fail("text", "be a non-empty str", repr(text)[:40], exc=TypeError)
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids ``(T,)`` of ``text``; every character must be in the vocabulary."""
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            _checks.fail(
                "text", "use only characters of the vocabulary", f"{unknown[:5]}"
            )
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of token ids ``(T,)``."""
        return "".join(self.chars[int(i)] for i in ids)


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP, each residual."""

    def __init__(self, embed_dim: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim)
        self.attn = CausalSelfAttention(embed_dim, dropout=dropout)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.GELU(),
            nn.Linear(4 * embed_dim, embed_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache=cache)  # (B, T, E)
        return x + self.mlp(self.ln2(x))  # (B, T, E)


class CharGPT(nn.Module):
    r"""A decoder-only (GPT-like) character model with single-head causal attention.

    Token and learned position embeddings, ``num_layers`` :class:`Block` s, a
    final LayerNorm and a linear head giving next-character logits.

    Args:
        vocab_size: ``V``.
        context: the longest sequence ``T`` it takes (positions are learned).
        embed_dim: model width ``E``.
        num_layers: number of blocks.
        dropout: dropout in training mode.

    Shape:
        ``idx`` ``(B, T)`` token ids -> logits ``(B, T, V)``.

    Example:
        >>> model = CharGPT(10, context=8, embed_dim=16, num_layers=1)
        >>> tuple(model(torch.zeros(2, 5, dtype=torch.long)).shape)
        (2, 5, 10)
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        context: int = 128,
        embed_dim: int = 96,
        num_layers: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = _checks.positive_int(context, "context")
        _checks.positive_int(num_layers, "num_layers")
        self.token_emb = nn.Embedding(
            _checks.positive_int(vocab_size, "vocab_size"), embed_dim
        )
        self.pos_emb = nn.Embedding(context, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, dropout=dropout) for _ in range(num_layers)
        )
        self.ln = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)

    def new_caches(self) -> list[KVCache]:
        """One empty :class:`attn_lib.KVCache` per block, for :meth:`forward`'s ``caches``."""
        return [KVCache() for _ in self.blocks]

    def forward(
        self, idx: torch.Tensor, *, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for token ids ``(B, T)``.

        With ``caches`` (from :meth:`new_caches`), ``idx`` holds only the new
        tokens: they take the positions after the cached ones.
        """
        _checks.tensor(idx, "idx", min_dim=2)
        start = 0 if caches is None else len(caches[0])
        if start + idx.shape[1] > self.context:
            _checks.fail(
                "the sequence",
                f"fit the context of {self.context} tokens",
                start + idx.shape[1],
            )
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)  # (T,)
        x = self.token_emb(idx) + self.pos_emb(positions)  # (B, T, E)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])  # (B, T, E)
        return self.head(self.ln(x))  # (B, T, V)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each block's attention weights ``(B, T, T)`` for token ids ``(B, T)``, in order."""
        _checks.tensor(idx, "idx", min_dim=2)
        positions = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        x = self.token_emb(idx) + self.pos_emb(positions)  # (B, T, E)
        maps = []
        for block in self.blocks:
            _, weights = block.attn(block.ln1(x), return_weights=True)  # (B, T, T)
            maps.append(weights)
            x = block(x)  # (B, T, E)
        return maps


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per character) of ``model(x)`` against targets ``y`` ``(B, T)``."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # (B*T, V) vs (B*T,)


def sample_batch(
    data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data`` ``(N,)``: inputs ``(B, T)`` and next-token targets ``(B, T)``."""
    _checks.positive_int(batch_size, "batch_size")
    _checks.positive_int(context, "context")
    if data.shape[0] <= context:
        _checks.fail(
            "data", f"be longer than context={context}", f"{data.shape[0]} tokens"
        )
    starts = torch.randint(
        0, data.shape[0] - context, (batch_size,), generator=generator
    )
    windows = torch.stack(
        [data[s : s + context + 1] for s in starts.tolist()]
    )  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def generate(
    model: CharGPT,
    prompt: torch.Tensor,
    steps: int,
    *,
    use_cache: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``prompt`` ``(T,)`` by ``steps`` sampled tokens; return all ``(T + steps,)``.

    With ``use_cache`` the prompt is read once and each new token costs one
    single-token pass over the cached keys and values; without it, every step
    runs the model over the whole sequence so far. Both give the same tokens.

    Args:
        temperature: divides the logits; ``0`` picks the most likely token.
        generator: for repeatable sampling.

    Limitations:
        ``len(prompt) + steps`` must fit ``model.context`` (no sliding window).
    """
    _checks.tensor(prompt, "prompt", min_dim=1)
    _checks.positive_int(steps, "steps")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        _checks.fail("temperature", "be a float >= 0", repr(temperature), exc=TypeError)
    if temperature < 0:
        _checks.fail("temperature", "be a float >= 0", repr(temperature))
    model.eval()
    seq = prompt[None]  # (1, T)
    caches = model.new_caches() if use_cache else None
    logits = model(seq, caches=caches)[:, -1]  # (1, V)
    for _ in range(steps):
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)  # (1, V)
            token = torch.multinomial(probs, 1, generator=generator)  # (1, 1)
        seq = torch.cat([seq, token], dim=1)  # (1, T + 1)
        if seq.shape[1] < prompt.shape[0] + steps:
            step_in = token if use_cache else seq
            logits = model(step_in, caches=caches)[:, -1]  # (1, V)
    return seq[0]
