"""Where the tool's data lives: the templates, the image recipe and IPFire's stock files.

They stay at the top of the checkout (the project's layout puts data beside the code, not in
it); a wheel carries them as package data under `builder/_data/`. A checkout wins, so an
editable install always reads the files being edited.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DATA = {"cloud-init": "cloud_init", "images": "images", "ipfire": "ipfire"}


def checkout() -> Path | None:
    """The source checkout this package runs from, or None when installed from a wheel."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "images").is_dir() else None


def data_dir(name: str) -> Path:
    """The folder `name` ("cloud-init", "images" or "ipfire") of this installation."""
    root = checkout()
    return root / name if root is not None else PACKAGE / "_data" / DATA[name]
