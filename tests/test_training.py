"""DFlash drafter training on a tiny Qwen3 target: features cache, the packed objective, resume, CLI, lossless decode."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache

import hf_ddtree
from hf_ddtree.drafter import DFlashDraftModel
from hf_ddtree.training import cli as train_cli
from hf_ddtree.training.features import FeatureStore, extract_features, target_features
from hf_ddtree.training.train import (
    IGNORE,
    TrainConfig,
    build_drafter,
    decay_weight,
    default_gamma,
    drafter_forward,
    head_shortlist,
    make_blocks,
    restrict_head,
    standardize_fc,
    feature_rms,
    sample_anchors,
    sample_prefix_lens,
    split_train_val,
    teacher_targets,
    token_counts,
    train_drafter,
    weighted_ce_sum,
)

LAYERS = [0, 2]
BS = 8
MASK = 127
PROMPT_LEN, NEW_TOKENS, N_RECORDS = 6, 40, 10


def _tiny_target(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # a random init is near-uniform; make it peaked and token-driven like a trained LM
        model.model.embed_tokens.weight.mul_(4.0)
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def target():
    return _tiny_target()


@pytest.fixture(scope="module")
def records(target):
    """Prompts answered greedily BY THE TARGET ITSELF (one batched generate)."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, 127, (N_RECORDS, PROMPT_LEN), generator=g)
    out = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False)
    return [{"id": f"r{i}", "prompt_ids": prompts[i].tolist(), "response_ids": out[i, PROMPT_LEN:].tolist(),
             "mode": "greedy", "source": "test"} for i in range(N_RECORDS)]


@pytest.fixture(scope="module")
def store(target, records, tmp_path_factory):
    d = tmp_path_factory.mktemp("features")
    extract_features(target, records, d, LAYERS, shard_tokens=150, progress=False)
    return FeatureStore(d, layer_ids=LAYERS)


@pytest.fixture(scope="module")
def trained(target, store, tmp_path_factory):
    """40 steps from a fresh init (fp32): (out_dir, TrainResult)."""
    out = tmp_path_factory.mktemp("run")
    train_idx, val_idx = split_train_val(store.ids, 0.2)
    drafter = build_drafter(target, num_layers=1, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                            init_from_target=False, seed=0)
    cfg = TrainConfig(block_size=BS, anchors_per_seq=16, batch_tokens=256, steps=40, lr=1e-2, warmup_steps=3,
                      bf16=False, eval_every=20, save_every=0, log_every=5, progress=False)
    result = train_drafter(target, drafter, store, out, cfg, train_idx=train_idx, val_idx=val_idx)
    print(f"\ntiny drafter training throughput: {result.tokens_per_s:.0f} block tok/s "
          f"({torch.get_num_threads()} threads, fp32), val {result.val}")
    return out, result


# ---- features ---------------------------------------------------------------------------------

def test_features_roundtrip_resume_and_refusal(target, records, store, tmp_path):
    assert len(store) == N_RECORDS and len(store.index["shards"]) > 1
    for i in (0, 3, N_RECORDS - 1):
        feats, ids, plen = store.get(i)
        rec = records[i]
        assert ids.tolist() == rec["prompt_ids"] + rec["response_ids"] and plen == PROMPT_LEN
        with torch.no_grad():
            out = target(ids[None], output_hidden_states=True)
        fresh = torch.cat([out.hidden_states[l + 1][0] for l in LAYERS], -1)
        assert feats.dtype == torch.bfloat16 and feats.shape == (ids.shape[0], len(LAYERS) * 64)
        torch.testing.assert_close(feats.float(), fresh.to(torch.bfloat16).float(), rtol=0, atol=0)
        assert torch.equal(feats, target_features(target, ids, LAYERS).to(torch.bfloat16))

    d = tmp_path / "f"
    extract_features(target, records[:4], d, LAYERS, progress=False)
    again = extract_features(target, records, d, LAYERS, progress=False)  # resumes: only the 6 new ones
    assert again["last_run"]["records"] == N_RECORDS - 4 and len(again["records"]) == N_RECORDS
    assert extract_features(target, records, d, LAYERS, progress=False)["last_run"]["records"] == 0
    with pytest.raises(ValueError, match="layers"):
        extract_features(target, records, d, [1, 2], progress=False)
    with pytest.raises(ValueError, match="another target model"):
        extract_features(_tiny_target(seed=5), records, d, LAYERS, progress=False)
    with pytest.raises(ValueError, match="layers"):
        FeatureStore(d, layer_ids=[0, 3])
    changed = [{**records[0], "response_ids": records[0]["response_ids"][:-1]}]
    with pytest.raises(ValueError, match="other tokens"):
        extract_features(target, changed, d, LAYERS, progress=False)


# ---- the objective ----------------------------------------------------------------------------

@pytest.mark.parametrize("attn,prefix", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_training_forward_equals_inference(target, store, attn, prefix):
    """Block k of one packed training forward == the drafter called as decoding.py calls it."""
    drafter = build_drafter(target, num_layers=2, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                            init_from_target=False, seed=3).eval()
    drafter.set_attn_implementation(attn)
    embed = target.get_input_embeddings()
    feats, ids, plen = store.get(2)
    T = ids.shape[0]
    anchors = torch.tensor([plen, plen + 5, plen + 11, T - 5, T - 2])  # the last two blocks are clipped
    g = torch.Generator().manual_seed(0)
    prefix_lens = sample_prefix_lens(T, anchors, BS, g) if prefix else None
    blocks = make_blocks(ids, anchors, BS, MASK, prefix_lens)
    with torch.no_grad():
        packed = drafter_forward(drafter, embed, feats, blocks).view(len(anchors), BS, -1)
        for k, a in enumerate(anchors.tolist()):
            noise = torch.full((1, BS), MASK, dtype=torch.long)
            noise[0, 0] = ids[a]
            if prefix:
                p = int(prefix_lens[k])
                noise[0, 1:p + 1] = ids[a + 1:a + p + 1]
            ref = drafter(position_ids=torch.arange(0, a + BS)[None], noise_embedding=embed(noise),
                          target_hidden=feats[:a][None], past_key_values=DynamicCache(), use_cache=True,
                          is_causal=False)[0]
            torch.testing.assert_close(packed[k], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(target.lm_head(packed[k]), target.lm_head(ref), rtol=1e-4, atol=1e-4)


def test_blocks_labels_and_prefix_mode():
    ids = torch.arange(100, 120)  # T = 20
    anchors = torch.tensor([4, 10, 17])
    b = make_blocks(ids, anchors, BS, MASK)
    lab = b.labels.view(3, BS)
    assert (lab[:, 0] == IGNORE).all()
    assert lab[0, 1:].tolist() == list(range(105, 112))
    assert lab[2].tolist() == [IGNORE, 118, 119] + [IGNORE] * 5  # clipped at the end of the sequence
    assert b.block_ids.view(3, BS)[:, 1:].eq(MASK).all() and b.block_ids.view(3, BS)[:, 0].tolist() == [104, 110, 117]
    assert b.position_ids.tolist() == list(range(20)) + [p for a in (4, 10, 17) for p in range(a, a + BS)]
    assert b.allowed.shape == (3 * BS, 20 + 3 * BS)
    assert b.allowed[BS, :20].tolist() == [True] * 10 + [False] * 10  # block 1 sees context < 10 ...
    assert b.allowed[BS, 20:].tolist() == [False] * BS + [True] * BS + [False] * BS  # ... and its own block

    pre = make_blocks(ids, anchors, BS, MASK, torch.tensor([0, 3, 1]))
    blk, lab = pre.block_ids.view(3, BS), pre.labels.view(3, BS)
    assert blk[1].tolist() == [110, 111, 112, 113] + [MASK] * 4
    assert lab[1].tolist() == [IGNORE] * 4 + [114, 115, 116, 117]  # only masked positions are labelled
    w = decay_weight(pre.distance, default_gamma(BS)).view(3, BS) * (lab != IGNORE)
    assert w[1, 4] == 1.0 and w[1, :4].eq(0).all() and (w[1, 5:] < w[1, 4:7]).all()

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = sample_anchors(20, 6, 32, g)
        assert a.min() >= 6 and a.max() <= 18 and len(a) == 13
        p = sample_prefix_lens(20, a, BS, g)
        assert (p >= 0).all() and (p <= BS - 2).all() and (a + p + 1 <= 19).all()
    assert default_gamma(16) == 7.0
    assert split_train_val([f"x{i}" for i in range(30)], 0.1) == split_train_val([f"x{i}" for i in range(30)], 0.1)


def test_init_from_target_copies_top_layers(target):
    d = build_drafter(target, num_layers=2, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                      init_from_target=True)
    for i, src in ((0, 2), (1, 3)):
        assert torch.equal(d.layers[i].self_attn.q_proj.weight, target.model.layers[src].self_attn.q_proj.weight)
        assert torch.equal(d.layers[i].mlp.down_proj.weight, target.model.layers[src].mlp.down_proj.weight)
    assert torch.equal(d.norm.weight, target.model.norm.weight)


# ---- training ---------------------------------------------------------------------------------

def test_loss_falls_and_logs(trained):
    out, result = trained
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    lines = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    vals = [l["val"] for l in lines if "val" in l and l.get("val")]
    assert vals and len(vals[-1]["acc"]) == BS - 1 and vals[-1]["tau"] >= 1.0
    assert any("tok_per_s" in l and "lr" in l for l in lines)
    assert (out / "final" / "train_log.jsonl").exists()


def test_shortlisted_head_equals_full_softmax_when_it_covers_the_vocab(target, store):
    counts = token_counts(store, range(len(store)), 128)
    assert int(counts.sum()) == sum(store.input_ids(i).numel() - store.prompt_len(i) for i in range(len(store)))
    top = head_shortlist(counts, 5)
    assert top.tolist() == sorted(top.tolist()) and set(top.tolist()) <= set(counts.topk(5).indices.tolist()) | {
        int(i) for i in (counts == counts.topk(5).values[-1]).nonzero()}
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 16, generator=g)
    h = torch.randn(30, 16, generator=g)
    y = torch.randint(0, 128, (30,), generator=g)
    y[::4] = IGNORE
    wt = torch.rand(30, generator=g)
    full = weighted_ce_sum(h, w, y, wt)
    sub_w, (sub_y,) = restrict_head(w, torch.arange(128), [y])
    assert torch.allclose(weighted_ce_sum(h, sub_w, sub_y, wt), full)
    # a small shortlist keeps every label (re-indexed onto the same rows) and gives a smaller loss
    sub_w, (sub_y,) = restrict_head(w, torch.tensor([3, 7]), [y])
    m = y != IGNORE
    assert torch.equal(sub_w[sub_y[m]], w[y[m]]) and torch.equal(sub_y == IGNORE, ~m)
    assert sub_w.shape[0] == len(set(y[m].tolist()) | {3, 7})
    assert weighted_ce_sum(h, sub_w, sub_y, wt) < full
    # random negatives: `negatives` more rows from outside shortlist ∪ labels, reproducible by generator
    base_rows = len(set(y[m].tolist()) | {3, 7})
    neg_w, (neg_y,) = restrict_head(w, torch.tensor([3, 7]), [y], 10, torch.Generator().manual_seed(5))
    again, _ = restrict_head(w, torch.tensor([3, 7]), [y], 10, torch.Generator().manual_seed(5))
    assert neg_w.shape[0] == base_rows + 10 and torch.equal(neg_w, again)
    assert torch.equal(neg_w[neg_y[m]], w[y[m]])


def test_standardize_fc_equalises_feature_channels(target, store):
    rms = feature_rms(store, range(len(store)))
    f = torch.cat([store.features(i).float() for i in range(len(store))])
    assert torch.allclose(rms, f.pow(2).mean(0).sqrt(), rtol=1e-5)
    d = build_drafter(target, num_layers=1, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                      init_from_target=False)
    before = d.fc.weight.detach().clone()
    standardize_fc(d, rms)
    ratio = d.fc.weight.detach() * rms[None] / before  # the same factor for every input column
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-4)
    scale = (d.fc.weight.detach() / before)[0]  # per-column factor, proportional to 1/rms
    assert torch.allclose(scale.pow(2).mean(), torch.tensor(1.0), rtol=1e-4)  # fc keeps its default magnitude
    with pytest.raises(ValueError, match="channels"):
        standardize_fc(d, rms[:-1])


def test_loss_falls_with_a_shortlisted_head(target, store, tmp_path):
    train_idx, val_idx = split_train_val(store.ids, 0.2)
    drafter = build_drafter(target, num_layers=1, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                            init_from_target=False, seed=0)
    cfg = TrainConfig(block_size=BS, anchors_per_seq=16, batch_tokens=256, steps=30, lr=1e-2, warmup_steps=3,
                      head_vocab=16, eval_every=0, save_every=0, progress=False)
    result = train_drafter(target, drafter, store, tmp_path, cfg, train_idx=train_idx, val_idx=[])
    assert sum(result.losses[-5:]) / 5 < 0.6 * sum(result.losses[:3]) / 3


def test_resume_reproduces_uninterrupted_run(target, store, tmp_path):
    cfg = TrainConfig(block_size=BS, anchors_per_seq=8, batch_tokens=128, steps=6, lr=5e-3, warmup_steps=2,
                      bf16=True, eval_every=0, save_every=3, progress=False)

    def fresh():
        return build_drafter(target, num_layers=1, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                             init_from_target=True, seed=7)

    full = fresh()
    ref = train_drafter(target, full, store, tmp_path / "a", cfg)
    part = fresh()
    first = train_drafter(target, part, store, tmp_path / "b", cfg, stop_after=3)
    assert first.step == 3 and first.final_dir is None and (tmp_path / "b" / "checkpoint-last").exists()
    resumed_model = fresh()
    rest = train_drafter(target, resumed_model, store, tmp_path / "b", cfg, resume=True)
    assert rest.step == 6 and rest.losses == ref.losses[3:] and first.losses == ref.losses[:3]
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(p, q), n


def test_prefix_mode_saves_variable_prefix(target, store, tmp_path):
    drafter = build_drafter(target, num_layers=1, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                            prefix_mode=True)
    cfg = TrainConfig(block_size=BS, anchors_per_seq=8, batch_tokens=128, steps=2, bf16=False, prefix_mode=True,
                      eval_every=0, save_every=0, progress=False)
    res = train_drafter(target, drafter, store, tmp_path, cfg)
    loaded = DFlashDraftModel.from_pretrained(res.final_dir)
    assert loaded.config.dflash_config["variable_prefix"] is True
    assert loaded.config.dflash_config["target_layer_ids"] == LAYERS


def test_trained_drafter_decodes_losslessly(target, records, trained):
    out, _ = trained
    drafter = DFlashDraftModel.from_pretrained(out / "final").eval()
    assert drafter.block_size == BS and drafter.mask_token_id == MASK
    hf_ddtree.enable(target)
    try:
        for prompt in (records[0]["prompt_ids"], records[7]["prompt_ids"], [5, 9, 33, 2]):
            ids = torch.tensor([prompt])
            ref = target.generate(ids, max_new_tokens=24, do_sample=False)
            got = target.generate(ids, assistant_model=drafter, tree_budget=8, do_sample=False, max_new_tokens=24,
                                  return_dict_in_generate=True)
            assert torch.equal(got.sequences, ref)
        train_prompt = torch.tensor([records[1]["prompt_ids"]])
        got = target.generate(train_prompt, assistant_model=drafter, tree_budget=8, do_sample=False,
                              max_new_tokens=24, return_dict_in_generate=True)
        print(f"\nmean acceptance length on a training prompt: {got.stats.mean_acceptance_length:.2f}")
        assert got.stats.mean_acceptance_length > 1.0  # it learned something about its training data
    finally:
        hf_ddtree.disable(target)


def _cli_run(target, records, tmp_path, monkeypatch, *extra: str) -> tuple[list[str], object]:
    """train-drafter argv for a tiny run on `records` (the target patched in), and its OUT dir."""
    monkeypatch.setattr(train_cli, "_load_target", lambda name, dtype: (target, None))
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    argv = ["--target", "tiny", "--responses", str(resp), "--out", str(out), "--layers", "1", "--block-size",
            str(BS), "--target-layer-ids", "0,2", "--mask-token-id", str(MASK), "--batch-tokens", "128",
            "--anchors-per-seq", "8", "--no-bf16", "--val-fraction", "0.2", "--no-progress", *extra]
    return argv, out


def test_cli_end_to_end(target, records, tmp_path, monkeypatch):
    argv, out = _cli_run(target, records, tmp_path, monkeypatch, "--steps", "4", "--eval-every", "2",
                         "--save-every", "2", "--log-every", "1", "--stop-after", "2")
    assert train_cli.train_drafter_main(argv) == 0
    assert not (out / "final").exists() and (out / "checkpoint-last").exists()
    assert train_cli.train_drafter_main(argv + ["--resume"]) == 0
    loaded = DFlashDraftModel.from_pretrained(out / "final")
    assert loaded.target_layer_ids == LAYERS
    cmd = (out / "command.txt").read_text()
    assert "--features-dir" in cmd and "--no-init-from-target" not in cmd and "--init-from-target" in cmd
    index = json.loads((out / "features" / "index.json").read_text())
    assert len(index["records"]) == N_RECORDS and index["layer_ids"] == LAYERS
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log if "loss" in l] == [1, 2, 3, 4]


def test_cli_init_from_drafter_warm_starts(target, records, trained, tmp_path, monkeypatch):
    """--init-from-drafter starts a (prefix-mode) run from an existing drafter's exact weights."""
    monkeypatch.setattr(train_cli, "_load_target", lambda name, dtype: (target, None))
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in records))
    src = trained[0] / "final"
    seen = {}

    def spy(target_, drafter, *a, **k):
        seen["state"] = {n: p.detach().clone() for n, p in drafter.state_dict().items()}
        raise SystemExit(0)

    import hf_ddtree.training.train as train_mod
    monkeypatch.setattr(train_mod, "train_drafter", spy)
    argv = ["--target", "tiny", "--responses", str(resp), "--out", str(tmp_path / "run"), "--layers", "1",
            "--block-size", str(BS), "--target-layer-ids", ",".join(map(str, LAYERS)), "--mask-token-id", str(MASK),
            "--steps", "1", "--no-bf16", "--no-progress", "--prefix-mode", "--init-from-drafter", str(src)]
    with pytest.raises(SystemExit):
        train_cli.train_drafter_main(argv)
    want = DFlashDraftModel.from_pretrained(src).state_dict()
    assert seen["state"].keys() == want.keys()
    assert all(torch.equal(seen["state"][k], want[k]) for k in want)

    bad = argv[:argv.index("--layers") + 1] + ["2"] + argv[argv.index("--layers") + 2:]
    with pytest.raises(SystemExit) as err:
        train_cli.train_drafter_main(bad)
    assert err.value.code == 2  # argparse error naming the mismatch


# ---- distillation on the target's top-k log-probs --------------------------------------------------

K = 4


@pytest.fixture(scope="module")
def topk_store(target, records, tmp_path_factory):
    d = tmp_path_factory.mktemp("features_topk")
    extract_features(target, records, d, LAYERS, shard_tokens=150, topk=K, progress=False)
    return FeatureStore(d, layer_ids=LAYERS)


def test_topk_features_are_the_targets_next_token_distribution(target, records, store, topk_store, tmp_path):
    assert topk_store.topk_k == K and store.topk_k == 0 and len(topk_store.index["shards"]) > 1
    agree = total = 0
    for i in range(len(topk_store)):
        feats, ids, plen = topk_store.get(i)
        assert torch.equal(feats, store.features(i))  # the same features as without top-k
        top_ids, top_lp = topk_store.topk(i)
        with torch.no_grad():
            logp = torch.log_softmax(target(ids[None]).logits[0].float(), -1)
        ref = logp.topk(K, -1)
        assert top_ids.shape == (ids.shape[0], K) and top_lp.dtype == torch.float32
        torch.testing.assert_close(top_lp, ref.values, rtol=0, atol=1e-5)
        assert torch.equal(logp.gather(1, top_ids), top_lp)  # ids and log-probs belong together
        # row t is the distribution of token t+1: for the target's own greedy answer, its argmax is that token
        agree += int((top_ids[plen - 1:-1, 0] == ids[plen:]).sum())
        total += ids.shape[0] - plen
    assert agree == total
    with pytest.raises(ValueError, match="top-k"):
        store.topk(0)
    with pytest.raises(ValueError, match="top-4 log-probs per token, not top-2"):
        extract_features(target, records, topk_store.dir, LAYERS, topk=2, progress=False)
    with pytest.raises(ValueError, match="top-0"):
        extract_features(target, records, store.dir, LAYERS, topk=K, progress=False)
    # without an explicit K a cache is extended in its own format
    part = tmp_path / "part"
    extract_features(target, records[:3], part, LAYERS, topk=K, progress=False)
    assert extract_features(target, records, part, LAYERS, progress=False)["topk"] == K
    assert FeatureStore(part).topk(N_RECORDS - 1)[0].shape[1] == K


def test_distillation_loss_is_cross_entropy_to_the_teacher(topk_store):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 16, generator=g)
    h = torch.randn(30, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 128, (30,), generator=g)
    y[::4] = IGNORE
    wt = torch.rand(30, generator=g)
    ids = torch.randint(0, 128, (30, K), generator=g)
    p = torch.softmax(torch.randn(30, K, generator=g), -1)
    plain = weighted_ce_sum(h, w, y, wt)
    assert torch.equal(weighted_ce_sum(h, w, y, wt, soft=(ids, p), alpha=0.0), plain)
    # alpha = 1 with a one-hot teacher on the label is the hard-label loss
    onehot = (y.clamp(min=0)[:, None].expand(30, K), torch.tensor([1.0, 0, 0, 0]).expand(30, K))
    torch.testing.assert_close(weighted_ce_sum(h, w, y, wt, soft=onehot, alpha=1.0), plain)
    m = y != IGNORE
    logp = torch.log_softmax(h[m] @ w.T, -1)
    hard = -logp.gather(1, y[m][:, None])[:, 0]
    soft = -(p[m] * logp.gather(1, ids[m])).sum(-1)
    ref = ((0.3 * hard + 0.7 * soft) * wt[m]).sum()
    got = weighted_ce_sum(h, w, y, wt, soft=(ids, p), alpha=0.7)
    chunked = weighted_ce_sum(h, w, y, wt, chunk=7, soft=(ids, p), alpha=0.7)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(chunked, ref)
    g1, = torch.autograd.grad(got, h)
    g2, = torch.autograd.grad(chunked, h)
    torch.testing.assert_close(g1, g2)
    # a shortlisted head keeps the teacher's ids and re-indexes them onto the same rows
    sub_w, (sub_y,), (sub_ids,) = restrict_head(w, torch.tensor([3, 7]), [y], 0, None, [ids])
    assert torch.equal(sub_w[sub_ids], w[ids])
    assert weighted_ce_sum(h, sub_w, sub_y, wt, soft=(sub_ids, p), alpha=1.0) < weighted_ce_sum(
        h, w, y, wt, soft=(ids, p), alpha=1.0)  # the same teacher rows, a softmax over fewer competitors
    # teacher rows: the label at sequence position t is taught by the target's distribution at t-1
    feats, seq, plen = topk_store.get(2)
    anchors = sample_anchors(seq.shape[0], plen, 5, torch.Generator().manual_seed(1))
    blocks = make_blocks(seq, anchors, BS, MASK)
    t_ids, t_p = teacher_targets(topk_store, 2, blocks)
    lab = blocks.labels != IGNORE
    assert torch.equal(t_ids[lab, 0], blocks.labels[lab])  # greedy records: the teacher's argmax is the label
    torch.testing.assert_close(t_p.sum(-1), torch.ones(t_p.shape[0]))
    assert torch.equal(teacher_targets(topk_store, 2, blocks, k=2)[0], t_ids[:, :2])


def test_distillation_trains_and_is_refused_without_targets(target, store, topk_store, tmp_path):
    train_idx, val_idx = split_train_val(topk_store.ids, 0.2)
    cfg = TrainConfig(block_size=BS, anchors_per_seq=16, batch_tokens=256, steps=30, lr=1e-2, warmup_steps=3,
                      bf16=False, distill_alpha=0.5, eval_every=30, save_every=0, progress=False)

    def run(s, c, out):
        d = build_drafter(target, num_layers=1, block_size=BS, mask_token_id=MASK, target_layer_ids=LAYERS,
                          init_from_target=False, seed=0)
        return train_drafter(target, d, s, out, c, train_idx=train_idx, val_idx=val_idx)

    distilled = run(topk_store, cfg, tmp_path / "a")
    assert sum(distilled.losses[-5:]) / 5 < 0.6 * sum(distilled.losses[:3]) / 3
    assert distilled.val["tau"] >= 1.0
    hard = run(topk_store, TrainConfig(**{**cfg.to_dict(), "distill_alpha": 0.0, "betas": cfg.betas}), tmp_path / "b")
    assert distilled.losses[0] != hard.losses[0]  # the soft term is in the loss
    with pytest.raises(ValueError, match="has none"):
        run(store, cfg, tmp_path / "c")
    with pytest.raises(ValueError, match="out of range"):
        run(topk_store, TrainConfig(**{**cfg.to_dict(), "distill_alpha": 1.5, "betas": cfg.betas}), tmp_path / "d")


def test_cli_distill_topk(target, records, tmp_path, monkeypatch):
    argv, out = _cli_run(target, records, tmp_path, monkeypatch, "--steps", "2", "--eval-every", "0",
                         "--save-every", "0", "--distill-topk", "3")
    assert train_cli.train_drafter_main(argv) == 0
    assert json.loads((out / "features" / "index.json").read_text())["topk"] == 3
    start = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert start["config"]["distill_alpha"] == 0.0  # targets stored, hard labels unless asked
    assert train_cli.train_drafter_main(argv + ["--distill-alpha", "0.5"]) == 0
    start = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert start["config"]["distill_alpha"] == 0.5
    with pytest.raises(SystemExit):  # distillation asked for on a cache without targets
        train_cli.train_drafter_main(argv[:-2] + ["--features-dir", str(tmp_path / "plain"), "--distill-alpha", "0.3"])


# ---- responses: resumable, and prompts answered by earlier runs are skipped ---------------------------------------

class _CharTokenizer:
    """A tokenizer stand-in without a chat template: one id per character (1..126)."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text, return_tensors="pt"):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[1 + ord(c) % 126 for c in text]]))


def test_generate_responses_resumes_and_skips_earlier_answers(target, tmp_path):
    from hf_ddtree.training.responses import answered_ids, generate_responses, read_records

    prompts = [("p0", "abcdef"), ("p1", "xyz"), ("p2", "hello")]
    first = tmp_path / "earlier.jsonl"
    generate_responses(target, _CharTokenizer(), prompts[1:2], first, modes=["greedy"], max_new_tokens=5,
                       source="t")
    assert answered_ids([first]) == {"p1:greedy"}
    out = tmp_path / "now.jsonl"
    generate_responses(target, _CharTokenizer(), prompts, out, modes=["greedy"], max_new_tokens=5, batch_size=2,
                       source="t", skip_ids=answered_ids([first]))
    recs = read_records(out)
    assert sorted(r["id"] for r in recs) == ["p0:greedy", "p2:greedy"]  # p1 was answered before
    for r in recs:  # each record is the target's own greedy answer (left padding in the batch changes nothing)
        ids = torch.tensor([r["prompt_ids"]])
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert r["response_ids"] == ref[0, ids.shape[1]:].tolist() and r["source"] == "t"
    generate_responses(target, _CharTokenizer(), prompts, out, modes=["greedy"], max_new_tokens=5,
                       skip_ids=answered_ids([first]))
    assert len(read_records(out)) == 2  # resumed: nothing left to answer


def test_make_responses_refuses_a_missing_skip_file(tmp_path, capsys):
    from hf_ddtree.cli import make_responses_main

    with pytest.raises(SystemExit):
        make_responses_main(["--out", str(tmp_path / "o.jsonl"), "--skip-answered", str(tmp_path / "nope.jsonl")])
    assert "no such file" in capsys.readouterr().err
