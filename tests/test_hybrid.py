"""Hybrid linear-attention targets (Gated DeltaNet + full attention): Qwen3-Next and Qwen3.5, dense and MoE.

A Gated DeltaNet layer keeps a conv window and a recurrent state instead of K/V; on a tree every
node's comes from its own path (src/hf_ddtree/linear_attention.py). Checked here:
  * the math: the tree's delta rule equals transformers' own token-by-token recurrence along every
    path (outputs and the state a path leaves), the tree conv equals conv1d over every path, and the
    conv state a path leaves is the last K inputs;
  * the model: every node of a tree forward has the logits of a plain forward over prompt + its path,
    and after `commit_linear_states` the cache's states equal those of a plain forward over the kept path;
  * greedy output token-identical to the target's own stock generate() for the chain and for trees at
    budgets 0-64 and CaDDTree, prompts shorter and longer than the conv window, the static and dynamic
    cache hf_ddtree makes and the DynamicCache / StaticCache a user passes, multi-turn on a carried
    cache, a batch of 3 with mixed lengths, EOS mid-tree (the returned cache equal to stock's too),
    on transformers' reference kernels (CPU);
  * the sampling law (exact enumeration + chi-square, as tests/test_sampling.py);
  * refusals: a linear-attention layer that is not a known Gated DeltaNet, other recurrent kinds.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    GenerationMixin,
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    StaticCache,
)

import hf_ddtree
from hf_ddtree import linear_attention as la
from hf_ddtree.cache import commit_linear_states, compact, make_cache
from hf_ddtree.compat import CACHE_FIELD, cache_kwargs, linear_attention_modules, linear_states
from hf_ddtree.tree import ancestor_matrix, ancestors_by_depth, build_tree
from hf_ddtree.verify import verify_tree

from conftest import OracleDrafter, build_drafter

VOCAB = HIDDEN = 64
KERNEL = 4  # the conv window: prompts of 2 (shorter) and 9 (longer) tokens
TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
FAMILIES = ("qwen3_next", "qwen3_next_dense", "qwen3_5", "qwen3_5_moe")
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def build_hybrid_target(family: str, *, vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0,
                        logit_scale: float = 1.0):
    """A tiny random fp32 hybrid target (3 Gated DeltaNet layers + 1 full attention, value heads = 2x key
    heads) with an orthonormal-rows lm_head (see conftest)."""
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=len(TYPES),
        layer_types=list(TYPES), num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=KERNEL, max_position_embeddings=512, tie_word_embeddings=False,
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    if family == "qwen3_next":
        model = Qwen3NextForCausalLM._from_config(Qwen3NextConfig(**common, **MOE))
    elif family == "qwen3_next_dense":
        model = Qwen3NextForCausalLM._from_config(Qwen3NextConfig(**common, **MOE, mlp_only_layers=list(range(len(TYPES)))))
    elif family == "qwen3_5":
        model = Qwen3_5ForCausalLM._from_config(Qwen3_5TextConfig(**common))
    elif family == "qwen3_5_moe":
        model = Qwen3_5MoeForCausalLM._from_config(Qwen3_5MoeTextConfig(**common, **MOE))
    else:
        raise ValueError(family)
    model = model.float().eval()
    g = torch.Generator().manual_seed(seed + 1000)
    q, _ = torch.linalg.qr(torch.randn(hidden, vocab, generator=g))
    with torch.no_grad():
        model.lm_head.weight.copy_(q.T * logit_scale)
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = None
    return model


@functools.lru_cache(maxsize=None)
def target_of(family: str):
    return build_hybrid_target(family)


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (1, length), generator=torch.Generator().manual_seed(seed + length))


def stock(target, ids, **kw):
    return GenerationMixin.generate(target, ids, do_sample=False, **kw)


def random_tree(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(6, VOCAB, generator=g) * 2, -1)  # depth up to 6
    top_lp, top_ids = torch.topk(logp, 4, dim=-1)
    return build_tree(3, top_lp, top_ids, n)


# ------------------------------------------------------------------------------------------------
# the math, against transformers' own recurrence
# ------------------------------------------------------------------------------------------------

def _reference_rule():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    return getattr(torch_recurrent_gated_delta_rule, "__wrapped__", torch_recurrent_gated_delta_rule)


@pytest.mark.parametrize("with_state", [False, True])
def test_tree_delta_rule_equals_the_recurrence_on_every_path(with_state):
    tree = random_tree()
    N, H, Dk, Dv = tree.size, 3, 8, 5
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, N, H, Dk, generator=g), torch.randn(1, N, H, Dk, generator=g)
    v = torch.randn(1, N, H, Dv, generator=g)
    decay = -torch.rand(1, N, H, generator=g) * 3
    beta = torch.rand(1, N, H, generator=g)
    state = torch.randn(1, H, Dk, Dv, generator=g) if with_state else None
    vis = ancestor_matrix(tree.parents, tree.max_depth)[None]
    qn, kn = la.l2norm(q) / Dk ** 0.5, la.l2norm(k)
    o, (kk, u, gsum) = la.tree_gated_delta_rule(qn, kn, v, decay, beta, state, vis)
    rule = _reference_rule()
    for i in range(N):
        path = tree.path_to(i)
        ref_o, ref_state = rule(q[:, path], k[:, path], v[:, path], g=decay[:, path], beta=beta[:, path],
                                initial_state=None if state is None else state.clone(), output_final_state=True,
                                use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(o[0, i], ref_o[0, -1], rtol=1e-4, atol=1e-5)
        got = la.path_state(state, la.TreeRecurrence(kk, u, gsum, None), vis[:, i], torch.tensor([i]))
        torch.testing.assert_close(got, ref_state, rtol=1e-4, atol=1e-5)


def test_tree_conv_equals_conv1d_on_every_path():
    tree = random_tree(seed=2)
    N, C = tree.size, 6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, C, N, generator=g)
    conv_state = torch.randn(1, C, KERNEL, generator=g)
    weight, bias = torch.randn(C, KERNEL, generator=g), torch.randn(C, generator=g)
    vis = ancestor_matrix(tree.parents, tree.max_depth)[None]
    anc = ancestors_by_depth(vis, tree.depths[None], tree.max_depth)
    out = la.tree_causal_conv(x, conv_state, anc, tree.depths[None], weight, bias, F.silu)
    paths = anc  # row i: node i's path by depth
    for i in range(N):
        path = tree.path_to(i)
        seq = torch.cat([conv_state, x[:, :, path]], -1)
        ref = F.silu(F.conv1d(seq, weight[:, None], bias, groups=C))[:, :, -1]
        torch.testing.assert_close(out[:, :, i], ref, rtol=1e-5, atol=1e-6)
        kept = la.path_conv_state(conv_state, x, paths[:, i], torch.tensor([len(path) - 1]))
        torch.testing.assert_close(kept, seq[:, :, -KERNEL:])


# ------------------------------------------------------------------------------------------------
# the model: tree logits and the committed states
# ------------------------------------------------------------------------------------------------

def test_the_adapter_knows_each_family():
    for family in FAMILIES:
        mods = linear_attention_modules(target_of(family))
        assert [m.layer_idx for m in mods] == [i for i, t in enumerate(TYPES) if t == "linear_attention"]


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
@pytest.mark.parametrize("length", [2, 9])
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_tree_logits_equal_plain_forwards_and_the_kept_state_is_stock(family, length, kind):
    target = target_of(family)
    ids = prompt(length)
    tree = random_tree(seed=length)
    cache = make_cache(target, kind, length + tree.size + 4)
    with torch.no_grad():
        target(input_ids=ids[:, :-1], **cache_kwargs(target, cache), use_cache=True)
        tree.tokens[0] = ids[0, -1]  # the root: the prompt's last token, not yet in the cache
        v = verify_tree(target, tree, cache, length - 1, None, None, ids, False)
        for i in range(tree.size):
            seq = torch.cat([ids[:, :-1], tree.tokens[tree.path_to(i)][None]], 1)
            plain = target(input_ids=seq, use_cache=False).logits[0, -1]
            torch.testing.assert_close(v.raw[0, i], plain, rtol=1e-4, atol=1e-4)
        # keep the deepest path: the cache's linear states become a plain forward's over prompt + that path
        leaf = int(torch.argmax(tree.depths))
        path = tree.path_to(leaf)
        paths = torch.tensor([path + [0] * (tree.max_depth + 1 - len(path))])
        commit_linear_states(cache, v.linear_states, paths, torch.tensor([len(path) - 1]))
        compact(cache, length - 1, torch.tensor(path))
        ref = DynamicCache(config=target.config)
        seq = torch.cat([ids[:, :-1], tree.tokens[path][None]], 1)
        target(input_ids=seq, **cache_kwargs(target, ref), use_cache=True)
        assert cache.get_seq_length() == ref.get_seq_length() == seq.shape[1]
        for m in linear_attention_modules(target):
            for got, want in zip(linear_states(cache, m.layer_idx), linear_states(ref, m.layer_idx)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        nxt = torch.tensor([[5]])  # and the next forward on the kept cache is the plain one
        pos = torch.tensor([[seq.shape[1]]])
        a = target(input_ids=nxt, position_ids=pos, **cache_kwargs(target, cache), use_cache=True).logits
        b = target(input_ids=nxt, position_ids=pos, **cache_kwargs(target, ref), use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# greedy: token-identical to stock generate
# ------------------------------------------------------------------------------------------------

METHODS = [dict(tree_budget=b) for b in (0, 1, 4, 16, 64)] + [dict(method="dflash")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [2, 9])
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_greedy_identical_to_stock(family, length, kind):
    target = target_of(family)
    ids = prompt(length)
    ref = stock(target, ids, max_new_tokens=40)
    random = build_drafter(target, target_layer_ids=[0, 2])
    deep = []
    for kw in METHODS:
        oracle = OracleDrafter(target, ref[0].tolist(), target_layer_ids=[0, 2])
        out = hf_ddtree.generate(target, ids, oracle, max_new_tokens=40, do_sample=False, cache_implementation=kind,
                                 return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), (family, length, kind, kw)
        deep.append(max(out.acceptance_lengths))
        assert torch.equal(hf_ddtree.generate(target, ids, random, max_new_tokens=40, do_sample=False,
                                              cache_implementation=kind, **kw), ref), (family, length, kind, kw, "random")
    assert max(deep) >= 6  # paths deeper than the conv window were kept


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_caddtree_and_lookup_on_a_hybrid(family):
    target = target_of(family)
    ids = prompt(9)
    ref = stock(target, ids, max_new_tokens=40)
    oracle = OracleDrafter(target, ref[0].tolist(), target_layer_ids=[0, 2])
    for kw in (dict(tree_budget="auto"), dict(method="ddtree-lookup", tree_budget=16)):
        assert torch.equal(hf_ddtree.generate(target, ids, oracle, max_new_tokens=40, do_sample=False, **kw), ref), kw


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_user_caches_and_multi_turn(family):
    """The caches transformers offers for these models, passed by the user, and a conversation carried."""
    target = target_of(family)
    ids = prompt(9)
    ref = stock(target, ids, max_new_tokens=24)
    oracle = OracleDrafter(target, ref[0].tolist() + [1] * 64, target_layer_ids=[0, 2])
    for cache in (DynamicCache(config=target.config), StaticCache(config=target.config, max_cache_len=128)):
        out = hf_ddtree.generate(target, ids, oracle, tree_budget=16, max_new_tokens=24, do_sample=False,
                                 **{CACHE_FIELD: cache})
        assert torch.equal(out, ref), type(cache).__name__
    # two turns on the returned cache vs stock's two turns on its own
    mine = hf_ddtree.generate(target, ids, oracle, tree_budget=16, max_new_tokens=24, do_sample=False,
                              return_dict_in_generate=True, cache_implementation="dynamic")
    theirs = stock(target, ids, max_new_tokens=24, return_dict_in_generate=True)
    turn2 = torch.cat([mine.sequences, prompt(5, seed=7)], 1)
    a = hf_ddtree.generate(target, turn2, oracle, tree_budget=16, max_new_tokens=16, do_sample=False,
                           **{CACHE_FIELD: getattr(mine, CACHE_FIELD)})
    b = stock(target, turn2, max_new_tokens=16, **{CACHE_FIELD: getattr(theirs, CACHE_FIELD)})
    assert torch.equal(a, b)
    # a stock cache (LinearAttentionLayer + DynamicLayer, no drafter context) continued by hf_ddtree
    again = stock(target, ids, max_new_tokens=24, return_dict_in_generate=True)
    random = build_drafter(target, target_layer_ids=[0, 2])  # (the oracle checks a drafter cache from position 0)
    c = hf_ddtree.generate(target, turn2, random, tree_budget=16, max_new_tokens=16, do_sample=False,
                           **{CACHE_FIELD: getattr(again, CACHE_FIELD)})
    assert torch.equal(c, b)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_batch_of_three_mixed_lengths(family):
    target = target_of(family)
    rows = [prompt(n, seed=s) for n, s in ((2, 1), (9, 2), (5, 3))]
    width = max(r.shape[1] for r in rows)
    ids = torch.cat([F.pad(r, (width - r.shape[1], 0), value=0) for r in rows])
    attn = torch.cat([F.pad(torch.ones_like(r), (width - r.shape[1], 0), value=0) for r in rows])
    ref = stock(target, ids, attention_mask=attn, max_new_tokens=24, pad_token_id=0)
    for kw in (dict(tree_budget=16), dict(method="dflash")):
        drafter = build_drafter(target, target_layer_ids=[0, 2])
        out = hf_ddtree.generate(target, ids, drafter, attention_mask=attn, max_new_tokens=24, do_sample=False,
                                 pad_token_id=0, **kw)
        assert torch.equal(out, ref), kw


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_eos_mid_tree_and_the_returned_cache(family):
    target = target_of(family)
    ids = prompt(9)
    free = stock(target, ids, max_new_tokens=30)[0, 9:].tolist()
    oracle = OracleDrafter(target, ids[0].tolist() + free, target_layer_ids=[0, 2])
    run = functools.partial(hf_ddtree.generate, target, ids, oracle, tree_budget=64, max_new_tokens=30, do_sample=False,
                            return_dict_in_generate=True, cache_implementation="dynamic")
    rounds = run().acceptance_lengths
    ends = {1 + sum(rounds[:r + 1]) for r in range(len(rounds))}  # new tokens after each round (1: the prefill's)
    # the EOS: a token first generated after two rounds, not the last of its round (the round stops mid-path)
    at = next(i for i in range(1 + sum(rounds[:2]), len(free)) if free[i] not in free[:i] and i + 1 not in ends)
    eos = free[at]
    ref = stock(target, ids, max_new_tokens=30, eos_token_id=eos, return_dict_in_generate=True)
    out = run(eos_token_id=eos)
    assert torch.equal(out.sequences, ref.sequences)
    assert ref.sequences.shape[1] == 9 + at + 1
    last = len(out.acceptance_lengths) - 1
    assert out.acceptance_lengths[-1] < rounds[last]  # its path was cut at the EOS
    c_mine, c_ref = getattr(out, CACHE_FIELD), getattr(ref, CACHE_FIELD)
    assert c_mine.get_seq_length() == c_ref.get_seq_length()
    for m in linear_attention_modules(target):
        for got, want in zip(linear_states(c_mine, m.layer_idx), linear_states(c_ref, m.layer_idx)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# sampling: the exact law
# ------------------------------------------------------------------------------------------------

def test_sampling_law_on_a_hybrid(monkeypatch):
    import test_sampling as ts

    target = build_hybrid_target("qwen3_next", vocab=ts.V, hidden=32, seed=0, logit_scale=2.0)
    greedy = stock(target, ts.PROMPT, max_new_tokens=16)
    hf_ddtree.enable(target)
    procs = ts.LogitsProcessorList([ts.TemperatureLogitsWarper(1.0)])
    exact = ts.exact_distribution(target, procs)
    wrong = ts.exact_distribution(target, ts.LogitsProcessorList([ts.TemperatureLogitsWarper(1.3)]))
    oracle = OracleDrafter(target, greedy[0].tolist(), block_size=ts.BLOCK)
    for i, kw in enumerate((dict(tree_budget=16), {})):
        counts, accept, _ = ts.sample(target, ts.N_SPEC, seed=300 + i, gen_kw=dict(temperature=1.0, top_k=0),
                                      method_kw=dict(assistant_model=oracle, **kw))
        stat, df, p = ts.chi_square_pvalue(counts, exact)
        assert p > ts.ALPHA, f"{kw}: chi2={stat:.1f} df={df} p={p:.2e}"
        assert ts.chi_square_pvalue(counts, wrong)[2] < ts.ALPHA  # the test has power
        assert max(accept) >= 2


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------

def test_unknown_linear_attention_and_other_recurrent_kinds_are_refused():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    odd = Qwen3ForCausalLM._from_config(Qwen3Config(**base, layer_types=["linear_attention", "full_attention",
                                                                         "full_attention"]))
    with pytest.raises(ValueError, match=r"not Gated DeltaNet layers hf_ddtree knows"):
        make_cache(odd, "static", 32)
    for kind in ("conv", "mamba", "chunked_attention"):
        model = Qwen3ForCausalLM._from_config(Qwen3Config(**base))
        model.config.layer_types = [kind, "full_attention", "full_attention"]  # (config validation may refuse it earlier)
        with pytest.raises(ValueError, match=rf"this target has '{kind}' layers"):
            make_cache(model, "static", 32)


def test_a_tensor_parallel_hybrid_is_refused():
    from hf_ddtree.distributed import _local_problem

    target = target_of("qwen3_5")
    problem = _local_problem(target, target.generation_config, [build_drafter(target, target_layer_ids=[0, 2])])
    assert problem is not None and "tensor-parallel hybrid" in problem
    from conftest import build_target

    dense = build_target()
    assert _local_problem(dense, dense.generation_config, [build_drafter(dense)]) is None


def test_a_zlab_format_drafter_config_for_a_hybrid_target():
    """Target layer ids over the hybrid's layers (linear and full) validate; out of range is refused."""
    from hf_ddtree import make_drafter_config, validate_pair, DFlashDraftModel

    target = target_of("qwen3_5")
    drafter = build_drafter(target, target_layer_ids=[0, 1, 2, 3])
    spec = validate_pair(target, drafter)
    assert spec.target_layer_ids == (0, 1, 2, 3)
    cfg = make_drafter_config(target.config, num_hidden_layers=1, block_size=8, mask_token_id=VOCAB - 1,
                              target_layer_ids=[1, 4])
    with pytest.raises(ValueError, match=r"target layers \[1, 4\] but the target has 4 layers"):
        validate_pair(target, DFlashDraftModel(cfg).float().eval())


def test_hybrid_layer_benchmark_rehearsal(capsys):
    """benchmarks/hybrid_layer.py at tiny shapes: every row is timed and the memory per node is the record's."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "hybrid_layer", Path(__file__).resolve().parents[1] / "benchmarks" / "hybrid_layer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--hidden", "64", "--key-heads", "2", "--value-heads", "4", "--head-dim", "16", "--nodes", "8",
                "--prompt", "9", "--dtype", "fp32", "--reps", "1", "--linear-layers", "3"])
    out = capsys.readouterr().out
    for row in ("decode (1 token)", "own forward, 8 tokens", "tree forward, 8 nodes", "commit after 8 nodes"):
        assert f"| {row}" in out
    record = (2 * 2 * 16 + 4 * 16) * 4 + 4 * (2 * 16 + 1) * 4  # x, then k, u, G (fp32)
    assert f"{record / 1024:.0f} KiB (record" in out and f"{4 * 16 * 16 * 4 / 1024:.0f} KiB for the node's own state" in out
