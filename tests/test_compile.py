"""Compiled forwards: generate()'s compile convention for the verify and drafter forwards.

When stock generate() would compile its decoding forward (static cache on cuda/xpu/..., or any
device with `compile_config._compile_all_devices`; never with `disable_compile=True`), the loop runs
the tree verify through the target's `get_compiled_call(compile_config)` and the drafter through
torch.compile with the same options. These tests use backends that do not generate code ("eager",
or a counting one) to stay fast; the graphs dynamo captures are the same that inductor would compile.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, GenerationConfig

import hf_ddtree
from hf_ddtree.compat import compile_requested
from hf_ddtree.decoding import compile_forwards

from conftest import OracleDrafter, build_drafter, build_target
from test_lossless import NEW, setup, stock


def all_devices(**kw) -> CompileConfig:
    cc = CompileConfig(mode=None, **kw)
    cc._compile_all_devices = True  # stock generate()'s switch for compiling on any device (e.g. cpu)
    return cc


class GraphCounter:
    """`.backend`: a torch.compile backend that runs the captured graph eagerly and records each graph's
    input shapes (a plain function, since CompileConfig.to_dict deep-copies objects)."""

    def __init__(self):
        self.graphs: Counter = Counter()

        def backend(gm, inputs):
            self.graphs[str([tuple(x.shape) if hasattr(x, "shape") else str(x) for x in inputs[:3]])] += 1
            return gm.forward

        self.backend = backend

    @property
    def total(self) -> int:
        return sum(self.graphs.values())


# ------------------------------------------------------------------------------------------------
# the decision: stock generate()'s criteria
# ------------------------------------------------------------------------------------------------

def _fake(device: str, **attrs):
    return SimpleNamespace(device=torch.device(device), **attrs)


@pytest.mark.parametrize("device, cache, config, disable, expect", [
    ("cpu", "static", None, False, False),  # cpu needs compile_config._compile_all_devices
    ("cpu", "static", "all", False, True),
    ("cpu", None, "all", False, False),  # stock decodes with a DynamicCache: no compile
    ("cpu", "dynamic", "all", False, False),
    ("cpu", "static", "all", True, False),  # disable_compile wins
    ("cpu", "static", "plain", False, False),
    ("cuda", "static", None, False, True),  # static cache on cuda: stock compiles by default
    ("cuda", None, None, False, False),
    ("cuda", "static", None, True, False),
])
def test_compile_decision_follows_generate(device, cache, config, disable, expect):
    cc = {None: None, "all": all_devices(), "plain": CompileConfig()}[config]
    gc = GenerationConfig(cache_implementation=cache, compile_config=cc, disable_compile=disable)
    model = _fake(device)
    model._default_compile_config = CompileConfig
    got = compile_forwards(model, gc)
    assert (got is not None) == expect
    if expect:
        assert got is cc or (cc is None and isinstance(got, CompileConfig))


def test_compile_decision_exceptions():
    """Like stock: a non-compileable quantizer or cpu/disk offload turns compiling off."""
    gc = GenerationConfig(cache_implementation="static")
    assert compile_requested(_fake("cuda"), gc, True)
    assert not compile_requested(_fake("cuda", hf_quantizer=SimpleNamespace(is_compileable=False)), gc, True)
    assert compile_requested(_fake("cuda", hf_quantizer=SimpleNamespace(is_compileable=True)), gc, True)
    assert not compile_requested(_fake("cuda", hf_device_map={"a": 0, "b": "cpu"}), gc, True)
    assert not compile_requested(_fake("cuda", hf_device_map={"a": 0, "b": "disk"}), gc, True)
    assert compile_requested(_fake("cuda", hf_device_map={"a": 0, "b": 1}), gc, True)


# ------------------------------------------------------------------------------------------------
# one graph for every round
# ------------------------------------------------------------------------------------------------

def test_one_verify_graph_no_recompiles_across_rounds():
    torch._dynamo.reset()
    target = build_target("qwen3", "sdpa")
    drafter = build_drafter(target)
    hf_ddtree.enable(target)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 60, (1, 12), generator=gen) for _ in range(2)]
    counter = GraphCounter()
    cc = all_devices(backend=counter.backend)
    kw = dict(assistant_model=drafter, tree_budget=8, max_new_tokens=40, do_sample=False, device_round=True,
              cache_implementation="static", compile_config=cc, return_dict_in_generate=True)
    out = target.generate(prompts[0], **kw)
    rounds = len(out.acceptance_lengths)
    assert rounds >= 20  # a random drafter: many rounds
    assert torch.equal(out.sequences, stock(target, prompts[0], max_new_tokens=40))
    # the verify: ONE graph, of the padded shape (1, budget + 1) (input ids, then the embedding weight), for all rounds
    verify = [g for g in counter.graphs if g.startswith("[(1, 9), (64, 64)")]
    assert len(verify) == 1 and counter.graphs[verify[0]] == 1, counter.graphs
    # the drafter (dynamic shapes): at most 4 graphs whatever the number of rounds (first round on an
    # empty cache, a context of one token - dynamo specialises size 1 -, a context of >= 2 tokens)
    drafter = [g for g in counter.graphs if g.startswith("['s")]
    assert sum(counter.graphs[g] for g in drafter) <= 4, counter.graphs
    # the device round's tensor pieces (tree build, tree inputs, accept walk, path moves), fullgraph at fixed
    # shapes: one graph per piece for drafted rounds, one more for the root-only rounds at the end (depth 0)
    pieces = counter.total - 1 - sum(counter.graphs[g] for g in drafter)
    assert 4 <= pieces <= 7, counter.graphs
    first = counter.total
    # another prompt of the same length, another sequence of rounds: nothing new is compiled
    out2 = target.generate(prompts[1], **kw)
    assert torch.equal(out2.sequences, stock(target, prompts[1], max_new_tokens=40))
    assert counter.total == first, counter.graphs


def test_disable_compile_runs_eager():
    torch._dynamo.reset()
    target = build_target("qwen3", "sdpa")
    drafter = build_drafter(target)
    hf_ddtree.enable(target)
    counter = GraphCounter()
    prompt = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(5))
    out = target.generate(prompt, assistant_model=drafter, tree_budget=4, max_new_tokens=12, do_sample=False,
                          cache_implementation="static", compile_config=all_devices(backend=counter.backend),
                          disable_compile=True)
    assert counter.total == 0
    assert torch.equal(out, stock(target, prompt, max_new_tokens=12))


# ------------------------------------------------------------------------------------------------
# exactness: compiled == eager == stock, greedy fp32 (the test_lossless matrix style, a few cases)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, impl, mode, drafter, eos, device_round", [
    ("qwen3", "sdpa", dict(tree_budget=4), "random", False, True),
    ("qwen3", "sdpa", dict(tree_budget=16), "oracle", True, True),
    ("qwen3", "sdpa", dict(tree_budget=16), "oracle", True, False),  # the host heap + walk (CPU: eager tree inputs), compiled moves
    ("llama", "eager", dict(tree_budget=16), "random", False, True),
    ("llama", "eager", dict(tree_budget=16), "random", False, False),
    ("llama", "sdpa", dict(), "oracle", False, True),  # the DFlash chain
    ("qwen3", "sdpa", dict(method="ddtree-lookup", tree_budget=8), "random", False, True),
])
def test_compiled_matches_stock_and_eager(arch, impl, mode, drafter, eos, device_round):
    """Compiled forwards and round pieces (tree inputs, path moves; on the device round also the beam and the walk):
    token-identical to eager and to stock, near max_length too (a compiled round keeps the drafter's whole block)."""
    torch._dynamo.reset()
    s = setup(arch, impl)
    d = s.drafters[drafter]
    extra = dict(eos_token_id=s.eos, pad_token_id=s.eos) if eos else {}
    ref = s.ref_eos if eos else s.ref
    kw = dict(assistant_model=d, max_new_tokens=NEW, do_sample=False, cache_implementation="static",
              device_round=device_round, **mode, **extra)
    eager = s.target.generate(s.prompt, **kw)
    graphs = counters["stats"]["unique_graphs"]
    compiled = s.target.generate(s.prompt, compile_config=all_devices(backend="eager"), **kw)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path ran
    assert torch.equal(eager, ref)
    assert torch.equal(compiled, ref)


def test_compiled_d2sd_matches_stock():
    torch._dynamo.reset()
    s = setup("qwen3", "sdpa")
    d1, d2 = build_drafter(s.target, seed=11), build_drafter(s.target, seed=12, block_size=12)
    out = s.target.generate(s.prompt, assistant_model=(d1, d2), method="d2sd", tree_budget=8, max_new_tokens=NEW,
                            do_sample=False, cache_implementation="static", compile_config=all_devices(backend="eager"))
    assert torch.equal(out, s.ref)



# ------------------------------------------------------------------------------------------------
# CaDDTree calibration: keyed on, and timing, the compiled calls
# ------------------------------------------------------------------------------------------------

def test_calibration_key_and_timing_follow_compile(monkeypatch, tmp_path):
    from hf_ddtree import calibrate as calibration
    from hf_ddtree import verify

    torch._dynamo.reset()
    monkeypatch.setenv("HF_DDTREE_CACHE", str(tmp_path))
    target = build_target("qwen3", "sdpa")
    drafter = build_drafter(target)
    counter = GraphCounter()
    cc = all_devices(backend=counter.backend)
    eager_key = calibration.calibration_key(target, drafter, 8)
    key = calibration.calibration_key(target, drafter, 8, compile_config=cc)
    assert eager_key["compiled"] == "" and key["compiled"] != "" and key != eager_key
    assert calibration.calibration_key(target, drafter, 8, compile_config=all_devices(backend="eager")) != key
    sizes = []
    real = verify.verify_tree

    def spy(target_, tree, *args, **kwargs):
        sizes.append((tree.size, kwargs.get("forward") is not None))
        return real(target_, tree, *args, **kwargs)

    monkeypatch.setattr(verify, "verify_tree", spy)
    m = calibration.measure_latency(target, drafter, 8, ns=[0, 4, 8], past_len=32, reps=1, warmup=1, progress=False,
                                    compile_config=cc)
    assert len(m["times"]) == 3 and m["t_draft"] > 0
    assert set(sizes) == {(9, True)}  # every verify padded to max_nodes + 1 rows, through the compiled call
    assert any(g.startswith("[(1, 9)") for g in counter.graphs)  # the verify graph
    assert counter.total >= 2  # and the drafter's
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        calibration.measure_latency(target, drafter, 8, ns=[0], cache_implementation="dynamic", compile_config=cc)


def test_auto_budget_calibrates_the_compiled_loop(monkeypatch):
    import hf_ddtree.distributed as distributed

    seen = []

    class Policy:  # verify every node up to the cap
        def __init__(self, max_nodes):
            self.max_nodes = max_nodes

        def __call__(self, tree):
            return min(tree.num_nodes, self.max_nodes)

        def observe(self, accepted):
            pass

    def policy_factory(target, drafter, max_nodes, **kwargs):
        seen.append(kwargs.get("compile_config"))
        return Policy(max_nodes)

    monkeypatch.setattr(distributed, "caddtree_policy", policy_factory)  # what generate() calls
    torch._dynamo.reset()
    s = setup("qwen3", "sdpa")
    cc = all_devices(backend="eager")
    kw = dict(assistant_model=s.drafters["oracle"], tree_budget="auto", max_tree_budget=8, max_new_tokens=NEW,
              do_sample=False)
    assert torch.equal(s.target.generate(s.prompt, **kw), s.ref)
    assert torch.equal(s.target.generate(s.prompt, cache_implementation="static", compile_config=cc, **kw), s.ref)
    assert seen[0] is None and seen[1] is cc


@pytest.mark.parametrize("kw", [dict(tree_budget="auto", max_tree_budget=16), dict(method="ddtree-lookup", tree_budget=16)],
                         ids=["caddtree", "ddtree-lookup"])
def test_trees_of_changing_depth_compile_once(monkeypatch, kw):
    """CaDDTree's cuts (here a policy cutting each round's tree to a different size) and lookup merges give trees of
    a different depth each round: the compiled pieces take the call's depth bound instead of each round's depth,
    so they compile a bounded number of graphs (no per-depth recompiles), and the output is stock's."""
    import hf_ddtree.distributed as distributed

    class Cutting:  # 1, 2, ..., 6, 1, 2, ... nodes: the cut tree's depth changes every round
        def __init__(self, max_nodes):
            self.max_nodes, self.calls = max_nodes, 0

        def __call__(self, tree):
            self.calls += 1
            return min(tree.num_nodes, 1 + self.calls % 6)

        def observe(self, accepted):
            pass

    monkeypatch.setattr(distributed, "caddtree_policy", lambda target, drafter, max_nodes, **k: Cutting(max_nodes))
    torch._dynamo.reset()
    s = setup("qwen3", "sdpa")
    counter = GraphCounter()
    cc = all_devices(backend=counter.backend)
    gen = dict(assistant_model=s.drafters["random"], max_new_tokens=NEW, do_sample=False, cache_implementation="static",
               compile_config=cc, return_dict_in_generate=True, **kw)
    out = s.target.generate(s.prompt, **gen)
    assert torch.equal(out.sequences, s.ref)
    if "max_tree_budget" in kw:
        assert len(set(out.stats.tree_sizes)) >= 4  # the cut really changed from round to round
    pieces = [g for g in counter.graphs if not g.startswith("['s")]  # all but the drafter's dynamic-shape graphs
    assert sum(counter.graphs[g] for g in pieces) <= 8, counter.graphs
