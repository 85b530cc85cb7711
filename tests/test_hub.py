"""Drafter repos on the Hub, offline: hub_configs/, save_drafter / load_drafter, loading by name from a
fake Hub cache (`models--org--name/snapshots/<commit>/` + `refs/main`), and `custom_generate="org/name"`.

Nothing here touches the network or ~/.cache: the Hub cache and the remote-code module cache
(HF_MODULES_CACHE) live in temporary folders, and offline mode is forced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, Qwen3Config, Qwen3ForCausalLM

import hf_ddtree
from hf_ddtree import DFlashDraftModel, drafter_spec, make_drafter_config
from hf_ddtree.hub import AUTO_MAP, expected_hub_configs, load_drafter, save_drafter

ROOT = Path(__file__).resolve().parents[1]
HUB_CONFIGS = ROOT / "hub_configs"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MASK = 63
NEW_TOKENS = 16


# ------------------------------------------------------------------------------------------------
# fixtures: offline Hub cache, private module cache, one tiny target
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline mode, a private HF_MODULES_CACHE and one CPU thread (the machine is shared) for this module."""
    import huggingface_hub.constants
    import transformers.dynamic_module_utils as dmu

    root = tmp_path_factory.mktemp("hub")
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(dmu, "HF_MODULES_CACHE", str(root / "modules"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield root
    finally:
        torch.set_num_threads(threads)
        mp.undo()
        sys.path[:] = [p for p in sys.path if p != str(root / "modules")]


def _target_config():
    return Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def target(env):
    torch.manual_seed(0)
    return Qwen3ForCausalLM._from_config(_target_config(), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, MASK, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(target, prompt):
    hf_ddtree.disable(target)
    return target.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)


def _drafter(target, convention="zlab", seed=0):
    config = make_drafter_config(target.config, num_hidden_layers=1, block_size=6, mask_token_id=MASK,
                                 target_layer_ids=[0, 2])
    if convention == "toplevel":  # transformers' built-in DFlash convention
        del config.dflash_config, config.num_target_layers
    else:  # z-lab's published layout: the fields only under dflash_config
        del config.mask_token_id, config.target_layer_ids
    torch.manual_seed(seed)
    return DFlashDraftModel(config).eval()


def _cache_repo(cache: Path, repo_id: str, src: Path) -> Path:
    """Lay `src` out as the cached snapshot of `repo_id` (real files; no blobs/ or symlinks needed)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(src, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _assert_generates(target, drafter, prompt, reference):
    """DDTree (8 nodes, greedy) with `drafter` on an enabled-for-the-call target gives `reference`."""
    hf_ddtree.enable(target)
    try:
        assert torch.equal(target.generate(prompt, assistant_model=drafter, tree_budget=8, do_sample=False,
                                           max_new_tokens=NEW_TOKENS), reference)
    finally:
        hf_ddtree.disable(target)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------
# hub_configs/
# ------------------------------------------------------------------------------------------------

def test_hub_configs_in_sync_with_package():
    for rel, want in expected_hub_configs().items():
        path = HUB_CONFIGS / rel
        assert path.exists() and path.read_bytes() == want, (
            f"hub_configs/{rel} differs from what the package generates "
            "(modeling_dflash.py must be byte-identical to src/hf_ddtree/drafter/modeling_dflash.py): "
            "run `python scripts/sync_hub_configs.py`."
        )


def test_hub_configs_config_has_the_shipped_drafters_shape():
    from hf_ddtree.models import default_drafter_dir

    shipped = json.loads((default_drafter_dir() / "config.json").read_text())
    template = json.loads((HUB_CONFIGS / "config.json").read_text())
    for key in ("block_size", "num_hidden_layers", "hidden_size", "vocab_size", "num_target_layers"):
        assert template[key] == shipped[key], key
    assert template["dflash_config"] == shipped["dflash_config"]


def test_hub_configs_config_builds_a_drafter():
    config = Qwen3Config.from_pretrained(HUB_CONFIGS)
    assert config.model_type == "qwen3"
    assert config.architectures == ["DFlashDraftModel"]
    assert config.auto_map == AUTO_MAP
    assert set(config.dflash_config) == {"mask_token_id", "target_layer_ids"}
    drafter = DFlashDraftModel(config)
    spec = drafter_spec(drafter)
    assert spec.block_size == config.block_size >= 2
    assert all(0 <= i < config.num_target_layers for i in spec.target_layer_ids)
    assert 0 <= spec.mask_token_id < config.vocab_size
    assert drafter.fc.in_features == len(spec.target_layer_ids) * config.hidden_size
    card = (HUB_CONFIGS / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: transformers", "license: apache-2.0", "pipeline_tag: text-generation",
                 "- dflash", "- speculative-decoding", "- ddtree"):
        assert line in front
    assert 'assistant_model=drafter, tree_budget=64' in card and 'custom_generate="org/name"' in card
    assert (HUB_CONFIGS / "custom_generate" / "requirements.txt").read_text().split() == ["hf_ddtree"]


# ------------------------------------------------------------------------------------------------
# save_drafter -> fake Hub cache -> AutoModel.from_pretrained("org/name") -> lossless decoding
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("convention", ["zlab", "toplevel"])
def test_save_then_load_by_name_decodes_losslessly(env, target, prompt, reference, convention, tmp_path):
    drafter = _drafter(target, convention)
    repo_id = f"ddtree-test/tiny-dflash-{convention}"
    out = save_drafter(drafter, tmp_path / "repo", repo_id=repo_id, target=target)

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {"config.json", "model.safetensors", "modeling_dflash.py", "README.md",
                     "custom_generate/generate.py", "custom_generate/requirements.txt"}
    assert (out / "modeling_dflash.py").read_bytes() == (HUB_CONFIGS / "modeling_dflash.py").read_bytes()
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP and saved["architectures"] == ["DFlashDraftModel"]
    assert saved["model_type"] == "qwen3"
    if convention == "zlab":
        assert saved["dflash_config"] == {"mask_token_id": MASK, "target_layer_ids": [0, 2]}
    else:
        assert "dflash_config" not in saved
        assert (saved["block_size"], saved["mask_token_id"], saved["target_layer_ids"]) == (6, MASK, [0, 2])
    assert f'"{repo_id}"' in (out / "README.md").read_text()
    assert "_auto_class" not in DFlashDraftModel.__dict__  # save_drafter leaves the class as it was

    cache = env / f"cache-{convention}"
    _cache_repo(cache, repo_id, out)
    loaded = AutoModel.from_pretrained(repo_id, trust_remote_code=True, cache_dir=cache, local_files_only=True)
    cls = type(loaded)
    assert cls.__name__ == "DFlashDraftModel" and cls is not DFlashDraftModel
    assert cls.__module__.startswith("transformers_modules.") and cls.__module__.endswith(".modeling_dflash")
    assert str(env / "modules") in sys.modules[cls.__module__].__file__
    _assert_same_weights(loaded, drafter)
    assert drafter_spec(loaded) == drafter_spec(drafter)

    via_helper = load_drafter(repo_id, target=target, cache_dir=cache, local_files_only=True)
    _assert_same_weights(via_helper, drafter)

    hf_ddtree.enable(target)
    try:
        runs = [target.generate(prompt, assistant_model=d, tree_budget=8, do_sample=False, max_new_tokens=NEW_TOKENS,
                                return_dict_in_generate=True) for d in (loaded, drafter)]
    finally:
        hf_ddtree.disable(target)
    assert torch.equal(runs[0].sequences, reference)
    assert runs[0].acceptance_lengths == runs[1].acceptance_lengths  # the remote class drafts what ours drafts
    # a Qwen3 config is not re-routed to the drafter class for later AutoModel users
    assert type(AutoModel.from_config(_target_config())).__name__ == "Qwen3Model"


def test_republish_a_foreign_drafter_class(env, target, prompt, reference, tmp_path):
    """A checkpoint in z-lab's layout (remote code in `dflash.py`, auto_map "dflash.DFlashDraftModel")
    loads through our modeling code's config reading, and save_drafter re-publishes it with ours."""
    drafter = _drafter(target, seed=3)
    zlab = save_drafter(drafter, tmp_path / "zlab", custom_generate=False)
    (zlab / "modeling_dflash.py").rename(zlab / "dflash.py")
    config = json.loads((zlab / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "dflash.DFlashDraftModel"}
    (zlab / "config.json").write_text(json.dumps(config))
    cache = env / "cache-zlab"
    _cache_repo(cache, "ddtree-test/zlab-layout", zlab)
    foreign = AutoModel.from_pretrained("ddtree-test/zlab-layout", trust_remote_code=True, cache_dir=cache,
                                        local_files_only=True)
    assert type(foreign).__module__.endswith(".dflash")

    out = save_drafter(foreign, tmp_path / "republished", target=target)
    assert not (out / "dflash.py").exists()
    assert (out / "modeling_dflash.py").read_bytes() == (HUB_CONFIGS / "modeling_dflash.py").read_bytes()
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert type(foreign)._auto_class == "AutoModel"  # what from_pretrained set is restored
    again = load_drafter(out, target=target)
    assert type(again).__module__.endswith(".modeling_dflash")
    _assert_same_weights(again, drafter)
    _assert_generates(target, again, prompt, reference)


@pytest.mark.parametrize("convention", ["zlab", "toplevel"])
def test_missing_dflash_field_is_a_clear_error(env, target, convention, tmp_path):
    drafter = _drafter(target, convention)
    out = save_drafter(drafter, tmp_path / "repo")
    config = json.loads((out / "config.json").read_text())
    if convention == "zlab":
        del config["dflash_config"]["mask_token_id"]
    config.pop("mask_token_id", None)  # saved configs mirror the field at the top level
    (out / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashDraftModel(Qwen3Config.from_pretrained(out))
    repo_id = f"ddtree-test/no-mask-{convention}"
    cache = env / f"cache-nomask-{convention}"
    _cache_repo(cache, repo_id, out)
    with pytest.raises(ValueError, match="mask_token_id"):
        AutoModel.from_pretrained(repo_id, trust_remote_code=True, cache_dir=cache, local_files_only=True)

    broken = _drafter(target, convention)
    if convention == "zlab":
        del broken.config.dflash_config["mask_token_id"]
    del broken.config.mask_token_id
    del broken.mask_token_id
    with pytest.raises(ValueError, match="mask_token_id"):
        save_drafter(broken, tmp_path / "never")


def test_without_trust_remote_code_is_a_clear_error(env, target, prompt, tmp_path):
    """model_type "qwen3" is built in, so AutoModel silently builds a plain Qwen3Model from a drafter repo
    when trust_remote_code is not given; generate() must say so instead of failing deep in the loop."""
    out = save_drafter(_drafter(target), tmp_path / "repo")
    plain = AutoModel.from_pretrained(out)
    assert type(plain).__name__ == "Qwen3Model"
    hf_ddtree.enable(target)
    try:
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            target.generate(prompt, assistant_model=plain, tree_budget=8, max_new_tokens=4)
    finally:
        hf_ddtree.disable(target)


def test_load_drafter_never_unpickles(env, target, tmp_path):
    out = save_drafter(_drafter(target), tmp_path / "repo")
    state = {k: v.clone() for k, v in _drafter(target).state_dict().items()}
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")  # written, never read back
    with pytest.raises(OSError):
        load_drafter(out)
    with pytest.raises(ValueError, match="safetensors"):
        load_drafter(out, use_safetensors=False)


def test_bench_loads_a_hub_drafter_through_load_drafter(env, target, prompt, reference, tmp_path, monkeypatch):
    """`hf-ddtree bench --drafter org/name` reads the cached repo as `load_drafter` does: safetensors only."""
    import functools

    import hf_ddtree.hub
    from hf_ddtree.bench import cli as bench_cli

    cache = tmp_path / "cache"
    drafter = _drafter(target)
    _cache_repo(cache, "org/bench-drafter", save_drafter(drafter, tmp_path / "repo"))
    # the bench calls hf_ddtree.hub.load_drafter; point it at this test's cache (users get the default cache)
    monkeypatch.setattr(hf_ddtree.hub, "load_drafter",
                        functools.partial(load_drafter, cache_dir=cache, local_files_only=True))
    loaded = bench_cli.load_drafter("org/bench-drafter", target, torch.float32)
    _assert_same_weights(loaded, drafter)
    _assert_generates(target, loaded, prompt, reference)
    pickled = _cache_repo(cache, "org/pickled-drafter", save_drafter(drafter, tmp_path / "repo2"))
    (pickled / "model.safetensors").unlink()
    torch.save(drafter.state_dict(), pickled / "pytorch_model.bin")  # written, never read back
    with pytest.raises(OSError):
        bench_cli.load_drafter("org/pickled-drafter", target, torch.float32)


# ------------------------------------------------------------------------------------------------
# custom_generate="org/name"
# ------------------------------------------------------------------------------------------------

def test_custom_generate_from_cached_repo(env, target, prompt, reference):
    repo_id = "ddtree-test/ddtree-gen"
    cache = env / "cache-gen"
    src = env / "gen-src"
    shutil.copytree(HUB_CONFIGS / "custom_generate", src / "custom_generate")
    shutil.copy(HUB_CONFIGS / "README.md", src / "README.md")
    _cache_repo(cache, repo_id, src)
    drafter = _drafter(target)
    hub = dict(trust_remote_code=True, cache_dir=cache, local_files_only=True)

    hf_ddtree.disable(target)
    out = target.generate(prompt, custom_generate=repo_id, assistant_model=drafter, tree_budget=8,
                          max_new_tokens=NEW_TOKENS, do_sample=False, **hub)
    assert torch.equal(out, reference)
    res = target.generate(prompt, custom_generate=repo_id, assistant_model=drafter, max_new_tokens=NEW_TOKENS,
                          do_sample=False, return_dict_in_generate=True, **hub)  # DFlash chain, dict output
    assert torch.equal(res.sequences, reference) and len(res.acceptance_lengths) > 0
    with pytest.raises(ValueError, match="assistant_model"):
        target.generate(prompt, custom_generate=repo_id, max_new_tokens=4, **hub)

    hf_ddtree.enable(target)  # a patched target accepts custom_generate too
    try:
        out = target.generate(prompt, custom_generate=repo_id, assistant_model=drafter, tree_budget=8,
                              max_new_tokens=NEW_TOKENS, do_sample=False, **hub)
    finally:
        hf_ddtree.disable(target)
    assert torch.equal(out, reference)


_SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import huggingface_hub.constants as c
    import transformers.dynamic_module_utils as dmu
    assert c.HF_HUB_OFFLINE, "HF_HUB_OFFLINE must be read at import"
    import torch
    from transformers import AutoModel, Qwen3ForCausalLM
    import hf_ddtree
    target = Qwen3ForCausalLM.from_pretrained(sys.argv[1]).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    ref = target.generate(ids, do_sample=False, max_new_tokens=int(sys.argv[3]))
    drafter = AutoModel.from_pretrained("ddtree-test/tiny-dflash", trust_remote_code=True)
    out = target.generate(ids, custom_generate="ddtree-test/tiny-dflash", trust_remote_code=True,
                          assistant_model=drafter, tree_budget=8, max_new_tokens=int(sys.argv[3]), do_sample=False)
    print(json.dumps({"module": type(drafter).__module__, "modules_cache": dmu.HF_MODULES_CACHE,
                      "ref": ref.tolist(), "out": out.tolist()}))
    """
)


def test_offline_by_name_with_env_only(env, target, prompt, reference, tmp_path):
    """The plain user calls, no cache_dir/local_files_only: HF_HUB_OFFLINE + HF_HUB_CACHE set before import."""
    cache = tmp_path / "hub-cache"
    _cache_repo(cache, "ddtree-test/tiny-dflash", save_drafter(_drafter(target), tmp_path / "repo"))
    target.save_pretrained(tmp_path / "target")
    modules = tmp_path / "modules"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_MODULES_CACHE=str(modules),
                   HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, str(tmp_path / "target"), json.dumps(prompt.tolist()), str(NEW_TOKENS)],
        env=environ, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.ddtree_hyphen_test.tiny_hyphen_dflash.")
    assert result["modules_cache"] == str(modules) and (modules / "transformers_modules").is_dir()
    assert result["ref"] == reference.tolist()
    assert result["out"] == reference.tolist()


def test_save_and_load_drafter_keep_the_draft_vocabulary(env, target, prompt, reference, tmp_path):
    """save_drafter writes the shortlist next to the weights (config draft_vocab_size + draft_vocab.safetensors),
    load_drafter attaches it, and decoding with it stays identical to stock greedy; without one the field is dropped."""
    from hf_ddtree.draft_vocab import DRAFT_VOCAB_FILE, set_draft_vocab

    drafter = _drafter(target, seed=4)
    set_draft_vocab(drafter, torch.arange(0, MASK, 2))
    out = save_drafter(drafter, tmp_path / "short", target=target, custom_generate=False)
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == len(range(0, MASK, 2))
    loaded = load_drafter(out, target=target)
    assert loaded.draft_vocab_ids.tolist() == list(range(0, MASK, 2))
    _assert_generates(target, loaded, prompt, reference)
    set_draft_vocab(loaded, None)
    again = save_drafter(loaded, out, custom_generate=False)  # re-saved without a shortlist
    assert "draft_vocab_size" not in json.loads((again / "config.json").read_text())
    assert not (again / DRAFT_VOCAB_FILE).exists()
    assert getattr(load_drafter(again, target=target), "draft_vocab_ids", None) is None
