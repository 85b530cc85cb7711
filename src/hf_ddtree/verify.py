"""Verify a draft tree with ONE target forward and walk it with the target's own choices.

Every node i of the tree is fed at position `past_len + depth[i]` and attends to the cache plus
its own ancestors, so its logits are exactly what the target computes after `prefix + path(i)`.
Walking from the root and following the child whose token equals the target's choice (argmax,
or a sample from the target's processed distribution) therefore yields exactly the tokens the
target would produce on its own: greedy output is identical and sampling has the same law.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)

from .cache import CacheRows, mask_width, tree_attention_masks_rows
from .compat import cache_kwargs, gather_features, hidden_states_request
from .tree import Tree

# processors whose output depends only on the scores row, not on the token prefix
_PREFIX_FREE = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)


@dataclass
class Verified:
    """What one tree verification gives the loop (one row; N = tree.size rows incl. root and padding)."""

    raw: torch.Tensor  # (N, V) target logits before processors
    scores: torch.Tensor  # (N, V) float32 processed logits (what the target picks from)
    features: torch.Tensor | None  # (N, F) concatenated selected hidden states, or None
    path: list[int]  # accepted node indices, root (0) first
    next_token: int  # the target's own token after the last accepted node (the bonus token)


def run_tree(target, tree: Tree, cache, past_len: int, hidden_indices: list[int] | None,
             mask_out: torch.Tensor | None = None, forward=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One target forward over one unpadded row's tree (root, nodes, padding) written at cache slots
    [past_len, past_len + N): `run_trees` with B = 1. Returns logits (N, V) and features (N, F) or None."""
    logits, features = run_trees(target, [tree], cache, CacheRows.single(past_len), hidden_indices, mask_out, forward)
    return logits[0], None if features is None else features[0]


def run_trees(target, trees: list[Tree], cache, rows: CacheRows, hidden_indices: list[int] | None,
              mask_out: torch.Tensor | None = None, forward=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ONE target forward over B trees of the same size N (pad them first: `Tree.pad_to`), row b's
    tree written at slots [rows.write_at, + N) of cache row b, node i of row b at position
    rows.positions[b] + depth, each node seeing its row's live cache and its own ancestors only.

    mask_out: optional preallocated (B, 1, N, kv_len) mask buffer, rewritten in place (fixed shapes).
    forward: the callable that runs the target (default `target` itself; the loop passes the target's
    compiled call, `compat.compiled_call`, when generate()'s compile criteria hold).
    Returns logits (B, N, V) and the selected hidden states concatenated (B, N, F) (or None).
    """
    device = target.device
    n = trees[0].size
    if any(t.size != n for t in trees):
        raise ValueError(f"run_trees needs trees of one size (pad them), got sizes {[t.size for t in trees]}.")
    ids = torch.stack([t.tokens for t in trees]).to(device)  # (B, N)
    depths = torch.stack([t.depths for t in trees])  # (B, N)
    position_ids = depths.to(device) + rows.positions.to(device)[:, None]  # (B, N)
    visibility = torch.stack([t.visibility(device) for t in trees])  # (B, N, N)
    num_real = torch.tensor([t.size - t.pad for t in trees])
    mask = tree_attention_masks_rows(target.config, visibility, depths, rows, mask_width(cache, rows.write_at, n),
                                     target.dtype, device, num_real=num_real, out=mask_out)
    out = (forward or target)(
        input_ids=ids,
        position_ids=position_ids,
        attention_mask=mask,  # (B, 1, N, kv_len), or {layer type: mask} for hybrid targets
        **cache_kwargs(target, cache),
        use_cache=True,
        output_hidden_states=hidden_states_request(hidden_indices),
    )
    features = None
    if hidden_indices:
        features = gather_features(out, hidden_indices)  # (B, N, F)
    return out.logits, features  # (B, N, V)


def verify_tree(target, tree: Tree, cache, past_len: int, hidden_indices: list[int] | None, logits_processor,
                prefix: torch.Tensor, do_sample: bool, mask_out: torch.Tensor | None = None,
                accept=None, forward=None) -> Verified:
    """A round's verification for one unpadded row (`verify_trees` with B = 1).
    prefix: (1, L) committed ids ending with the root. The cache is left holding the whole tree:
    `cache.compact(cache, past_len, path)` keeps the accepted path."""
    return verify_trees(target, [tree], cache, CacheRows.single(past_len), hidden_indices, logits_processor,
                        [prefix], do_sample, mask_out, accept, forward)[0]


def verify_trees(target, trees: list[Tree], cache, rows: CacheRows, hidden_indices: list[int] | None,
                 logits_processor, prefixes: list[torch.Tensor], do_sample: bool,
                 mask_out: torch.Tensor | None = None, accept=None, forward=None) -> list[Verified]:
    """A round's verification of B rows: `run_trees` (one forward), then per row the processors per
    node and the accept walk. prefixes[b]: (1, L_b) row b's committed ids ending with its root (what
    stock generate() would pass the processors for that row, left padding included). The cache is
    left holding every tree: `cache.compact_rows` keeps the accepted paths. logits_processor: one list for
    every row, or a tuple of B of them (`row_processors`). accept: the walk,
    `(tree, scores, do_sample) -> (path, next_token)` (default `walk`; tensor-parallel targets pass
    one that walks on the leader and broadcasts). forward: see `run_trees`."""
    raw, features = run_trees(target, trees, cache, rows, hidden_indices, mask_out, forward)
    out = []
    for b, tree in enumerate(trees):
        procs = logits_processor[b] if isinstance(logits_processor, tuple) else logits_processor
        scores = process_scores(procs, prefixes[b], tree, raw[b])
        path, nxt = (accept or walk)(tree, scores, do_sample)
        out.append(Verified(raw[b], scores, None if features is None else features[b], path, nxt))
    return out


def row_processors(logits_processor: LogitsProcessorList | None, row: int) -> LogitsProcessorList | None:
    """generate()'s processors as they apply to batch row `row` alone, for calls on that row's (1, L) ids.

    Processors that carry per-row state are narrowed to the row: transformers >= 5.23 builds
    `RepetitionPenaltyLogitsProcessor(prompt_ignore_length=<(B,) left-padding lengths>)`, which becomes
    the row's own int (the same positions ignored). Every other processor is shared as is (the loop
    refuses `prefix_allowed_tokens_fn` for B > 1: it reads the batch index)."""
    if not logits_processor:
        return logits_processor
    import copy

    out = LogitsProcessorList()
    for proc in logits_processor:
        ignore = getattr(proc, "prompt_ignore_length", None)
        if isinstance(proc, RepetitionPenaltyLogitsProcessor) and isinstance(ignore, torch.Tensor):
            proc = copy.copy(proc)
            proc.prompt_ignore_length = int(ignore[row])
        out.append(proc)
    return out


def process_scores(logits_processor: LogitsProcessorList | None, prefix: torch.Tensor, tree: Tree,
                   logits: torch.Tensor) -> torch.Tensor:
    """Apply generate()'s logits processors to every node with that node's own token prefix.

    prefix: (1, L) committed ids, ending with the root token. logits: (n+1, V).
    Prefix-free processors (temperature, top-k/p, ...) run once on all rows; any other processor
    (repetition penalty, no-repeat-ngram, min-new-tokens, ...) runs per node on `prefix + path`,
    exactly as stock generate() would call it at that position.
    """
    scores = logits.float()
    if not logits_processor:
        return scores
    if all(isinstance(p, _PREFIX_FREE) for p in logits_processor):
        ids = prefix.expand(scores.shape[0], -1)
        return logits_processor(ids, scores)
    rows = []
    tokens = tree.tokens.to(prefix.device)
    for i in range(scores.shape[0]):
        path = tree.path_to(i)[1:]  # a padding node has no parent: the prefix alone  # root is already the last id of prefix
        ids = torch.cat([prefix, tokens[path][None]], dim=-1) if path else prefix
        rows.append(logits_processor(ids, scores[i:i + 1]))
    return torch.cat(rows, dim=0)


def choose(scores_row: torch.Tensor, do_sample: bool) -> int:
    """The target's token from one processed scores row (V,): argmax, or a sample from its softmax."""
    if do_sample:
        return int(torch.multinomial(torch.softmax(scores_row, dim=-1), 1))
    return int(torch.argmax(scores_row))


def walk(tree: Tree, scores: torch.Tensor, do_sample: bool) -> tuple[list[int], int]:
    """Follow the target's choices down the tree.

    At each node the target picks a token (`choose`: argmax of `scores[node]`, or a sample from
    softmax(scores[node])); if a child carries that token we move there, else we stop.
    Returns (accepted node indices starting with the root, the target's token after the last one).
    """
    node = 0
    path = [0]
    while True:
        token = choose(scores[node], do_sample)
        child = tree.children[node].get(token)
        if child is None:
            return path, token
        node = child
        path.append(node)
