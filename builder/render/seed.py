"""The NoCloud seed as files in memory: user-data, meta-data, network-config and seed.iso.

Pure: the caller decides where the files go (`write_files(out, seed.files, secret=SECRET)`).
The ISO is ISO 9660 + Joliet + Rock Ridge, volume label `cidata`. pycdlib stamps every
record with the current time; the clock is held at a fixed epoch while it writes, so the
same files give the same ISO bytes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pycdlib

from builder.model.keys import Keys
from builder.model.site import Site
from builder.render.appliance import render_seed, seed_digest

SECRET = {"user-data", "seed.iso"}
SOURCE_DATE_EPOCH = 1704067200  # 2024-01-01T00:00:00Z


@dataclass(frozen=True)
class Seed:
    files: dict[str, bytes]
    digest: str


def make_seed(site: Site, keys: Keys) -> Seed:
    seed = render_seed(site, keys)
    files = {name: text.encode() for name, text in seed.items()}
    files["seed.iso"] = make_iso(seed)
    return Seed(files, seed_digest(seed))


@contextmanager
def _fixed_clock(epoch: int) -> Iterator[None]:
    real = time.time
    time.time = lambda: float(epoch)
    try:
        yield
    finally:
        time.time = real


def _iso_name(name: str) -> str:
    """ISO 9660 level 1 needs an 8.3 upper-case name; Rock Ridge and Joliet keep the real one."""
    stem = "".join(c for c in name.upper() if c.isalnum())[:8]
    return f"/{stem}.;1"


def make_iso(files: dict[str, str | bytes]) -> bytes:
    with _fixed_clock(SOURCE_DATE_EPOCH):
        iso = pycdlib.PyCdlib()
        iso.new(
            interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata", sys_ident="LINUX"
        )
        for name in sorted(files):
            data = files[name]
            raw = data.encode() if isinstance(data, str) else data
            iso.add_fp(
                io.BytesIO(raw), len(raw), _iso_name(name), rr_name=name, joliet_path=f"/{name}"
            )
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    return out.getvalue()
