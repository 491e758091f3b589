"""A key/value cache for decoding one token (or a few) at a time."""

from __future__ import annotations

import torch

from . import _checks


class KVCache:
    """The keys and values a causal attention layer has seen so far.

    Pass one (empty) cache per attention layer as ``cache=`` on every call while
    decoding. Each call appends its new keys and values along the length dim
    (-2) and attends over everything stored, so feeding a sequence token by
    token gives the same outputs as one causal pass over the whole sequence.

    Shape:
        keys ``(..., S, D)`` and values ``(..., S, Dv)``; ``len(cache)`` is ``S``.

    Example:
        >>> cache = KVCache()
        >>> k, v = cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
        >>> len(cache), tuple(k.shape)
        (3, (1, 2, 3, 4))
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def __repr__(self) -> str:
        shape = None if self.keys is None else tuple(self.keys.shape)
        return f"KVCache(length={len(self)}, keys_shape={shape})"

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k`` ``(..., s, D)`` and ``v`` ``(..., s, Dv)``; return all keys and values."""
        _checks.tensor(k, "k", min_dim=2, floating=True)
        _checks.tensor(v, "v", min_dim=2, floating=True)
        _checks.same_dtype_device(k=k, v=v)
        if k.shape[:-1] != v.shape[:-1]:
            _checks.fail(
                "k and v",
                "agree in every dim but the last",
                f"k {tuple(k.shape)} and v {tuple(v.shape)}",
            )
        if self.keys is None:
            self.keys, self.values = k, v
            return k, v
        _checks.same_dtype_device(cached_keys=self.keys, k=k)
        expected = (*self.keys.shape[:-2], "*", self.keys.shape[-1])
        if k.shape[:-2] != self.keys.shape[:-2] or k.shape[-1] != self.keys.shape[-1]:
            _checks.fail(
                "k",
                f"match the cached keys' shape {expected}",
                f"shape {tuple(k.shape)}",
            )
        if v.shape[-1] != self.values.shape[-1]:
            _checks.fail(
                "v",
                f"have the cached values' last dim {self.values.shape[-1]}",
                f"shape {tuple(v.shape)}",
            )
        self.keys = torch.cat([self.keys, k], dim=-2)  # (..., S + s, D)
        self.values = torch.cat([self.values, v], dim=-2)  # (..., S + s, Dv)
        return self.keys, self.values

    def reset(self) -> None:
        """Forget everything: the cache is empty again."""
        self.keys = self.values = None
