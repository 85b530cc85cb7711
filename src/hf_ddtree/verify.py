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
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)

from .cache import mask_width, tree_attention_masks
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
    """One target forward over the tree's N rows (root, nodes, padding) written at cache slots
    [past_len, past_len + N).

    mask_out: optional preallocated (1, 1, N, kv_len) mask buffer, rewritten in place (fixed shapes).
    forward: the callable that runs the target (default `target` itself; the loop passes the target's
    compiled call, `compat.compiled_call`, when generate()'s compile criteria hold).
    Returns logits (N, V) and the selected hidden states concatenated (N, F) (or None).
    """
    device = target.device
    n = tree.size
    ids = tree.tokens.to(device)[None]  # (1, N)
    position_ids = (tree.depths.to(device) + past_len)[None]  # (1, N)
    mask = tree_attention_masks(target.config, tree.visibility(device), tree.depths, past_len,
                                mask_width(cache, past_len, n), target.dtype, device,
                                num_real=n - tree.pad, out=mask_out)
    out = (forward or target)(
        input_ids=ids,
        position_ids=position_ids,
        attention_mask=mask,  # (1, 1, N, kv_len), or {layer type: mask} for hybrid targets
        **cache_kwargs(target, cache),
        use_cache=True,
        output_hidden_states=hidden_states_request(hidden_indices),
    )
    features = None
    if hidden_indices:
        features = gather_features(out, hidden_indices)[0]  # (N, F)
    return out.logits[0], features  # (N, V)


def verify_tree(target, tree: Tree, cache, past_len: int, hidden_indices: list[int] | None, logits_processor,
                prefix: torch.Tensor, do_sample: bool, mask_out: torch.Tensor | None = None,
                accept=None, forward=None) -> Verified:
    """A round's verification: `run_tree`, the processors per node, and the accept walk.
    prefix: (1, L) committed ids ending with the root. The cache is left holding the whole tree:
    `cache.compact(cache, past_len, path)` keeps the accepted path. accept: the walk,
    `(tree, scores, do_sample) -> (path, next_token)` (default `walk`; tensor-parallel targets pass
    one that walks on the leader and broadcasts). forward: see `run_tree`."""
    raw, features = run_tree(target, tree, cache, past_len, hidden_indices, mask_out, forward)
    scores = process_scores(logits_processor, prefix, tree, raw)
    path, nxt = (accept or walk)(tree, scores, do_sample)
    return Verified(raw, scores, features, path, nxt)


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
