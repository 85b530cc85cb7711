"""hf_ddtree: lossless DDTree / DFlash speculative decoding for Hugging Face transformers.

    import hf_ddtree
    hf_ddtree.enable(target)
    out = target.generate(input_ids, assistant_model=drafter, tree_budget=64, max_new_tokens=256)
"""

from ._version import __version__

from .drafter import DFlashDraftModel, drafter_spec, is_dflash_drafter, make_drafter_config, validate_pair
from .decoding import DDTreeGenerateOutput, DecodeStats, disable, enable, generate, is_enabled, speculative_decoding
from .tree import Tree, build_chain, build_tree

__all__ = [
    "__version__",
    "DDTreeGenerateOutput",
    "DFlashDraftModel",
    "DecodeStats",
    "Tree",
    "build_chain",
    "build_tree",
    "disable",
    "drafter_spec",
    "enable",
    "generate",
    "is_dflash_drafter",
    "is_enabled",
    "make_drafter_config",
    "speculative_decoding",
    "validate_pair",
]
