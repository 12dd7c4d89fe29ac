"""Rendering: site + keys in, file contents out. Pure, so it is fast and golden-testable."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from functools import cache
from pathlib import Path

import jinja2

from builder.errors import RenderError
from builder.guest import agent as guest_agent
from builder.guest.agent import FILES as GUEST_FILES
from builder.guest.agent import IMAGE_FILE, METRICS_UNIT, peers_text
from builder.model.keys import Keys
from builder.model.site import CONTROL_RE, Peer, Site
from builder.resources import data_dir

TEMPLATES = data_dir("cloud-init")
SEED_FILES = ("user-data", "meta-data", "network-config")
WG0_HELPER = Path(__file__).resolve().parent.parent / "guest" / "wg0.py"
# Files the seed installs that no site value shapes: guest path -> (source, mode).
STATIC_FILES = {
    "/usr/local/lib/wg-appliance/wg0.py": (WG0_HELPER, 0o644),
    "/etc/systemd/system/wg-quick@wg0.service.d/wg0-up.conf": (
        TEMPLATES / "wg0-up.conf",
        0o644,
    ),
}
# The exporter's program, shipped into the guest as it is in this checkout.
EXPORTER = Path(__file__).resolve().parent.parent / "guest" / "metrics.py"


def _one_line(value: object) -> object:
    """Every `{{ }}` in every template ends on the line it started: a value with a line break
    could start a new wg-quick key (`PreUp = ...`) or nftables rule. The site model refuses
    such values already; this holds even if a new key forgets to. YAML templates pass values
    through `tojson`, whose output never holds a raw control character."""
    if isinstance(value, str) and CONTROL_RE.search(value):
        raise RenderError(f"refusing to render a value with a control character: {value[:60]!r}")
    return value


@cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=_one_line,
    )
    env.filters["gz_b64"] = gz_b64
    return env


def gz_b64(text: str) -> str:
    """cloud-init's `gz+b64` encoding; no timestamp in the gzip header, so the same file makes
    the same seed."""
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()


def _render(template: str, **context) -> str:
    return _env().get_template(template).render(**context)


def render_wg_conf(site: Site, keys: Keys) -> str:
    return _render("wg0.conf.j2", site=site, keys=keys)


def render_nftables(site: Site) -> str:
    return _render(
        "nftables.conf.j2",
        site=site,
        peer_rules=peer_rules(site),
        lan_nets=[(_family(n.version), n) for n in site.lan.networks],
        metrics_family=_family(site.lan.address.version),
    )


def _family(version: int) -> str:
    """The nftables address match of an IP version."""
    return "ip" if version == 4 else "ip6"


def peer_rules(site: Site) -> list[str]:
    """Forward rules of the peers with an `allow` list: what they may reach, then a drop for
    the rest of what they send. A peer is known by its source address, which WireGuard
    guarantees is one of its AllowedIPs; answers pass the chain's established rule."""
    rules = []
    for p in site.peers:
        if not p.active or p.allow is None:
            continue
        rules.append(f"# {p.name}: only what its allow list names")
        for version, family in ((4, "ip"), (6, "ip6")):
            sources = [str(n) for n in p.allowed_ips if n.version == version]
            if not sources:
                continue
            src = sources[0] if len(sources) == 1 else "{ " + ", ".join(sources) + " }"
            match = f'iifname "wg0" {family} saddr {src}'
            for a in p.allow:
                if a.network.version != version:
                    continue
                rule = f"{match} {family} daddr {a.network}"
                if a.proto is not None and a.ports is not None:
                    lo, hi = a.ports
                    rule += f" {a.proto} dport {lo}" + (f"-{hi}" if hi != lo else "")
                rules.append(rule + " accept")
            rules.append(f"{match} drop")
    return rules


def timed_peers(site: Site) -> list[Peer]:
    """The live peers the appliance's timer acts on: those with an expiry or an endpoint name."""
    return [p for p in site.peers if p.active and (p.expires is not None or p.dns_endpoint)]


def render_peers_json(site: Site, keys: Keys) -> str:
    """What the appliance's timer acts on without a workstation: the expiry of each peer
    that has one and the endpoint names to re-resolve, with the site's DNS servers."""
    peers = []
    for p in timed_peers(site):
        entry: dict[str, object] = {}
        if p.expires is not None:
            entry["expires"] = int(p.expires.timestamp())
        if p.dns_endpoint:
            entry["endpoint"] = str(p.endpoint)
            entry["address"] = str(p.addresses[0].ip)  # poked after a new endpoint
        peers.append({"name": p.name, "public_key": keys.peers[p.name].public, **entry})
    return peers_text({"dns": [str(d) for d in site.lan.dns], "peers": peers})


@cache
def agent_source() -> str:
    return Path(guest_agent.__file__).read_text()


def render_sysctl(site: Site) -> str:
    return _render("sysctl.conf.j2", ipv6=site.uses_ipv6)


def render_metrics_unit(site: Site) -> str:
    return _render(
        "metrics.service.j2",
        site=site,
        program=GUEST_FILES["metrics.py"][0],
        names=GUEST_FILES["names.json"][0],
        image=IMAGE_FILE,
        socket=METRICS_UNIT,
    )


def render_metrics_socket(site: Site) -> str:
    return _render("metrics.socket.j2", site=site, listen=str(site.metrics_listen))


def render_peer_names(site: Site, keys: Keys) -> str:
    """The exporter's `name` label: public key -> site name, one JSON object."""
    names = {keys.peers[p.name].public: p.name for p in site.peers}
    return json.dumps(dict(sorted(names.items())), indent=0) + "\n"


@cache
def exporter_program() -> str:
    return EXPORTER.read_text()


def appliance_files(site: Site, keys: Keys) -> dict[str, str]:
    """The appliance's own files by their name in the guest's file table: cloud-init writes
    them at first boot, sync replaces them. The exporter's files are there whether metrics
    are on or not; whether its socket is enabled says whether it runs."""
    return {
        "wg0.conf": render_wg_conf(site, keys),
        "nftables.conf": render_nftables(site),
        "sysctl": render_sysctl(site),
        "metrics.py": exporter_program(),
        "metrics.service": render_metrics_unit(site),
        "metrics.socket": render_metrics_socket(site),
        "names.json": render_peer_names(site, keys),
        "peers.json": render_peers_json(site, keys),
        "agent": agent_source(),
        "peers.service": _render(
            "peers.service.j2",
            agent=GUEST_FILES["agent"][0],
            tick=guest_agent.TICKED,
            work=bool(timed_peers(site)),
        ),
        "peers.timer": _render("peers.timer.j2"),
        "agent.service": _render(
            "agent.service.j2",
            user=site.ssh.user,
            agent=GUEST_FILES["agent"][0],
            socket=guest_agent.SERVE_UNIT,
        ),
        "agent.socket": _render(
            "agent.socket.j2", user=site.ssh.user, path=guest_agent.SERVE_SOCKET
        ),
        "resolv.conf": render_resolv_conf(site),
    }


def render_resolv_conf(site: Site) -> str:
    """/etc/resolv.conf with the site's lan.dns (glibc reads the first three)."""
    head = "# Written by wg-appliance from the site's lan.dns.\n"
    return head + "".join(f"nameserver {a}\n" for a in site.lan.dns)


def render_seed(site: Site, keys: Keys, files: dict[str, str] | None = None) -> dict[str, str]:
    """The three NoCloud files. instance-id follows the content, so a changed
    seed makes cloud-init apply it again on the next boot. `files`: appliance_files(site,
    keys) when the caller has them already."""
    user_data = _render(
        "user-data.j2",
        site=site,
        keys=keys,
        guest_files=GUEST_FILES,
        guest_agent=guest_agent,
        files=appliance_files(site, keys) if files is None else files,
        static_files={path: (src.read_text(), mode) for path, (src, mode) in STATIC_FILES.items()},
        metrics_unit=METRICS_UNIT,
    )
    network_config = _render("network-config.j2", site=site)
    digest = hashlib.sha256((user_data + "\0" + network_config).encode()).hexdigest()[:16]
    meta_data = _render("meta-data.j2", site=site, instance_id=f"{site.name}-{digest}")
    return {"user-data": user_data, "meta-data": meta_data, "network-config": network_config}


def seed_digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in SEED_FILES:
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


def client_allowed_ips(site: Site, peer: Peer, full_tunnel: bool = False) -> list[str]:
    """What a peer routes into the tunnel: tunnel subnets, the LAN, the other sites."""
    if full_tunnel:
        return ["0.0.0.0/0", "::/0"]
    nets = [str(n) for n in site.wireguard.networks]
    nets += [str(n) for n in site.lan.networks]
    nets += [str(n) for p in site.peers if p.name != peer.name for n in p.networks]
    return nets


def render_peer_config(site: Site, keys: Keys, peer: Peer, full_tunnel: bool = False) -> str:
    """A wg-quick config for one peer (a road warrior, or the remote gateway of a site)."""
    pk = keys.peers[peer.name]
    keepalive = peer.keepalive if peer.keepalive is not None else 25
    return _render(
        "peer.conf.j2",
        site=site,
        keys=keys,
        peer=peer,
        private_key=pk.private,
        public_key=pk.public,
        psk=pk.psk,
        dns=list(site.wireguard.client_dns),
        keepalive=keepalive,
        allowed_ips=client_allowed_ips(site, peer, full_tunnel),
    )
