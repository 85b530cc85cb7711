"""A drafter's drafting-vocabulary shortlist: the file format, validation, and attaching it to a
drafter (`drafter.draft_vocab_ids`). Building one from token counts is tooling: `hf_ddtree.draft_vocab`.

`draft_vocab.safetensors` holds one int32 tensor `token_ids`, most frequent first; the drafter's config
field `draft_vocab_size` says how many of them it uses (0 or absent: the full vocabulary).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DRAFT_VOCAB_FILE = "draft_vocab.safetensors"
_KEY = "token_ids"


def check_draft_vocab(ids, vocab_size: int, what: str = "draft vocabulary") -> torch.Tensor:
    """Validate a shortlist: a non-empty 1-D integer tensor of distinct ids in [0, vocab_size).
    Returns it as int64. Raises ValueError naming the problem and the fix."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be a non-empty 1-D integer tensor of token ids, got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}.")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what} holds token id {hi if hi >= vocab_size else lo}, outside the target vocabulary "
            f"[0, {vocab_size}): it was built for another tokenizer. Rebuild it with `hf-ddtree draft-vocab` "
            "for this target, or drop it (`set_draft_vocab(drafter, None)` / remove `draft_vocab_size`)."
        )
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{what} lists some token ids twice: rebuild it with `hf-ddtree draft-vocab`.")
    return ids


def save_draft_vocab(ids: torch.Tensor, folder: str | os.PathLike) -> Path:
    """Write `ids` (ranked) as int32 tensor `token_ids` to `folder/draft_vocab.safetensors`."""
    from safetensors.torch import save_file

    path = Path(folder) / DRAFT_VOCAB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({_KEY: torch.as_tensor(ids).to(torch.int32).contiguous()}, str(path))
    return path


def load_draft_vocab(path: str | os.PathLike, vocab_size: int | None = None, size: int | None = None) -> torch.Tensor:
    """(S,) int64 ranked ids from a draft_vocab.safetensors file (or a folder holding one); the first
    `size` of them if given. Validated against `vocab_size` when given."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No draft vocabulary at {path}: build one with `hf-ddtree draft-vocab --out "
                                f"{path.parent}`, or remove `draft_vocab_size` from the drafter's config.")
    tensors = load_file(str(path))
    if _KEY not in tensors:
        raise ValueError(f"{path} has no `{_KEY}` tensor (found {sorted(tensors)}): rebuild it with "
                         "`hf-ddtree draft-vocab`.")
    ids = tensors[_KEY].to(torch.int64)
    if size is not None:
        if size < 1 or size > ids.numel():
            raise ValueError(f"draft_vocab_size={size} but {path} ranks {ids.numel()} tokens: use a size in "
                             f"[1, {ids.numel()}] or rebuild the file with a larger --size.")
        ids = ids[:size]
    if vocab_size is not None:
        ids = check_draft_vocab(ids, vocab_size, what=f"draft vocabulary {path}")
    return ids


def set_draft_vocab(drafter, ids) -> None:
    """Use the shortlist `ids` (1-D token ids) in `drafter`'s draft head from now on; None: full vocabulary.
    Checked against the target when generate() validates the pair."""
    drafter.draft_vocab_ids = None if ids is None else torch.as_tensor(ids).to(torch.int64)


def attach_draft_vocab(drafter, folder: str | os.PathLike | None, vocab_size: int | None = None) -> None:
    """If `drafter.config.draft_vocab_size` is a positive int, load that many ranked ids from
    `folder/draft_vocab.safetensors` and attach them (`set_draft_vocab`); else leave the drafter as is."""
    size = getattr(drafter.config, "draft_vocab_size", None)
    if not size:
        return
    if folder is None:
        raise ValueError("the drafter's config sets draft_vocab_size but its folder is unknown: call "
                         "set_draft_vocab(drafter, load_draft_vocab(folder, size=...)) yourself.")
    set_draft_vocab(drafter, load_draft_vocab(folder, vocab_size, int(size)))
