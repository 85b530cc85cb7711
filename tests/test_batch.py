"""Batched DDTree: generate() on a left-padded batch is token-identical, row by row, to stock batched greedy
generate() on the same batch, and to each row decoded alone.

Matrix: Qwen3 and Llama targets x static/dynamic cache x B in {2, 3, 8} (mixed prompt lengths) x tree budgets
0-64 and the DFlash chain x with/without an EOS that ends rows in different rounds x a random drafter and an
oracle that gives long, ragged acceptances. Plus CaDDTree, D2SD and ddtree-lookup on a batch, a sliding-window
target, rows leaving the batch as they finish, output scores, a stop criterion without EOS (rows then keep
generating real tokens, as stock), per-row sampling laws, and the refusals (right padding, streamer, ...).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationMixin, StoppingCriteria
from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

import hf_ddtree
from hf_ddtree.bench.batch import left_pad as bench_left_pad
from hf_ddtree.budget import CaDDTreePolicy, LatencyModel
from hf_ddtree.decoding import speculative_decoding
from hf_ddtree.drafter import drafter_spec
from hf_ddtree.propose import DrafterState

from conftest import CACHES, OracleDrafter, build_drafter, build_target

NEW = 20
PAD = 0
LENGTHS = [7, 3, 5, 9, 4, 6, 2, 8]  # prompt lengths of rows 0..7 (a batch of B takes the first B)
MODES = {"b0": dict(tree_budget=0), "b1": dict(tree_budget=1), "b4": dict(tree_budget=4),
         "b16": dict(tree_budget=16), "b64": dict(tree_budget=64), "chain": dict()}


def stock(target, ids, **kw):
    """Stock transformers generate (bypasses the enable() patch)."""
    kw.setdefault("do_sample", False)
    return GenerationMixin.generate(target, ids, **kw)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids left-padded with PAD and the (B, P) attention mask, as a tokenizer with padding_side='left' gives."""
    return bench_left_pad([p.tolist() for p in prompts], PAD, "cpu")


class BatchOracle(OracleDrafter):
    """OracleDrafter for a batch: each row's block is predicted from the reference (prompt without padding +
    the target's continuation) whose token at the block's first position equals the row's root. It does not
    touch the drafter cache (the batched drafter-cache bookkeeping is checked against real drafters below)."""

    def __init__(self, target, references: list[list[int]], **kw):
        super().__init__(target, references[0], write_cache=False, **kw)
        self.references = references
        self.register_buffer("embed", target.get_input_embeddings().weight.detach().clone(), persistent=False)

    def forward(self, position_ids, noise_embedding=None, target_hidden=None, **kwargs):
        self.calls += 1
        q_len = noise_embedding.shape[1]
        out = []
        for b in range(noise_embedding.shape[0]):
            root = int((self.embed == noise_embedding[b, 0]).all(-1).nonzero()[0])
            p0 = int(position_ids[b, -q_len])
            ref = next((r for r in self.references if p0 < len(r) and r[p0] == root), self.references[0])
            self.reference = ref
            logits = torch.stack([self.wanted_logits(int(p)) for p in position_ids[b, -q_len:]])  # (Q, V)
            out.append(logits @ self.inverse)
        return torch.stack(out) + 0.0 * self.anchor  # (B, Q, H)


def first_steps(gen: torch.Tensor, token: int) -> list[int | None]:
    """Per row, the step at which `token` first appears in gen (B, NEW), or None."""
    out = []
    for row in gen.tolist():
        out.append(row.index(token) if token in row else None)
    return out


@functools.lru_cache(maxsize=None)
def setup(arch: str, B: int, seed: int = 0) -> SimpleNamespace:
    target = build_target(arch, "sdpa", seed=seed)
    g = torch.Generator().manual_seed(seed + 11)
    prompts = [torch.randint(1, target.config.vocab_size - 1, (n,), generator=g) for n in LENGTHS[:B]]
    ids, mask = left_pad(prompts)
    P = ids.shape[1]
    ref = stock(target, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    gen = ref[:, P:]
    # every row of the batch equals the row decoded alone (stock vs stock: the premise of "identical per row")
    for b, p in enumerate(prompts):
        assert torch.equal(stock(target, p[None], max_new_tokens=NEW, pad_token_id=PAD)[0, p.numel():], gen[b])
    # an EOS whose first occurrence differs between rows, mid-sequence for at least one: rows end in different rounds
    eos = None
    for tok in range(1, target.config.vocab_size):
        steps = first_steps(gen, tok)
        mid = [s for s in steps if s is not None and 2 <= s < NEW - 3]
        if mid and len(set(steps)) >= min(B, 3) and tok not in ids.tolist()[0][-1:]:
            eos = tok
            break
    assert eos is not None
    ref_eos = stock(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    references = [p.tolist() + gen[b].tolist() for b, p in enumerate(prompts)]
    hf_ddtree.enable(target)
    return SimpleNamespace(target=target, prompts=prompts, ids=ids, mask=mask, ref=ref, ref_eos=ref_eos, eos=eos,
                           drafters={"random": build_drafter(target, seed=seed + 1),
                                     "oracle": BatchOracle(target, references)})


def run(s, drafter, cache: str, eos: bool, **kw):
    extra = dict(eos_token_id=s.eos) if eos else {}
    kw.setdefault("max_new_tokens", NEW)
    return s.target.generate(s.ids, attention_mask=s.mask, assistant_model=drafter, do_sample=False, pad_token_id=PAD,
                             cache_implementation=cache, return_dict_in_generate=True, **extra, **kw)


def check_rows(out, s, eos: bool):
    """Per row: acceptance lengths sum to the row's new tokens (first token from the prefill), all >= 1."""
    P = s.ids.shape[1]
    assert isinstance(out.acceptance_lengths, list) and len(out.acceptance_lengths) == s.ids.shape[0]
    for b, acc in enumerate(out.acceptance_lengths):
        row = out.sequences[b, P:].tolist()
        new = row.index(s.eos) + 1 if eos and s.eos in row else len(row)
        assert sum(acc) == new - 1 and all(a >= 1 for a in acc), (b, acc, row)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_batched_greedy_is_token_identical(arch, cache):
    oracle_acc = {}
    for B in (2, 3, 8):
        s = setup(arch, B)
        for dname, drafter in s.drafters.items():
            for mode, kw in MODES.items():
                for eos in (False, True):
                    out = run(s, drafter, cache, eos, **kw)
                    expect = s.ref_eos if eos else s.ref
                    assert torch.equal(out.sequences, expect), (
                        f"B={B} {dname} {mode} eos={eos}:\n{out.sequences.tolist()}\n!=\n{expect.tolist()}")
                    check_rows(out, s, eos)
                    if dname == "oracle" and not eos:
                        oracle_acc[B, mode] = out.stats.mean_acceptance_length
    # the oracle gives long acceptances in a batch too (ragged rows, multi-node compaction per row)
    for B in (2, 3, 8):
        assert oracle_acc[B, "b64"] > 2.5 and oracle_acc[B, "b16"] > 2, oracle_acc
        assert oracle_acc[B, "b0"] == 1.0


def test_batched_rows_equal_rows_decoded_alone_by_hf_ddtree():
    s = setup("qwen3", 3)
    P = s.ids.shape[1]
    for dname, drafter in s.drafters.items():
        out = run(s, drafter, "static", False, tree_budget=16)
        for b, p in enumerate(s.prompts):
            alone = s.target.generate(p[None], assistant_model=drafter, do_sample=False, max_new_tokens=NEW,
                                      tree_budget=16, pad_token_id=PAD)
            assert torch.equal(alone[0, p.numel():], out.sequences[b, P:]), (dname, b)


def test_batched_methods_caddtree_d2sd_lookup():
    s = setup("llama", 3)
    prefix_drafter = build_drafter(s.target, seed=7, num_hidden_layers=1)
    latency = LatencyModel.from_points([0, 4, 16, 64], [0.010, 0.012, 0.018, 0.05], t_draft=0.004)
    for eos in (False, True):
        expect = s.ref_eos if eos else s.ref
        for cache in CACHES:
            extra = dict(eos_token_id=s.eos) if eos else {}
            common = dict(attention_mask=s.mask, do_sample=False, pad_token_id=PAD, cache_implementation=cache,
                          max_new_tokens=NEW, **extra)
            for dname, drafter in s.drafters.items():
                policy = CaDDTreePolicy(latency, 32)
                out = stock(s.target, s.ids, custom_generate=functools.partial(
                    speculative_decoding, drafter=drafter, method="auto", tree_budget=32, budget_policy=policy), **common)
                assert torch.equal(out, expect), ("caddtree", dname, cache, eos)
                assert len(policy.budgets) > 0 and max(policy.budgets) > 0
                out = s.target.generate(s.ids, assistant_model=drafter, method="ddtree-lookup", tree_budget=16, **common)
                assert torch.equal(out, expect), ("lookup", dname, cache, eos)
            for method in ("d2sd", "d2sd-tree"):
                out = s.target.generate(s.ids, assistant_model=(s.drafters["random"], prefix_drafter), method=method,
                                        tree_budget=16, **common)
                assert torch.equal(out, expect), (method, cache, eos)


def test_batched_sliding_window_target():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=256,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    target = MistralForCausalLM._from_config(cfg, attn_implementation="sdpa").float().eval()
    g = torch.Generator().manual_seed(4)
    ids, mask = left_pad([torch.randint(1, 63, (n,), generator=g) for n in (6, 2, 9)])
    ref = stock(target, ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD)
    hf_ddtree.enable(target)
    drafter = build_drafter(target, seed=2)
    for cache in CACHES:
        for kw in (dict(tree_budget=8), dict()):
            out = target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=16,
                                  pad_token_id=PAD, cache_implementation=cache, **kw)
            assert torch.equal(out, ref), (cache, kw)


def test_finished_rows_leave_the_forwards():
    """Once a row has hit EOS it is not in any later target or drafter forward."""
    s = setup("qwen3", 3)
    rows_seen = []
    hook = s.target.register_forward_pre_hook(lambda m, args, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                              with_kwargs=True)
    try:
        out = run(s, s.drafters["random"], "static", True, tree_budget=4)
    finally:
        hook.remove()
    assert torch.equal(out.sequences, s.ref_eos)
    P = s.ids.shape[1]
    ends = [row.index(s.eos) if s.eos in row else None for row in s.ref_eos[:, P:].tolist()]
    assert any(e is not None for e in ends)
    assert rows_seen[0] == 3 and min(rows_seen) < 3  # the prefill had every row; later rounds fewer
    assert rows_seen == sorted(rows_seen, reverse=True)  # a row never comes back


def test_batched_scores_and_logits_match_stock():
    s = setup("llama", 3)
    kw = dict(attention_mask=s.mask, pad_token_id=PAD, max_new_tokens=NEW, eos_token_id=s.eos, output_scores=True,
              output_logits=True, return_dict_in_generate=True)
    ref = stock(s.target, s.ids, **kw)
    out = s.target.generate(s.ids, assistant_model=s.drafters["oracle"], tree_budget=16, do_sample=False, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == len(out.logits)
    P = s.ids.shape[1]
    for b in range(3):
        row = ref.sequences[b, P:].tolist()
        live = row.index(s.eos) + 1 if s.eos in row else len(row)
        for t in range(len(ref.scores)):
            if t < live:  # the row's own steps: the target's scores, as stock computed them
                torch.testing.assert_close(out.scores[t][b], ref.scores[t][b], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(out.logits[t][b], ref.logits[t][b].float(), rtol=1e-4, atol=1e-4)
            else:  # finished: the pad is certain
                assert int(out.scores[t][b].argmax()) == PAD and float(out.scores[t][b, PAD]) == 0.0
    assert getattr(out, "cache", getattr(out, "past_key_values", None)) is None  # no stock-layout cache for B > 1


class _StopAfterToken(StoppingCriteria):
    """A stop criterion without `eos_token_id`: stock then keeps appending real tokens to finished rows."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stop_criterion_without_eos_keeps_rows_generating_like_stock():
    s = setup("qwen3", 3)
    crit = lambda: [_StopAfterToken(s.eos)]  # noqa: E731
    common = dict(attention_mask=s.mask, max_new_tokens=NEW, pad_token_id=PAD)
    ref = stock(s.target, s.ids, stopping_criteria=crit(), **common)
    P = s.ids.shape[1]
    # the premise: some row stopped before the last step and stock kept appending real (non-pad) tokens to it
    assert any(s.eos in row[:-1] and row[row.index(s.eos) + 1:] != [PAD] * (len(row) - row.index(s.eos) - 1)
               for row in ref[:, P:].tolist()), ref.tolist()
    for dname, drafter in s.drafters.items():
        for kw in (dict(tree_budget=16), dict()):
            out = s.target.generate(s.ids, assistant_model=drafter, do_sample=False, stopping_criteria=crit(), **common,
                                    **kw)
            assert torch.equal(out, ref), (dname, kw, out.tolist(), ref.tolist())


def test_batched_drafter_cache_equals_rows_drafted_alone():
    """DrafterState.draft_rows over ragged rows (different context lengths per round) gives each row the
    log-probs that row's own DrafterState gives it, round after round, and select() drops rows cleanly."""
    torch.manual_seed(0)
    target = build_target("qwen3", "sdpa")
    drafter = build_drafter(target, seed=5)
    spec = drafter_spec(drafter)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    F = drafter.fc.in_features
    g = torch.Generator().manual_seed(1)
    B, bs = 3, spec.block_size
    batched = DrafterState(drafter, spec, embed, head)
    singles = [DrafterState(drafter, spec, embed, head) for _ in range(B)]
    past = torch.tensor([5, 2, 7])  # prompt lengths: the first context
    rows = list(range(B))
    for step, news in enumerate([[5, 2, 7], [1, 3, 2], [4, 1, 1], [2, 2, 3]]):
        if step == 3:  # row 1 finished: it leaves the batch
            rows = [0, 2]
            batched.select([0, 2])
            past = past[[0, 2]]
            news = [news[0], news[2]]
        ctx = [torch.randn(n, F, generator=g) for n in news]
        C = max(news)
        context = torch.zeros(len(rows), C, F)
        for i, c in enumerate(ctx):
            context[i, :c.shape[0]] = c
        if step > 0:
            past = past + torch.tensor(news)
        blocks = torch.full((len(rows), 1, bs), spec.mask_token_id)
        blocks[:, 0, 0] = torch.randint(0, 63, (len(rows),), generator=g)
        lp = batched.draft_rows(blocks, context, past, torch.tensor(news))  # (B, 1, bs-1, V)
        for i, r in enumerate(rows):
            one = singles[r].draft(blocks[i], ctx[i][None], int(past[i]))  # (1, bs-1, V)
            torch.testing.assert_close(lp[i], one, rtol=1e-4, atol=1e-5)


def test_batch_refusals():
    s = setup("qwen3", 2)
    d = s.drafters["random"]
    right = s.mask.flip(-1)  # right padding
    with pytest.raises(ValueError, match="left padding"):
        s.target.generate(s.ids, attention_mask=right, assistant_model=d, max_new_tokens=4, pad_token_id=PAD)
    holes = s.mask.clone()
    holes[0, -2] = 0
    with pytest.raises(ValueError, match="left padding"):
        s.target.generate(s.ids, attention_mask=holes, assistant_model=d, max_new_tokens=4, pad_token_id=PAD)
    from transformers.generation.streamers import BaseStreamer

    class _Collect(BaseStreamer):  # a streamer that does not check the batch itself (TextStreamer does)
        def put(self, value):
            pass

        def end(self):
            pass

    with pytest.raises(ValueError, match="streamer takes one sequence"):
        s.target.generate(s.ids, attention_mask=s.mask, assistant_model=d, max_new_tokens=4, pad_token_id=PAD,
                          streamer=_Collect())
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn"):
        s.target.generate(s.ids, attention_mask=s.mask, assistant_model=d, max_new_tokens=4, pad_token_id=PAD,
                          prefix_allowed_tokens_fn=lambda b, ids: [1, 2])


def _exact_row_law(target, prompt: torch.Tensor, padded: torch.Tensor, procs, V: int, new: int) -> torch.Tensor:
    """(V**new,) float64 law of a row's new tokens: the model sees the unpadded prompt, the processors the
    padded row (what stock passes them for that row)."""
    import itertools

    cells = torch.tensor(list(itertools.product(range(V), repeat=new)))
    prob = torch.ones(cells.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for j in range(new):
            seqs = torch.cat([prompt.expand(cells.shape[0], -1), cells[:, :j]], dim=1)
            logits = target(input_ids=seqs, use_cache=False).logits[:, -1].float()
            pseqs = torch.cat([padded.expand(cells.shape[0], -1), cells[:, :j]], dim=1)
            law = torch.softmax(procs(pseqs, logits).double(), dim=-1)
            prob *= law[torch.arange(cells.shape[0]), cells[:, j]]
    return prob


def test_batched_sampling_follows_each_rows_law():
    from test_sampling import ALPHA, chi_square_pvalue

    V, new, n = 8, 3, 300
    target = build_target("qwen3", "sdpa", vocab=V, hidden=32, layers=2, logit_scale=2.0, seed=1)
    prompts = [torch.tensor([1, 5, 2, 6]), torch.tensor([3, 7])]
    ids, mask = left_pad(prompts)
    import inspect

    # the penalty as stock builds it for row b: from transformers 5.23 it ignores the row's left padding
    ignores = "prompt_ignore_length" in inspect.signature(RepetitionPenaltyLogitsProcessor).parameters

    def procs_for(b):
        pen = RepetitionPenaltyLogitsProcessor(3.0, prompt_ignore_length=int((mask[b] == 0).sum())) if ignores else \
            RepetitionPenaltyLogitsProcessor(3.0)
        return LogitsProcessorList([pen, TemperatureLogitsWarper(0.8)])

    wrong = LogitsProcessorList([TemperatureLogitsWarper(0.8)])
    laws = [_exact_row_law(target, p[None], ids[b:b + 1], procs_for(b), V, new) for b, p in enumerate(prompts)]
    bad = [_exact_row_law(target, p[None], ids[b:b + 1], wrong, V, new) for b, p in enumerate(prompts)]
    hf_ddtree.enable(target)
    drafter = build_drafter(target, block_size=4, seed=4)
    counts = torch.zeros(2, V ** new, dtype=torch.float64)
    torch.manual_seed(0)
    for _ in range(n):
        out = target.generate(ids, attention_mask=mask, assistant_model=drafter, tree_budget=8, do_sample=True,
                              temperature=0.8, top_k=0, repetition_penalty=3.0, max_new_tokens=new, pad_token_id=PAD)
        for b in range(2):
            toks = out[b, ids.shape[1]:].tolist()
            counts[b, sum(t * V ** (new - 1 - i) for i, t in enumerate(toks))] += 1
    for b in range(2):
        stat, df, p = chi_square_pvalue(counts[b], laws[b])
        assert p > ALPHA, f"row {b}: chi2={stat:.1f} df={df} p={p:.2e}"
        _, _, p_bad = chi_square_pvalue(counts[b], bad[b])
        assert p_bad < ALPHA, f"row {b}: no power (p={p_bad:.2e})"


def test_batch_at_max_length_returns_the_prompts():
    """The loop called with the prompts already at max_length (generate() refuses that itself on newer
    transformers): the prompts come back, with no scores and no rounds."""
    from transformers import GenerationConfig
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    s = setup("qwen3", 2)
    cfg = GenerationConfig(max_length=s.ids.shape[1], pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    out = speculative_decoding(s.target, s.ids, None, StoppingCriteriaList(), cfg, drafter=s.drafters["random"],
                               tree_budget=4, attention_mask=s.mask)
    assert torch.equal(out.sequences, s.ids) and out.scores == () and out.acceptance_lengths == [[], []]
