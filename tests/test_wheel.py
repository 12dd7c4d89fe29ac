"""The tool installed from a wheel, outside the checkout, finds its templates, recipe and
IPFire's stock files: `check`, `render` and `ipfire --out` work from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, ROOT


def _run(argv: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from the dev venv's
    site-packages through a plain path line (which does not load the editable install)."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ beside the sources, never in the checkout.
    src = work / "src"
    for part in ("builder", "cloud-init", "images", "ipfire"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    r = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", work / "dist", src],
        cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (work / "dist").glob("wg_appliance-*.whl")
    venv = work / "venv"
    assert _run([sys.executable, "-m", "venv", venv], cwd=work).returncode == 0
    r = _run([venv / "bin/pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    (site_packages / "dev-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    r = _run([installed / "bin/python", "-c", "import builder; print(builder.__file__)"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(installed), r.stdout
    shutil.copy(EXAMPLE, tmp_path / "site.toml")
    cli = installed / "bin/wg-appliance"

    r = _run([cli, "check", "--site", "site.toml"], tmp_path)
    assert r.returncode == 0 and "ok: appliance wg-gw" in r.stdout, r.stderr

    r = _run([cli, "render", "--site", "site.toml", "--out", "seed"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "seed/user-data").read_text().startswith("#cloud-config")
    assert (tmp_path / "seed/seed.iso").stat().st_size > 0

    (tmp_path / "fw").mkdir(mode=0o700)
    r = _run([cli, "ipfire", "--site", "site.toml", "--out", "fw"], tmp_path)
    assert r.returncode == 0, r.stderr
    firewall = (tmp_path / "fw/firewall.local").read_text()
    assert "# BEGIN wg-appliance wg-gw" in firewall
    assert "Used for private firewall rules" in firewall  # IPFire's stock file, from the wheel
