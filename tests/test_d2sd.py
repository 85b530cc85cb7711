"""D^2SD (method "d2sd" / "d2sd-tree"): path merging, rejection boundaries, the batched
variable-prefix drafter forward, the proposer's block construction, and end-to-end losslessness
(greedy token-identical to stock, sampling distributed exactly like stock).

The end-to-end oracle here (`PrefixOracle`, a conftest.OracleDrafter) decodes every block it is
given back to token ids and predicts the reference token at a position only when the block's
anchored prefix [root, chain[:j], alternative] agrees with the reference; a wrong prefix gets a
confident wrong token. So drafter 2 helps only if the proposer really builds the blocks right, and
it also checks, on every call, the block-diagonal 4D mask of a batched multi-block forward.
"""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch

import hf_ddtree
from hf_ddtree.drafter import DrafterSpec, drafter_spec
from hf_ddtree.propose import D2SDProposer, DrafterState, Round, rejection_boundaries
from hf_ddtree.tree import build_tree, merge_paths, topk_per_position, tree_paths

import test_sampling as ts
from conftest import OracleDrafter, build_drafter, build_target
from test_lossless import check_stats, pick_eos, stock

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------
# 1. merge_paths against brute force
# ------------------------------------------------------------------------------------------------


def expected_scores(paths) -> dict[tuple[int, ...], float]:
    """Every distinct node (its token path) -> score: the max over the paths through it of the sum
    of increments up to it, then capped by its ancestors' scores (min over the chain, root = 0)."""
    raw: dict[tuple[int, ...], float] = {}
    for toks, lps in paths:
        acc = 0.0
        for i, (t, lp) in enumerate(zip(toks, lps)):
            acc += float(lp)
            node = tuple(int(x) for x in toks[: i + 1])
            raw[node] = max(raw.get(node, -math.inf), acc)
    # the root (score 0) is every depth-1 node's parent, so it caps too
    return {node: min([0.0] + [raw[node[:k]] for k in range(1, len(node) + 1)]) for node in raw}


def node_paths(tree) -> list[tuple[int, ...]]:
    toks = tree.tokens.tolist()
    return [tuple(toks[j] for j in tree.path_to(i)[1:]) for i in range(1, len(toks))]


def check_merge(root: int, paths, budget: int) -> None:
    tree = merge_paths(root, paths, budget)
    want = expected_scores(paths)
    got = node_paths(tree)
    n = len(got)
    assert int(tree.tokens[0]) == root and tree.scores[0] == 0.0
    assert n == min(budget, len(want)) == tree.num_nodes
    assert len(set(got)) == n, "a shared prefix is stored twice"
    parents, depths = tree.parents.tolist(), tree.depths.tolist()
    index = {p: i + 1 for i, p in enumerate(got)}
    for i, p in enumerate(got, start=1):
        assert p in want, f"node {p} is on no input path"
        assert depths[i] == len(p)
        assert 0 <= parents[i] < i, "a parent must precede its child"
        assert parents[i] == (0 if len(p) == 1 else index[p[:-1]]), "not prefix-closed"
        assert tree.children[parents[i]][p[-1]] == i
        assert tree.scores[i] == pytest.approx(want[p], abs=1e-12)
    assert all(a >= b for a, b in zip(tree.scores[1:], tree.scores[2:])), "pop order is not best-first"
    # the kept set is a `budget`-best set: nothing dropped scores above anything kept ...
    dropped = [want[p] for p in want if p not in index]
    if got and dropped:
        assert max(dropped) <= min(tree.scores[1:])
    # ... and where the cut is not a tie it is exactly the top-`budget` nodes by score
    ranked = sorted(want, key=lambda p: -want[p])
    if 0 < n < len(ranked) and want[ranked[n - 1]] > want[ranked[n]]:
        assert set(got) == set(ranked[:n])
    if n == len(want):
        assert set(got) == set(want)


def random_paths(rng: random.Random, vocab: int, style: str):
    paths = []
    for _ in range(rng.randint(1, 7)):
        length = rng.randint(0, 6)
        toks = [rng.randrange(vocab) for _ in range(length)]
        if style == "continuous":
            lps = [-rng.uniform(0, 2) for _ in toks]
        elif style == "ties":  # zeros and a few discrete values: many exact ties, children tying parents
            lps = [-rng.choice([0.0, 0.0, 0.5, 1.0]) for _ in toks]
        else:  # "positive": some increments > 0, so max-merging really needs the parent cap
            lps = [rng.uniform(-2, 1) for _ in toks]
        paths.append((toks, lps))
        if paths and rng.random() < 0.3:  # the same tokens again with other increments
            other = [x + rng.uniform(-0.5, 0.5) for x in lps]
            paths.append((list(toks), other if style == "positive" else [min(x, 0.0) for x in other]))
    return paths


@pytest.mark.parametrize("style", ["continuous", "ties", "positive"])
def test_merge_paths_matches_brute_force(style):
    rng = random.Random({"continuous": 1, "ties": 2, "positive": 3}[style])
    for trial in range(150):
        paths = random_paths(rng, vocab=rng.choice([2, 3, 5]), style=style)
        total = len(expected_scores(paths))
        for budget in sorted({0, 1, rng.randint(0, total + 1), max(total - 1, 0), total, total + 5}):
            check_merge(7, paths, budget)


def test_merge_paths_edges():
    assert merge_paths(3, [], 10).num_nodes == 0
    assert merge_paths(3, [([], [])], 10).num_nodes == 0
    t = merge_paths(3, [([1, 2], [-0.1, -0.2])], 0)
    assert t.num_nodes == 0 and t.tokens.tolist() == [3]
    with pytest.raises(ValueError):
        merge_paths(3, [([1], [-0.1])], -1)
    # a shared prefix keeps its best score; the cheaper path's other branch is kept too
    t = merge_paths(0, [([1, 2, 3], [-1.0, -1.0, -1.0]), ([1, 4], [-0.5, -0.1])], 10)
    assert node_paths(t) == [(1,), (1, 4), (1, 2), (1, 2, 3)]
    assert t.scores == pytest.approx([0.0, -0.5, -0.6, -2.0, -3.0])


def random_top(seed: int, depth: int, vocab: int, width: int):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(depth, vocab, generator=g) * 2, dim=-1)
    return topk_per_position(lp, width)


@pytest.mark.parametrize("seed", range(6))
def test_tree_paths_round_trip(seed):
    top_lp, top_ids = random_top(seed, depth=5, vocab=12, width=4)
    for budget in (0, 1, 5, 17, 40):
        tree = build_tree(9, top_lp, top_ids, budget)
        again = merge_paths(9, tree_paths(tree), budget)
        assert node_paths(again) == node_paths(tree)
        assert again.parents.tolist() == tree.parents.tolist()
        assert again.depths.tolist() == tree.depths.tolist()
        assert again.scores == pytest.approx(tree.scores, abs=1e-9)
        # more budget than nodes adds nothing; less budget gives the smaller heap tree's paths
        assert node_paths(merge_paths(9, tree_paths(tree), budget + 10)) == node_paths(tree)
        small = max(budget - 3, 0)
        assert set(node_paths(merge_paths(9, tree_paths(tree), small))) == set(
            node_paths(build_tree(9, top_lp, top_ids, small)))


# ------------------------------------------------------------------------------------------------
# 2. rejection boundaries
# ------------------------------------------------------------------------------------------------


def brute_boundaries(chain_lp: list[float], k: int) -> list[int]:
    q = [math.exp(x) for x in chain_lp]
    p_first = []
    for j in range(len(q)):
        reach = 1.0
        for i in range(j):
            reach *= q[i]
        p_first.append(reach * (1 - q[j]))
    return sorted(range(len(q)), key=lambda j: -p_first[j])[:k]


def test_rejection_boundaries_match_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        d = 1 + trial % 10
        lp = -torch.rand(d, generator=g, dtype=torch.float64) * (3.0 if trial % 2 else 0.3)
        for k in range(1, d + 3):
            got = rejection_boundaries(lp, k).tolist()
            assert got == brute_boundaries(lp.tolist(), k), (lp.tolist(), k)
            assert len(got) == min(k, d)
    # a sure token (q = 1) can never be the first rejection: it ranks last
    lp = torch.tensor([0.0, -0.2, -0.05])
    assert rejection_boundaries(lp, 3).tolist()[-1] == 0
    assert rejection_boundaries(lp, 1).tolist() == brute_boundaries(lp.tolist(), 1)


# ------------------------------------------------------------------------------------------------
# 3. the batched variable-prefix drafter forward (block-diagonal mask)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_batched_blocks_equal_single_block_calls(impl):
    target = build_target("qwen3", impl, seed=3)
    drafter = build_drafter(target, seed=5, block_size=8, attn_implementation=impl)
    spec = drafter_spec(drafter)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    feat = len(spec.target_layer_ids) * target.config.hidden_size
    g = torch.Generator().manual_seed(9)
    K, bs, mask = 5, spec.block_size, spec.mask_token_id

    def blocks_for(round_: int) -> torch.Tensor:  # [root, prefix of length k, mask, ...]
        b = torch.full((K, bs), mask, dtype=torch.long)
        b[:, 0] = 4 + round_
        for k in range(K):
            b[k, 1:1 + k + round_] = torch.randint(0, mask, (k + round_,), generator=g)
        return b

    rounds = [(torch.randn(1, 6, feat, generator=g), 6, blocks_for(0)),
              (torch.randn(1, 3, feat, generator=g), 9, blocks_for(1))]
    batched = DrafterState(drafter, spec, embed, head)
    singles = [DrafterState(drafter, spec, embed, head) for _ in range(K)]
    with torch.no_grad():
        for context, past, blocks in rounds:
            lp = batched.draft(blocks, context, past)
            assert lp.shape == (K, bs - 1, target.config.vocab_size)
            assert int(batched.cache.get_seq_length()) == past  # blocks dropped, context kept
            for k in range(K):
                one = singles[k].draft(blocks[k:k + 1], context, past)
                torch.testing.assert_close(lp[k], one[0], atol=1e-5, rtol=0)
        # the last round's blocks, all context at once into a fresh state: the same again
        fresh = DrafterState(drafter, spec, embed, head)
        lp_fresh = fresh.draft(rounds[-1][2], torch.cat([rounds[0][0], rounds[1][0]], dim=1), rounds[-1][1])
        torch.testing.assert_close(lp, lp_fresh, atol=1e-5, rtol=0)
    # the blocks really differ, so the equality above is not vacuous
    assert (lp[0] - lp[-1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# the proposer's blocks and merged paths (stub drafters, no model)
# ------------------------------------------------------------------------------------------------


class StubState:
    """Stands in for DrafterState: returns seeded random log-probs and records the blocks."""

    def __init__(self, spec, vocab: int, seed: int):
        self.spec, self.vocab, self.g = spec, vocab, torch.Generator().manual_seed(seed)
        self.blocks, self.out = [], []

    def draft_rows(self, blocks, context, past, context_lengths=None):
        """blocks (B, K, bs) -> (B, K, bs-1, V); records each row's (K, bs) blocks and (K, bs-1, V) log-probs."""
        out = []
        for row in blocks:
            self.blocks.append(row.clone())
            lp = torch.log_softmax(3 * torch.randn(row.shape[0], row.shape[1] - 1, self.vocab, generator=self.g), -1)
            self.out.append(lp)
            out.append(lp)
        return torch.stack(out)

    def select(self, rows):
        self.selected = list(rows)


@pytest.mark.parametrize("method", ["d2sd", "d2sd-tree"])
@pytest.mark.parametrize("K,A,D,bs2,budget", [(1, 1, 7, 8, 64), (4, 2, 7, 12, 64), (4, 3, 3, 8, 64),
                                               (2, 2, 5, 8, 6), (3, 1, 1, 8, 4)])
def test_proposer_blocks_and_paths(method, K, A, D, bs2, budget):
    V, root = 20, 5
    spec1 = DrafterSpec(8, 19, (0, 1))
    spec2 = DrafterSpec(bs2, 18, (0, 1))
    s1, s2 = StubState(spec1, V, 1), StubState(spec2, V, 2)
    [tree] = D2SDProposer(s1, s2, method, budget, boundaries=K, alternatives=A).propose(Round(torch.tensor([[root]]), None, torch.tensor([10]), D))

    assert s1.blocks[0].tolist() == [[root] + [19] * 7]
    lp1 = s1.out[0][0, :D]
    chain_lp, chain = lp1.max(-1)
    chain = chain.tolist()
    js = brute_boundaries(chain_lp.tolist(), K)
    blocks = s2.blocks[0]
    assert blocks.shape == (len(js) * A, bs2)
    paths = []
    if method == "d2sd":
        paths.append((chain, chain_lp.tolist()))
    else:
        top_lp, top_ids = topk_per_position(lp1, budget)
        paths += tree_paths(build_tree(root, top_lp, top_ids, budget))
    b = 0
    for j in js:
        ranked = lp1[j].argsort(descending=True).tolist()
        for a in range(A):
            alt = ranked[a + 1]  # rank 0 is the chain token itself
            assert alt != chain[j]
            assert blocks[b].tolist() == [root] + chain[:j] + [alt] + [18] * (bs2 - j - 2), (j, a)
            lp2 = s2.out[0][b]
            cont = lp2[j + 1:D].max(-1)  # row m predicts depth m + 1
            paths.append((chain[:j] + [alt] + cont.indices.tolist(),
                          chain_lp[:j].tolist() + [float(lp1[j, alt])] + cont.values.tolist()))
            b += 1
    want = merge_paths(root, paths, budget)
    assert node_paths(tree) == node_paths(want)
    assert tree.scores == pytest.approx(want.scores)
    assert tree.num_nodes <= budget and max(tree.depths.tolist()) <= D
    have = set(node_paths(tree))
    if method == "d2sd" and budget >= 64:  # everything fits: the chain and every branch are in the tree
        assert len(have) == len(expected_scores(paths))
        assert all(tuple(t) in have for t, _ in paths)
    assert tuple(chain[:1]) in have  # drafter 1's top token at depth 1 is always the best node


# ------------------------------------------------------------------------------------------------
# 4. greedy losslessness, end to end
# ------------------------------------------------------------------------------------------------


class PrefixOracle(OracleDrafter):
    """A variable-prefix-aware oracle for D2SD (drafter 1 and/or 2).

    Decodes each block of a (possibly multi-block) call back to token ids; row i of a block at
    position `past` predicts position past + i: the reference token if the block's known tokens
    before row i (root, chain prefix, alternative) equal the reference there, else (and on the rows
    of the known tokens themselves) a confident wrong token. `rank1_every` positions put the right
    token at rank 1 behind a slightly likelier decoy (low confidence, so the rejection boundaries
    pick them); elsewhere the right token is confident.
    Also asserts the block-diagonal mask of every batched call, and that blocks are
    [root, known tokens..., mask, ...] with the root on the reference.
    """

    def __init__(self, target, reference, *, block_size: int = 8, rank1_every: int = 3, mask_token_id: int):
        super().__init__(target, reference, block_size=block_size, rank1_every=rank1_every)
        self.config.dflash_config["mask_token_id"] = mask_token_id
        self.mask = mask_token_id
        self.block = block_size
        self.embed_w = target.get_input_embeddings().weight.detach()
        self.block_counts: list[int] = []

    def row_logits(self, p: int, prefix_ok: bool) -> torch.Tensor:
        v = torch.zeros(self.vocab)
        if p >= len(self.reference):
            return v
        correct = self.reference[p]
        decoy = (correct + 1 + p) % self.vocab
        if decoy == correct:
            decoy = (decoy + 1) % self.vocab
        if not prefix_ok:
            v[decoy] = 8.0
        elif self.rank1_every > 0 and p % self.rank1_every == self.rank1_phase:
            v[decoy], v[correct] = 5.2, 5.0
        else:
            v[correct], v[decoy] = 8.0, 5.0
        return v

    def forward(self, position_ids, noise_embedding=None, target_hidden=None, past_key_values=None,
                use_cache=False, attention_mask=None, **kwargs):
        cached = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        super().forward(position_ids, noise_embedding=noise_embedding, target_hidden=target_hidden,
                        past_key_values=past_key_values, use_cache=use_cache, **kwargs)  # its checks + cache
        q_len, ctx_len, bs = noise_embedding.shape[1], target_hidden.shape[1], self.block
        assert q_len % bs == 0
        k = q_len // bs
        self.block_counts.append(k)
        width = cached + ctx_len + q_len
        if k == 1:
            assert attention_mask is None
        else:
            want = torch.full((1, 1, q_len, width), torch.finfo(torch.float32).min)
            want[..., : cached + ctx_len] = 0
            for b in range(k):
                want[0, 0, b * bs:(b + 1) * bs, cached + ctx_len + b * bs:cached + ctx_len + (b + 1) * bs] = 0
            assert attention_mask is not None and torch.equal(attention_mask, want)
        hit = (noise_embedding[0][:, None, :] == self.embed_w[None]).all(-1)  # (Q, V): exact embedding rows
        assert bool((hit.sum(-1) == 1).all())
        ids = hit.float().argmax(-1).view(k, bs).tolist()
        pos = position_ids[0, -q_len:].view(k, bs).tolist()
        rows = []
        for toks, ps in zip(ids, pos):
            past = ps[0]
            assert ps == list(range(past, past + bs))
            assert past >= len(self.reference) or toks[0] == self.reference[past], "root is off the reference"
            m = toks.index(self.mask) if self.mask in toks else bs
            assert all(t == self.mask for t in toks[m:]), f"block is not [root, known..., mask...]: {toks}"
            for i in range(bs):
                known = range(1, min(i, m))
                ok = all(past + r < len(self.reference) and toks[r] == self.reference[past + r] for r in known)
                # a row whose own token is given (i < m) is never a proposal: make it wrong, so a proposer
                # reading the wrong rows is caught
                rows.append(self.row_logits(past + i, ok and i >= m))
        return (torch.stack(rows) @ self.inverse)[None] + 0.0 * self.anchor


NEW = 16
ARCH_IMPL_CACHE = list(itertools.product(("qwen3", "llama"), ("sdpa", "eager"), ("static", "dynamic")))
METHODS = ("d2sd", "d2sd-tree")
BUDGETS = (1, 4, 16, 64)
KA = ((1, 1), (4, 1), (1, 2), (4, 2))
PAIRS = (("orc", "porc"), ("rand", "rand"), ("orc", "rand12"), ("corc", "porc12"), ("rand", "porc12"),
         ("orc", "corc"))
_SETUPS: dict = {}


def setup(arch: str, impl: str) -> SimpleNamespace:
    if (arch, impl) in _SETUPS:
        return _SETUPS[arch, impl]
    target = build_target(arch, impl, seed=0)
    vocab = target.config.vocab_size
    prompt = torch.randint(0, vocab - 1, (1, 7), generator=torch.Generator().manual_seed(3))
    long = stock(target, prompt, max_new_tokens=NEW + 24, output_scores=True, return_dict_in_generate=True)
    top2 = torch.cat(long.scores).topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4  # greedy decided far above fp32 noise
    full = long.sequences[0].tolist()
    P = prompt.shape[1]
    eos, k = pick_eos(full[P:P + NEW])
    ref_eos = stock(target, prompt, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=eos)
    assert ref_eos.shape[1] == P + k + 1
    unused = [t for t in range(vocab) if t not in full]
    assert len(unused) >= 2
    hf_ddtree.enable(target)
    s = SimpleNamespace(target=target, prompt=prompt, full=long.sequences, eos=eos, ref_eos=ref_eos, drafters={
        "rand": build_drafter(target, seed=11),
        "rand12": build_drafter(target, seed=12, block_size=12),
        "corc": OracleDrafter(target, full),  # conftest's position-only oracle (decoy at rank 0 every 3rd)
        "orc": PrefixOracle(target, full, mask_token_id=unused[0]),
        "porc": PrefixOracle(target, full, rank1_every=0, mask_token_id=unused[1]),
        "porc12": PrefixOracle(target, full, block_size=12, rank1_every=0, mask_token_id=unused[1]),
    })
    _SETUPS[arch, impl] = s
    return s


def run(s, pair, method, budget, K, A, cache, eos=False, **kw):
    extra = dict(eos_token_id=s.eos, pad_token_id=s.eos) if eos else {}
    kw.setdefault("max_new_tokens", NEW)
    return s.target.generate(s.prompt, assistant_model=(s.drafters[pair[0]], s.drafters[pair[1]]), method=method,
                             tree_budget=budget, d2sd_boundaries=K, d2sd_alternatives=A, do_sample=False,
                             cache_implementation=cache, return_dict_in_generate=True, **extra, **kw)


@pytest.mark.parametrize("arch,impl,cache", ARCH_IMPL_CACHE)
def test_greedy_is_token_identical(arch, impl, cache):
    """Every (arch, attention, cache) cell runs both methods x all budgets; boundaries x alternatives,
    drafter pairs and EOS rotate with the cell, so across cells every (method, budget, K, A) occurs."""
    s = setup(arch, impl)
    P = s.prompt.shape[1]
    c = ARCH_IMPL_CACHE.index((arch, impl, cache))
    acc = {}
    for i, (method, budget) in enumerate(itertools.product(METHODS, BUDGETS)):
        K, A = KA[(i + c) % len(KA)]
        pair = PAIRS[(i + c) % len(PAIRS)]
        eos = (i // 2 + c) % 2 == 1
        out = run(s, pair, method, budget, K, A, cache, eos=eos)
        want = s.ref_eos if eos else s.full[:, : P + NEW]
        assert torch.equal(out.sequences, want), (method, budget, K, A, pair, eos,
                                                  out.sequences[0, P:].tolist(), want[0, P:].tolist())
        check_stats(out, P, budget)
        if pair[0] != "rand" and budget >= 4 and not eos:
            acc[method, budget, K, A, pair] = out.stats.mean_acceptance_length
    assert acc and all(a > 2 for a in acc.values()), acc


def test_second_drafter_recovers_rejections():
    """K=1: the re-anchored branch at the likeliest rejection (the low-confidence rank-1 positions)
    is what the prefix oracle continues correctly, so D2SD beats drafter 1's chain alone; drafter 2
    is really called with K*A blocks in one forward."""
    s = setup("qwen3", "sdpa")
    P = s.prompt.shape[1]
    chain = s.target.generate(s.prompt, assistant_model=s.drafters["orc"], do_sample=False, max_new_tokens=NEW,
                              return_dict_in_generate=True)
    assert torch.equal(chain.sequences, s.full[:, : P + NEW])
    porc = s.drafters["porc"]
    for K, A in ((1, 1), (2, 2)):
        porc.block_counts.clear()
        out = run(s, ("orc", "porc"), "d2sd", 64, K, A, "static")
        assert torch.equal(out.sequences, s.full[:, : P + NEW])
        assert out.stats.mean_acceptance_length > max(6.0, chain.stats.mean_acceptance_length + 2), (
            out.acceptance_lengths, chain.acceptance_lengths)
        assert set(porc.block_counts) == {K * A}
    # a wrong prefix really gets a wrong continuation: drafter 2 alone as a chain is still exact
    out = run(s, ("orc", "rand"), "d2sd", 64, 1, 1, "static")
    assert torch.equal(out.sequences, s.full[:, : P + NEW])


@pytest.mark.parametrize("arch,impl,cache", [("qwen3", "sdpa", "static"), ("llama", "eager", "dynamic")])
def test_max_new_tokens_edges(arch, impl, cache):
    s = setup(arch, impl)
    P = s.prompt.shape[1]
    bs = s.drafters["orc"].block
    i = 0
    for m in (1, 2, bs, bs + 1):
        for method in METHODS:
            for pair in (("orc", "porc12"), ("rand", "rand")):
                K, A = KA[i % len(KA)]
                budget = BUDGETS[i % len(BUDGETS)]
                i += 1
                out = run(s, pair, method, budget, K, A, cache, max_new_tokens=m)
                assert torch.equal(out.sequences, s.full[:, : P + m]), (m, method, pair, budget, K, A)
                check_stats(out, P, budget)
    # budget 0: the root alone each round, i.e. plain decoding
    out = run(s, ("orc", "porc"), "d2sd-tree", 0, 4, 2, cache)
    assert torch.equal(out.sequences, s.full[:, : P + NEW])
    assert out.acceptance_lengths == [1] * (NEW - 1) and set(out.stats.tree_sizes) == {0}


# ------------------------------------------------------------------------------------------------
# 5. sampling: D2SD samples follow the target's exact law (helpers from test_sampling)
# ------------------------------------------------------------------------------------------------

SAMPLING = {
    "temperature": [("d2sd", "oracle", "random6", dict(tree_budget=8, d2sd_boundaries=2, d2sd_alternatives=2))],
    "penalty_topk_topp": [("d2sd-tree", "oracle", "oracle", dict(tree_budget=8, d2sd_boundaries=3))],
}


def sampling_drafters(seed: int):
    target, drafters = ts.setup(seed)
    return target, {**drafters, "random6": build_drafter(target, block_size=ts.BLOCK + 2, seed=seed + 7)}


@pytest.mark.parametrize("config", list(SAMPLING))
def test_sampling_matches_exact_distribution(config):
    cfg = ts.CONFIGS[config]
    target, drafters = sampling_drafters(cfg["seed"])
    exact = ts.exact_distribution(target, cfg["procs"]())
    wrong = ts.exact_distribution(target, cfg["wrong"]())
    for i, (method, d1, d2, kw) in enumerate(SAMPLING[config]):
        counts, accept, _ = ts.sample(target, ts.N_SPEC, seed=300 + i, gen_kw=cfg["gen"],
                                      method_kw=dict(assistant_model=(drafters[d1], drafters[d2]), method=method, **kw))
        stat, df, p = ts.chi_square_pvalue(counts, exact)
        assert p > ts.ALPHA, f"{config}/{method}/{d1}+{d2}: chi2={stat:.1f} df={df} p={p:.2e}"
        stat_w, df_w, p_w = ts.chi_square_pvalue(counts, wrong)
        assert p_w < ts.ALPHA, f"{config}/{method}: no power (wrong law accepted, p={p_w:.2e})"
        assert sum(accept) == ts.N_SPEC * (ts.NEW - 1)
        if d1 == "oracle":  # multi-node acceptances really happen under sampling
            assert accept.count(3) >= ts.N_SPEC // 20, {a: accept.count(a) for a in set(accept)}


# ------------------------------------------------------------------------------------------------
# 6. argument errors
# ------------------------------------------------------------------------------------------------


def test_errors():
    target = build_target("qwen3", "sdpa", seed=4)
    hf_ddtree.enable(target)
    prompt = torch.tensor([[1, 2, 3]])
    d = build_drafter(target, seed=1)
    gen = dict(do_sample=False, max_new_tokens=4)

    other_layers = build_drafter(target, seed=2, target_layer_ids=[1, 2])
    with pytest.raises(ValueError, match=r"layers.*\[0, 1\].*\[1, 2\]"):
        target.generate(prompt, assistant_model=(d, other_layers), method="d2sd", **gen)
    with pytest.raises(ValueError, match="two drafters"):
        target.generate(prompt, assistant_model=d, method="d2sd", **gen)
    with pytest.raises(ValueError, match="two drafters"):
        target.generate(prompt, assistant_model=d, method="d2sd-tree", tree_budget=8, **gen)
    for bad in ((d,), [d], (d, d, d), (d, target), (target, d)):
        with pytest.raises(ValueError, match="two DFlash drafters"):
            target.generate(prompt, assistant_model=bad, method="d2sd", **gen)
    with pytest.raises(ValueError, match="method must be one of"):
        target.generate(prompt, assistant_model=(d, d), method="ddtree", **gen)
    for name in ("d2sd_boundaries", "d2sd_alternatives"):
        for v in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match=name):
                target.generate(prompt, assistant_model=(d, d), method="d2sd", **{name: v}, **gen)
    for budget in (-1, "auto", 2.5):
        with pytest.raises(ValueError, match="tree_budget"):
            target.generate(prompt, assistant_model=(d, d), method="d2sd", tree_budget=budget, **gen)
    small = build_drafter(target, seed=3, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        target.generate(prompt, assistant_model=(d, small), method="d2sd", **gen)
    # the same pair the other way round is fine (a larger variable-prefix block), and so is the default method
    out = target.generate(prompt, assistant_model=(small, d), **gen)
    assert torch.equal(out, stock(target, prompt, max_new_tokens=4))
