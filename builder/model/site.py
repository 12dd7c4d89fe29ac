"""The site model: one TOML file read once into frozen dataclasses.

Pure: knows nothing of libvirt or SSH, and of the state dir only where it goes by default
(beside the site file), not what is in it. Every problem is an InputError carrying the
file and the key path, raised before anything happens; the only files read are the site
file and the `.pub` files it names.
Keys are declared once in FIELDS tables, so the parser, the unknown-key hint
and the README reference come from the same place.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from functools import cache
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from builder.errors import InputError

IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

MODES = ("masquerade", "routed")
# Patterns are applied with fullmatch: `$` alone would let a trailing newline through.
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
PEER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# What the Linux kernel accepts as an interface name (IFNAMSIZ 16 with the NUL), narrowed to
# characters that need no quoting in iptables, nftables, libvirt XML or a shell.
IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
POOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Characters an address or network is written with; anything else (a `%scope`, a space, a
# line break) is refused before `ipaddress` sees it, since it accepts anything after `%`.
ADDR_CHARS_RE = re.compile(r"[0-9A-Fa-f:./]+")
LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Control characters, and the ones YAML also takes for line breaks.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_STRING = 4096
MAX_SITE_BYTES = 16 * 1024 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
SYSTEM_USERS = frozenset(
    ("root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp")
    + ("proxy", "www-data", "backup", "list", "irc", "nobody", "messagebus", "sshd", "_apt")
    + ("systemd-network", "systemd-resolve", "systemd-timesync")
)
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Appliance:
    name: str
    memory_mib: int = 512
    vcpus: int = 1
    disk_gib: int = 2


@dataclass(frozen=True)
class Host:
    """The libvirt host and, when it is remote, the SSH login to it: the admin's identity
    file and the host key pin (a SHA256 fingerprint or a known_hosts file), both workstation
    paths already resolved against the site file's folder."""

    uri: str = "qemu:///system"
    bridge: str = "green0"
    pool: str = "wg-appliance"
    pool_path: str = "/var/lib/libvirt/images/wg-appliance"
    ssh_key: Path | None = None
    host_key: str | None = None
    known_hosts: Path | None = None

    @property
    def remote(self) -> bool:
        return self.uri != "qemu:///system"


@dataclass(frozen=True)
class Lan:
    """The appliance's LAN side: at most one address and one gateway per family, a gateway
    only for a family it has an address of."""

    addresses: tuple[IPInterface, ...]
    gateways: tuple[IPAddress, ...]
    dns: tuple[IPAddress, ...]
    mac: str

    @property
    def ipv4(self) -> IPv4Interface | None:
        return next((a for a in self.addresses if isinstance(a, IPv4Interface)), None)

    @property
    def ipv6(self) -> IPv6Interface | None:
        return next((a for a in self.addresses if isinstance(a, IPv6Interface)), None)

    @property
    def address(self) -> IPInterface:
        """The address SSH, verify, metrics and the host's files use: the IPv4 one when there
        is one (IPFire's GREEN is IPv4), else the IPv6 one."""
        return self.ipv4 or self.addresses[0]

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(a.network for a in self.addresses)

    def gateway_for(self, version: int) -> IPAddress | None:
        return next((g for g in self.gateways if g.version == version), None)

    @property
    def gateway(self) -> IPAddress:
        """The gateway verify pings: the one of `address`'s family when there is one."""
        return self.gateway_for(self.address.version) or self.gateways[0]


@dataclass(frozen=True)
class Ssh:
    user: str
    authorized_keys: tuple[str, ...]


@dataclass(frozen=True)
class WireGuard:
    addresses: tuple[IPInterface, ...]
    listen_port: int
    mode: str
    mtu: int
    endpoint: Endpoint
    client_dns: tuple[str, ...]

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(a.network for a in self.addresses)


@dataclass(frozen=True)
class Allow:
    """One destination a restricted peer may reach: a network, optionally one protocol and
    a port range (lo == hi for a single port)."""

    network: IPNetwork
    proto: str | None = None
    ports: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.proto is None or self.ports is None:
            return str(self.network)
        lo, hi = self.ports
        return f"{self.network} {self.proto}/{lo}" + (f"-{hi}" if hi != lo else "")


@dataclass(frozen=True)
class Peer:
    name: str
    addresses: tuple[IPInterface, ...]
    public_key: str | None
    networks: tuple[IPNetwork, ...]
    endpoint: Endpoint | None
    keepalive: int | None
    preshared_key: bool
    enabled: bool = True
    expires: datetime | None = None  # aware, in UTC
    allow: tuple[Allow, ...] | None = None  # None: everything the site routes
    expired: bool = False  # expires was past when the site was loaded

    @property
    def is_site(self) -> bool:
        """A site-to-site peer has networks behind it; a road warrior has none."""
        return bool(self.networks)

    @property
    def active(self) -> bool:
        """On the live interface: enabled and not expired when the site was loaded."""
        return self.enabled and not self.expired

    @property
    def dns_endpoint(self) -> bool:
        """An endpoint given by name, which the appliance resolves again when stale."""
        return self.endpoint is not None and is_dns_name(self.endpoint.host)

    @property
    def allowed_ips(self) -> tuple[IPNetwork, ...]:
        return tuple(a.network for a in self.addresses) + self.networks


@dataclass(frozen=True)
class Metrics:
    """The Prometheus endpoint on the LAN address; `allow` are the only sources it admits."""

    enabled: bool
    port: int
    allow: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class Site:
    path: Path
    appliance: Appliance
    host: Host
    lan: Lan
    ssh: Ssh
    wireguard: WireGuard
    peers: tuple[Peer, ...]
    metrics: Metrics

    @property
    def name(self) -> str:
        return self.appliance.name

    @property
    def metrics_listen(self) -> Endpoint:
        """Where the exporter listens: the LAN address (of `lan.address`'s family) and port."""
        return Endpoint(str(self.lan.address.ip), self.metrics.port)

    @property
    def uses_ipv6(self) -> bool:
        """IPv6 in the tunnel or on the LAN: then the appliance forwards it."""
        return any(a.version == 6 for a in self.wireguard.addresses + self.lan.addresses)

    def peer(self, name: str) -> Peer:
        for p in self.peers:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.peers) or "none"
        raise InputError(self.path.name, "peers", f"no peer named {name!r} (peers: {known})")

    def default_state_dir(self) -> Path:
        return self.path.parent / ".wg-appliance" / self.name

    def warnings(self) -> list[str]:
        """What is not an error but changes what is rendered, one line each."""
        return [
            f"{self.path}: peers[{i}].expires: {expiry_text(p.expires)} is past: "
            f"peer {p.name!r} is rendered disabled"
            for i, p in enumerate(self.peers)
            if p.expired and p.enabled and p.expires is not None
        ]


def expiry_text(moment: datetime | None) -> str:
    """An expiry as README and status show it: UTC, to the second."""
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- field parsers: each takes (value, ctx) and returns the typed value ---------------------


class _Ctx:
    """Where we are in the file, for error messages."""

    def __init__(self, file: str, base: Path):
        self.file = file
        self.base = base

    def fail(self, key: str, message: str) -> InputError:
        return InputError(self.file, key, message)


Parser = Callable[[Any, _Ctx, str], Any]


def _typed(kind: type, name: str) -> Parser:
    def parse(value: Any, ctx: _Ctx, key: str) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ctx.fail(key, f"expected {name}, got {_type_name(value)}")
        return value

    return parse


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _int_range(lo: int, hi: int) -> Parser:
    def parse(value: Any, ctx: _Ctx, key: str) -> int:
        value = _typed(int, "an integer")(value, ctx, key)
        if not lo <= value <= hi:
            # A huge TOML integer has too many digits for str(): never print it whole.
            shown = str(value) if abs(value) < 10**12 else "the number"
            raise ctx.fail(key, f"{shown} is out of range ({lo}..{hi})")
        return value

    return parse


def _str(value: Any, ctx: _Ctx, key: str) -> str:
    """A non-empty string on one line: no control character reaches any output file."""
    value = _typed(str, "a string")(value, ctx, key)
    if not value.strip():
        raise ctx.fail(key, "must not be empty")
    if len(value) > MAX_STRING:
        raise ctx.fail(key, f"is too long ({len(value)} characters, at most {MAX_STRING})")
    if m := CONTROL_RE.search(value):
        raise ctx.fail(key, f"holds a control character ({m.group()!r}); write it on one line")
    return value


def _matching(pattern: re.Pattern[str], what: str) -> Parser:
    def parse(value: Any, ctx: _Ctx, key: str) -> str:
        value = _str(value, ctx, key)
        if not pattern.fullmatch(value):
            raise ctx.fail(key, f"{value!r} is not a valid {what}")
        return value

    return parse


_hostname = _matching(
    HOSTNAME_RE,
    "host name (lower-case letters, digits and '-', at most 63 characters, "
    "not starting or ending with '-')",
)
_peer_name = _matching(
    PEER_NAME_RE, "peer name (letters, digits, '.', '_', '-', at most 63 characters)"
)
_ifname = _matching(
    IFNAME_RE, "interface name (letters, digits, '.', '_', '-', at most 15 characters)"
)
_pool_name = _matching(POOL_RE, "pool name (letters, digits, '.', '_', '-', at most 64)")


def _user(value: Any, ctx: _Ctx, key: str) -> str:
    value = _matching(HOSTNAME_RE, "user name (lower-case letters, digits and '-')")(
        value, ctx, key
    )
    if value in SYSTEM_USERS:
        raise ctx.fail(key, f"{value!r} is a system account; choose another login name")
    return value


def _abs_path(value: Any, ctx: _Ctx, key: str) -> str:
    """An absolute, normalised folder path on the host (it goes into XML and shell)."""
    value = _str(value, ctx, key)
    if not value.startswith("/") or any(p in ("..", ".") for p in value.split("/")):
        raise ctx.fail(key, f"{value!r} must be an absolute path without '.' or '..'")
    if not re.fullmatch(r"[A-Za-z0-9/_.+-]+", value) or "//" in value:
        raise ctx.fail(key, f"{value!r}: use letters, digits and '/_.+-' only")
    return value.rstrip("/") or "/"


def _list_of(item: Parser, min_items: int = 0) -> Parser:
    """A list, or a single value standing for a list of one."""

    def parse(value: Any, ctx: _Ctx, key: str) -> tuple:
        values = value if isinstance(value, list) else [value]
        if len(values) < min_items:
            raise ctx.fail(key, f"needs at least {min_items} item(s)")
        return tuple(item(v, ctx, f"{key}[{i}]") for i, v in enumerate(values))

    return parse


def _list_only(item: Parser) -> Parser:
    def parse(value: Any, ctx: _Ctx, key: str) -> tuple:
        if not isinstance(value, list):
            raise ctx.fail(key, f"expected a list, got {_type_name(value)}")
        return _list_of(item)(value, ctx, key)

    return parse


def _addr_text(value: Any, ctx: _Ctx, key: str, what: str) -> str:
    value = _str(value, ctx, key)
    if "%" in value:
        raise ctx.fail(key, f"{value!r}: a scoped address (with '%') is not allowed here")
    if not ADDR_CHARS_RE.fullmatch(value):
        raise ctx.fail(key, f"{value!r} is not a valid {what}")
    return value


def _cidr_text(value: Any, ctx: _Ctx, key: str, what: str) -> str:
    value = _addr_text(value, ctx, key, what)
    if "/" not in value:
        raise ctx.fail(key, f"{value!r} has no prefix length (write e.g. {value}/24)")
    return value


def _interface(value: Any, ctx: _Ctx, key: str) -> IPInterface:
    value = _cidr_text(value, ctx, key, "address with prefix")
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise ctx.fail(key, f"{value!r} is not a valid address with prefix") from None


def _ipv4_interface(value: Any, ctx: _Ctx, key: str) -> IPv4Interface:
    iface = _interface(value, ctx, key)
    if not isinstance(iface, IPv4Interface):
        raise ctx.fail(key, f"{value!r} must be an IPv4 address with prefix")
    if iface.network.prefixlen < 31 and iface.ip in (
        iface.network.network_address,
        iface.network.broadcast_address,
    ):
        raise ctx.fail(key, f"{value!r} is the network or broadcast address of its subnet")
    return iface


def _lan_interface(value: Any, ctx: _Ctx, key: str) -> IPInterface:
    """A LAN address: IPv4 as before; IPv6 a global or unique-local host address in a subnet."""
    iface = _interface(value, ctx, key)
    if isinstance(iface, IPv4Interface):
        return _ipv4_interface(value, ctx, key)
    if iface.network.prefixlen > 126:
        raise ctx.fail(key, f"{value!r}: give the LAN subnet's prefix (e.g. /64)")
    if iface.ip.is_link_local or iface.ip.is_multicast or iface.ip.is_loopback:
        raise ctx.fail(key, f"{value!r} is not a global or unique-local IPv6 address")
    if iface.ip == iface.network.network_address:
        raise ctx.fail(key, f"{value!r} is the subnet-router anycast address of its subnet")
    return iface


def _host_interface(value: Any, ctx: _Ctx, key: str) -> IPInterface:
    iface = _interface(value, ctx, key)
    if iface.network.prefixlen != iface.max_prefixlen:
        raise ctx.fail(
            key, f"{value!r} must be a single address (/{iface.max_prefixlen}), it is a subnet"
        )
    return iface


# Networks a peer cannot sit behind: they never leave a host or a link.
_NOT_ROUTABLE = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "224.0.0.0/4", "ff00::/8")
)


def _network(value: Any, ctx: _Ctx, key: str) -> IPNetwork:
    value = _cidr_text(value, ctx, key, "network in CIDR form")
    try:
        return ipaddress.ip_network(value)
    except ValueError:
        try:
            iface = ipaddress.ip_interface(value)
        except ValueError:
            raise ctx.fail(key, f"{value!r} is not a valid network in CIDR form") from None
        raise ctx.fail(
            key, f"{value!r} has host bits set (did you mean {iface.network}?)"
        ) from None


def _peer_network(value: Any, ctx: _Ctx, key: str) -> IPNetwork:
    net = _network(value, ctx, key)
    for bad in _NOT_ROUTABLE:
        if net.version == bad.version and net.overlaps(bad):
            kind = (
                "loopback"
                if bad.is_loopback
                else "link-local"
                if bad.is_link_local
                else "multicast"
            )
            raise ctx.fail(key, f"{net} overlaps the {kind} range {bad}: it cannot be routed")
    return net


def _ip(value: Any, ctx: _Ctx, key: str) -> IPAddress:
    value = _addr_text(value, ctx, key, "IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ctx.fail(key, f"{value!r} is not a valid IPv4 or IPv6 address") from None


def _one_or_list(item: Parser, most: int) -> Parser:
    """One value, or a list of 1..`most`: errors name `key` for one value, `key[i]` in a list."""

    def parse(value: Any, ctx: _Ctx, key: str) -> tuple:
        if not isinstance(value, list):
            return (item(value, ctx, key),)
        if not 1 <= len(value) <= most:
            raise ctx.fail(key, f"needs 1 to {most} items (one per address family)")
        return tuple(item(v, ctx, f"{key}[{i}]") for i, v in enumerate(value))

    return parse


def _ip_str(value: Any, ctx: _Ctx, key: str) -> str:
    value = _addr_text(value, ctx, key, "IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ctx.fail(key, f"{value!r} is not a valid IP address") from None


def _mac(value: Any, ctx: _Ctx, key: str) -> str:
    value = _str(value, ctx, key).lower()
    if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", value):
        raise ctx.fail(key, f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(value[:2], 16) & 1:
        raise ctx.fail(key, f"{value!r} is a multicast MAC address")
    return value


def is_dns_name(host: str) -> bool:
    """RFC 1123 host name: labels of letters, digits and '-', at most 253 characters; a name
    of digits and dots only must be an IPv4 address instead."""
    labels = host.split(".")
    if len(host) > 253 or not all(LABEL_RE.fullmatch(label) for label in labels):
        return False
    return not all(label.isdigit() for label in labels)


def _endpoint(value: Any, ctx: _Ctx, key: str) -> Endpoint:
    value = _str(value, ctx, key)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", value) or re.fullmatch(
        r"([A-Za-z0-9.-]+):(\d{1,5})", value
    )
    if not m:
        raise ctx.fail(key, f"{value!r} is not host:port or [ipv6]:port")
    host, port = m.group(1), int(m.group(2))
    if value.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ctx.fail(key, f"{host!r} is not a valid IPv6 address") from None
    elif not is_dns_name(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ctx.fail(key, f"{host!r} is not a valid host name or IPv4 address") from None
    if not 1 <= port <= 65535:
        raise ctx.fail(key, f"port {port} is out of range (1..65535)")
    return Endpoint(host, port)


def _wg_key(value: Any, ctx: _Ctx, key: str) -> str:
    value = _str(value, ctx, key)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or len(value) != 44:
        raise ctx.fail(key, "is not a WireGuard key (32 bytes in base64, 44 characters)")
    if base64.b64encode(raw).decode() != value:
        raise ctx.fail(key, "is not in canonical base64 (as `wg pubkey` prints it)")
    if is_low_order(raw):
        raise ctx.fail(key, "is a weak key (zero or a low-order point): make a new key pair")
    return value


def is_low_order(public: bytes) -> bool:
    """True for the all-zero key and the other low-order X25519 points: a Diffie-Hellman with
    them gives the all-zero secret, which `cryptography` refuses."""
    try:
        _probe_key().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return True
    return False


@cache
def _probe_key() -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def read_small_text(path: Path, file: str, key: str, limit: int) -> str:
    """A regular file of at most `limit` bytes of UTF-8, opened without blocking: a FIFO, a
    device or a folder is refused before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(file, key, f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(file, key, f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(file, key, f"{path} is larger than {limit // 1024} KiB")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InputError(file, key, f"{path} is not UTF-8 text") from None
    if "\0" in text:
        raise InputError(file, key, f"{path} is binary, not text")
    return text


def _ssh_key(value: Any, ctx: _Ctx, key: str) -> str:
    """Exactly one OpenSSH public key line (no options), or a path (relative to the site
    file) to a .pub file holding one."""
    value = _str(value, ctx, key).strip()
    if value.split()[0] not in SSH_KEY_TYPES:
        path = (ctx.base / value).expanduser()
        if not (value.endswith(".pub") or "/" in value or path.exists()):
            raise ctx.fail(key, f"is neither an SSH public key line nor a path: {value[:40]!r}")
        text = read_small_text(path, ctx.file, key, MAX_KEY_FILE_BYTES)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if len(lines) != 1:
            raise ctx.fail(key, f"{path} must hold exactly one public key line")
        value = _str(lines[0], ctx, key)
    return _ssh_key_line(value, ctx, key)


def _ssh_key_line(value: str, ctx: _Ctx, key: str) -> str:
    parts = value.split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ctx.fail(
            key,
            "not an SSH public key line (type first, one of "
            f"{', '.join(SSH_KEY_TYPES[:3])}, ...; no options before it)",
        )
    if len(parts[1]) > 8192:
        raise ctx.fail(key, "the SSH public key is too large")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ctx.fail(key, "the SSH public key's base64 part is malformed") from None
    n = int.from_bytes(blob[:4], "big")
    if n > len(blob) or blob[4 : 4 + n].decode(errors="replace") != parts[0]:
        raise ctx.fail(key, f"the SSH public key's data does not match its type {parts[0]}")
    return " ".join(parts)


def _mode(value: Any, ctx: _Ctx, key: str) -> str:
    value = _str(value, ctx, key)
    if value not in MODES:
        raise ctx.fail(key, f"unknown mode {value!r} (choose {' or '.join(MODES)})")
    return value


# The SSH transports libvirt has; the tool always connects through libssh2 (see builder.remote
# .libvirtd), whichever the admin writes: its host key check takes a file, and it carries
# large replies, which libssh does not with libvirt 9.0.
URI_RE = re.compile(
    r"(qemu\+(?:ssh|libssh|libssh2))://(?:([a-z_][a-z0-9_-]{0,31})@)?"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?/system(?:\?(.*))?"
)
FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def host_uri_problem(uri: str) -> str | None:
    """Why `uri` is not a libvirt URI the tool may use, or None.

    Only transports whose peer the tool can pin: the local socket (`qemu:///system`) and the
    SSH-based ones, with no parameters: `qemu+tcp://` would send the seed (with the
    appliance's private keys) in clear, `qemu+ext://...?command=` runs a local program,
    `no_verify=1` or `known_hosts_verify=ignore` would accept an unknown host key, and the
    tool sets `keyfile` and `known_hosts` itself from host.ssh_key and the pin.
    """
    if uri == "qemu:///system":
        return None
    m = URI_RE.fullmatch(uri)
    if not m:
        return (
            "use qemu:///system on the host itself, or "
            "qemu+ssh://root@HOST:222/system (also qemu+libssh, qemu+libssh2) from elsewhere"
        )
    host, port, query = m.group(3), m.group(4), m.group(5)
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not a valid IPv6 address"
    elif not is_dns_name(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not a valid host name or address"
    if port is not None and not 1 <= int(port) <= 65535:
        return f"port {port} is out of range (1..65535)"
    if query is not None:
        return (
            "takes no URI parameters: the identity goes in host.ssh_key, the host key in "
            "host.host_key or host.known_hosts, and the tool always checks it"
        )
    return None


def _host_uri(value: Any, ctx: _Ctx, key: str) -> str:
    value = _str(value, ctx, key)
    problem = host_uri_problem(value)
    if problem:
        raise ctx.fail(key, f"{value!r}: {problem}")
    return value


def _fingerprint(value: Any, ctx: _Ctx, key: str) -> str:
    value = _str(value, ctx, key).strip()
    if not FINGERPRINT_RE.fullmatch(value):
        raise ctx.fail(
            key,
            f"{value[:60]!r} is not a SHA256 fingerprint; expected SHA256:... (43 characters "
            "after the colon) as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it",
        )
    return value


def _local_file(value: Any, ctx: _Ctx, key: str) -> Path:
    """A file on this workstation: `~` expanded, relative to the site file's folder."""
    path = Path(_str(value, ctx, key)).expanduser()
    return path if path.is_absolute() else ctx.base / path


def _expires(value: Any, ctx: _Ctx, key: str) -> datetime:
    """A TOML date (00:00 UTC that day) or offset date-time; a local date-time is refused,
    since the appliance and the workstation may be in different zones."""
    example = "e.g. 2026-12-31 or 2026-12-31T18:00:00+01:00, unquoted"
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ctx.fail(
                key, f"{value.isoformat()} has no zone: add an offset (+01:00) or Z for UTC"
            )
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ctx.fail(
        key, f"expected a TOML date or offset date-time ({example}), got " + _type_name(value)
    )


ALLOW_PORTS_RE = re.compile(r"(tcp|udp)/(\d{1,5})(?:-(\d{1,5}))?")


def _allow(value: Any, ctx: _Ctx, key: str) -> Allow:
    """`ADDRESS[/PREFIX] [tcp|udp/PORT[-PORT]]`: one destination of a restricted peer."""
    value = _str(value, ctx, key)
    parts = value.split(" ")
    if len(parts) > 2 or "" in parts:
        raise ctx.fail(
            key,
            f"{value!r} is not 'ADDRESS[/PREFIX]' with an optional ' tcp/PORT', "
            "' udp/PORT' or ' tcp/PORT-PORT'",
        )
    text = _addr_text(parts[0], ctx, key, "address or network")
    if "/" in text:
        network = _network(text, ctx, key)
    else:
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            raise ctx.fail(key, f"{text!r} is not a valid address or network") from None
    if len(parts) == 1:
        return Allow(network)
    m = ALLOW_PORTS_RE.fullmatch(parts[1])
    if not m:
        raise ctx.fail(key, f"{parts[1]!r} is not tcp/PORT, udp/PORT or a range like tcp/8000-8080")
    lo = int(m.group(2))
    hi = int(m.group(3)) if m.group(3) else lo
    for port in (lo, hi):
        if not 1 <= port <= 65535:
            raise ctx.fail(key, f"port {port} is out of range (1..65535)")
    if lo > hi:
        raise ctx.fail(key, f"port range {lo}-{hi} runs backwards (write {hi}-{lo})")
    return Allow(network, m.group(1), (lo, hi))


REQUIRED = object()


@dataclass(frozen=True)
class Field:
    key: str
    parse: Parser
    default: Any
    help: str


# The whole site file schema: section -> fields. README's reference follows this table.
FIELDS: dict[str, tuple[Field, ...]] = {
    "appliance": (
        Field("name", _hostname, REQUIRED, "host name of the VM and the libvirt domain"),
        Field("memory_mib", _int_range(256, 65536), 512, "memory in MiB"),
        Field("vcpus", _int_range(1, 64), 1, "virtual CPUs"),
        Field("disk_gib", _int_range(1, 1024), 2, "disk size in GiB (root grows to it)"),
    ),
    "host": (
        Field(
            "uri",
            _host_uri,
            "qemu:///system",
            "libvirt URI, e.g. qemu+ssh://root@ipfire:222/system",
        ),
        Field("bridge", _ifname, "green0", "host bridge the appliance's NIC joins"),
        Field("pool", _pool_name, "wg-appliance", "libvirt storage pool (made if missing)"),
        Field(
            "pool_path", _abs_path, "/var/lib/libvirt/images/wg-appliance", "folder of a new pool"
        ),
        Field("ssh_key", _local_file, None, "SSH identity for the host (default: agent, ~/.ssh)"),
        Field("host_key", _fingerprint, None, "the host's SSH key fingerprint, SHA256:..."),
        Field("known_hosts", _local_file, None, "or a known_hosts file that pins the host key"),
    ),
    "lan": (
        Field(
            "address",
            _one_or_list(_lan_interface, 2),
            REQUIRED,
            "appliance LAN address with prefix, or a list: one IPv4 and/or one IPv6",
        ),
        Field(
            "gateway",
            _one_or_list(_ip, 2),
            REQUIRED,
            "LAN default gateway (IPFire GREEN), or one per family",
        ),
        Field("dns", _list_of(_ip), (), "DNS servers for the appliance (IPv4 or IPv6)"),
        Field("mac", _mac, None, "NIC MAC; default derived from the name"),
    ),
    "ssh": (
        Field("user", _user, "wgadmin", "login user on the appliance"),
        Field("authorized_keys", _list_only(_ssh_key), (), "public key lines or .pub paths"),
    ),
    "wireguard": (
        Field("address", _list_of(_interface, 1), REQUIRED, "appliance tunnel address(es), CIDR"),
        Field("listen_port", _int_range(1, 65535), 51820, "UDP port"),
        Field("mode", _mode, "masquerade", "masquerade or routed"),
        Field("mtu", _int_range(1280, 9000), 1420, "tunnel MTU"),
        Field("endpoint", _endpoint, REQUIRED, "host:port clients dial"),
        Field("client_dns", _list_of(_ip_str), (), "DNS servers put in client configs"),
    ),
    "peers": (
        Field("name", _peer_name, REQUIRED, "peer name (unique)"),
        Field("address", _list_of(_host_interface, 1), REQUIRED, "tunnel address(es), /32 or /128"),
        Field("public_key", _wg_key, None, "peer public key; generated when absent"),
        Field("networks", _list_only(_peer_network), (), "LANs behind a site-to-site peer"),
        Field("endpoint", _endpoint, None, "where the appliance dials this peer"),
        Field("keepalive", _int_range(0, 65535), None, "PersistentKeepalive seconds"),
        Field("preshared_key", _typed(bool, "a boolean"), True, "add a preshared key"),
        Field("enabled", _typed(bool, "a boolean"), True, "false: keys kept, not on wg0"),
        Field("expires", _expires, None, "date or offset date-time the appliance removes it"),
        Field("allow", _list_only(_allow), None, "destinations it may reach; absent: all"),
    ),
    "metrics": (
        Field("enabled", _typed(bool, "a boolean"), False, "serve Prometheus metrics"),
        Field("port", _int_range(1, 65535), 9586, "TCP port on the LAN address"),
        Field("allow", _list_only(_network), None, "networks that may scrape; LAN subnet"),
    ),
}


def _closest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (known: {', '.join(known)})"


def _section(table: Any, section: str, ctx: _Ctx, prefix: str) -> dict[str, Any]:
    """Parse one table against FIELDS[section]: unknown keys, required keys, types."""
    if not isinstance(table, dict):
        raise ctx.fail(prefix, f"expected a table, got {_type_name(table)}")
    fields = {f.key: f for f in FIELDS[section]}
    for key in table:
        if key not in fields:
            raise ctx.fail(f"{prefix}.{key}", "unknown key" + _closest(key, list(fields)))
    out: dict[str, Any] = {}
    for f in fields.values():
        if f.key in table:
            out[f.key] = f.parse(table[f.key], ctx, f"{prefix}.{f.key}")
        elif f.default is REQUIRED:
            raise ctx.fail(f"{prefix}.{f.key}", "is required")
        else:
            out[f.key] = f.default
    return out


def default_mac(name: str) -> str:
    """A stable, unicast, locally administered MAC derived from the appliance name."""
    h = bytearray(hashlib.sha256(b"wg-appliance:" + name.encode()).digest()[:6])
    h[0] = (h[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in h)


def load_site(path: str | Path, now: datetime | None = None) -> Site:
    """Read and validate a site file. Raises InputError naming the file and key path.
    Peers whose `expires` is before `now` (default: this moment) are marked expired."""
    path = Path(path)
    file = str(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(file, "", "no such file")
    text = read_small_text(path, file, "", MAX_SITE_BYTES)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line.*\)", "", str(e))
        line = int(m.group(1)) if m else None
        col = f" (column {m.group(2)})" if m else ""
        raise InputError(file, "", f"TOML syntax error: {msg}{col}", line=line) from None
    except RecursionError:
        raise InputError(file, "", "TOML nested too deeply") from None
    except ValueError as e:
        # tomllib lets int() refuse numbers of more than 4300 digits with a plain ValueError.
        raise InputError(file, "", f"a value cannot be read: {str(e)[:80]}") from None
    return parse_site(data, path, now)


def parse_site(data: dict[str, Any], path: Path, now: datetime | None = None) -> Site:
    ctx = _Ctx(str(path), path.parent)
    sections = list(FIELDS)
    for key in data:
        if key not in sections:
            raise ctx.fail(key, "unknown section" + _closest(key, sections))
    for required in ("appliance", "lan", "wireguard"):
        if required not in data:
            raise ctx.fail(required, f"section [{required}] is required")

    appliance = Appliance(**_section(data["appliance"], "appliance", ctx, "appliance"))
    host = Host(**_section(data.get("host", {}), "host", ctx, "host"))
    if host.host_key and host.known_hosts:
        raise ctx.fail("host.known_hosts", "give host.host_key or host.known_hosts, not both")
    lan_d = _section(data["lan"], "lan", ctx, "lan")
    ssh_d = _section(data.get("ssh", {}), "ssh", ctx, "ssh")
    wg_d = _section(data["wireguard"], "wireguard", ctx, "wireguard")

    lan = Lan(
        addresses=lan_d["address"],
        gateways=lan_d["gateway"],
        dns=lan_d["dns"],
        mac=lan_d["mac"] or default_mac(appliance.name),
    )
    _check_lan(lan, data["lan"], ctx)

    wg = WireGuard(**_as_fields(wg_d))
    _check_wireguard(wg, lan, ctx)

    raw_peers = data.get("peers", [])
    if not isinstance(raw_peers, list):
        raise ctx.fail("peers", "expected [[peers]] entries (an array of tables)")
    peers = tuple(_peer(p, i, ctx) for i, p in enumerate(raw_peers))
    _check_peers(peers, wg, lan, ctx)
    metrics = _metrics(_section(data.get("metrics", {}), "metrics", ctx, "metrics"), lan, ctx)
    moment = now or datetime.now(UTC)
    peers = tuple(
        replace(p, expired=True) if p.expires is not None and p.expires <= moment else p
        for p in peers
    )

    return Site(
        path=path,
        appliance=appliance,
        host=host,
        lan=lan,
        ssh=Ssh(user=ssh_d["user"], authorized_keys=ssh_d["authorized_keys"]),
        wireguard=wg,
        peers=peers,
        metrics=metrics,
    )


def _item_key(raw: dict[str, Any], name: str, i: int) -> str:
    """`lan.address` when the file gave one value, `lan.address[1]` in a list."""
    return f"lan.{name}" + (f"[{i}]" if isinstance(raw.get(name), list) else "")


def _check_lan(lan: Lan, raw: dict[str, Any], ctx: _Ctx) -> None:
    """One address per family; each gateway inside the subnet of its family's address."""
    seen: set[int] = set()
    for i, a in enumerate(lan.addresses):
        if a.version in seen:
            raise ctx.fail(_item_key(raw, "address", i), f"more than one IPv{a.version} address")
        seen.add(a.version)
    seen = set()
    for i, g in enumerate(lan.gateways):
        key = _item_key(raw, "gateway", i)
        if g.version in seen:
            raise ctx.fail(key, f"more than one IPv{g.version} gateway")
        seen.add(g.version)
        own = lan.ipv4 if g.version == 4 else lan.ipv6
        if own is None:
            raise ctx.fail(key, f"{g} is IPv{g.version}, but lan.address has no IPv{g.version}")
        if g not in own.network:
            raise ctx.fail(key, f"{g} is outside the LAN subnet {own.network}")
        if g == own.ip:
            raise ctx.fail(key, "is the appliance's own address")


def _metrics(parsed: dict[str, Any], lan: Lan, ctx: _Ctx) -> Metrics:
    """`allow` defaults to the LAN subnet; an empty list would serve no one, so it is refused,
    and so is the port SSH answers on."""
    if parsed["port"] == 22:
        raise ctx.fail("metrics.port", "22 is the appliance's SSH port; choose another")
    allow = parsed["allow"]
    if allow is None:
        allow = (lan.address.network,)
    elif not allow:
        raise ctx.fail("metrics.allow", "is empty: no one could scrape; leave it out for the LAN")
    for i, n in enumerate(allow):
        if n.version != lan.address.version:
            raise ctx.fail(
                f"metrics.allow[{i}]",
                f"{n} is IPv{n.version}; metrics listen on the LAN address {lan.address.ip} only",
            )
    return Metrics(enabled=parsed["enabled"], port=parsed["port"], allow=allow)


def _check_wireguard(wg: WireGuard, lan: Lan, ctx: _Ctx) -> None:
    seen_versions: set[int] = set()
    for i, addr in enumerate(wg.addresses):
        key = "wireguard.address" + (f"[{i}]" if len(wg.addresses) > 1 else "")
        if addr.version in seen_versions:
            raise ctx.fail(key, f"more than one IPv{addr.version} tunnel address")
        seen_versions.add(addr.version)
        if addr.network.prefixlen == addr.max_prefixlen:
            raise ctx.fail(key, f"{addr} is a single address; give the tunnel subnet (e.g. /24)")
        if addr.ip == addr.network.network_address:
            raise ctx.fail(key, f"{addr} is the subnet's network address")
        for ln in lan.networks:
            if addr.version == ln.version and addr.network.overlaps(ln):
                raise ctx.fail(key, f"{addr.network} overlaps the LAN subnet {ln}")


def _peer(raw: Any, i: int, ctx: _Ctx) -> Peer:
    return Peer(**_as_fields(_section(raw, "peers", ctx, f"peers[{i}]")))


def _as_fields(parsed: dict[str, Any]) -> dict[str, Any]:
    """A parsed section as dataclass fields: the file says `address` (one or a list), the
    model holds `addresses`."""
    return {("addresses" if k == "address" else k): v for k, v in parsed.items()}


def _check_peers(peers: tuple[Peer, ...], wg: WireGuard, lan: Lan, ctx: _Ctx) -> None:
    names: dict[str, int] = {}
    addrs: dict[Any, int] = {}
    keys: dict[str, int] = {}
    nets: list[tuple[IPNetwork, str]] = []
    own = {a.ip for a in wg.addresses}
    families = {n.version for n in wg.networks}
    for i, p in enumerate(peers):
        if p.name in names:
            raise ctx.fail(
                f"peers[{i}].name", f"duplicate peer name {p.name!r} (also peers[{names[p.name]}])"
            )
        names[p.name] = i
        if p.public_key:
            if p.public_key in keys:
                raise ctx.fail(f"peers[{i}].public_key", f"same key as peers[{keys[p.public_key]}]")
            keys[p.public_key] = i
        for j, a in enumerate(p.addresses):
            key = f"peers[{i}].address" + (f"[{j}]" if len(p.addresses) > 1 else "")
            if a.version not in families:
                raise ctx.fail(
                    key, f"{a.ip} is IPv{a.version}, but the tunnel has no IPv{a.version} subnet"
                )
            if not any(a.ip in n for n in wg.networks):
                subnets = ", ".join(str(n) for n in wg.networks)
                raise ctx.fail(key, f"{a.ip} is outside the wireguard subnets ({subnets})")
            if a.ip in own:
                raise ctx.fail(key, f"{a.ip} is the appliance's own tunnel address")
            if a.ip in addrs:
                raise ctx.fail(key, f"duplicate address {a.ip} (also peers[{addrs[a.ip]}])")
            addrs[a.ip] = i
        for j, n in enumerate(p.networks):
            key = f"peers[{i}].networks[{j}]"
            if n.version not in families:
                raise ctx.fail(
                    key, f"{n} is IPv{n.version}, but the tunnel has no IPv{n.version} subnet"
                )
            for wn in wg.networks:
                if n.overlaps(wn):
                    raise ctx.fail(key, f"{n} overlaps the wireguard subnet {wn}")
            for ln in lan.networks:
                if n.version == ln.version and n.overlaps(ln):
                    raise ctx.fail(key, f"{n} overlaps the LAN subnet {ln}")
            nets.append((n, key))
        _check_allow(p, i, ctx)
    _check_disjoint(nets, ctx)


def _check_allow(p: Peer, i: int, ctx: _Ctx) -> None:
    """An allowed destination of a family the peer has no address of would never match."""
    families = {a.version for a in p.addresses}
    for j, a in enumerate(p.allow or ()):
        if a.network.version not in families:
            raise ctx.fail(
                f"peers[{i}].allow[{j}]",
                f"{a.network} is IPv{a.network.version}, but {p.name!r} has no "
                f"IPv{a.network.version} address",
            )


def _check_disjoint(nets: list[tuple[IPNetwork, str]], ctx: _Ctx) -> None:
    """Peer networks must not overlap: sorted by start address, two CIDR blocks overlap only
    if one holds the next, so one pass finds any overlap (n log n; 3000 branches in ms)."""
    order = {key: i for i, (_, key) in enumerate(nets)}
    for version in (4, 6):
        spans = sorted(
            (int(n.network_address), -int(n.broadcast_address), n, key)
            for n, key in nets
            if n.version == version
        )
        widest: tuple[int, IPNetwork, str] | None = None
        for start, neg_end, n, key in spans:
            if widest is not None and start <= widest[0]:
                (net_a, key_a), (net_b, key_b) = sorted(
                    [(widest[1], widest[2]), (n, key)], key=lambda nk: order[nk[1]]
                )
                raise ctx.fail(key_b, f"{net_b} overlaps {net_a} ({key_a})")
            if widest is None or -neg_end > widest[0]:
                widest = (-neg_end, n, key)
