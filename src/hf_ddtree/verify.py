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
    PrefixConstrainedLogitsProcessor,
)

from .cache import (CacheRows, layout_tensor, mask_layout, mask_width, shape_masks, sliding_window_core,
                    tree_mask_core, tree_mask_from_layout, tree_mask_from_lineage)
from .compat import (cache_kwargs, compiled_function, gather_features, hidden_states_request, linear_attention_modules,
                     tree_linear_attention)
from .device import host_tensor, to_device
from .linear_attention import TreeStates
from .tree import Tree, ancestor_matrices, ancestor_matrix, ancestors_by_depth, lineage_matrices

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
class HostWalk:
    """The accept walk's result where it ran on the host (`accept_on_host`): `accept_paths`' paths and packed
    rows as host lists, which is what the loop reads (for free), and their tensors on `device` made only when
    something asks for them (the compiled path move, a batch's feature gather, scores / logits output, a hybrid
    target's states)."""

    paths: list[list[int]]  # B rows of P node indices, root-padded
    packed: list[list[int]]  # B rows of [count, path tokens at depths 1..P-1, next token]
    device: torch.device
    made: tuple | None = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(paths (B, P), counts (B,), next tokens (B,), packed (B, P + 1)) on `device`, as `accept_paths` gives."""
        if self.made is None:
            packed = host_tensor(self.packed, self.device)
            self.made = (host_tensor(self.paths, self.device), packed[:, 0], packed[:, -1], packed)
        return self.made


def walk_tensors(walked) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An accept step's result (`accept_paths`' four tensors, or a `HostWalk`) as the four tensors."""
    return walked.tensors() if isinstance(walked, HostWalk) else walked


@dataclass
class Verified:
    """What one verification of B trees (N rows each, root and padding included) gives the loop,
    all on the target's device: nothing here has been read by the host.

    raw       (B, N, V) target logits before processors
    scores    (B, N, V) float32 processed logits (what the target picks from)
    features  (B, N, F) concatenated selected hidden states, or None
    walk      the accept step's result: `accept_paths`' (paths, counts, next_tokens, packed), or a `HostWalk`
              where it ran on the host; read through the properties below
    paths     (B, P) long: accepted node indices, root first; entries past counts[b] repeat the root
              (P = deepest depth + 1)
    counts    (B,) long: accepted drafted nodes per row (the path has counts[b] + 1 nodes)
    next_tokens (B,) long: the target's own token after each row's last accepted node (the bonus token)
    packed    (B, P + 1) long: [count, path tokens at depths 1..P-1, next token]: the one tensor the
              host reads per round (`packed_rows`; `unpack` turns the read into per-row token lists)
    linear_states  hybrid targets: what the linear-attention layers recorded (`cache.commit_linear_states`
              turns it into the state after the kept path), else None
    """

    raw: torch.Tensor
    scores: torch.Tensor
    features: torch.Tensor | None
    walk: tuple | HostWalk
    linear_states: TreeStates | None = None
    at: torch.Tensor | None = None  # (3, B) long: the cache layout the trees were verified on (`cache.layout_tensor`), or None

    @property
    def paths(self) -> torch.Tensor:
        return walk_tensors(self.walk)[0]

    @property
    def counts(self) -> torch.Tensor:
        return walk_tensors(self.walk)[1]

    @property
    def next_tokens(self) -> torch.Tensor:
        return walk_tensors(self.walk)[2]

    @property
    def packed(self) -> torch.Tensor:
        return walk_tensors(self.walk)[3]

    def packed_rows(self) -> list[list[int]]:
        """`packed` on the host: the round's one read (the walk's own lists where it ran on the host)."""
        return self.walk.packed if isinstance(self.walk, HostWalk) else self.packed.tolist()

    def path_rows(self) -> list[list[int]]:
        """`paths` on the host (the walk's own lists where it ran on the host, else a read)."""
        return self.walk.paths if isinstance(self.walk, HostWalk) else self.paths.tolist()


def unpack(packed_rows: list[list[int]]) -> list[tuple[int, list[int]]]:
    """The host's read of `Verified.packed` (`.tolist()`) -> per row (accepted count, committed tokens:
    the accepted path's tokens then the target's next token)."""
    return [(row[0], row[1:1 + row[0]] + [row[-1]]) for row in packed_rows]


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
    tokens, parents, depths = _stack_trees(trees, target.device)
    inputs = _tree_inputs(target, trees, parents, depths, cache, rows, mask_out, None)
    logits, features, _ = _forward_trees(target, tokens, inputs, cache, hidden_indices, forward)
    return logits, features


def _stack_trees(trees: list[Tree], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N) tokens, parents, depths of B trees of one size, on `device`."""
    n = trees[0].size
    if any(t.size != n for t in trees):
        raise ValueError(f"run_trees needs trees of one size (pad them), got sizes {[t.size for t in trees]}.")
    if len(trees) == 1:
        t = trees[0]
        return to_device(t.tokens[None], device), to_device(t.parents[None], device), to_device(t.depths[None], device)
    return tuple(to_device(torch.stack([getattr(t, k) for t in trees]), device) for k in ("tokens", "parents", "depths"))


def tree_inputs(parents: torch.Tensor, depths: torch.Tensor, at: torch.Tensor, *, max_depth: int, kv_len: int,
                dtype: torch.dtype, windows: tuple, out: torch.Tensor | None = None):
    """Everything a tree forward needs besides its tokens, from tensors only (no host read; compiles with
    fullgraph=True at fixed shapes, `compat.compiled_function`).

    parents / depths: (B, N) long; at: (3, B) long, the cache layout (`cache.layout_tensor`: start, length,
    real nodes per row; the trees sit at slot max(length)); windows: `mask_layout(config)[0]`; out: an optional
    (B, 1, N, kv_len) buffer for the full mask. Returns visibility (B, N, N) bool (`ancestor_matrices`),
    position_ids (B, N) (a row's next position + depth) and one (B, 1, N, kv_len) additive mask per window."""
    visibility = ancestor_matrices(parents, max_depth)
    position_ids = depths + (at[1] - at[0])[:, None]
    mask = tree_mask_core(visibility, at, kv_len, dtype, out=out)
    masks = tuple(mask if w is None else sliding_window_core(mask, depths, at, w) for _, w in windows)
    return visibility, position_ids, masks


@dataclass
class TreeInputs:
    """A tree forward's inputs on the device: depths / position_ids (B, N) long, attention_mask (the
    (B, 1, N, kv_len) mask, or {layer type: mask}), at (3, B) long (the layout, for the path moves after the
    walk; None where no piece needed it: one eager row of full attention), max_depth (a host int), and
    `visibility` (B, N, N) bool: given, or made on first use from the trees' lineages (host-built trees, eager:
    the mask is written without it, and the host walk, a target without linear-attention layers and a round
    without processors never ask for it)."""

    depths: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: object
    at: torch.Tensor | None
    max_depth: int
    made_visibility: torch.Tensor | None = None
    lineages: list[list[tuple[int, ...]]] | None = None

    @property
    def visibility(self) -> torch.Tensor:
        if self.made_visibility is None:
            self.made_visibility = lineage_matrices(self.lineages, self.depths.shape[1], self.depths.device)
        return self.made_visibility


def _tree_inputs(target, trees: list[Tree], parents: torch.Tensor, depths: torch.Tensor, cache, rows: CacheRows,
                 mask_out: torch.Tensor | None, compile_config, depth_bound: int | None = None,
                 masks_of=None) -> TreeInputs:
    """`tree_inputs` for B stacked trees, the mask shaped as the target takes it: compiled when compile_config is
    given; eagerly, the same values with the mask written from the layout's host ints (`cache.tree_mask_from_layout`,
    a few slice writes instead of the core's ~20 ops over the mask's elements) and, for trees the host built, the
    visibility from their lineage. At most ONE host-to-device copy: the layout (`cache.layout_tensor`). depth_bound:
    a depth no tree of the call exceeds, used instead of this round's deepest (one static depth: one compiled graph
    for all rounds).
    masks_of: `cache.mask_layout(target.config)` when the caller already has it (the loop reads it once a call)."""
    n = trees[0].size
    max_depth = max(max(t.max_depth for t in trees), min(depth_bound or 0, n - 1))
    num_real = [t.size - t.pad for t in trees]
    windows, linear = masks_of if masks_of is not None else mask_layout(target.config)
    kv_len = mask_width(cache, rows.write_at, n)
    at = None  # (3, B) the layout as a tensor (`layout_tensor`), where a piece takes it
    visibility, lineages = None, None
    host_trees = all(t.lineage is not None for t in trees)
    # eager: the same tensors, the mask written from the layout's host ints; also for host trees on the CPU, where
    # a few eager ops cost less than a compiled call's guards (the compiled pieces are for an accelerator's round)
    if compile_config is None or (host_trees and depths.device.type == "cpu"):
        if len(trees) > 1 or any(w is not None for _, w in windows):
            at = layout_tensor(rows, num_real, depths.device)
        position_ids = depths + (rows.positions[0] if at is None else (at[1] - at[0])[:, None])  # (B, N)
        if host_trees:  # trees the host built: their ancestors are host data
            lineages = [t.lineage for t in trees]  # the visibility is made from them only if asked for
            mask = tree_mask_from_lineage(lineages, n, rows, kv_len, target.dtype, depths.device, out=mask_out)
        else:
            visibility = ancestor_matrices(parents, max_depth)  # (B, N, N)
            mask = tree_mask_from_layout(visibility, rows, num_real, kv_len, target.dtype, out=mask_out)
        masks = tuple(mask if w is None else sliding_window_core(mask, depths, at, w) for _, w in windows)
    else:
        at = layout_tensor(rows, num_real, depths.device)
        visibility, position_ids, masks = compiled_function(tree_inputs, compile_config)(
            parents, depths, at, max_depth=max_depth, kv_len=kv_len, dtype=target.dtype, windows=windows, out=mask_out)
    return TreeInputs(depths, position_ids, shape_masks(masks, windows, linear), at, max_depth, visibility, lineages)


def _forward_trees(target, tokens: torch.Tensor, inputs: TreeInputs, cache, hidden_indices, forward):
    """The target forward over stacked trees (B, N) with their `TreeInputs`. Returns logits (B, N, V),
    features (B, N, F) or None and, for a hybrid target, the linear-attention layers' record
    (`linear_attention.TreeStates`, for `cache.commit_linear_states`; None otherwise)."""
    gdn = linear_attention_modules(target)
    states = None
    if gdn:  # Gated DeltaNet layers: each node's conv window and recurrence along its own path
        states = TreeStates(inputs.visibility, ancestors_by_depth(inputs.visibility, inputs.depths, inputs.max_depth),
                            inputs.depths, {})
    with tree_linear_attention(gdn, states):
        out = (forward or target)(
            input_ids=tokens,
            position_ids=inputs.position_ids,
            attention_mask=inputs.attention_mask,  # (B, 1, N, kv_len), or {layer type: mask} for hybrid targets
            **cache_kwargs(target, cache),
            use_cache=True,
            output_hidden_states=hidden_states_request(hidden_indices),
        )
    features = None
    if hidden_indices:
        features = gather_features(out, hidden_indices)  # (B, N, F)
    return out.logits, features, states  # (B, N, V)


def verify_tree(target, tree: Tree, cache, past_len: int, hidden_indices: list[int] | None, logits_processor,
                prefix: torch.Tensor, do_sample: bool, mask_out: torch.Tensor | None = None,
                accept=None, forward=None) -> Verified:
    """A round's verification for one unpadded row (`verify_trees` with B = 1).
    prefix: (1, L) committed ids ending with the root. The cache is left holding the whole tree:
    `cache.compact(cache, past_len, path)` keeps the accepted path."""
    return verify_trees(target, [tree], cache, CacheRows.single(past_len), hidden_indices, logits_processor,
                        [prefix], do_sample, mask_out, accept, forward)


def verify_trees(target, trees: list[Tree], cache, rows: CacheRows, hidden_indices: list[int] | None,
                 logits_processor, prefixes: list[torch.Tensor], do_sample: bool,
                 mask_out: torch.Tensor | None = None, accept=None, forward=None, compile_config=None,
                 depth_bound: int | None = None, masks_of=None) -> Verified:
    """A round's verification of B rows: `run_trees` (one forward), the processors by depth
    (`process_scores`) and the accept walk (`accept_paths`), all on the device, no host read.
    prefixes[b]: (1, L_b) row b's committed ids ending with its root (what stock generate() would
    pass the processors for that row, left padding included). The cache is left holding every
    tree: `cache.move_paths` + `cache.set_lengths` keep the accepted paths. logits_processor: one
    list for every row, or a tuple of B of them (`row_processors`). accept: the walk,
    `(trees, tokens, parents, tree inputs, scores, do_sample) -> (paths, counts, next tokens, packed)` or a
    `HostWalk`: `accept_on_device` (the default) or `accept_on_host`; tensor-parallel
    targets wrap it to walk on the leader and broadcast. forward: see `run_trees`. compile_config: the
    tree inputs (`tree_inputs`) run compiled (`compat.compiled_function`); None: eagerly. depth_bound: a depth
    no tree of the call exceeds, given to the tree inputs and the walk instead of this round's deepest (fixed
    shapes for compiled pieces; paths then have min(depth_bound, N - 1) + 1 entries). masks_of: the target's
    `cache.mask_layout`, when the caller has read it already (else read here)."""
    tokens, parents, depths = _stack_trees(trees, target.device)  # (B, N) each
    inputs = _tree_inputs(target, trees, parents, depths, cache, rows, mask_out, compile_config, depth_bound, masks_of)
    raw, features, states = _forward_trees(target, tokens, inputs, cache, hidden_indices, forward)
    scores = raw.float() if not logits_processor else torch.stack([
        process_scores(logits_processor[b] if isinstance(logits_processor, tuple) else logits_processor,
                       prefixes[b], tree, raw[b], inputs.visibility[b], depths[b])
        for b, tree in enumerate(trees)])  # (B, N, V)
    walked = (accept or accept_on_device)(trees, tokens, parents, inputs, scores, do_sample)
    return Verified(raw, scores, features, walked, states, inputs.at)


def accept_on_device(trees, tokens, parents, inputs: TreeInputs, scores, do_sample, compile_config=None):
    """The loop's accept step on an accelerator: `accept_paths` (no host read), compiled when compile_config
    is given (`compat.compiled_function`)."""
    return compiled_function(accept_paths, compile_config)(tokens, parents, inputs.visibility, inputs.depths, scores,
                                                           do_sample, inputs.max_depth)


def accept_on_host(trees, tokens, parents, inputs: TreeInputs, scores, do_sample) -> HostWalk:
    """The loop's accept step when the device is the host (CPU): the node-by-node `walk` per row (a few
    argmax reads, which cost nothing there, instead of the whole-tree tensor work), in `accept_paths`' form
    as host lists (`HostWalk`: the loop reads them as they are; tensors only when asked for)."""
    P = inputs.max_depth + 1
    rows, paths = [], []
    for b, tree in enumerate(trees):
        path, nxt = walk(tree, scores[b], do_sample)
        toks = tree.host_lists[0] if tree.host_lists else tree.tokens.tolist()
        fill = [0] * (P - len(path))
        paths.append(path + fill)
        rows.append([len(path) - 1] + [toks[i] for i in path[1:]] + fill + [nxt])
    return HostWalk(paths, rows, scores.device)


def accept_paths(tokens: torch.Tensor, parents: torch.Tensor, visibility: torch.Tensor, depths: torch.Tensor,
                 scores: torch.Tensor, do_sample: bool, max_depth: int):
    """The accept walk of B trees on the device, with no host read and no per-node Python.

    tokens / parents / depths: (B, N) long; visibility: (B, N, N) bool (`ancestor_matrix`);
    scores: (B, N, V) processed scores. Every node gets the target's choice (argmax, or ONE draw
    from softmax(scores[node])); a node matches when its token is its parent's choice, it is
    accepted when it and all its ancestors match, and the deepest accepted node ends the path
    (the children of a node carry distinct tokens, so at most one node per depth is accepted).
    Walking from the root and following the child that carries the choice visits exactly these
    nodes, and each visited node's choice is one independent draw from its own distribution: the
    same tokens (greedy) and the same law (sampling) as stock decoding.
    Returns paths (B, P) (root-padded), counts (B,), next tokens (B,), packed (B, P + 1)
    (see `Verified`); P = max_depth + 1.
    """
    B, N, V = scores.shape
    if do_sample:
        choice = torch.multinomial(torch.softmax(scores.reshape(B * N, V), dim=-1), 1).view(B, N)
    else:
        choice = scores.argmax(-1)  # (B, N): the first maximum, like int(torch.argmax(row))
    node = torch.arange(N, device=tokens.device)
    match = torch.where(parents >= 0, tokens == choice.gather(1, parents.clamp(min=0)), node == 0)  # (B, N)
    accepted = ~(visibility & ~match[:, None, :]).any(-1)  # (B, N): it and every ancestor match
    deepest = torch.where(accepted, depths, -1).argmax(1)  # (B,)
    counts = depths.gather(1, deepest[:, None])[:, 0]
    nxt = choice.gather(1, deepest[:, None])[:, 0]
    on_path = visibility.gather(1, deepest[:, None, None].expand(B, 1, N))  # (B, 1, N): the deepest's ancestors
    paths = ancestors_by_depth(on_path, depths, max_depth)[:, 0]  # (B, P): the path's node per depth (0 = root past its end)
    packed = torch.cat([counts[:, None], tokens.gather(1, paths[:, 1:]), nxt[:, None]], 1)
    return paths, counts, nxt, packed


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


def _row_wise(proc) -> bool:
    """A processor that treats every row of (R, L) ids on its own, so it may see a tree's nodes as R
    rows: transformers' own processors, except those that read the row index."""
    return (type(proc).__module__.startswith("transformers.generation")
            and not isinstance(proc, PrefixConstrainedLogitsProcessor))


def process_scores(logits_processor: LogitsProcessorList | None, prefix: torch.Tensor, tree: Tree,
                   logits: torch.Tensor, visibility: torch.Tensor | None = None,
                   depths: torch.Tensor | None = None) -> torch.Tensor:
    """Apply generate()'s logits processors to every node with that node's own token prefix.

    prefix: (1, L) committed ids, ending with the root token. logits: (N, V).
    visibility (N, N) / depths (N,): the tree's ancestor matrix and depths on the logits' device
    (computed when not given).
    Prefix-free processors (temperature, top-k/p, ...) run once on all rows. Any other processor
    list (repetition penalty, no-repeat-ngram, min-new-tokens, ...) runs once per depth d on all N
    rows with ids = prefix + each node's ancestors at depths 1..d, and node i keeps the output of
    its own depth's call: exactly what stock generate() computes at that node's position, in
    max_depth + 1 batched calls and no host read. A processor that reads the row index
    (`prefix_allowed_tokens_fn`) or one from outside transformers runs per node on (1, L + d) ids.
    """
    scores = logits.float()
    if not logits_processor:
        return scores
    N = scores.shape[0]
    if all(isinstance(p, _PREFIX_FREE) for p in logits_processor):
        return logits_processor(prefix.expand(N, -1), scores)
    device = scores.device
    if depths is None:
        depths = to_device(tree.depths, device)
    if visibility is None:
        visibility = ancestor_matrix(to_device(tree.parents, device), tree.max_depth)
    D = tree.max_depth
    tokens = to_device(tree.tokens, device)
    # anc_tok[i, k]: the token of node i's ancestor at depth k (the root's where i has none: its output is not kept)
    anc_tok = tokens[ancestors_by_depth(visibility, depths, D)]  # (N, D + 1)
    ids = torch.cat([prefix.expand(N, -1), anc_tok[:, 1:]], dim=-1)  # (N, L + D)
    L = prefix.shape[1]
    if not all(_row_wise(p) for p in logits_processor):
        path = tree.depths.tolist()  # host fallback: per node
        return torch.cat([logits_processor(ids[i:i + 1, :L + path[i]], scores[i:i + 1]) for i in range(N)])
    out = scores
    for d in range(D + 1):
        got = logits_processor(ids[:, :L + d], scores.clone())
        out = got if d == 0 else torch.where((depths == d)[:, None], got, out)
    return out


def choose(scores_row: torch.Tensor, do_sample: bool) -> int:
    """The target's token from one processed scores row (V,): argmax, or a sample from its softmax."""
    if do_sample:
        return int(torch.multinomial(torch.softmax(scores_row, dim=-1), 1))
    return int(torch.argmax(scores_row))


def walk(tree: Tree, scores: torch.Tensor, do_sample: bool) -> tuple[list[int], int]:
    """The accept walk on the host, node by node (the reference `accept_paths` is tested against).

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
