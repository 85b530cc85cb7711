#!/usr/bin/env python
"""Regenerate hub_configs/ (what a drafter repo on the Hub holds) from the package.

    python scripts/sync_hub_configs.py            # refresh modeling_dflash.py, README.md, custom_generate/
    python scripts/sync_hub_configs.py --config   # ... and overwrite config.json with the template

hub_configs/modeling_dflash.py is a byte-for-byte copy of src/hf_ddtree/drafter/modeling_dflash.py,
the single source of truth; tests/test_hub.py fails when they differ. config.json is kept unless
--config is given (a training run updates it); README.md is rendered from it.
"""

import argparse
from pathlib import Path

from hf_ddtree.hub import export_hub_configs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "hub_configs"), help="target folder (default: hub_configs/)")
    parser.add_argument("--config", action="store_true", help="overwrite config.json with the template")
    args = parser.parse_args()
    for path in export_hub_configs(args.out, write_config=True if args.config else None):
        print(path)


if __name__ == "__main__":
    main()
