"""Multi-turn chat on a carried cache, as stock generate() does it: `past_key_values=` a cache whose
tokens are a prefix of input_ids, only the rest prefilled; the returned DynamicCache carried to the
next turn, or the user's own StaticCache passed on every turn (used, never replaced); the cache
hf_ddtree returns carries the drafter's context, so later turns draft exactly as after a full re-read;
a stock cache (no drafter context) gives the same tokens; caches that cannot match are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, StaticCache

import hf_ddtree
from hf_ddtree.compat import CACHE_FIELD

from conftest import build_drafter, build_target

TURNS = [torch.tensor([[12, 40, 3, 33, 7, 50, 21]]), torch.tensor([[5, 9, 17]]), torch.tensor([[30, 2, 44, 8]])]
NEW = 12
METHODS = [("ddtree", dict(tree_budget=8)), ("ddtree-lookup", dict(tree_budget=8)), ("dflash", dict()),
           ("d2sd-tree", dict(tree_budget=8))]


@pytest.fixture(scope="module")
def pair():
    target = hf_ddtree.enable(build_target("qwen3", "sdpa", seed=11))
    return target, build_drafter(target, seed=3), build_drafter(target, seed=4, block_size=12)


def assistant(pair, method):
    """The assistant_model argument for `method`: D2SD takes (drafter, variable-prefix drafter)."""
    return (pair[1], pair[2]) if method.startswith("d2sd") else pair[1]


class Prefills:
    """Token counts of every forward of the target's decoder (the first of a generate() call is its prefill)."""

    def __init__(self, target):
        self.lengths: list[int] = []
        self.handle = target.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.lengths.append(kwargs["input_ids"].shape[1])

    def first(self) -> int:
        n, self.lengths = self.lengths[0], []
        return n


class DrafterOutputs:
    """The drafter's output hidden states, call by call."""

    def __init__(self, drafter):
        self.outputs: list[torch.Tensor] = []
        self.handle = drafter.register_forward_hook(lambda m, a, out: self.outputs.append(out.detach().clone()))

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out


def cache_of(out):
    return getattr(out, CACHE_FIELD)


def conversation(generate, cache_kind: str):
    """Three turns: each input is the previous output plus the next user message; the cache carried
    (dynamic: the returned one; static: one StaticCache allocated up front and passed every turn).
    Returns per turn (sequences, prefill length, output)."""
    cache = StaticCache(config=generate.target.config, max_cache_len=160) if cache_kind == "static" else None
    ids, turns = None, []
    for msg in TURNS:
        ids = msg if ids is None else torch.cat([ids, msg], dim=1)
        kw = {} if cache is None else {CACHE_FIELD: cache}
        out = generate(ids, **kw)
        turns.append((out.sequences, generate.prefills.first(), out))
        if cache_kind == "static":
            assert cache_of(out) is cache  # the user's cache, used (not replaced)
        else:
            cache = cache_of(out)
        assert int(cache.get_seq_length()) == out.sequences.shape[1] - 1  # every token but the last, like stock
        ids = out.sequences
    return turns


class Call:
    def __init__(self, target, prefills, **kw):
        self.target, self.prefills, self.kw = target, prefills, kw

    def __call__(self, ids, **extra):
        return self.target.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                    **self.kw, **extra)


class Stock(Call):
    def __call__(self, ids, **extra):
        return GenerationMixin.generate(self.target, ids, max_new_tokens=NEW, do_sample=False,
                                        return_dict_in_generate=True, **extra)


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
@pytest.mark.parametrize("method,mode", METHODS, ids=[m for m, _ in METHODS])
def test_three_turns_match_stock_and_prefill_only_new_tokens(pair, cache_kind, method, mode):
    target, drafter = pair[:2]
    prefills = Prefills(target)
    seen = DrafterOutputs(drafter)
    try:
        want = conversation(Stock(target, prefills), cache_kind)
        ours = Call(target, prefills, assistant_model=assistant(pair, method), method=method, **mode)
        got = conversation(ours, cache_kind)
        carried = seen.take()
        for turn, ((w_ids, w_pre, _), (g_ids, g_pre, g_out)) in enumerate(zip(want, got)):
            assert torch.equal(g_ids, w_ids), (turn, g_ids, w_ids)
            assert g_pre == w_pre, (turn, g_pre, w_pre)  # turn 1: the prompt; then only the new tokens
        assert [p for _, p, _ in got] == [TURNS[0].shape[1], TURNS[1].shape[1] + 1, TURNS[2].shape[1] + 1]
        # the same turns from a full re-read (no cache): the drafter sees the same context, so it drafts the same
        reread = [ours(ids) for ids in _turn_inputs(want)]
        fresh = seen.take()
        assert len(fresh) == len(carried)
        for a, b in zip(carried, fresh):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        for (_, _, g_out), r in zip(got, reread):
            assert torch.equal(r.sequences, g_out.sequences)
            assert r.acceptance_lengths == g_out.acceptance_lengths
    finally:
        prefills.handle.remove()
        seen.handle.remove()


def _turn_inputs(turns):
    """Each turn's input ids: the previous turn's output plus the next message."""
    ids = [TURNS[0]]
    for (out, _, _), msg in zip(turns, TURNS[1:]):
        ids.append(torch.cat([out, msg], dim=1))
    return ids


@pytest.mark.parametrize("method,mode", METHODS, ids=[m for m, _ in METHODS])
def test_stock_cache_continues_and_ours_continues_in_stock(pair, method, mode):
    """A cache from stock generate() (no drafter context) gives the same tokens; our returned cache is a
    plain cache stock generate() can go on from."""
    target = pair[0]
    ours = Call(target, Prefills(target), assistant_model=assistant(pair, method), method=method, **mode)
    stock = Stock(target, ours.prefills)
    try:
        first = stock(TURNS[0])
        ids = torch.cat([first.sequences, TURNS[1]], dim=1)
        want = stock(ids, **{CACHE_FIELD: cache_of(stock(TURNS[0]))})
        ours.prefills.lengths = []
        got = ours(ids, **{CACHE_FIELD: cache_of(first)})
        assert ours.prefills.first() == TURNS[1].shape[1] + 1
        assert torch.equal(got.sequences, want.sequences)
        # and back: stock generate() continues from the cache hf_ddtree returned
        ids3 = torch.cat([got.sequences, TURNS[2]], dim=1)
        again = stock(ids3, **{CACHE_FIELD: cache_of(got)})
        assert torch.equal(again.sequences, stock(ids3).sequences)
    finally:
        ours.prefills.handle.remove()


def test_returned_static_cache_grows_for_the_next_turn(pair):
    """The StaticCache hf_ddtree made itself (sized for turn 1) is enlarged in place when turn 2 needs more."""
    target, drafter = pair[:2]
    out = target.generate(TURNS[0], assistant_model=drafter, tree_budget=8, max_new_tokens=4, do_sample=False,
                          return_dict_in_generate=True, cache_implementation="static")
    cache = cache_of(out)
    assert isinstance(cache, StaticCache)
    small = cache.layers[0].max_cache_len
    ids = torch.cat([out.sequences, TURNS[1]], dim=1)
    more = target.generate(ids, assistant_model=drafter, tree_budget=8, max_new_tokens=3 * NEW, do_sample=False,
                           return_dict_in_generate=True, **{CACHE_FIELD: cache})
    assert cache_of(more) is cache and cache.layers[0].max_cache_len > small
    assert torch.equal(more.sequences, GenerationMixin.generate(target, ids, max_new_tokens=3 * NEW, do_sample=False))


def test_sampling_on_a_carried_cache_runs_and_keeps_the_cache_consistent(pair):
    target, drafter = pair[:2]
    torch.manual_seed(0)
    out = target.generate(TURNS[0], assistant_model=drafter, tree_budget=8, max_new_tokens=NEW, do_sample=True,
                          return_dict_in_generate=True)
    ids = torch.cat([out.sequences, TURNS[1]], dim=1)
    more = target.generate(ids, assistant_model=drafter, tree_budget=8, max_new_tokens=NEW, do_sample=True,
                           return_dict_in_generate=True, **{CACHE_FIELD: cache_of(out)})
    assert torch.equal(more.sequences[:, :ids.shape[1]], ids)
    # the cache holds the K/V of exactly these tokens: a greedy turn on top matches a fresh greedy run
    ids3 = torch.cat([more.sequences, TURNS[2]], dim=1)
    last = target.generate(ids3, assistant_model=drafter, tree_budget=8, max_new_tokens=NEW, do_sample=False,
                           **{CACHE_FIELD: cache_of(more)})
    assert torch.equal(last, GenerationMixin.generate(target, ids3, max_new_tokens=NEW, do_sample=False))


# ---- refusals ---------------------------------------------------------------------------------------

def test_a_cache_that_is_not_a_prefix_of_input_ids_is_refused(pair):
    target, drafter = pair[:2]
    out = target.generate(TURNS[0], assistant_model=drafter, tree_budget=8, max_new_tokens=NEW, do_sample=False,
                          return_dict_in_generate=True)
    wrong = out.sequences.clone()
    wrong[0, 3] = (int(wrong[0, 3]) + 1) % target.config.vocab_size
    with pytest.raises(ValueError, match=r"does not match input_ids: .*input_ids\[0, 3\]"):
        target.generate(torch.cat([wrong, TURNS[1]], 1), assistant_model=drafter, tree_budget=8, max_new_tokens=4,
                        **{CACHE_FIELD: cache_of(out)})
    with pytest.raises(ValueError, match=r"holds \d+ tokens but input_ids has \d+"):
        target.generate(TURNS[0], assistant_model=drafter, tree_budget=8, max_new_tokens=4,
                        **{CACHE_FIELD: cache_of(out)})


def test_a_user_static_cache_too_small_is_refused_not_replaced(pair):
    target, drafter = pair[:2]
    cache = StaticCache(config=target.config, max_cache_len=16)
    with pytest.raises(ValueError, match=r"max_cache_len=16, but this call needs \d+ slots"):
        target.generate(TURNS[0], assistant_model=drafter, tree_budget=8, max_new_tokens=NEW,
                        **{CACHE_FIELD: cache})
    assert int(cache.get_seq_length()) == 0


def test_a_sliding_window_cache_and_a_batch_are_refused(pair):
    from test_sliding_window import build_family_target

    target = hf_ddtree.enable(build_family_target("mistral"))
    drafter = build_drafter(target)
    for cache in (StaticCache(config=target.config, max_cache_len=128), DynamicCache(config=target.config)):
        with pytest.raises(ValueError, match="full-length key/value layer per decoder layer"):
            target.generate(TURNS[0], assistant_model=drafter, tree_budget=8, max_new_tokens=4, **{CACHE_FIELD: cache})
    # the full-length cache hf_ddtree returns for it carries on
    out = target.generate(TURNS[0], assistant_model=drafter, tree_budget=8, max_new_tokens=NEW, do_sample=False,
                          return_dict_in_generate=True)
    ids = torch.cat([out.sequences, TURNS[1]], dim=1)
    more = target.generate(ids, assistant_model=drafter, tree_budget=8, max_new_tokens=NEW, do_sample=False,
                           **{CACHE_FIELD: cache_of(out)})
    assert torch.equal(more, GenerationMixin.generate(target, ids, max_new_tokens=NEW, do_sample=False))
    t, d = pair[:2]
    with pytest.raises(ValueError, match="past_key_values with a batch of 2"):
        t.generate(torch.cat([TURNS[0]] * 2), assistant_model=d, tree_budget=8, max_new_tokens=4,
                   **{CACHE_FIELD: DynamicCache()})
