"""Figures that need no VM: rendering speed."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def big_site(path: Path, peers: int) -> Path:
    """A site with `peers` road warriors in a /16, written as TOML."""
    lines = (ROOT / "examples" / "site.toml").read_text().split("[[peers]]")[0]
    lines = lines.replace('["10.77.0.1/24", "fd77::1/64"]', '["10.100.0.1/16"]')
    body = [lines]
    for i in range(peers):
        body.append(
            f'[[peers]]\nname = "p{i}"\naddress = "10.100.{2 + i // 250}.{1 + i % 250}/32"\n'
        )
    path.write_text("\n".join(body))
    return path


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def render_1000() -> dict[str, float]:
    """Whole-process render of a 1000-peer site: first run (makes keys) and a re-run."""
    with tempfile.TemporaryDirectory() as d:
        site = big_site(Path(d) / "site.toml", 1000)
        cmd = [sys.executable, "-m", "builder", "render", "--site", str(site), "--out", f"{d}/out"]
        baseline = min(timed([sys.executable, "-c", "pass"]) for _ in range(3))
        first = timed(cmd)
        again = min(timed(cmd) for _ in range(3))
    return {
        "render_1000_peers_first_s": round(first, 3),
        "render_1000_peers_rerun_s": round(again, 3),
        "python_startup_baseline_s": round(baseline, 3),
        "render_1000_peers_ratio_to_python_startup": round(again / baseline, 1),
    }


ALL = [render_1000]
