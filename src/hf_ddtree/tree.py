"""Draft trees from per-position draft distributions. Knows nothing of models.

A tree has node 0 = the root (the last accepted token, not yet in the target's KV cache) and
nodes 1..n in best-first pop order, so every parent comes before its children and any prefix
`0..k` of the nodes is itself a valid (prefix-closed) tree. `Tree.pad(m)` appends padding nodes up
to a fixed node count (one verify shape per budget): they have no parent, so they see only
themselves, are nobody's child (never walked) and never enter a kept path.

The DDTree surrogate: a node at depth d reached by ranks (r_1, ..., r_d) scores
sum_i logp_i[r_i], the log of the product of the drafter's per-position probabilities. The heap
pops nodes in decreasing score (ties broken by the rank tuple, lexicographically), so the first
`budget` pops are exactly the `budget` best prefix-closed paths.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch


def ancestor_matrix(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(N, N) bool: [i, j] is True iff j is i or an ancestor of i, computed on `parents`' device.

    parents: (N,) long, -1 for a node without a parent (the root, padding nodes). max_depth: the
    deepest node's depth (bounds the pointer jumps). Vectorised over nodes: `max_depth` gathers.
    """
    n = parents.shape[0]
    idx = torch.arange(n, device=parents.device)
    up = torch.where(parents < 0, idx, parents)  # a parentless node points at itself
    vis = torch.zeros(n, n, dtype=torch.bool, device=parents.device)
    vis[idx, idx] = True
    cur = idx
    for _ in range(max_depth):
        cur = up[cur]
        vis[idx, cur] = True
    return vis


@dataclass
class Tree:
    tokens: torch.Tensor  # (N,) long: node token ids; tokens[0] = root; N = n + 1 + pad
    parents: torch.Tensor  # (N,) long: parents[0] = -1 (and -1 for padding nodes)
    depths: torch.Tensor  # (N,) long: depths[0] = 0 (and 0 for padding nodes)
    scores: list[float]  # (n+1,) surrogate log-probability of the path to each real node; scores[0] = 0
    children: list[dict[int, int]] = field(repr=False)  # children[i][token] = child node index (real nodes)
    pad: int = 0  # padding nodes at the end (never walked, see only themselves)

    @property
    def num_nodes(self) -> int:
        """Number of drafted nodes, root and padding excluded."""
        return len(self.scores) - 1

    @property
    def size(self) -> int:
        """Rows the verify forward sees: root + drafted + padding nodes."""
        return self.tokens.shape[0]

    def visibility(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(N, N) bool on `device`: [i, j] is True iff j is i or an ancestor of i."""
        max_depth = int(self.depths.max()) if self.depths.numel() else 0
        return ancestor_matrix(self.parents.to(device), max_depth)

    def pad_to(self, size: int) -> "Tree":
        """This tree with padding nodes appended up to `size` rows (root included). A padding node
        carries the root token at the root's position (depth 0), has no parent and no children."""
        if self.pad:
            raise ValueError("pad_to: the tree is already padded.")
        extra = size - self.size
        if extra < 0:
            raise ValueError(f"pad_to({size}): the tree already has {self.size} rows.")
        if extra == 0:
            return self
        return Tree(torch.cat([self.tokens, self.tokens[:1].expand(extra)]),
                    torch.cat([self.parents, self.parents.new_full((extra,), -1)]),
                    torch.cat([self.depths, self.depths.new_zeros(extra)]),
                    self.scores, self.children, extra)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        parents = self.parents.tolist()
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        return path[::-1]

    def truncate(self, num_nodes: int) -> "Tree":
        """The tree of the first `num_nodes` drafted nodes (still prefix-closed: parents come first)."""
        if self.pad:
            raise ValueError("truncate a tree before padding it.")
        k = num_nodes + 1
        children = [{t: c for t, c in ch.items() if c < k} for ch in self.children[:k]]
        return Tree(self.tokens[:k], self.parents[:k], self.depths[:k], self.scores[:k], children)


def _make_tree(root_token: int, tokens: list[int], parents: list[int], depths: list[int], scores: list[float]) -> Tree:
    children: list[dict[int, int]] = [{} for _ in range(len(tokens) + 1)]
    for i, (tok, par) in enumerate(zip(tokens, parents), start=1):
        children[par][tok] = i
    return Tree(
        tokens=torch.tensor([root_token] + tokens, dtype=torch.long),
        parents=torch.tensor([-1] + parents, dtype=torch.long),
        depths=torch.tensor([0] + depths, dtype=torch.long),
        scores=[0.0] + scores,
        children=children,
    )


def topk_per_position(draft_logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, V) log-probs -> sorted (D, k) log-probs and (D, k) token ids, k clipped to V."""
    k = max(1, min(k, draft_logprobs.shape[-1]))
    values, ids = torch.topk(draft_logprobs.float(), k, dim=-1)
    return values, ids


def build_tree(root_token: int, top_logprobs: torch.Tensor, top_ids: torch.Tensor, budget: int,
               max_depth: int | None = None) -> Tree:
    """Best-first DDTree under a node budget.

    Args:
        root_token: the last accepted token (node 0).
        top_logprobs: (D, K) per-depth log-probs sorted descending (depth d+1 is row d).
        top_ids: (D, K) the matching token ids.
        budget: number of drafted nodes (root excluded); 0 gives the root alone.
        max_depth: optional depth limit <= D.
    Returns the tree of the `budget` best prefix-closed paths, nodes in pop order.
    """
    if budget < 0:
        raise ValueError(f"tree budget must be >= 0, got {budget}")
    depth_limit = top_logprobs.shape[0] if max_depth is None else min(max_depth, top_logprobs.shape[0])
    lp = top_logprobs.tolist()
    ids = top_ids.tolist()
    width = len(lp[0]) if lp else 0
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    scores: list[float] = []
    if budget == 0 or depth_limit == 0 or width == 0:
        return _make_tree(root_token, tokens, parents, depths, scores)
    # heap entry: (-score, ranks, parent_node, parent_score)
    heap = [(-lp[0][0], (0,), 0, 0.0)]
    while heap and len(tokens) < budget:
        neg, ranks, parent, parent_score = heapq.heappop(heap)
        depth = len(ranks)
        tokens.append(ids[depth - 1][ranks[-1]])
        parents.append(parent)
        depths.append(depth)
        scores.append(-neg)
        node = len(tokens)
        if ranks[-1] + 1 < width:  # next sibling: same parent, next rank
            s = parent_score + lp[depth - 1][ranks[-1] + 1]
            heapq.heappush(heap, (-s, ranks[:-1] + (ranks[-1] + 1,), parent, parent_score))
        if depth < depth_limit:  # first child: next depth, rank 0
            s = -neg + lp[depth][0]
            heapq.heappush(heap, (-s, ranks + (0,), node, -neg))
    return _make_tree(root_token, tokens, parents, depths, scores)


def build_chain(root_token: int, draft_ids: torch.Tensor, draft_logprobs: torch.Tensor | None = None) -> Tree:
    """DFlash's single trajectory: root -> draft_ids[0] -> draft_ids[1] -> ... (a tree with one path)."""
    toks = [int(t) for t in draft_ids.tolist()]
    lps = [0.0] * len(toks) if draft_logprobs is None else [float(x) for x in draft_logprobs.tolist()]
    scores, acc = [], 0.0
    for x in lps:
        acc += x
        scores.append(acc)
    n = len(toks)
    return _make_tree(root_token, toks, list(range(n)), list(range(1, n + 1)), scores)


def merge_paths(root_token: int, paths: list[tuple[list[int], list[float]]], budget: int) -> Tree:
    """One prefix tree from several candidate paths, the `budget` best nodes kept.

    paths: (tokens, logps) pairs; logps[i] is the log-probability increment of tokens[i] given
    the path before it, so a node's score is the sum of increments from the root. Shared prefixes
    are stored once (a node reached by several paths keeps its highest score). Nodes are then
    taken best-first from the root (ties by insertion order), so the result is prefix-closed,
    in non-increasing score order like `build_tree`.
    """
    if budget < 0:
        raise ValueError(f"tree budget must be >= 0, got {budget}")
    kids: list[dict[int, int]] = [{}]  # trie: node -> {token: node}
    score = [0.0]
    token = [root_token]
    for toks, lps in paths:
        node, acc = 0, 0.0
        for tok, lp in zip(toks, lps):
            acc += float(lp)
            child = kids[node].get(int(tok))
            if child is None:
                child = len(token)
                kids[node][int(tok)] = child
                kids.append({})
                score.append(acc)
                token.append(int(tok))
            elif acc > score[child]:
                score[child] = acc
            node = child
    # a child's score may exceed its parent's after max-merging; cap it so pop order stays parent-first
    order = [0]
    for node in order:
        for child in kids[node].values():
            score[child] = min(score[child], score[node])
            order.append(child)

    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    scores: list[float] = []
    new_index = {0: 0}
    depth = {0: 0}
    heap = [(-score[c], c, 0) for c in kids[0].values()]
    heapq.heapify(heap)
    while heap and len(tokens) < budget:
        neg, node, parent = heapq.heappop(heap)
        tokens.append(token[node])
        parents.append(new_index[parent])
        depth[node] = depth[parent] + 1
        depths.append(depth[node])
        scores.append(-neg)
        new_index[node] = len(tokens)
        for c in kids[node].values():
            heapq.heappush(heap, (-score[c], c, node))
    return _make_tree(root_token, tokens, parents, depths, scores)


def tree_paths(tree: Tree) -> list[tuple[list[int], list[float]]]:
    """Every root-to-node path of `tree` as (tokens, log-prob increments), for `merge_paths`."""
    toks = tree.tokens.tolist()
    pars = tree.parents.tolist()
    sc = tree.scores
    out: list[tuple[list[int], list[float]]] = [([], [])]  # out[i]: the path to node i (root: empty)
    for i in range(1, len(toks)):  # parents come first: extend the parent's path (O(n * depth), not O(n^2))
        ptoks, plps = out[pars[i]]
        out.append((ptoks + [toks[i]], plps + [sc[i] - sc[pars[i]]]))
    return out[1:]
