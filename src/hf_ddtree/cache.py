"""Target KV caches for tree verification: creation, the ancestor mask, and in-place compaction.

transformers 5.x facts this relies on (see docs/design.md):
  * `StaticLayer.keys/.values` are plain (B, H_kv, max_cache_len, D) tensors written at the
    layer's `cumulative_length` pointer; attention reads the whole buffer, so slots past the live
    length must be masked.
  * `DynamicCache.crop(n)` only accepts a negative n (tokens to drop) in 5.x.
  * A 4D float mask is passed through unchanged; a bool mask is silently wrong under eager.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer

CACHE_KINDS = ("static", "dynamic")


def make_cache(target, kind: str, max_cache_len: int):
    """A fresh target cache. `max_cache_len` must cover prompt + new tokens + 1 + tree nodes."""
    if kind not in CACHE_KINDS:
        raise ValueError(
            f"cache_implementation={kind!r} is not supported by hf_ddtree; use one of {CACHE_KINDS}."
        )
    config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        raise ValueError(
            "hf_ddtree needs full-attention layers: this target has sliding-window layers "
            f"({sorted(set(config.layer_types))}), whose caches cannot be compacted after a tree "
            "verification. Use a target without sliding-window attention."
        )
    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_cache_len)
    return DynamicCache(config=config)


def mask_width(cache, past_len: int, num_new: int) -> int:
    """Key length attention sees for a forward of `num_new` tokens on top of `past_len`."""
    if isinstance(cache, StaticCache):
        return cache.layers[0].max_cache_len
    return past_len + num_new


def tree_attention_mask(visibility: torch.Tensor, past_len: int, kv_len: int, dtype: torch.dtype,
                        device: torch.device, *, num_real: int | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask (1, 1, N, kv_len): 0 where a node may attend (the cache, itself, its
    ancestors), finfo(dtype).min elsewhere (later nodes, siblings, stale static slots).

    visibility: (N, N) bool, [i, j] = j is i or an ancestor of i (`Tree.visibility(device)`).
    num_real: rows >= num_real are padding nodes: they see only themselves, not the cache.
    out: a (1, 1, N, kv_len) buffer of `dtype` on `device` to write into (no allocation).
    Built with tensor ops on `device` (no Python loop over nodes).
    """
    n = visibility.shape[0]
    vis = visibility.to(device)
    key = torch.arange(kv_len, device=device)  # (K,)
    rel = key - past_len  # key slot -> tree node index
    in_tree = (rel >= 0) & (rel < n)
    allowed = vis[:, rel.clamp(0, max(n - 1, 0))] & in_tree  # (N, K): ancestors and itself
    sees_cache = (key < past_len)[None]  # (1, K)
    if num_real is not None and num_real < n:
        sees_cache = sees_cache & (torch.arange(n, device=device) < num_real)[:, None]
    allowed = allowed | sees_cache
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    if out is None:
        return torch.where(allowed, zero, neg)[None, None]
    torch.where(allowed[None, None], zero, neg, out=out)
    return out


def compact(cache, past_len: int, keep: torch.Tensor) -> None:
    """Move the K/V of tree nodes `keep` (indices into the verified block, root = 0, ascending)
    to slots [past_len, past_len + len(keep)) and drop the rest of the block."""
    k = keep.numel()
    for layer in cache.layers:
        src = keep.to(layer.keys.device) + past_len
        if isinstance(layer, StaticLayer):
            dst = torch.arange(past_len, past_len + k, device=layer.keys.device)
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))  # index_select copies: overlap-safe
            layer.values.index_copy_(2, dst, layer.values.index_select(2, src))
            layer.cumulative_length.fill_(past_len + k)
        elif isinstance(layer, DynamicLayer):
            layer.keys[..., past_len:past_len + k, :] = layer.keys.index_select(-2, src)
            layer.values[..., past_len:past_len + k, :] = layer.values.index_select(-2, src)
            layer.crop(-(layer.keys.shape[-2] - (past_len + k)))
        else:
            raise TypeError(f"cannot compact cache layer {type(layer).__name__}")
