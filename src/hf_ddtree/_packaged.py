"""Files that ship inside installed PyPI distributions (the embedded target's GGUF, prompt sets)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def installed_file(package: str, file: str, install_command: str) -> Path | None:
    """`file` inside the installed distribution `package`, found via importlib.metadata.

    None when the package is not installed; FileNotFoundError (naming the reinstall command) when
    it is installed but the file is missing.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{package} {dist.version} is installed but {file} is missing from it ({path}). "
            f"Reinstall with `{install_command} --force-reinstall`."
        )
    return path
