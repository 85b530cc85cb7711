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
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer, StaticCache, StaticLayer

from . import linear_attention as la
from .compat import LINEAR_ATTENTION, compiled_function, linear_attention_modules, linear_states
from .device import host_tensor, to_device
from .tree import lineage_index

CACHE_KINDS = ("static", "dynamic")
# the cache the loop makes (and CaDDTree calibrates on) when generate() gets no cache and no cache_implementation.
# A StaticCache: a verify writes its tree in place (a DynamicCache concatenates it onto every layer and the
# compaction cuts it back), 12% faster on GSM8K in bf16 here, though 6-7% slower on chat-like text, where most
# rounds are small (docs/benchmarks.md, "Default cache"). It is not what stock makes, and does not make the
# call compile: generate()'s compile convention counts only cache_implementation="static" asked for.
DEFAULT_CACHE_KIND = "static"


def loop_cache_kind(cache_implementation: str | None, compiled: bool = False) -> str:
    """The cache kind a loop call uses: the one asked for, else "static" when it compiles (generate()'s compile
    convention only compiles with a static cache), else `DEFAULT_CACHE_KIND`."""
    return cache_implementation or ("static" if compiled else DEFAULT_CACHE_KIND)


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
KV_LAYERS = (StaticLayer, DynamicLayer)  # the layers holding keys and values (compaction moves them)


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

    "linear_attention" layers (Gated DeltaNet: Qwen3-Next, Qwen3.5) take no attention mask and have no
    entry. Raises ValueError for layer kinds hf_ddtree cannot verify a tree over (chunked attention,
    Mamba / conv / other recurrent layers, bidirectional sliding windows, per-layer windows).
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
        if kind == LINEAR_ATTENTION:
            continue  # Gated DeltaNet layers: no attention mask, their states follow the tree (linear_attention.py)
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
                f"hf_ddtree verifies trees over full-attention, sliding-window and Gated DeltaNet linear-attention "
                f"layers only; this target has {kind!r} layers (layer types: {sorted(set(layer_types))}), whose state "
                "cannot be verified as a tree and compacted yet. Use a target with full or sliding-window attention, "
                "or a Qwen3-Next / Qwen3.5 hybrid."
            )
    return windows


def make_cache(target, kind: str, max_cache_len: int):
    """A fresh target cache with one full-length layer per decoder layer, also for sliding-window
    and hybrid targets (their windows live in the masks, see `mask_layout` and `verify.tree_inputs`).
    `max_cache_len` must cover prompt + new tokens + 1 + tree nodes."""
    if kind not in CACHE_KINDS:
        raise ValueError(
            f"cache_implementation={kind!r} is not supported by hf_ddtree; use one of {CACHE_KINDS}."
        )
    config = text_config(target)
    attention_windows(config)  # refuses what cannot work, before any forward
    linear_attention_modules(target)  # and linear-attention layers of an unknown kind
    view = copy.copy(config)  # shallow: the target's own config is left untouched
    view.layer_types = _cache_layer_types(config)
    cache = StaticCache(config=view, max_cache_len=max_cache_len) if kind == "static" else DynamicCache(config=view)
    odd = _odd_layers(cache, config)
    if odd:
        raise ValueError(
            f"hf_ddtree cannot compact this target's cache layers ({', '.join(odd)}): it needs one "
            "key/value cache per decoder layer (no shared or recurrent layers)."
        )
    return cache


def _cache_layer_types(config) -> list[str]:
    """The layer types of the cache hf_ddtree keeps: full-length K/V for every attention layer (sliding
    windows live in the masks), the linear-attention state layers where the target has them."""
    types = list(getattr(config, "layer_types", None) or [FULL_ATTENTION] * int(config.num_hidden_layers))
    return [LINEAR_ATTENTION if t == LINEAR_ATTENTION else FULL_ATTENTION for t in types]


def _odd_layers(cache, config) -> list[str]:
    """Names of the cache's layer classes other than the ones a tree round can handle: plain full-length
    K/V layers at the attention layers, `LinearAttentionLayer`s at the linear-attention layers."""
    types = _cache_layer_types(config)
    odd = set()
    for i, layer in enumerate(cache.layers):
        linear = i < len(types) and types[i] == LINEAR_ATTENTION
        if not (type(layer) is LinearAttentionLayer if linear else type(layer) in KV_LAYERS):
            odd.add(type(layer).__name__)
    return sorted(odd)


def kv_layers(cache) -> list:
    """The cache's key/value layers (linear-attention state layers left out)."""
    return [layer for layer in cache.layers if isinstance(layer, KV_LAYERS)]


def adopt_cache(cache, target, max_cache_len: int, grow: bool = False) -> int:
    """Check that a cache the caller passed (`generate(..., past_key_values=cache)`: a user's, or one a
    previous call returned) can hold this call's verification, and return the tokens it holds.

    It must be a transformers `DynamicCache` or `StaticCache` whose layers are plain full-length
    `DynamicLayer` / `StaticLayer`s, one per decoder layer (sliding-window layers drop old entries, so a
    sliding or hybrid target needs the full-length cache hf_ddtree makes: `make_cache`, or the cache a
    previous hf_ddtree call returned). A static one needs `max_cache_len` slots: with `grow` (a cache
    hf_ddtree made itself and returned) its buffers are enlarged in place, keeping the object and its
    entries; a user's own StaticCache is refused when smaller, never replaced. Raises ValueError."""
    if not isinstance(cache, (StaticCache, DynamicCache)) or not hasattr(cache, "layers"):
        raise ValueError(
            f"past_key_values={type(cache).__name__}: hf_ddtree continues from a transformers DynamicCache or "
            "StaticCache (the one a previous generate() returned, or StaticCache(config=model.config, max_cache_len=N))."
        )
    layers = int(text_config(target).num_hidden_layers)
    odd = _odd_layers(cache, text_config(target))
    if odd or len(cache.layers) not in (0, layers):
        what = f"has {', '.join(odd)} layers" if odd else f"has {len(cache.layers)} layers for a {layers}-layer target"
        raise ValueError(
            f"past_key_values: this {type(cache).__name__} {what}; hf_ddtree verifies trees in one full-length "
            "key/value layer per decoder layer (a sliding-window layer drops the entries a tree may need). Pass the "
            "cache a previous hf_ddtree generate() returned, hf_ddtree.cache.make_cache(target, 'static', N), or no cache."
        )
    held = int(cache.get_seq_length())
    if isinstance(cache, StaticCache):
        have = min(int(layer.max_cache_len) for layer in kv_layers(cache))
        if have < max_cache_len:
            if not grow:
                raise ValueError(
                    f"past_key_values: this StaticCache has max_cache_len={have}, but this call needs {max_cache_len} "
                    "slots (input_ids + new tokens + 1 + the tree's nodes). Allocate StaticCache(config=model.config, "
                    f"max_cache_len={max_cache_len}) or larger (one for the whole conversation), or lower max_new_tokens."
                )
            for layer in kv_layers(cache):
                _grow_static(layer, max_cache_len)
    return held


def _grow_static(layer: StaticLayer, max_cache_len: int) -> None:
    """Enlarge a static layer's buffers to `max_cache_len` slots in place (entries kept)."""
    if getattr(layer, "is_initialized", False):
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_zeros(*old.shape[:2], max_cache_len, old.shape[-1])
            new[:, :, :old.shape[2]] = old
            setattr(layer, name, new)
            torch._dynamo.mark_static_address(new)
    layer.max_cache_len = max_cache_len


def mask_width(cache, past_len: int, num_new: int) -> int:
    """Key length attention sees for a forward of `num_new` tokens on top of `past_len`."""
    if isinstance(cache, StaticCache):
        return kv_layers(cache)[0].max_cache_len
    return past_len + num_new


@dataclass
class CacheRows:
    """Where each row of a batched target cache lives (the loop's bookkeeping; B rows, host ints).

    All rows share one write pointer (the cache's own length, `write_at` = max(length)): a forward
    writes its tokens at slots [write_at, write_at + N) of every row. Row b's live entries are the
    slots [start[b], length[b]): slots before start[b] hold the prompt's left padding, and slots
    [length[b], write_at) are stale (a longer row's tokens went there; `compact_rows` re-aligns
    each row's accepted tree nodes right after its own live entries). Slot s of row b holds
    position s - start[b], so the next token of row b sits at position length[b] - start[b].

    start  B ints: left-padding slots of each row (0 without padding)
    length B ints: slots in use by each row (padding included)
    Plain Python ints (tensors are accepted and converted): the layout is known on the host without
    reading the device.
    """

    start: list[int]
    length: list[int]

    def __post_init__(self):
        self.start = [int(x) for x in (self.start.tolist() if isinstance(self.start, torch.Tensor) else self.start)]
        self.length = [int(x) for x in (self.length.tolist() if isinstance(self.length, torch.Tensor) else self.length)]

    @classmethod
    def single(cls, past_len: int) -> "CacheRows":
        """One unpadded row holding `past_len` positions."""
        return cls([0], [int(past_len)])

    @property
    def write_at(self) -> int:
        return max(self.length)

    @property
    def positions(self) -> list[int]:
        """B ints: the position of each row's next token (its root)."""
        return [n - s for s, n in zip(self.start, self.length)]

    def select(self, rows: list[int]) -> "CacheRows":
        return CacheRows([self.start[r] for r in rows], [self.length[r] for r in rows])


def tree_attention_mask(visibility: torch.Tensor, past_len: int, kv_len: int, dtype: torch.dtype,
                        device: torch.device, *, num_real: int | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask (1, 1, N, kv_len) for one unpadded row: 0 where a node may attend (the cache,
    itself, its ancestors), finfo(dtype).min elsewhere (later nodes, siblings, stale static slots).

    visibility: (N, N) bool, [i, j] = j is i or an ancestor of i (`Tree.visibility(device)`).
    num_real: rows >= num_real are padding nodes: they see only themselves, not the cache.
    out: a (1, 1, N, kv_len) buffer of `dtype` on `device` to write into (no allocation).
    The one-row case of `tree_attention_mask_rows`.
    """
    real = None if num_real is None else [int(num_real)]
    return tree_attention_mask_rows(visibility[None], CacheRows.single(past_len), kv_len, dtype, device,
                                    num_real=real, out=out)


def layout_tensor(rows: CacheRows, num_real: list[int] | None, device) -> torch.Tensor:
    """(3, B) long on `device`, ONE host-to-device copy of the round's host ints: each row's first live
    slot (`start`), its length, and its real tree nodes (`num_real`; the length again when None: no padding
    node, every row index below it). What the tensor cores of the masks and the path moves read, so a
    compiled round sees the layout as data and does not recompile when it changes."""
    real = rows.length if num_real is None else list(num_real)
    return host_tensor([rows.start, rows.length, real], device)


def tree_attention_mask_rows(visibility: torch.Tensor, rows: CacheRows, kv_len: int, dtype: torch.dtype,
                             device: torch.device, *, num_real: torch.Tensor | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask (B, 1, N, kv_len) for B trees written at slots [rows.write_at, + N) of a cache
    laid out as `rows` says: node i of row b sees its row's live slots [start[b], length[b]) and
    the tree slots of itself and its ancestors; nothing else (padding, stale slots, siblings, later
    nodes, other rows' trees are never visible: each row has its own mask).

    visibility: (B, N, N) bool, [b, i, j] = node j of row b's tree is i or an ancestor of i.
    num_real: B ints or None: rows' nodes >= num_real[b] are padding: they see only themselves.
    out: a (B, 1, N, kv_len) buffer of `dtype` on `device` to write into (no allocation).
    Built with tensor ops on `device` (no Python loop over nodes or rows): `tree_mask_core` on the
    layout's tensor (`layout_tensor`).
    """
    at = layout_tensor(rows, num_real, device)
    return tree_mask_core(visibility.to(device), at, kv_len, dtype, out=out, padded=num_real is not None)


def tree_mask_core(visibility: torch.Tensor, at: torch.Tensor, kv_len: int, dtype: torch.dtype, *,
                   out: torch.Tensor | None = None, padded: bool = True) -> torch.Tensor:
    """`tree_attention_mask_rows` on tensors only (no host read, compiles with fullgraph=True).
    visibility (B, N, N) bool; at (3, B) long (`layout_tensor`): start, length, real nodes per row; the
    trees sit at slot write_at = max(length). padded: whether rows past `at[2]` are padding nodes."""
    n = visibility.shape[1]
    device = visibility.device
    key = torch.arange(kv_len, device=device)  # (K,)
    rel = key - at[1].max()  # key slot -> tree node index
    in_tree = (rel >= 0) & (rel < n)  # (K,)
    allowed = visibility[:, :, rel.clamp(0, max(n - 1, 0))] & in_tree  # (B, N, K): ancestors and itself
    sees_cache = (key[None] >= at[0][:, None]) & (key[None] < at[1][:, None])  # (B, K)
    sees_cache = sees_cache[:, None, :]  # (B, 1, K)
    if padded:
        sees_cache = sees_cache & (torch.arange(n, device=device)[None] < at[2][:, None])[:, :, None]
    allowed = allowed | sees_cache
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    if out is None:
        return torch.where(allowed, zero, neg)[:, None]
    torch.where(allowed[:, None], zero, neg, out=out)
    return out


def tree_mask_from_layout(visibility: torch.Tensor, rows: CacheRows, num_real: list[int], kv_len: int,
                          dtype: torch.dtype, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`tree_mask_core`'s mask (B, 1, N, kv_len) written with the layout's host ints instead of computed from
    its tensor: everything hidden, then each row's tree block from `visibility` and its live cache slots
    [start[b], length[b]) opened for its real nodes (num_real[b] of them). About 2B + 4 small ops instead of
    the core's ~20 over (B, N, kv_len) elements: the eager round's mask (the core is what compiles, at a
    fixed shape, with the layout as data). visibility (B, N, N) bool; out: an optional buffer to fill."""
    B, n, _ = visibility.shape
    w = rows.write_at
    mask = out if out is not None else torch.empty(B, 1, n, kv_len, dtype=dtype, device=visibility.device)
    mask.fill_(torch.finfo(dtype).min)
    mask[:, 0, :, w:w + n].masked_fill_(visibility, 0)  # the tree: itself and its ancestors
    return _open_live_cache(mask, rows, num_real)


def tree_mask_from_lineage(lineages: list[list[tuple[int, ...]]], n: int, rows: CacheRows, kv_len: int,
                           dtype: torch.dtype, device, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`tree_mask_from_layout` for B trees the host built, from their lineages (`Tree.lineage`: each real node's
    ancestors and itself) instead of a visibility tensor: the tree block's open entries (a padding row up to n sees
    only itself) are ONE indexed write into the filled mask, and no (B, N, N) bool is made. (B, 1, n, kv_len)."""
    B, w = len(lineages), rows.write_at
    mask = out if out is not None and out.is_contiguous() else torch.empty(B, 1, n, kv_len, dtype=dtype, device=device)
    mask.fill_(torch.finfo(dtype).min)
    mask.view(-1)[host_tensor(lineage_index(lineages, n, kv_len, w), device)] = 0
    _open_live_cache(mask, rows, [len(lin) for lin in lineages])
    if out is not None and mask is not out:
        return out.copy_(mask)
    return mask


def _open_live_cache(mask: torch.Tensor, rows: CacheRows, num_real: list[int]) -> torch.Tensor:
    """Open each row's live cache slots [start[b], length[b]) in `mask` (B, 1, N, kv_len) for its num_real[b] real
    nodes (padding sees only itself)."""
    for b, (s, length, real) in enumerate(zip(rows.start, rows.length, num_real)):
        if length > s and real > 0:
            mask[b, 0, :real, s:length] = 0
    return mask


def sliding_window_mask(mask: torch.Tensor, depths: torch.Tensor, past_len: int, window: int) -> torch.Tensor:
    """`mask` (1, 1, n, kv_len) from `tree_attention_mask`, further restricted to a sliding window
    (the one-row case of `sliding_window_mask_rows`)."""
    return sliding_window_mask_rows(mask, depths[None], CacheRows.single(past_len), window)


def sliding_window_mask_rows(mask: torch.Tensor, depths: torch.Tensor, rows: CacheRows, window: int) -> torch.Tensor:
    """`mask` (B, 1, n, kv_len) from `tree_attention_mask_rows`, further restricted to a sliding window.

    depths: (B, n). Node j of row b sits at position rows.positions[b] + depths[b, j]; cache slot
    s < write_at of row b holds position s - start[b], and tree slot write_at + i holds position
    rows.positions[b] + depths[b, i]. Like transformers' sliding overlay (`kv_idx > q_idx - window`,
    on positions), node j keeps only keys at positions > its own position - window. Returns a new
    mask; what was hidden stays hidden. `sliding_window_core` on the layout's tensor."""
    at = layout_tensor(rows, None, mask.device)
    return sliding_window_core(mask, depths.to(mask.device), at, window)


def sliding_window_core(mask: torch.Tensor, depths: torch.Tensor, at: torch.Tensor, window: int) -> torch.Tensor:
    """`sliding_window_mask_rows` on tensors only (no host read, compiles with fullgraph=True); at: (3, B)
    long (`layout_tensor`)."""
    n, kv_len = mask.shape[-2], mask.shape[-1]
    key = torch.arange(kv_len, device=mask.device)
    rel = key - at[1].max()  # key slot -> tree node index (in [0, n) for the tree's slots)
    q_pos = (at[1] - at[0])[:, None] + depths  # (B, n): each node's position
    k_pos = key[None] - at[0][:, None]  # (B, kv_len): a cache slot's position
    tree_pos = q_pos.gather(1, rel.clamp(0, max(n - 1, 0))[None].expand(q_pos.shape[0], -1))  # (B, kv_len)
    k_pos = torch.where(((rel >= 0) & (rel < n))[None], tree_pos, k_pos)
    outside = k_pos[:, None, :] <= (q_pos[:, :, None] - window)  # (B, n, kv_len)
    return mask.masked_fill(outside[:, None], torch.finfo(mask.dtype).min)


def mask_layout(config) -> tuple[tuple[tuple[str, int | None], ...], bool]:
    """The static part of a tree forward's `attention_mask=`: ((layer type, sliding window or None), ...) in
    `attention_windows` order, and whether the target has linear-attention layers (they take no mask)."""
    config = text_config(config)
    return tuple(attention_windows(config).items()), LINEAR_ATTENTION in (getattr(config, "layer_types", None) or ())


def shape_masks(masks, windows: tuple, linear: bool):
    """One mask per `windows` entry -> the `attention_mask=` the target takes: the mask itself when every layer
    has the same window, else {layer type: mask} (plus None for linear-attention layers, which take none)."""
    by_kind = dict(zip((kind for kind, _ in windows), masks))
    if linear:
        return {**by_kind, LINEAR_ATTENTION: None}  # Gated DeltaNet layers take no mask (their tree forward: compat)
    if len({w for _, w in windows}) == 1:
        return masks[0]
    return by_kind


def compact(cache, past_len: int, keep: torch.Tensor) -> None:
    """Move the K/V of tree nodes `keep` (indices into the verified block, root = 0, ascending)
    to slots [past_len, past_len + len(keep)) and drop the rest of the block: `compact_rows` for one
    unpadded row."""
    compact_rows(cache, CacheRows.single(past_len), [keep])


def _set_length(layer, end: int, what: str) -> None:
    """Make `end` the layer's length: the static write pointer, or the dynamic layer cut there; a linear-attention
    layer's token count where it keeps one (transformers >= 5.25: `cumulative_length_linear`, what
    `get_seq_length` reads; its states are `commit_linear_states`' job)."""
    if isinstance(layer, LinearAttentionLayer):
        count = getattr(layer, "cumulative_length_linear", None)
        if isinstance(count, torch.Tensor):
            count.fill_(end)
        return
    if isinstance(layer, StaticLayer):
        layer.cumulative_length.fill_(end)
    elif isinstance(layer, DynamicLayer):
        layer.crop(-(layer.keys.shape[-2] - end))
    else:
        raise TypeError(f"cannot {what} cache layer {type(layer).__name__}")


def compact_rows(cache, rows: CacheRows, keep: list[torch.Tensor] | list[list[int]]) -> CacheRows:
    """Batched `compact`: the tree was written at slots [rows.write_at, + N) of every row; move row
    b's nodes `keep[b]` (indices into its tree, root = 0, ascending; host lists or tensors) to slots
    [rows.length[b], + len(keep[b])) of that row, and set the cache's length to the longest row.
    Only the kept entries move (O(accepted) per row). Returns the new layout."""
    keep = [k.tolist() if isinstance(k, torch.Tensor) else list(k) for k in keep]
    moves = kept_moves(rows, keep)
    if moves:  # decided on the host: no device sync per layer
        _move(cache, host_tensor([[m[0] for m in moves], [m[1] for m in moves], [m[2] for m in moves]], "cpu"))  # (3, M)
    return set_lengths(cache, rows, [len(k) for k in keep])


def kept_moves(rows: CacheRows, keep: list[list[int]]) -> list[tuple[int, int, int]]:
    """The (batch row, source slot, destination slot) moves `compact_rows` makes for `keep`: only the entries not
    already in place (a path that runs down the tree's first nodes in order, and every root-only round of one
    row, moves nothing)."""
    w = rows.write_at
    return [(b, w + i, rows.length[b] + j) for b, k in enumerate(keep) for j, i in enumerate(k)
            if w + i != rows.length[b] + j]


def move_paths(cache, rows: CacheRows, paths: torch.Tensor, at: torch.Tensor | None = None, compile_config=None) -> None:
    """The device half of compacting accepted paths, with no host read: row b's path nodes
    `paths[b]` ((B, P) long on the cache's device, node indices into the tree written at slots
    [rows.write_at, + N), root first, padded past the path's end with any node index) go to slots
    [rows.length[b], + P). Entries past a row's accepted length land in slots past its new length
    (stale, masked, overwritten later; P <= N keeps them inside the cache). Then `set_lengths`
    with the counts the host has read.
    at: `rows` as a (3, B) tensor (`layout_tensor`; the verify's `Verified.at`), made when not given.
    compile_config: every layer's moves in one compiled call (`move_path_kv`, `compat.compiled_function`)."""
    if at is None:
        at = layout_tensor(rows, None, paths.device)
    layers = kv_layers(cache)
    at = to_device(at, paths.device)
    if compile_config is not None and len({layer.keys.device for layer in layers}) == 1:
        compiled_function(move_path_kv, compile_config)([layer.keys for layer in layers],
                                                        [layer.values for layer in layers], paths, at)
        return
    _move(cache, path_moves(paths, at))


def path_moves(paths: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """(3, B * P) long (batch row, source slot, destination slot) moving row b's path nodes `paths[b]` from the
    tree at slot max(at[1]) to slots [at[1][b], + P) (at: `layout_tensor`). Tensor ops only."""
    B, P = paths.shape
    row_idx = torch.arange(B, device=paths.device)[:, None].expand(B, P).reshape(-1)
    src = (paths + at[1].max()).reshape(-1)
    dst = (at[1][:, None] + torch.arange(P, device=paths.device)[None]).reshape(-1)
    return torch.stack([row_idx, src, dst])


def move_path_kv(keys: list[torch.Tensor], values: list[torch.Tensor], paths: torch.Tensor, at: torch.Tensor) -> None:
    """`path_moves` applied to every layer's keys / values (B, H, S, D) in place: one graph for all layers
    when compiled (fullgraph=True)."""
    index = path_moves(paths, at)
    for k, v in zip(keys, values):
        move_kv(k, v, index)


def set_lengths(cache, rows: CacheRows, counts: list[int]) -> CacheRows:
    """After `move_paths` (or `compact_rows`' moves): row b now holds `counts[b]` more slots; the cache's
    length becomes the longest row's. Returns the new layout."""
    new = CacheRows(list(rows.start), [n + int(c) for n, c in zip(rows.length, counts)])
    for layer in cache.layers:
        _set_length(layer, new.write_at, "compact")
    return new


ARENA = "_hf_ddtree_kv_arena"  # the cache attribute holding (arena, the layers' data pointers when it was made)


def make_kv_arena(cache) -> bool:
    """Put every key/value layer of a static cache into ONE tensor (2, L, B, H, S, D), each layer's keys and
    values becoming views of it (`StaticLayer.update` writes into them in place, as before), so compacting a
    round's path is one gather and one write for all layers (`_move`) instead of four ops per layer: 4L launches
    fewer per round on an accelerator, and the eager CPU round's path moves ~L times cheaper. Done once, after
    the prefill initialized the layers; the copy needs a second K/V's room for a moment, so on CUDA the arena is
    made only when the device has it free (on the CPU always; other accelerators: not). Returns whether the cache
    has an arena (`select_rows` keeps it, selected; replacing a layer's tensors, e.g. a grown cache, retires it:
    `kv_arena`). Eager rounds only: a compiled forward would see the layers as aliased inputs (its path moves are
    one graph anyway, `move_path_kv`)."""
    if kv_arena(cache) is not None:
        return True
    layers = kv_layers(cache)
    if not layers or not all(type(layer) is StaticLayer and getattr(layer, "keys", None) is not None for layer in layers):
        return False
    k0 = layers[0].keys
    if any(t.shape != k0.shape or t.dtype != k0.dtype or t.device != k0.device
           for layer in layers for t in (layer.keys, layer.values)):
        return False
    if k0.device.type == "cuda":
        if torch.cuda.mem_get_info(k0.device)[0] < 1.1 * 2 * len(layers) * k0.nbytes:
            return False
    elif k0.device.type != "cpu":  # no free-memory query here: keep the layers as they are
        return False
    arena = torch.empty((2, len(layers), *k0.shape), dtype=k0.dtype, device=k0.device)
    for i, layer in enumerate(layers):
        arena[0, i].copy_(layer.keys)
        arena[1, i].copy_(layer.values)
        layer.keys, layer.values = arena[0, i], arena[1, i]
    setattr(cache, ARENA, (arena, _data_ptrs(layers)))
    return True


def kv_arena(cache) -> torch.Tensor | None:
    """The cache's K/V arena (`make_kv_arena`) while every layer still lives in it, else None."""
    held = getattr(cache, ARENA, None)
    if held is None:
        return None
    if _data_ptrs(kv_layers(cache)) != held[1]:  # a layer's tensors were replaced since
        setattr(cache, ARENA, None)
        return None
    return held[0]


def _data_ptrs(layers) -> list[int]:
    return [t.data_ptr() for layer in layers for t in (layer.keys, layer.values)]


def _move(cache, index: torch.Tensor) -> None:
    """index: (3, M) long rows (batch row, source slot, destination slot), moved to each layer's
    device once per device (not per layer); with a K/V arena (`make_kv_arena`), every layer at once."""
    arena = kv_arena(cache)
    if arena is not None:  # (2, L, B, H, S, D): the right side is gathered first, overlapping moves are safe
        index = to_device(index, arena.device)
        if arena.shape[2] == 1:  # one row: a plain gather and copy along the slots (cheaper than advanced indexing)
            rows = arena.select(2, 0)  # (2, L, H, S, D)
            rows.index_copy_(3, index[2], rows.index_select(3, index[1]))
        else:
            arena[:, :, index[0], :, index[2]] = arena[:, :, index[0], :, index[1]]
        return
    on: dict[torch.device, torch.Tensor] = {}
    for layer in kv_layers(cache):
        dev = layer.keys.device
        if dev not in on:
            on[dev] = to_device(index, dev)
        move_kv(layer.keys, layer.values, on[dev])


def move_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
    """keys / values (B, H, S, D): copy slot index[1] of row index[0] to slot index[2], in place, for
    the (3, M) long `index`; the right side is gathered first, so overlapping moves are safe. Pure
    tensor work (compiles with `torch.compile(fullgraph=True)`)."""
    r, s_, d = index[0], index[1], index[2]
    keys[r, :, d] = keys[r, :, s_]
    values[r, :, d] = values[r, :, s_]


def select_rows(cache, rows: list[int], layout: CacheRows) -> CacheRows:
    """Keep only batch rows `rows` of the cache (finished rows leave the batch); returns their layout,
    with the cache's length set to the longest kept row. Layers that hold nothing yet are skipped."""
    idx = torch.tensor(rows, dtype=torch.long)
    new = layout.select(rows)
    on: dict[torch.device, torch.Tensor] = {}
    end = new.write_at
    arena = kv_arena(cache)
    if arena is not None:  # one selection for every layer, which stay views of the (smaller) arena
        arena = arena[:, :, to_device(idx, arena.device)]
        for i, layer in enumerate(kv_layers(cache)):
            layer.keys, layer.values = arena[0, i], arena[1, i]
        setattr(cache, ARENA, (arena, _data_ptrs(kv_layers(cache))))
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionLayer):
            for states in (layer.conv_states, layer.recurrent_states):
                if states.get(0) is not None:
                    states[0] = states[0][idx.to(states[0].device)]
            _set_length(layer, end, "select rows of")
            continue
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if arena is None:
            dev = layer.keys.device
            if dev not in on:
                on[dev] = to_device(idx, dev)
            layer.keys = layer.keys[on[dev]]
            layer.values = layer.values[on[dev]]
        if isinstance(layer, StaticLayer):
            layer.batch_size = len(rows)
        _set_length(layer, end, "select rows of")
    return new


def commit_linear_states(cache, tree_states: "la.TreeStates", paths: torch.Tensor, last: torch.Tensor) -> None:
    """After a tree verify on a hybrid target: every linear-attention layer's conv and recurrent state
    becomes that of row b's path node at depth last[b] (the last token the cache keeps), computed from
    the verify's record (`linear_attention.path_state` / `path_conv_state`) and copied into the cache's
    own buffers (their addresses kept). paths: (B, P) long (`Verified.paths`); last: (B,) long on the
    device. No host read."""
    leaf = paths.gather(1, last[:, None])[:, 0]  # (B,)
    vis = tree_states.visibility  # (B, N, N)
    on_path = vis.gather(1, leaf[:, None, None].expand(-1, 1, vis.shape[-1]))[:, 0]  # (B, N): the leaf and its ancestors
    for idx, rec in tree_states.layers.items():
        conv_state, state = linear_states(cache, idx)
        new_state = la.path_state(state, rec, on_path, leaf)
        new_conv = la.path_conv_state(conv_state, rec.x, paths, last)
        state.copy_(new_state.to(state.dtype))
        conv_state.copy_(new_conv)
