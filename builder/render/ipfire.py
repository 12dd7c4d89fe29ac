"""What an IPFire host needs for an appliance: a firewall.local block and static routes.

Pure: text in, text out. builder.remote.ipfire fetches, uploads and applies.

The block is a shell function plus a `case "$1"` of its own, placed before the admin's
`case`: IPFire's `reload)` branch runs `$0 stop; $0 start`, so the block sees every
start and stop without touching the admin's branches. Its rules live in chains of their
own (WGA_<NAME>_FWD, _NAT, _RAW) jumped to from CUSTOMFORWARD, nat CUSTOMPREROUTING and
raw PREROUTING, so stop removes exactly them and never flushes the shared CUSTOM* chains.

Routed mode and the asymmetric path: the appliance sits on GREEN beside the LAN hosts.
A LAN host sends tunnel-bound packets to its default gateway, IPFire, which routes them
back out of GREEN to the appliance; the appliance answers the LAN host directly. IPFire
sees one half of each flow. With nf_conntrack_tcp_loose=0 (IPFire's setting) conntrack
calls the half-seen packets INVALID and the CONNTRACK chain drops them; with pickup on,
they are NEW without SYN and BADTCP drops them before CUSTOMFORWARD is reached (both
measured in the lab). The block takes the LAN-to-tunnel half out of conntrack in the raw
table (CT --notrack) and accepts it in its forward chain: untracked packets are neither
NEW nor INVALID, so neither BADTCP nor CONNTRACK touches them, whatever the sysctl says.
Masquerade at the appliance would avoid the routes but hide the far side's address; DHCP
option 121 needs every LAN host's cooperation.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from ipaddress import IPv4Network

from builder.errors import HostError, InputError
from builder.model.site import Site
from builder.resources import data_dir
from builder.text import printable

DATA = data_dir("ipfire")
FIREWALL_LOCAL = "/etc/sysconfig/firewall.local"
ROUTING = "/var/ipfire/main/routing"
RED_IFACE = "/var/ipfire/red/iface"
STATIC_ROUTES = "/etc/rc.d/init.d/static-routes"
IPTABLES = "/sbin/iptables -w"
MARK = "wg-appliance"
# iptables chain names hold at most 28 characters.
CHAIN_MAX = 28

BEGIN_RE = re.compile(rf"^# BEGIN {MARK} (\S+)\s*$")
END_RE = re.compile(rf"^# END {MARK} (\S+)\s*$")
META_RE = re.compile(rf"^# {MARK}-meta: (.*)$")
CASE_RE = re.compile(r"""^\s*case\s+["']?\$\{?1\}?["']?\s+in\b""")
# A name in the BEGIN/END markers: one token that BEGIN_RE and END_RE read back whole.
MARKER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Chains:
    forward: str
    nat: str
    raw: str
    function: str

    @property
    def all(self) -> tuple[tuple[str, str], ...]:
        """(table, chain) pairs, in the order stop removes them."""
        return (("filter", self.forward), ("nat", self.nat), ("raw", self.raw))


@dataclass(frozen=True)
class Route:
    network: IPv4Network
    gateway: str
    remark: str

    def line(self) -> str:
        return f"on,{self.network},{self.gateway},{self.remark}"


def host_text(data: bytes) -> str:
    """A host file as text that encodes back to exactly its bytes, UTF-8 or not."""
    return data.decode("utf-8", errors="surrogateescape")


def host_bytes(text: str) -> bytes:
    """The inverse of host_text: the bytes to write to the host."""
    return text.encode("utf-8", errors="surrogateescape")


def lines_of(text: str, keepends: bool = False) -> list[str]:
    """Lines as sh sees them: split at newlines only (str.splitlines also splits at
    \r, \x0c, \x85, \u2028, ... which sh leaves inside a line)."""
    if not text:
        return []
    parts = text.split("\n")
    if keepends:
        parts = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    elif not parts[-1]:
        parts.pop()
    return parts


def _has_control(text: str) -> bool:
    return printable(text, keep_newlines=False) != text


def _word(site: Site, key: str, value: object) -> str:
    """A site value as one shell word on one line: quoted, and refused if it holds a
    newline or another control character (no interface name or address does)."""
    text = str(value)
    if _has_control(text):
        raise InputError(
            str(site.path),
            key,
            f"{printable(text, keep_newlines=False)!r} holds control characters",
        )
    return shlex.quote(text)


def _comment(value: object) -> str:
    """A site value inside a shell comment: control characters (newlines too) escaped."""
    return printable(str(value), keep_newlines=False)


def _meta(**values: object) -> str:
    """key=value tokens for the meta line: one token each, as find_blocks reads them."""
    return " ".join(f"{k}={_comment(v).replace(' ', '_')}" for k, v in values.items())


def _marker_name(site: Site) -> str:
    """The appliance name as the BEGIN/END markers hold it; anything else is refused."""
    if not MARKER_NAME_RE.fullmatch(site.name):
        raise InputError(
            str(site.path),
            "appliance.name",
            f"{_comment(site.name)!r} cannot mark a block in {FIREWALL_LOCAL}",
        )
    return site.name


@dataclass(frozen=True)
class HostFiles:
    """The two files as they should be on the host, and what the admin should know."""

    firewall_local: str
    routing: str
    notes: tuple[str, ...] = ()


def chains_for(name: str) -> Chains:
    """Chain and shell function names for an appliance; long names get a short digest."""
    token = re.sub(r"[^A-Za-z0-9]", "_", name).upper()
    room = CHAIN_MAX - len("WGA__FWD")
    if len(token) > room:
        digest = hashlib.sha256(name.encode()).hexdigest()[:6].upper()
        token = f"{token[: room - 7]}_{digest}"
    base = f"WGA_{token}"
    return Chains(f"{base}_FWD", f"{base}_NAT", f"{base}_RAW", f"wga_{token.lower()}")


def red_port(site: Site) -> int:
    """The UDP port clients dial on RED: the endpoint's port (usually the listen port)."""
    return site.wireguard.endpoint.port


def routed_networks(site: Site) -> tuple[IPv4Network, ...]:
    """Networks behind the appliance that GREEN reaches through it (IPFire 2.x is IPv4)."""
    if site.wireguard.mode != "routed":
        return ()
    nets = [n for n in site.wireguard.networks if isinstance(n, IPv4Network)]
    for peer in site.peers:
        nets += [n for n in peer.networks if isinstance(n, IPv4Network)]
    return tuple(dict.fromkeys(nets))


def routes(site: Site) -> tuple[Route, ...]:
    gateway = str(site.lan.address.ip)
    out = []
    tunnel = set(site.wireguard.networks)
    name = _marker_name(site)
    for net in routed_networks(site):
        what = "tunnel" if net in tunnel else "peer " + _peer_of(site, net)
        out.append(Route(net, gateway, _remark(site, f"{MARK} {name} {what}")))
    return tuple(out)


def _remark(site: Site, remark: str) -> str:
    """The routing file's last field: IPFire's web UI splits lines at ',', so none in it."""
    if "," in remark or _has_control(remark):
        raise InputError(
            str(site.path),
            "peers",
            f"{_comment(remark)!r} cannot be a remark in {ROUTING} (no ',' or control characters)",
        )
    return remark


def _peer_of(site: Site, net: IPv4Network) -> str:
    return next(p.name for p in site.peers if net in p.networks)


def teardown_lines(chains: Chains, indent: str = "") -> list[str]:
    """Shell that removes an appliance's jumps and chains; harmless when they are gone."""
    ipt = IPTABLES
    lines = [
        f"while {ipt} -D CUSTOMFORWARD -j {chains.forward} 2>/dev/null; do :; done",
        f"while {ipt} -t nat -D CUSTOMPREROUTING -j {chains.nat} 2>/dev/null; do :; done",
        f"while {ipt} -t raw -D PREROUTING -j {chains.raw} 2>/dev/null; do :; done",
    ]
    for table, chain in chains.all:
        lines.append(f"{ipt} -t {table} -F {chain} 2>/dev/null")
        lines.append(f"{ipt} -t {table} -X {chain} 2>/dev/null")
    return [indent + line for line in lines]


def teardown_script(name: str) -> str:
    """Standalone teardown, run on removal in case the block was edited away by hand."""
    return "\n".join(teardown_lines(chains_for(name))) + "\ntrue\n"


def render_block(site: Site) -> str:
    """The marked block for one appliance, ending with a newline.

    Every site value reaches the shell as one quoted word (_word) or inside a comment with
    its control characters escaped (_comment); chain and function names are [A-Za-z0-9_]."""
    name = _marker_name(site)
    c = chains_for(name)
    mode = site.wireguard.mode
    addr = _word(site, "lan.address", site.lan.address.ip)
    lan = _word(site, "lan.address", site.lan.address.network)
    br = _word(site, "host.bridge", site.host.bridge)
    port = _word(site, "wireguard.endpoint", red_port(site))
    listen = site.wireguard.listen_port
    dest = _word(site, "wireguard.listen_port", f"{site.lan.address.ip}:{listen}")
    dport = _word(site, "wireguard.listen_port", listen)
    nets = routed_networks(site)
    ipt = IPTABLES
    t = "\t"
    red = f'"${c.function}_red"'
    no_red = shlex.quote(f"{MARK} {name}: no port forward until RED is up")
    lines = [
        f"# BEGIN {MARK} {name}",
        f"# {MARK}-meta: " + _meta(address=site.lan.address.ip, port=red_port(site), mode=mode),
        f"# Managed by {MARK} for appliance {name} ({_comment(site.lan.address.ip)} on "
        f"{_comment(site.host.bridge)}, {_comment(mode)} mode).",
        f"# Do not edit: `{MARK} ipfire --apply` rewrites this block, `--remove` deletes it.",
        f"# Its rules live in chains {c.forward[:-4]}_* of their own: stop removes exactly them",
        "# and never flushes the CUSTOM* chains that hold your own rules.",
        f"{c.function}() {{",
        *teardown_lines(c, t),
        f'{t}[ "$1" = start ] || return 0',
        f"{t}{ipt} -N {c.forward}",
        f"{t}{ipt} -t nat -N {c.nat}",
        f"{t}{ipt} -t raw -N {c.raw}",
        f"{t}# Clients dial RED udp/{_comment(red_port(site))}; RED's name is read now, "
        "as it changes with the uplink.",
        f"{t}{c.function}_red=$(cat {RED_IFACE} 2>/dev/null)",
        f"{t}if [ -n {red} ]; then",
        f"{t}{t}{ipt} -t nat -A {c.nat} -i {red} -p udp --dport {port} "
        f"-j DNAT --to-destination {dest}",
        f"{t}{t}{ipt} -A {c.forward} -i {red} -o {br} -p udp -d {addr} "
        f"--dport {dport} -m conntrack --ctstate DNAT -j ACCEPT",
        f"{t}else",
        f"{t}{t}echo {no_red} >&2",
        f"{t}fi",
    ]
    if nets:
        lines += [
            f"{t}# Routed mode: IPFire sees only the LAN-to-tunnel half of these flows (the",
            f"{t}# appliance answers LAN hosts directly): keep it out of conntrack, accept it.",
        ]
        for net in nets:
            d = _word(site, "wireguard.networks", net)
            lines.append(f"{t}{ipt} -t raw -A {c.raw} -i {br} -s {lan} -d {d} -j CT --notrack")
            lines.append(f"{t}{ipt} -A {c.forward} -i {br} -o {br} -s {lan} -d {d} -j ACCEPT")
    lines += [
        f"{t}{ipt} -A CUSTOMFORWARD -j {c.forward}",
        f"{t}{ipt} -t nat -A CUSTOMPREROUTING -j {c.nat}",
        f"{t}{ipt} -t raw -I PREROUTING -j {c.raw}",
        "}",
        'case "$1" in',
        f'start|stop) {c.function} "$1" ;;',
        "esac",
        f"# END {MARK} {name}",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Block:
    name: str
    start: int  # line index of BEGIN
    end: int  # line index of END
    meta: dict[str, str]


def find_blocks(text: str, where: str = FIREWALL_LOCAL) -> list[Block]:
    """The wg-appliance blocks in a firewall.local; a broken marker pair is a HostError."""
    lines = lines_of(text)
    blocks: list[Block] = []
    open_name, open_at, meta = None, 0, {}
    for i, line in enumerate(lines):
        if m := BEGIN_RE.match(line):
            if open_name is not None:
                raise _broken(where, open_name, i)
            open_name, open_at, meta = m.group(1), i, {}
        elif (m := META_RE.match(line)) and open_name is not None:
            meta = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        elif m := END_RE.match(line):
            if m.group(1) != open_name:
                raise _broken(where, m.group(1), i)
            blocks.append(Block(open_name, open_at, i, meta))
            open_name = None
    if open_name is not None:
        raise _broken(where, open_name, open_at)
    names = [b.name for b in blocks]
    for n in names:
        if names.count(n) > 1:
            raise HostError(
                f"{where}: the block of appliance {n} appears twice",
                f"delete one of the two '# BEGIN {MARK} {n}' ... '# END' blocks by hand",
            )
    return blocks


def _broken(where: str, name: str, index: int) -> HostError:
    return HostError(
        f"{where}: line {index + 1}: the '{MARK} {name}' block has unmatched BEGIN/END markers",
        "repair the file by hand (restore a backup next to it, or delete the partial block)",
    )


def _insert_at(lines: list[str], blocks: list[Block]) -> int:
    """After the last appliance block; else before the admin's `case "$1"` and the comment
    right above it; else after the leading shebang and comments."""
    if blocks:
        at = blocks[-1].end + 1
        return at + 1 if at < len(lines) and not lines[at].strip() else at
    for i, line in enumerate(lines):
        if CASE_RE.match(line):
            while i > 1 and lines[i - 1].startswith("#"):
                i -= 1
            return i
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    return i


def merge_firewall_local(current: str, site: Site) -> str:
    """`current` with this appliance's block added or replaced; every other line kept."""
    if not current.strip():
        current = "#!/bin/sh\n"
    blocks = find_blocks(current)
    port = str(red_port(site))
    for b in blocks:
        if b.name != site.name and b.meta.get("port") == port:
            raise HostError(
                f"appliance {b.name} already forwards RED udp/{port} ({FIREWALL_LOCAL})",
                "give this site another wireguard.endpoint port, or remove the other "
                f"appliance with `{MARK} ipfire --remove`",
            )
    lines = lines_of(current)
    block = lines_of(render_block(site))
    mine = next((b for b in blocks if b.name == site.name), None)
    if mine is not None:
        lines[mine.start : mine.end + 1] = block
    else:
        at = _insert_at(lines, blocks)
        lines[at:at] = [*block, ""]
    return "\n".join(lines) + "\n"


def remove_firewall_block(current: str, name: str) -> str:
    """`current` without the appliance's block (and the blank line that followed it)."""
    mine = next((b for b in find_blocks(current) if b.name == name), None)
    if mine is None:
        return current
    lines = lines_of(current, keepends=True)
    end = mine.end + 1
    if end < len(lines) and not lines[end].strip():
        end += 1
    del lines[mine.start : end]
    return "".join(lines)


def _is_ours(line: str, name: str) -> bool:
    parts = line.rstrip("\n").split(",", 3)
    remark = parts[3] if len(parts) == 4 else ""
    return remark == f"{MARK} {name}" or remark.startswith(f"{MARK} {name} ")


def merge_routing(current: str, site: Site) -> tuple[str, tuple[str, ...]]:
    """Routing file with this appliance's lines replaced; other lines kept in place.

    Another enabled line for one of our networks via another gateway is a HostError: IPFire
    would install whichever comes first. Via the same gateway it is only noted.
    """
    mine = routes(site)
    kept = [ln for ln in lines_of(current) if not _is_ours(ln, site.name)]
    notes = []
    gateway = str(site.lan.address.ip)
    wanted = {str(r.network) for r in mine}
    for ln in kept:
        parts = ln.split(",")
        if len(parts) < 3 or parts[0] != "on" or parts[1] not in wanted:
            continue
        if parts[2] != gateway:
            raise HostError(
                f"{ROUTING} already routes {parts[1]} via {parts[2]} ({ln!r}), "
                f"not via the appliance {gateway}",
                "disable or delete that route in the web UI (Network > Routing), "
                "or give the site other networks",
            )
        notes.append(
            f"{ROUTING} has its own line for {parts[1]} via {gateway} ({ln!r}); "
            "it does the same as ours and can go"
        )
    text = "\n".join([*kept, *(r.line() for r in mine)])
    return (text + "\n" if text else ""), tuple(notes)


def remove_routing(current: str, name: str) -> str:
    kept = [ln for ln in lines_of(current) if not _is_ours(ln, name)]
    return "\n".join(kept) + "\n" if kept else ""


def stock_firewall_local() -> str:
    return (DATA / "firewall.local").read_text()


def stock_routing() -> str:
    return (DATA / "routing").read_text()


def host_files(
    site: Site,
    firewall_local: str | None = None,
    routing: str | None = None,
    remove: bool = False,
) -> HostFiles:
    """Both files as they should be; the host's current ones, else IPFire's stock ones."""
    fw = stock_firewall_local() if firewall_local is None else firewall_local
    rt = stock_routing() if routing is None else routing
    if remove:
        return HostFiles(remove_firewall_block(fw, site.name), remove_routing(rt, site.name))
    require_ipv4(site)
    new_rt, notes = merge_routing(rt, site)
    if site.uses_ipv6:
        notes += (IPV6_NOTE,)
    return HostFiles(merge_firewall_local(fw, site), new_rt, notes)


def require_ipv4(site: Site) -> None:
    """IPFire's files name the appliance by its IPv4 address: an IPv6-only LAN has none."""
    if site.lan.ipv4 is None:
        raise InputError(
            str(site.path),
            "lan.address",
            "has no IPv4 address: IPFire 2.x forwards and routes IPv4 only (GREEN and RED)",
        )


# Said once per run: the site's IPv6 stays between the appliance and its LAN and tunnel.
IPV6_NOTE = (
    "IPFire 2.x has no IPv6 on RED: these files leave IPv6 out (no port forward or route "
    "for it); clients reach the appliance through IPFire over IPv4"
)
