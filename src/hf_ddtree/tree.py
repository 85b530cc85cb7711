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
import torch

from .device import host_tensor, to_device


def ancestor_matrix(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(N, N) bool: [i, j] is True iff j is i or an ancestor of i, computed on `parents`' device.

    parents: (N,) long, -1 for a node without a parent (the root, padding nodes). max_depth: the
    deepest node's depth (bounds the pointer jumps). Vectorised over nodes: `max_depth` gathers.
    (`ancestor_matrices` for B trees at once.)"""
    return ancestor_matrices(parents[None], max_depth)[0]


def ancestor_matrices(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(B, N, N) bool for B trees' parents (B, N): [b, i, j] is True iff node j is i or an ancestor of i in
    tree b. Tensor ops only (`max_depth` gathers), no host read: it compiles with fullgraph=True."""
    B, n = parents.shape
    idx = torch.arange(n, device=parents.device).expand(B, n)
    up = torch.where(parents < 0, idx, parents)  # a parentless node points at itself
    vis = torch.eye(n, dtype=torch.bool, device=parents.device)[None].repeat(B, 1, 1)
    cur = idx
    for _ in range(max_depth):
        cur = up.gather(1, cur)
        vis.scatter_(2, cur[..., None], True)
    return vis


def lineage_matrices(lineages: list[list[tuple[int, ...]]], n: int, device=None) -> torch.Tensor:
    """`ancestor_matrices` of B trees the host built, from their lineages (`Tree.lineage`: each real node's
    ancestors and itself), padded to n rows (a padding row sees only itself): ONE write of the True entries
    (about n x mean depth of them) instead of a gather and a scatter per depth. (B, n, n) bool on `device`."""
    vis = torch.zeros(len(lineages) * n * n, dtype=torch.bool)
    vis[host_tensor(lineage_index(lineages, n, n), "cpu")] = True
    return to_device(vis.view(len(lineages), n, n), device or "cpu")


def lineage_index(lineages: list[list[tuple[int, ...]]], n: int, row_stride: int, offset: int = 0) -> list[int]:
    """Flat positions of `lineage_matrices`' True entries (each real node's ancestors and itself; a padding row up to
    n: itself) in a row-major (B, n, row_stride) layout whose tree block starts at column `offset`: entry (b, i, j)
    is at (b * n + i) * row_stride + offset + j (the matrices themselves: row_stride n, offset 0; a mask's tree
    block: row_stride kv_len, offset the slot the trees are written at)."""
    flat = [(b * n + i) * row_stride + offset + j for b, lin in enumerate(lineages) for i, anc in enumerate(lin)
            for j in anc]
    flat += [(b * n + i) * row_stride + offset + i for b, lin in enumerate(lineages) for i in range(len(lin), n)]
    return flat


def ancestors_by_depth(visibility: torch.Tensor, depths: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(..., R, max_depth + 1) long: for each row of `visibility` (..., R, N) bool (a node's ancestors
    and itself, `ancestor_matrix`), the index of its node at each depth 0..max_depth; depths: (..., N)
    long. Past a row's own depth the entry is 0 (the root). Tensor ops only, no host read."""
    levels = torch.arange(max_depth + 1, device=depths.device)
    at_depth = visibility[..., :, None, :] & (depths[..., None, None, :] == levels[:, None])  # (..., R, D + 1, N)
    return at_depth.to(torch.uint8).argmax(-1)


class Tree:
    """One row's draft tree (N rows = root + n drafted nodes + padding), tensors on any device.

    tokens  (N,) long: node token ids; tokens[0] = root
    parents (N,) long: parents[0] = -1 (and -1 for padding nodes)
    depths  (N,) long: depths[0] = 0 (and 0 for padding nodes)
    score   (N,) float64: surrogate log-probability of the path to each node (root 0, padding -inf)
    num_nodes, max_depth, pad: host ints (drafted nodes, deepest depth, padding rows), so nothing
    about the tree's shape needs a read of the device.
    `scores` (a list) and `children` (dicts) are host views, read on first use only (budget policy,
    tests, host tree merging): the loop's own round never touches them.
    """

    def __init__(self, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
                 scores: list[float] | None = None, children: list[dict[int, int]] | None = None, pad: int = 0, *,
                 score: torch.Tensor | None = None, num_nodes: int | None = None, max_depth: int | None = None,
                 host_lists: tuple[list[int], list[int]] | None = None, lineage: list[tuple[int, ...]] | None = None):
        self.tokens, self.parents, self.depths, self.pad = tokens, parents, depths, int(pad)
        n = tokens.shape[0] - self.pad - 1 if num_nodes is None else int(num_nodes)
        self._num_nodes = n
        if score is None and scores is None:
            raise ValueError("Tree needs its node scores (a list `scores` or a tensor `score`).")
        self._score = score  # None: made from `scores` on first use (a tree the host built)
        self._scores = None if scores is None else list(scores)
        self._children = children
        if max_depth is None:
            max_depth = int(depths.max()) if depths.numel() else 0
        self.max_depth = int(max_depth)
        self.host_lists = host_lists  # (tokens, parents) of the real nodes when built on the host, else None
        self.lineage = lineage  # per real node, its ancestors and itself (root first), when built on the host

    def __repr__(self) -> str:
        return f"Tree(num_nodes={self.num_nodes}, max_depth={self.max_depth}, pad={self.pad}, device={self.tokens.device})"

    @property
    def score(self) -> torch.Tensor:
        """(N,) float64 path scores, padding -inf (from the host list on first use, for a tree the host built)."""
        if self._score is None:
            self._score = host_tensor(self._scores + [float("-inf")] * self.pad, "cpu", torch.float64)
        return self._score

    @property
    def num_nodes(self) -> int:
        """Number of drafted nodes, root and padding excluded."""
        return self._num_nodes

    @property
    def scores(self) -> list[float]:
        """(n+1,) host list of the real nodes' path scores (a read of `score` on first use)."""
        if self._scores is None:
            self._scores = self.score[:self.num_nodes + 1].tolist()
        return self._scores

    @property
    def children(self) -> list[dict[int, int]]:
        """children[i][token] = child node index, real nodes only (a host read on first use)."""
        if self._children is None:
            k = self.num_nodes + 1
            toks, pars = self.host_lists or (self.tokens[:k].tolist(), self.parents[:k].tolist())
            children: list[dict[int, int]] = [{} for _ in range(k)]
            for i in range(1, k):
                children[pars[i]][toks[i]] = i
            self._children = children
        return self._children

    @property
    def size(self) -> int:
        """Rows the verify forward sees: root + drafted + padding nodes."""
        return self.tokens.shape[0]

    def visibility(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(N, N) bool on `device`: [i, j] is True iff j is i or an ancestor of i."""
        return ancestor_matrix(self.parents.to(device), self.max_depth)

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
        score = None if self._score is None else torch.cat([self._score, self._score.new_full((extra,), float("-inf"))])
        return Tree(torch.cat([self.tokens, self.tokens[:1].expand(extra)]),
                    torch.cat([self.parents, self.parents.new_full((extra,), -1)]),
                    torch.cat([self.depths, self.depths.new_zeros(extra)]),
                    self._scores, self._children, extra, score=score, num_nodes=self.num_nodes,
                    max_depth=self.max_depth, host_lists=self.host_lists, lineage=self.lineage)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included (a host read)."""
        parents = self.parents.tolist()
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        return path[::-1]

    def truncate(self, num_nodes: int) -> "Tree":
        """The tree of the first `num_nodes` drafted nodes (still prefix-closed: parents come first)."""
        if self.pad:
            raise ValueError("truncate a tree before padding it.")
        num_nodes = max(0, min(int(num_nodes), self.num_nodes))
        if num_nodes == self.num_nodes:
            return self
        k = num_nodes + 1
        children = None if self._children is None else [{t: c for t, c in ch.items() if c < k}
                                                        for ch in self._children[:k]]
        scores = None if self._scores is None else self._scores[:k]
        # max_depth stays an upper bound (exact for the visibility pointer jumps: extra jumps are no-ops)
        host = None if self.host_lists is None else (self.host_lists[0][:k], self.host_lists[1][:k])
        score = None if self._score is None else self._score[:k]
        return Tree(self.tokens[:k], self.parents[:k], self.depths[:k], scores, children, score=score,
                    num_nodes=num_nodes, max_depth=min(self.max_depth, num_nodes), host_lists=host,
                    lineage=None if self.lineage is None else self.lineage[:k])


def _make_tree(root_token: int, tokens: list[int], parents: list[int], depths: list[int], scores: list[float]) -> Tree:
    children: list[dict[int, int]] = [{} for _ in range(len(tokens) + 1)]
    lineage: list[tuple[int, ...]] = [(0,)]  # node i's ancestors and itself, root first (parents come first)
    for i, (tok, par) in enumerate(zip(tokens, parents), start=1):
        children[par][tok] = i
        lineage.append(lineage[par] + (i,))
    host = ([root_token] + tokens, [-1] + parents)
    rows = host_tensor([*host, [0] + depths], "cpu")  # (3, n + 1): one host-to-tensor copy
    return Tree(rows[0], rows[1], rows[2], [0.0] + scores, children, max_depth=max(depths, default=0),
                host_lists=host, lineage=lineage)


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
        top_logprobs: (D, K) per-depth log-probs sorted descending (depth d+1 is row d), a tensor
            or the same as nested host lists.
        top_ids: (D, K) the matching token ids (tensor or lists).
        budget: number of drafted nodes (root excluded); 0 gives the root alone.
        max_depth: optional depth limit <= D.
    Returns the tree of the `budget` best prefix-closed paths, nodes in pop order.
    """
    if budget < 0:
        raise ValueError(f"tree budget must be >= 0, got {budget}")
    lp = top_logprobs.tolist() if isinstance(top_logprobs, torch.Tensor) else top_logprobs
    ids = top_ids.tolist() if isinstance(top_ids, torch.Tensor) else top_ids
    depth_limit = len(lp) if max_depth is None else min(max_depth, len(lp))
    width = len(lp[0]) if lp else 0
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    scores: list[float] = []
    if budget == 0 or depth_limit == 0 or width == 0:
        return _make_tree(root_token, tokens, parents, depths, scores)
    # heap entry: (-score, key, depth, rank, parent_node, parent_score). Ties are broken by the rank tuple
    # (r_1, ..., r_d) lexicographically, a prefix first; `key` is that order as one int: digit r_i + 1 at place
    # depth_limit - i in base width + 1 (0 past the tuple's end), so a sibling adds one at its place, a child
    # one at the next place (an int per entry instead of a tuple: the heap is the host round's largest loop)
    place = [(width + 1) ** (depth_limit - d) for d in range(depth_limit + 1)]  # place[d]: depth d's digit
    push, pop = heapq.heappush, heapq.heappop
    heap = [(-lp[0][0], place[1], 1, 0, 0, 0.0)]
    node = 0
    while heap and node < budget:
        neg, key, depth, rank, parent, parent_score = pop(heap)
        tokens.append(ids[depth - 1][rank])
        parents.append(parent)
        depths.append(depth)
        scores.append(-neg)
        node += 1
        if rank + 1 < width:  # next sibling: same parent, next rank
            push(heap, (-(parent_score + lp[depth - 1][rank + 1]), key + place[depth], depth, rank + 1, parent,
                        parent_score))
        if depth < depth_limit:  # first child: next depth, rank 0
            push(heap, (-(-neg + lp[depth][0]), key + place[depth + 1], depth + 1, 0, node, -neg))
    return _make_tree(root_token, tokens, parents, depths, scores)


def _beam_widths(width: int, depth_limit: int, budget: int) -> list[int]:
    """Beam width per depth 1..depth_limit: min(budget, width**d), computed without overflow."""
    out, w = [], 1
    for _ in range(depth_limit):
        w = min(budget, w * width)
        out.append(w)
    return out


def _stable_order(keys: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(B, M) permutation sorting by score descending, ties by the rank tuples `keys` (B, M, J) ascending
    (lexicographic over J packed int64 chunks): LSD, one stable sort per chunk, then one by score."""
    B, M, J = keys.shape
    perm = torch.arange(M, device=score.device).expand(B, M)
    for j in range(J - 1, -1, -1):
        order = torch.sort(keys[..., j].gather(1, perm), dim=1, stable=True).indices
        perm = perm.gather(1, order)
    order = torch.sort(score.gather(1, perm), dim=1, descending=True, stable=True).indices
    return perm.gather(1, order)


def build_trees(roots: torch.Tensor, top_logprobs: torch.Tensor, top_ids: torch.Tensor, budget: int,
                max_depth: int | None = None, core=None) -> list[Tree]:
    """`build_tree` for B rows at once, on the tensors' device, with no host read: the same trees
    (nodes, pop order, ties, float64 scores) as the heap.

    roots: (B,) long; top_logprobs / top_ids: (B, D, K) sorted descending per depth (`topk_per_position`).
    The heap's first n pops are the n best prefixes in the order (score descending, rank tuple
    ascending); that set is prefix-closed (a parent scores at least its child and its tuple is a
    prefix), so its depth-d part lies among the children of its depth-(d-1) part. A beam over the
    depths finds it: at depth d, the children of the kept depth-(d-1) nodes, laid out in
    lexicographic tuple order (parent's place * K + rank), are stably sorted by score and the best
    min(n, K**d) kept (re-sorted into tuple order). The best n of all kept nodes, in that order, are
    the heap's pops. Scores are summed left to right in float64, as the heap sums Python floats.
    Every row gets min(n, sum_d K**d) nodes (a host int): shapes depend on (n, K, D) only.
    core: `beam_tree_tensors` or a compiled copy of it (the default: itself).
    """
    if budget < 0:
        raise ValueError(f"tree budget must be >= 0, got {budget}")
    B, D, K = top_logprobs.shape
    device = top_logprobs.device
    depth_limit = D if max_depth is None else min(max_depth, D)
    widths = _beam_widths(K, depth_limit, budget) if K and budget else []
    total = sum(widths)
    n = min(budget, total)
    roots = to_device(roots, device).long()
    if n == 0:
        return [Tree(roots[b:b + 1], roots.new_full((1,), -1), roots.new_zeros(1), score=torch.zeros(1, dtype=torch.float64,
                     device=device), num_nodes=0, max_depth=0) for b in range(B)]
    tokens, parents, depths, scores = (core or beam_tree_tensors)(roots, top_logprobs, top_ids, widths, n)
    return [Tree(tokens[b], parents[b], depths[b], score=scores[b], num_nodes=n, max_depth=min(len(widths), n))
            for b in range(B)]


def beam_tree_tensors(roots: torch.Tensor, top_logprobs: torch.Tensor, top_ids: torch.Tensor, widths: list[int],
                      n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensor core of `build_trees` (fixed shapes given the host ints `widths` and `n`, no host
    read, so it compiles with `torch.compile(fullgraph=True)`): returns (B, n + 1) tokens, parents,
    depths (long) and float64 scores, root first, nodes in pop order."""
    B, D, K = top_logprobs.shape
    device = top_logprobs.device
    depth_limit = len(widths)
    total = sum(widths)
    lp = top_logprobs.double()  # (B, D, K)
    bits = max(1, int(K).bit_length())  # a rank r is stored as r + 1 (0: past the tuple's end)
    per = max(1, 62 // bits)  # tuple positions per int64 chunk
    J = -(-depth_limit // per)
    score_l, parent_l, tok_l, depth_l, tup_l = [], [], [], [], []
    prev_score = torch.zeros(B, 1, dtype=torch.float64, device=device)  # the root
    prev_tuple = torch.zeros(B, 1, depth_limit, dtype=torch.long, device=device)  # (B, w, depth_limit) r + 1, 0-padded
    for d, w in enumerate(widths):
        cand = (prev_score[:, :, None] + lp[:, d][:, None, :]).reshape(B, -1)  # (B, w_prev * K), tuple order
        keep = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :w]
        keep = torch.sort(keep, dim=1).values  # (B, w): back to tuple order
        par, rank = keep.div(K, rounding_mode="floor"), keep % K  # place in the previous beam, rank
        prev_score = cand.gather(1, keep)
        tup = prev_tuple.gather(1, par[:, :, None].expand(-1, -1, depth_limit)).clone()
        tup[:, :, d] = rank + 1
        prev_tuple = tup
        score_l.append(prev_score)
        parent_l.append(par + sum(widths[:d - 1]) if d else torch.full_like(par, -1))  # flat index of the parent
        tok_l.append(top_ids[:, d].gather(1, rank))
        depth_l.append(torch.full_like(par, d + 1))
        tup_l.append(tup)
    score = torch.cat(score_l, 1)  # (B, M), M = total
    parent = torch.cat(parent_l, 1)  # flat index of the parent (-1: root)
    tok, depth = torch.cat(tok_l, 1), torch.cat(depth_l, 1)
    tup = torch.cat(tup_l, 1)  # (B, M, depth_limit)
    pad = J * per - depth_limit
    if pad:
        tup = torch.cat([tup, tup.new_zeros(B, total, pad)], 2)
    shifts = (bits * torch.arange(per - 1, -1, -1, device=device))  # (per,)
    keys = (tup.view(B, total, J, per) << shifts).sum(-1)  # (B, M, J)
    sel = _stable_order(keys, score)[:, :n]  # (B, n): the pops, in pop order
    node_of = torch.zeros(B, total + 1, dtype=torch.long, device=device)  # flat index + 1 -> node (0: root)
    node_of.scatter_(1, sel + 1, torch.arange(1, n + 1, device=device).expand(B, n))
    parents = node_of.gather(1, parent.gather(1, sel) + 1)  # (B, n)
    tokens = torch.cat([roots[:, None], tok.gather(1, sel)], 1)  # (B, n + 1)
    parents = torch.cat([parents.new_full((B, 1), -1), parents], 1)
    depths = torch.cat([depth.new_zeros(B, 1), depth.gather(1, sel)], 1)
    scores = torch.cat([score.new_zeros(B, 1), score.gather(1, sel)], 1)
    return tokens, parents, depths, scores


def build_chains(roots: torch.Tensor, draft_ids: torch.Tensor, draft_logprobs: torch.Tensor | None = None) -> list[Tree]:
    """`build_chain` for B rows on the tensors' device: roots (B,), draft_ids / draft_logprobs (B, D)."""
    B, D = draft_ids.shape
    device = draft_ids.device
    tokens = torch.cat([to_device(roots, device).long()[:, None], draft_ids.long()], 1)  # (B, D + 1)
    parents = torch.arange(-1, D, device=device)
    depths = torch.arange(D + 1, device=device)
    lps = torch.zeros(B, D, dtype=torch.float64, device=device) if draft_logprobs is None else draft_logprobs.double()
    scores = torch.cat([lps.new_zeros(B, 1), lps.cumsum(1)], 1)
    return [Tree(tokens[b], parents, depths, score=scores[b], num_nodes=D, max_depth=D) for b in range(B)]


def build_chain(root_token: int, draft_ids: torch.Tensor, draft_logprobs: torch.Tensor | None = None) -> Tree:
    """DFlash's single trajectory: root -> draft_ids[0] -> draft_ids[1] -> ... (a tree with one path).
    draft_ids / draft_logprobs: (D,) tensors or host lists."""
    toks = [int(t) for t in (draft_ids.tolist() if isinstance(draft_ids, torch.Tensor) else draft_ids)]
    lps = ([0.0] * len(toks) if draft_logprobs is None else
           [float(x) for x in (draft_logprobs.tolist() if isinstance(draft_logprobs, torch.Tensor) else draft_logprobs)])
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
    toks, pars = tree.host_lists or (tree.tokens.tolist(), tree.parents.tolist())
    sc = tree.scores
    out: list[tuple[list[int], list[float]]] = [([], [])]  # out[i]: the path to node i (root: empty)
    for i in range(1, len(toks)):  # parents come first: extend the parent's path (O(n * depth), not O(n^2))
        ptoks, plps = out[pars[i]]
        out.append((ptoks + [toks[i]], plps + [sc[i] - sc[pars[i]]]))
    return out[1:]
