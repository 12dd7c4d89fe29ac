"""The state dir: keys made once, kept, reused ever after, never printed.

The state dir (default `.wg-appliance/NAME/` beside the site file) is 0700;
secret files in it are 0600. `keys.json` holds every secret in one file so a
1000-peer site costs one write, and a re-run with the same input writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from builder.errors import HostError
from builder.local.files import OutDir
from builder.model.keys import Keys, derive, keys_from, keys_problem
from builder.model.site import Site
from builder.text import printable

KEYS_FILE = "keys.json"
ADMIN_KEY_FILE = "admin_ed25519"
KNOWN_HOSTS_FILE = "known_hosts"
VIRT_FILE = "virt.json"


RESTORE = "restore it from a backup; deleting it makes new keys and every client must be re-issued"
STATE_FIX = "pass --state DIR with a folder of your own"
NO_KEYS_FIX = "deploy first, or pass the right --state DIR"


def _parse_keys(file: Path, raw: bytes) -> dict:
    """keys.json as stored, or a one-line error naming the file: never new keys over it."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        problem = f"not valid JSON ({e})" if isinstance(e, ValueError) else "nested too deeply"
    else:
        problem = keys_problem(data)
    if problem:
        where = printable(str(file), keep_newlines=False)
        raise HostError(f"{where}: {printable(problem, keep_newlines=False)}", RESTORE)
    return data


class State:
    """The state dir of one appliance: 0700, ours, refused (never chmod'ed) when not."""

    def __init__(self, path: Path, chosen: bool = False):
        self.path = Path(path)
        self.chosen = chosen  # named by --state: a link there of the user's own is followed

    @classmethod
    def for_site(cls, site: Site, override: str | Path | None = None) -> State:
        if override:
            return cls(Path(override), chosen=True)
        return cls(site.default_state_dir())

    def folder(self) -> OutDir:
        return OutDir(self.path, fix=STATE_FIX, private=True, chosen=self.chosen)

    def ensure(self) -> None:
        """Make the state dir 0700, or refuse one that others can use."""
        with self.folder():
            pass

    def _read(self) -> dict | None:
        """The stored keys; None when there is no state dir or no keys.json in it."""
        if not os.path.lexists(self.path):
            return None
        with contextlib.closing(self.folder().open(create=False)) as d:
            raw = d.read(KEYS_FILE, fix=RESTORE)
        return None if raw is None else _parse_keys(self.path / KEYS_FILE, raw)

    def load(self) -> Keys | None:
        """Keys as stored, without making any; None when there are none yet."""
        data = self._read()
        return None if data is None else keys_from(data)

    def keys_for(self, site: Site, existing: bool = False) -> Keys:
        """The keys the site needs, made where missing and saved (only what changed).
        `existing`: the appliance is deployed, so its keys must be here already."""
        data = self._derive(site, existing)
        keys = keys_from(data)
        with self.folder() as d:
            d.write(KEYS_FILE, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o600)
            d.write(ADMIN_KEY_FILE, keys.admin_key.encode(), 0o600)
            d.write(KNOWN_HOSTS_FILE, f"{site.lan.address.ip} {keys.host_public}\n".encode(), 0o644)
        return keys

    def look(self, site: Site) -> Keys:
        """The same keys for commands that only look (verify, dry runs): nothing is written.
        A peer not yet issued gets a key that is thrown away, so it shows as missing."""
        return keys_from(self._derive(site, existing=True))

    def _derive(self, site: Site, existing: bool) -> dict:
        stored = self._read()
        if stored is None and existing:
            raise HostError(f"no keys in {self.path}", NO_KEYS_FIX)
        return derive(site, stored)

    def learned_virt_type(self, host: str) -> str | None:
        """The virtualisation type a start on `host` showed to work (`kvm`, or `qemu` when
        KVM failed), or None when no deploy here has tried KVM on that host. Not a secret, and
        not trusted beyond its two values: anything else in the file means "not known"."""
        if not os.path.isdir(self.path):
            return None
        with contextlib.closing(self.folder().open(create=False)) as d:
            raw = d.read(VIRT_FILE)
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("host") != host:
            return None
        return data.get("virt_type") if data.get("virt_type") in ("kvm", "qemu") else None

    def learn_virt_type(self, host: str, virt_type: str) -> None:
        """Keep what a KVM start on `host` showed, so the next deploy skips the probe."""
        data = {"host": host, "virt_type": virt_type}
        with self.folder() as d:
            d.write(VIRT_FILE, (json.dumps(data, sort_keys=True) + "\n").encode(), 0o644)

    @property
    def admin_key_path(self) -> Path:
        return self.path / ADMIN_KEY_FILE

    @property
    def known_hosts_path(self) -> Path:
        return self.path / KNOWN_HOSTS_FILE
