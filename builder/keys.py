"""Keys and the state dir: made once, reused ever after, never printed.

The state dir (default `.wg-appliance/NAME/` beside the site file) is 0700;
secret files in it are 0600. `keys.json` holds every secret in one file so a
1000-peer site costs one write, and a re-run with the same input writes nothing.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from builder.errors import HostError
from builder.site import Site

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


def _write_secret(path: Path, text: str) -> None:
    """Atomic write, 0600 from the start: never a moment with wider permissions."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_if_changed(path: Path, text: str, secret: bool) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    if secret:
        _write_secret(path, text)
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return True


class State:
    """The state dir of one appliance."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_site(cls, site: Site, override: str | Path | None = None) -> State:
        return cls(Path(override) if override else site.default_state_dir())

    def _ensure_dir(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as e:
            raise HostError(
                f"cannot create state dir {self.path}: {e.strerror}",
                "pass --state DIR with a writable folder",
            ) from None

    def _read(self) -> dict:
        f = self.path / KEYS_FILE
        if not f.exists():
            return {}
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise HostError(
                f"cannot read {f}: {e}",
                "restore it from a backup; "
                "deleting it makes new keys and every client must be re-issued",
            ) from None

    def load(self) -> Keys | None:
        """Keys as stored, without making any; None when the state dir is empty."""
        data = self._read()
        if not data:
            return None
        return Keys(
            wg_private=data["wg_private"],
            host_key=data["host_key"],
            admin_key=data["admin_key"],
            peers={n: PeerKeys(**p) for n, p in data.get("peers", {}).items()},
        )

    def keys_for(self, site: Site) -> Keys:
        """Load the keys, make what the site needs and is missing, save only on change.

        Keys of peers no longer in the site are dropped, so a re-added peer gets a
        fresh key and an old device cannot come back.
        """
        data = self._read()
        old = json.dumps(data, sort_keys=True)
        data.setdefault("wg_private", wg_genkey())
        data.setdefault("host_key", ssh_genkey())
        data.setdefault("admin_key", ssh_genkey())
        stored = data.get("peers", {})
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
        data["peers"] = peers
        if json.dumps(data, sort_keys=True) != old:
            self._ensure_dir()
            _write_secret(self.path / KEYS_FILE, json.dumps(data, indent=1, sort_keys=True) + "\n")
        keys = Keys(
            wg_private=data["wg_private"],
            host_key=data["host_key"],
            admin_key=data["admin_key"],
            peers={n: PeerKeys(**v) for n, v in peers.items()},
        )
        self._ensure_dir()
        _write_if_changed(self.path / ADMIN_KEY_FILE, keys.admin_key, secret=True)
        _write_if_changed(
            self.path / KNOWN_HOSTS_FILE,
            f"{site.lan.address.ip} {keys.host_public}\n",
            secret=False,
        )
        return keys

    @property
    def admin_key_path(self) -> Path:
        return self.path / ADMIN_KEY_FILE

    @property
    def known_hosts_path(self) -> Path:
        return self.path / KNOWN_HOSTS_FILE
