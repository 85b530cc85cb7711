"""Target KV caches for tree verification: creation, the attention masks, and in-place compaction.

transformers 5.x facts this relies on (see docs/design.md):
  * `StaticLayer.keys/.values` are plain (B, H_kv, max_cache_len, D) tensors written at the
    layer's `cumulative_length` pointer; attention reads the whole buffer, so slots past the live
    length must be masked.
  * `DynamicCache.crop(n)` only accepts a negative n (tokens to drop) in 5.x.
  * A 4D float mask is passed through unchanged; a bool mask is silently wrong under eager.
  * Sliding-window attention lives in the masks only (sdpa/eager): a query at position p sees the
    keys at positions (p - window, p] (`masking_utils.sliding_window_overlay`). Models whose config
    has `layer_types` take `attention_mask={layer_type: 4D mask}` (`create_masks_for_generate`);
    the others (Mistral, Phi-3) use one mask for every layer, sliding when `config.sliding_window`
    is set. A 4D tensor is used as-is for every layer by both kinds.

Sliding-window and hybrid targets keep ONE full-length cache for every layer (built from a config
view whose layers are all "full_attention"), so compaction is the same for every layer; each layer
type's window is expressed in that layer type's mask instead of by a rolling cache.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer

CACHE_KINDS = ("static", "dynamic")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def text_config(model_or_config):
    """The decoder config of a model (or config): `get_text_config()` for composite models."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_windows(config) -> dict[str, int | None]:
    """{mask key: sliding window (None = full attention)} for a target's decoder layers, decided
    exactly as transformers decides it:

      * with `config.layer_types` (Qwen2/Qwen3 - derived from `use_sliding_window` and
        `max_window_layers` -, Gemma 2/3, ...): one entry per layer type present; the
        "sliding_attention" layers use `config.sliding_window`;
      * without it (Mistral, Phi-3, Llama, ...): every layer is sliding when `config.sliding_window`
        is set, else full attention.

    Raises ValueError for layer kinds hf_ddtree cannot verify a tree over (chunked, linear or
    recurrent attention, bidirectional sliding windows, per-layer windows).
    """
    if getattr(config, "is_heterogeneous", False) and (
        set(getattr(config, "per_layer_attributes", None) or ()) & {"sliding_window", "attention_chunk_size", "layer_types"}
    ):
        raise ValueError(
            "hf_ddtree does not support targets whose sliding window or layer type is set per layer "
            "(per_layer_config); use a target with one sliding_window for all its sliding layers."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            "This target uses bidirectional attention (use_bidirectional_attention=True, an embedding model): "
            "it does not generate causally, so it cannot be a hf_ddtree target."
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "sliding_window", None) is not None:
            layer_types = [SLIDING_ATTENTION]
        elif getattr(config, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"]
        else:
            layer_types = [FULL_ATTENTION]
    windows: dict[str, int | None] = {}
    for kind in dict.fromkeys(layer_types):  # first-seen order
        if kind == FULL_ATTENTION:
            windows[kind] = None
        elif kind == SLIDING_ATTENTION:
            window = getattr(config, "sliding_window", None)
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(
                    f"The target has sliding_attention layers but config.sliding_window={window!r}: set it to "
                    "the model's window (a positive int)."
                )
            windows[kind] = window
        else:
            raise ValueError(
                f"hf_ddtree verifies trees over full-attention and sliding-window layers only; this target has "
                f"{kind!r} layers (layer types: {sorted(set(layer_types))}), whose state cannot be verified as a "
                "tree and compacted. Use a target with full or sliding-window attention."
            )
    return windows


def make_cache(target, kind: str, max_cache_len: int):
    """A fresh target cache with one full-length layer per decoder layer, also for sliding-window
    and hybrid targets (their windows live in the masks, see `tree_attention_masks`).
    `max_cache_len` must cover prompt + new tokens + 1 + tree nodes."""
    if kind not in CACHE_KINDS:
        raise ValueError(
            f"cache_implementation={kind!r} is not supported by hf_ddtree; use one of {CACHE_KINDS}."
        )
    config = text_config(target)
    attention_windows(config)  # refuses what cannot work, before any forward
    view = copy.copy(config)  # shallow: the target's own config is left untouched
    view.layer_types = [FULL_ATTENTION] * int(config.num_hidden_layers)
    cache = StaticCache(config=view, max_cache_len=max_cache_len) if kind == "static" else DynamicCache(config=view)
    odd = sorted({type(layer).__name__ for layer in cache.layers} - {"StaticLayer", "DynamicLayer"})
    if odd:
        raise ValueError(
            f"hf_ddtree cannot compact this target's cache layers ({', '.join(odd)}): it needs one "
            "key/value cache per decoder layer (no shared or recurrent layers)."
        )
    return cache


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


def sliding_window_mask(mask: torch.Tensor, depths: torch.Tensor, past_len: int, window: int) -> torch.Tensor:
    """`mask` (1, 1, n, kv_len) from `tree_attention_mask`, further restricted to a sliding window.

    Node j sits at position past_len + depths[j]; cache slot s < past_len holds position s and tree
    slot past_len + i holds position past_len + depths[i]. Like transformers' sliding overlay
    (`kv_idx > q_idx - window`, on positions), node j keeps only keys at positions
    > past_len + depths[j] - window. Returns a new mask; slots past the tree stay hidden."""
    n, kv_len = mask.shape[-2], mask.shape[-1]
    depths = depths.to(mask.device)
    q_pos = past_len + depths  # (n,)
    k_pos = torch.arange(kv_len, device=mask.device)
    k_pos[past_len:past_len + n] = q_pos
    outside = k_pos[None, :] <= (q_pos[:, None] - window)  # (n, kv_len)
    return mask.masked_fill(outside, torch.finfo(mask.dtype).min)


def tree_attention_masks(config, visibility: torch.Tensor, depths: torch.Tensor, past_len: int, kv_len: int,
                         dtype: torch.dtype, device: torch.device, *, num_real: int | None = None,
                         out: torch.Tensor | None = None):
    """The `attention_mask=` of a tree forward: the (1, 1, N, kv_len) ancestor mask when every
    layer has the same window, else {layer type: its mask} (what hybrid models like Gemma 2/3 take).

    visibility: (N, N) bool, node i sees node j; depths: (N,) depth of each node (root = 0).
    num_real / out: as in `tree_attention_mask` (padding rows; a preallocated buffer for the
    full-attention mask).
    """
    mask = tree_attention_mask(visibility, past_len, kv_len, dtype, device, num_real=num_real, out=out)
    windows = attention_windows(text_config(config))
    masks = {kind: mask if w is None else sliding_window_mask(mask, depths, past_len, w) for kind, w in windows.items()}
    if len(set(windows.values())) == 1:
        return next(iter(masks.values()))
    return masks


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
