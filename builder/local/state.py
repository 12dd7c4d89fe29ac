"""Keys and the state dir: made once, reused ever after, never printed.

The state dir (default `.wg-appliance/NAME/` beside the site file) is 0700;
secret files in it are 0600. `keys.json` holds every secret in one file so a
1000-peer site costs one write, and a re-run with the same input writes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from builder.errors import HostError
from builder.local.files import OutDir
from builder.model.site import Site
from builder.text import printable

KEYS_FILE = "keys.json"
ADMIN_KEY_FILE = "admin_ed25519"
KNOWN_HOSTS_FILE = "known_hosts"


def wg_genkey() -> str:
    return base64.b64encode(X25519PrivateKey.generate().private_bytes_raw()).decode()


def wg_pubkey(private: str) -> str:
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private))
    return base64.b64encode(key.public_key().public_bytes_raw()).decode()


def wg_genpsk() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def ssh_genkey() -> str:
    """An ed25519 private key in OpenSSH format (what sshd and paramiko read)."""
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        .decode()
    )


def ssh_pubkey(private: str, comment: str = "") -> str:
    key = serialization.load_ssh_private_key(private.encode(), password=None)
    line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return f"{line} {comment}".strip()


@dataclass(frozen=True)
class PeerKeys:
    public: str
    private: str | None  # None when the admin supplied the public key
    psk: str | None


@dataclass(frozen=True)
class Keys:
    """Every key a render needs. Tests may build one by hand for golden files."""

    wg_private: str
    host_key: str  # ed25519, OpenSSH private format
    admin_key: str  # the tool's own login key, ed25519
    peers: dict[str, PeerKeys] = field(default_factory=dict)

    @property
    def wg_public(self) -> str:
        return wg_pubkey(self.wg_private)

    @property
    def host_public(self) -> str:
        return ssh_pubkey(self.host_key)

    @property
    def admin_public(self) -> str:
        return ssh_pubkey(self.admin_key, "wg-appliance")


RESTORE = "restore it from a backup; deleting it makes new keys and every client must be re-issued"
STATE_FIX = "pass --state DIR with a folder of your own"


def _is_wg_key(value: object) -> bool:
    """32 bytes in canonical base64, as `wg genkey` prints them."""
    if not isinstance(value, str):
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return len(raw) == 32 and base64.b64encode(raw).decode() == value


def _is_ssh_ed25519(value: object) -> bool:
    if not isinstance(value, str) or not value.startswith("-----BEGIN OPENSSH PRIVATE KEY-----"):
        return False
    try:
        key = serialization.load_ssh_private_key(value.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return isinstance(key, Ed25519PrivateKey)


def _peer_problem(entry: object) -> str:
    """What is wrong with one stored peer, or "" when nothing is."""
    if not isinstance(entry, dict):
        return "is not an object"
    extra = sorted(set(entry) - {"public", "private", "psk"})
    if extra:
        return f"has unknown field {extra[0]!r}"
    if not _is_wg_key(entry.get("public")):
        return "public: not a 32-byte base64 key"
    for name in ("private", "psk"):
        if entry.get(name) is not None and not _is_wg_key(entry[name]):
            return f"{name}: not a 32-byte base64 key"
    if entry.get("private") and wg_pubkey(entry["private"]) != entry["public"]:
        return "public does not match private"
    return ""


def _keys_problem(data: object) -> str:
    """What is wrong with a parsed keys.json, or "" when nothing is."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for name in ("wg_private", "host_key", "admin_key", "peers"):
        if name not in data:
            return f"{name}: missing"
    if not _is_wg_key(data["wg_private"]):
        return "wg_private: not a 32-byte base64 key"
    for name in ("host_key", "admin_key"):
        if not _is_ssh_ed25519(data[name]):
            return f"{name}: not an OpenSSH ed25519 private key"
    if not isinstance(data["peers"], dict):
        return "peers: not an object"
    for peer, entry in data["peers"].items():
        problem = _peer_problem(entry)
        if problem:
            return f"peers.{peer}: {problem}"
    return ""


def _parse_keys(file: Path, raw: bytes) -> dict:
    """keys.json as stored, or a one-line error naming the file: never new keys over it."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        problem = f"not valid JSON ({e})" if isinstance(e, ValueError) else "nested too deeply"
    else:
        problem = _keys_problem(data)
    if problem:
        where = printable(str(file), keep_newlines=False)
        raise HostError(f"{where}: {printable(problem, keep_newlines=False)}", RESTORE)
    return data


def _keys(data: dict) -> Keys:
    return Keys(
        wg_private=data["wg_private"],
        host_key=data["host_key"],
        admin_key=data["admin_key"],
        peers={
            n: PeerKeys(p["public"], p.get("private"), p.get("psk"))
            for n, p in data["peers"].items()
        },
    )


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
        return None if data is None else _keys(data)

    def keys_for(self, site: Site) -> Keys:
        """Load the keys, make what the site needs and is missing, save only on change.

        Keys of peers no longer in the site are dropped, so a re-added peer gets a
        fresh key and an old device cannot come back.
        """
        data = self._read() or {
            "wg_private": wg_genkey(),
            "host_key": ssh_genkey(),
            "admin_key": ssh_genkey(),
            "peers": {},
        }
        stored = data["peers"]
        peers: dict[str, dict] = {}
        for p in site.peers:
            prev = stored.get(p.name, {})
            if p.public_key:
                priv = None
                pub = p.public_key
            elif prev.get("private"):
                priv = prev["private"]
                pub = wg_pubkey(priv)
            else:
                priv = wg_genkey()
                pub = wg_pubkey(priv)
            psk = (prev.get("psk") or wg_genpsk()) if p.preshared_key else None
            peers[p.name] = {"public": pub, "private": priv, "psk": psk}
        data = {**data, "peers": peers}
        keys = _keys(data)
        with self.folder() as d:
            d.write(KEYS_FILE, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o600)
            d.write(ADMIN_KEY_FILE, keys.admin_key.encode(), 0o600)
            d.write(KNOWN_HOSTS_FILE, f"{site.lan.address.ip} {keys.host_public}\n".encode(), 0o644)
        return keys

    @property
    def admin_key_path(self) -> Path:
        return self.path / ADMIN_KEY_FILE

    @property
    def known_hosts_path(self) -> Path:
        return self.path / KNOWN_HOSTS_FILE
