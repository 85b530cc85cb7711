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
    scores: torch.Tensor  # (n+1, V) float32 processed logits per node (what the target samples from)
    raw_logits: torch.Tensor  # (n+1, V) target logits before processors
    features: torch.Tensor | None  # (n+1, F) concatenated selected hidden states, or None


def run_tree(target, tree: Tree, cache, past_len: int, hidden_indices: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One target forward over root + tree nodes written at cache slots [past_len, past_len + n + 1).

    Returns logits (n+1, V) and the selected hidden states concatenated (n+1, F) (or None).
    """
    device = target.device
    dtype = target.dtype
    n = tree.tokens.numel()
    ids = tree.tokens.to(device)[None]  # (1, n+1)
    position_ids = (tree.depths.to(device) + past_len)[None]  # (1, n+1)
    mask = tree_attention_masks(target.config, tree.visibility(), tree.depths, past_len,
                                mask_width(cache, past_len, n), dtype, device)
    out = target(
        input_ids=ids,
        position_ids=position_ids,
        attention_mask=mask,  # (1, 1, n+1, kv_len), or {layer type: mask} for hybrid targets
        **cache_kwargs(target, cache),
        use_cache=True,
        output_hidden_states=hidden_states_request(hidden_indices),
    )
    features = None
    if hidden_indices:
        features = gather_features(out, hidden_indices)[0]  # (n+1, F)
    return out.logits[0], features  # (n+1, V)


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
        path = tree.path_to(i)[1:]  # root is already the last id of prefix
        ids = torch.cat([prefix, tokens[path][None]], dim=-1) if path else prefix
        rows.append(logits_processor(ids, scores[i:i + 1]))
    return torch.cat(rows, dim=0)


def walk(tree: Tree, scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Follow the target's choices down the tree.

    At each node the target picks a token (argmax of `scores[node]`, or a sample from
    softmax(scores[node])); if a child carries that token we move there, else we stop.
    Returns (accepted node indices starting with the root, the target's token after the last one).
    """
    node = 0
    path = [0]
    while True:
        row = scores[node]
        if do_sample:
            probs = torch.softmax(row, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(torch.argmax(row))
        child = tree.children[node].get(token)
        if child is None:
            return path, token
        node = child
        path.append(node)
