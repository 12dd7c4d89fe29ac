"""Keys as pure derivation: what keys a site needs, made from what is stored and fresh ones
for what is missing. No file is read or written here (builder.local.state does that), so the
commands that create keys and the ones that only look use the same derivation.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from builder.model.site import Site


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
    """An ed25519 private key in OpenSSH's own format (what sshd and paramiko read)."""
    if not isinstance(value, str):
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


def keys_problem(data: object) -> str:
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


def keys_from(data: dict) -> Keys:
    return Keys(
        wg_private=data["wg_private"],
        host_key=data["host_key"],
        admin_key=data["admin_key"],
        peers={
            n: PeerKeys(p["public"], p.get("private"), p.get("psk"))
            for n, p in data["peers"].items()
        },
    )


def derive(site: Site, stored: dict | None) -> dict:
    """The stored keys (keys.json's content) the site needs: kept where stored, made where
    missing. Keys of peers no longer in the site are dropped, so a re-added peer gets a fresh
    key and an old device cannot come back."""
    data = stored or {
        "wg_private": wg_genkey(),
        "host_key": ssh_genkey(),
        "admin_key": ssh_genkey(),
        "peers": {},
    }
    before = data["peers"]
    peers: dict[str, dict] = {}
    for p in site.peers:
        prev = before.get(p.name, {})
        if p.public_key:
            priv = None
            pub = p.public_key
        elif prev.get("private"):
            # keys_problem has checked that the stored public key is this private key's:
            # deriving it again would cost a curve multiplication per peer on every command.
            priv = prev["private"]
            pub = prev.get("public") or wg_pubkey(priv)
        else:
            priv = wg_genkey()
            pub = wg_pubkey(priv)
        psk = (prev.get("psk") or wg_genpsk()) if p.preshared_key else None
        peers[p.name] = {"public": pub, "private": priv, "psk": psk}
    return {**data, "peers": peers}
