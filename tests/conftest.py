"""Shared fixtures. Costly ones (image, lab) live in tests/plugins and are session-scoped."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "site.toml"

pytest_plugins = [
    "tests.plugins.image_fixture",
    "tests.plugins.lab_fixture",
    "tests.plugins.samples",
]


def wg_cli(
    *args: str, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "builder", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        input=input,
        timeout=600,
    )


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    """A copy of the example site in a temp dir, so its state dir is private to the test."""
    shutil.copy(EXAMPLE, tmp_path / "site.toml")
    return tmp_path
