"""The seed as files: rendered in memory first, written only where the caller decides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.local.files import OutDir, write_files
from builder.local.state import Keys
from builder.model.site import Site
from builder.render.appliance import render_seed, seed_digest
from builder.render.iso import make_iso

SECRET = {"user-data", "seed.iso"}


@dataclass(frozen=True)
class Seed:
    files: dict[str, bytes]
    digest: str

    def write(self, out: Path | OutDir) -> list[str]:
        """Write what changed into `out` (a path, or a folder already open and checked);
        return the names written."""
        if isinstance(out, OutDir):
            return write_files(out, self.files, secret=SECRET)
        with OutDir(out) as d:
            return write_files(d, self.files, secret=SECRET)


def make_seed(site: Site, keys: Keys) -> Seed:
    seed = render_seed(site, keys)
    files = {name: text.encode() for name, text in seed.items()}
    files["seed.iso"] = make_iso(seed)
    return Seed(files, seed_digest(seed))
