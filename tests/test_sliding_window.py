"""Sliding-window and hybrid-attention targets: Mistral, Phi-3, Qwen2 (use_sliding_window with
max_window_layers < layers), Gemma 2 and Gemma 3 text.

hf_ddtree keeps one full-length cache for every layer and puts each layer type's window in that
layer type's mask (see cache.attention_windows / cache.mask_layout / verify.tree_inputs). Checked here:
  * the sliding mask of a chain equals transformers' own sliding mask (the convention),
  * every node of a tree forward (deeper than the window) has the logits of a plain full forward
    over prompt + its path, before and after compaction (the masks, directly),
  * greedy output is token-identical to the target's own stock generate() for prompts and
    generations shorter and longer than the window, static/dynamic caches, sdpa/eager, tree
    budgets 0/1/4/16 and the DFlash chain, with a random and an oracle drafter.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationMixin,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

import hf_ddtree
from hf_ddtree import DFlashDraftModel, make_drafter_config
from hf_ddtree.cache import attention_windows, compact, make_cache, sliding_window_mask, tree_attention_mask
from hf_ddtree.compat import cache_kwargs
from hf_ddtree.tree import Tree, build_chain, build_tree
from hf_ddtree.verify import run_tree

from conftest import BLOCK, CACHES, IMPLS, OracleDrafter, build_drafter

VOCAB = HIDDEN = 64
LAYERS = 3
SLIDING, FULL = "sliding_attention", "full_attention"

# family -> (config class, model class, window, extra config fields)
FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM, 4, {}),
    "phi3": (Phi3Config, Phi3ForCausalLM, 5, {}),
    # layers >= max_window_layers slide: [full, sliding, sliding]
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 6, dict(use_sliding_window=True, max_window_layers=1)),
    # default layer_types alternate: [sliding, full, sliding]
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, 7, dict(query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                                                         final_logit_softcapping=30.0)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, 8, dict(query_pre_attn_scalar=16,
                                                            layer_types=[SLIDING, FULL, SLIDING])),
}
EXPECTED_LAYOUT = {  # what transformers decides; keys are the masks' layer types
    "mistral": {SLIDING: 4},
    "phi3": {SLIDING: 5},
    "qwen2": {FULL: None, SLIDING: 6},
    "gemma2": {SLIDING: 7, FULL: None},
    "gemma3": {SLIDING: 8, FULL: None},
}


def build_family_target(family: str, impl: str = "sdpa", *, window: int | None = None, seed: int = 0):
    """A tiny random fp32 target of `family` with an orthonormal-rows lm_head (see conftest)."""
    config_cls, model_cls, default_window, extra = FAMILIES[family]
    config = config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=HIDDEN // 4, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        sliding_window=default_window if window is None else window, **extra,
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=impl).float().eval()
    g = torch.Generator().manual_seed(seed + 1000)
    q, _ = torch.linalg.qr(torch.randn(HIDDEN, VOCAB, generator=g))
    with torch.no_grad():
        model.lm_head.weight.copy_(q.T)
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = None
    return model


def cases():
    for family in FAMILIES:
        for impl in IMPLS:
            if family == "gemma2" and impl == "sdpa":
                continue  # transformers refuses sdpa for Gemma 2 (attention softcapping)
            yield family, impl


# ------------------------------------------------------------------------------------------------
# layout and mask convention
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_attention_windows_follow_transformers(family):
    target = build_family_target(family, "eager")
    assert attention_windows(target.config) == EXPECTED_LAYOUT[family]
    # the cache is full length on every layer; the target's own config is untouched
    for kind in CACHES:
        cache = make_cache(target, kind, max_cache_len=16)
        assert {type(layer).__name__ for layer in cache.layers} == {"StaticLayer" if kind == "static" else "DynamicLayer"}
        assert len(cache.layers) == LAYERS
    assert attention_windows(target.config) == EXPECTED_LAYOUT[family]


def test_qwen2_window_layers_and_switch():
    """Qwen2: only layers >= max_window_layers slide, and only with use_sliding_window=True."""
    cfg = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=2)
    assert cfg.layer_types == [FULL, FULL, SLIDING, SLIDING]
    assert attention_windows(cfg) == {FULL: None, SLIDING: 5}
    assert attention_windows(Qwen2Config(num_hidden_layers=4, use_sliding_window=False, sliding_window=5)) == {FULL: None}
    assert attention_windows(MistralConfig(sliding_window=None)) == {FULL: None}


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("past_len", [0, 2, 9])
def test_sliding_chain_mask_equals_transformers(window, past_len):
    """On a chain (a plain causal continuation) the sliding tree mask is transformers' sliding mask."""
    n = 7
    chain = build_chain(0, torch.arange(1, n))
    kv_len = past_len + n + 3  # + stale static slots
    full = tree_attention_mask(chain.visibility(), past_len, kv_len, torch.float32, torch.device("cpu"))
    ours = sliding_window_mask(full, chain.depths, past_len, window)[0, 0] == 0
    ref = sdpa_mask(batch_size=1, q_length=n, kv_length=kv_len, q_offset=past_len,
                    mask_function=sliding_window_causal_mask_function(window), allow_is_causal_skip=False)[0, 0]
    assert torch.equal(ours, ref)
    assert torch.equal(full[0, 0] == 0, sdpa_mask(batch_size=1, q_length=n, kv_length=kv_len, q_offset=past_len,
                                                  allow_is_causal_skip=False)[0, 0])


def test_sliding_tree_mask_uses_positions():
    """In a tree, the window counts positions (depths), not slots: siblings do not push keys out."""
    tree = Tree(tokens=torch.tensor([0, 1, 2, 3, 4]), parents=torch.tensor([-1, 0, 0, 1, 3]), depths=torch.tensor([0, 1, 1, 2, 3]),
                scores=[0.0] * 5, children=[{1: 1, 2: 2}, {3: 3}, {}, {4: 4}, {}])
    past = 4
    full = tree_attention_mask(tree.visibility(), past, past + 5, torch.float32, torch.device("cpu"))
    seen = sliding_window_mask(full, tree.depths, past, window=3)[0, 0] == 0
    # node 4 (depth 3, position 7) sees positions 5..7: node 1 (pos 5), node 3 (pos 6), itself - not the root (pos 4)
    assert seen[4].nonzero().flatten().tolist() == [past + 1, past + 3, past + 4]
    # node 2 (depth 1, position 5) sees positions 3..5: cache slot 3, the root, itself (not its sibling in slot 5)
    assert seen[2].nonzero().flatten().tolist() == [3, past, past + 2]


# ------------------------------------------------------------------------------------------------
# one tree forward == per-path full forwards, with windows inside the tree and across the cache
# ------------------------------------------------------------------------------------------------

def full_logits(target, seq: list[int]) -> torch.Tensor:
    return target(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()


def deep_tree(seed: int, root: int, budget: int) -> Tree:
    """A best-first tree that branches at the root and runs BLOCK - 1 deep (deeper than the windows)."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.tensor([[-0.7, -1.0, -1.6]] + [[-0.05, -3.0, -4.0]] * (BLOCK - 2))  # (depth, k) log-probs
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:3] for _ in range(BLOCK - 1)])  # (depth, k) tokens
    tree = build_tree(root, lp, ids, budget)
    assert int(tree.depths.max()) >= 5 and len(tree.children[0]) >= 2, "test tree should branch and go deep"
    return tree


def check_tree(target, cache, prefix: list[int], tree: Tree):
    past = len(prefix) - 1
    assert int(cache.get_seq_length()) == past
    logits, _ = run_tree(target, tree, cache, past, None)
    for node in range(tree.num_nodes + 1):
        path = tree.tokens[tree.path_to(node)[1:]].tolist()
        torch.testing.assert_close(logits[node].float(), full_logits(target, prefix + path)[-1], atol=1e-5, rtol=0,
                                   msg=lambda m: f"node {node} (depth {int(tree.depths[node])}): {m}")


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family,impl", [("mistral", "sdpa"), ("phi3", "eager"), ("qwen2", "sdpa"), ("gemma2", "eager"),
                                         ("gemma3", "sdpa"), ("gemma3", "eager")])
@torch.no_grad()
def test_tree_forward_and_compaction_match_full_forward(family, impl, cache_kind):
    target = build_family_target(family, impl, window=3, seed=5)
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = make_cache(target, cache_kind, max_cache_len=64)
    # prefill (the model builds its own sliding masks over the full-length cache): every position exact
    pre = target(input_ids=torch.tensor([prompt[:-1]]), **cache_kwargs(target, cache), use_cache=True).logits[0]
    torch.testing.assert_close(pre.float(), full_logits(target, prompt[:-1]), atol=1e-5, rtol=0)

    tree = deep_tree(0, prompt[-1], budget=24)
    check_tree(target, cache, prompt, tree)
    keep = tree.path_to(int(tree.depths.argmax()))
    compact(cache, len(prompt) - 1, torch.tensor(keep))
    seq = prompt + tree.tokens[keep[1:]].tolist()

    # a plain continuation over the compacted cache, then a second tree round
    extra = [3, 17]
    cont = target(input_ids=torch.tensor([extra]), **cache_kwargs(target, cache), use_cache=True).logits[0]
    torch.testing.assert_close(cont.float(), full_logits(target, seq + extra)[-2:], atol=1e-5, rtol=0)
    seq = seq + extra + [11]
    tree2 = deep_tree(1, 11, budget=16)
    check_tree(target, cache, seq, tree2)
    keep2 = tree2.path_to(max(range(tree2.num_nodes + 1), key=lambda i: (int(tree2.depths[i]), -i)))
    compact(cache, len(seq) - 1, torch.tensor(keep2))
    seq = seq + tree2.tokens[keep2[1:]].tolist()
    check_tree(target, cache, seq + [5], deep_tree(2, 5, budget=18))


# ------------------------------------------------------------------------------------------------
# greedy output == the target's own generate()
# ------------------------------------------------------------------------------------------------

NEW = 16
MODES = {"b0": dict(tree_budget=0), "b1": dict(tree_budget=1), "b4": dict(tree_budget=4),
         "b16": dict(tree_budget=16), "chain": dict(method="dflash")}


def stock(target, ids, **kw):
    return GenerationMixin.generate(target, ids, do_sample=False, **kw)


@functools.lru_cache(maxsize=None)
def setup(family: str, impl: str) -> SimpleNamespace:
    target = build_family_target(family, impl)
    window = FAMILIES[family][2]
    refs = {}
    for name, length in (("short", 2), ("long", 2 * window + 1)):
        prompt = torch.randint(0, VOCAB - 1, (1, length), generator=torch.Generator().manual_seed(length))
        out = stock(target, prompt, max_new_tokens=NEW + BLOCK, output_scores=True, return_dict_in_generate=True)
        top2 = torch.cat(out.scores).topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4  # greedy choices far above fp32 noise
        refs[name] = (prompt, out.sequences)
    hf_ddtree.enable(target)
    return SimpleNamespace(target=target, window=window, refs=refs, random=build_drafter(target, seed=7))


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("family,impl", list(cases()))
def test_greedy_is_token_identical(family, impl, cache):
    s = setup(family, impl)
    runs = []  # (prompt kind, drafter name, mode, new tokens)
    runs += [("long", "random", m, NEW) for m in MODES] + [("long", "oracle", m, NEW) for m in ("b16", "chain")]
    runs += [("short", "random", "b4", NEW), ("short", "oracle", "b16", NEW)]  # the window starts to bite mid-decoding
    inside = s.window - 2  # prompt + generation fit in the window: it never bites
    runs += [("short", "oracle", "b16", inside), ("short", "random", "chain", inside)]
    oracles = {k: OracleDrafter(s.target, seq[0].tolist()) for k, (_, seq) in s.refs.items()}
    mean_acc = {}
    for kind, dname, mode, new in runs:
        prompt, ref = s.refs[kind]
        P = prompt.shape[1]
        drafter = oracles[kind] if dname == "oracle" else s.random
        out = s.target.generate(prompt, assistant_model=drafter, do_sample=False, max_new_tokens=new,
                                cache_implementation=cache, return_dict_in_generate=True, **MODES[mode])
        assert torch.equal(out.sequences, ref[:, :P + new]), (
            f"{kind} {dname} {mode}: {out.sequences[0, P:].tolist()} != {ref[0, P:P + new].tolist()}")
        assert sum(out.acceptance_lengths) == new - 1
        mean_acc[kind, dname, mode, new] = out.stats.mean_acceptance_length
    assert s.refs["short"][0].shape[1] + inside <= s.window < s.refs["long"][0].shape[1]
    # the oracle's long accepted paths (deeper than the window) were verified and compacted
    assert mean_acc["long", "oracle", "b16", NEW] > 3, mean_acc
    assert mean_acc["long", "oracle", "chain", NEW] > 2 and mean_acc["short", "oracle", "b16", NEW] > 3, mean_acc


@pytest.mark.parametrize("cache", CACHES)
def test_issue_cases_large_window_and_qwen3_hybrid(cache):
    """The reported failures: Mistral with sliding_window=4096 and a 30-token prompt (sdpa size
    mismatch in the tree forward), and a Qwen3 target with a sliding layer (refused before)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from conftest import build_target

    mistral = build_family_target("mistral", "sdpa", window=4096, seed=3)
    base = build_target("qwen3", "eager", seed=4)
    cfg = Qwen3Config(**{**base.config.to_dict(), "layer_types": [SLIDING, FULL, FULL], "use_sliding_window": True,
                         "sliding_window": 5})
    torch.manual_seed(4)
    qwen3 = Qwen3ForCausalLM._from_config(cfg, attn_implementation="eager").float().eval()
    qwen3.load_state_dict(base.state_dict())
    qwen3.generation_config.bos_token_id = qwen3.generation_config.eos_token_id = None
    qwen3.generation_config.pad_token_id = None
    assert attention_windows(qwen3.config) == {SLIDING: 5, FULL: None}
    for target, length in ((mistral, 30), (qwen3, 9)):
        prompt = torch.randint(0, VOCAB - 1, (1, length), generator=torch.Generator().manual_seed(length))
        ref = stock(target, prompt, max_new_tokens=12)
        hf_ddtree.enable(target)
        oracle = OracleDrafter(target, stock(target, prompt, max_new_tokens=12 + BLOCK)[0].tolist())
        for drafter, mode in ((build_drafter(target, seed=5), "b16"), (oracle, "b16"), (oracle, "chain")):
            out = target.generate(prompt, assistant_model=drafter, do_sample=False, max_new_tokens=12,
                                  cache_implementation=cache, **MODES[mode])
            assert torch.equal(out, ref), (type(target).__name__, mode)


def test_refused_attention_kinds():
    with pytest.raises(ValueError, match=r"bidirectional attention"):
        attention_windows(Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True))
    cfg = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    cfg.sliding_window = None  # sliding layers without a window
    with pytest.raises(ValueError, match=r"sliding_attention layers but config.sliding_window=None"):
        attention_windows(cfg)


# ------------------------------------------------------------------------------------------------
# budget calibration and the drafter config on sliding / hybrid targets
# ------------------------------------------------------------------------------------------------

def test_budget_calibration_runs_on_a_hybrid_target():
    from hf_ddtree.calibrate import measure_latency

    target = build_family_target("gemma3", "sdpa")
    drafter = build_drafter(target, seed=3)
    for kind in CACHES:
        res = measure_latency(target, drafter, 8, ns=[0, 4, 8], past_len=20, reps=1, warmup=0,
                              cache_implementation=kind, progress=False)
        assert res["ns"] == [0, 4, 8] and len(res["times"]) == 3


def test_drafter_config_from_gemma3_uses_full_attention_rope():
    """Gemma 3 keeps rope parameters per layer type; the drafter (full attention) takes the full ones."""
    cfg = FAMILIES["gemma3"][0](vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                sliding_window=8, max_position_embeddings=512)
    assert set(cfg.rope_parameters) == {FULL, SLIDING}
    dcfg = make_drafter_config(cfg, block_size=BLOCK, mask_token_id=VOCAB - 1, target_layer_ids=[0, 2])
    assert dcfg.rope_parameters["rope_type"] == cfg.rope_parameters[FULL]["rope_type"]
    assert dcfg.rope_parameters["rope_theta"] == cfg.rope_parameters[FULL]["rope_theta"]
    drafter = DFlashDraftModel(dcfg).float().eval()  # used to raise KeyError: 'rope_type'
    target = build_family_target("gemma3", "sdpa")
    hf_ddtree.enable(target)
    d = build_drafter(target, seed=2)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    ref = stock(target, prompt, max_new_tokens=12)
    out = target.generate(prompt, assistant_model=d, tree_budget=8, do_sample=False, max_new_tokens=12)
    assert torch.equal(out, ref)
    assert drafter.config.rope_parameters["rope_theta"] == cfg.rope_parameters[FULL]["rope_theta"]
