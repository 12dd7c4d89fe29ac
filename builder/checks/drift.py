"""How the live appliance differs from the site file: peer by peer, file by file, and what
only a new VM can change. Pure; verify and sync both judge with it."""

from __future__ import annotations

import hashlib
from typing import Any

from builder.model.keys import Keys
from builder.model.site import Peer, Site, expiry_text
from builder.render.libvirt_xml import META_DISK_GIB, META_MEMORY_MIB, META_VCPUS
from builder.text import printable

VM_KEYS = {META_MEMORY_MIB: "memory_mib", META_VCPUS: "vcpus", META_DISK_GIB: "disk_gib"}


def expected_peers(site: Site, keys: Keys) -> dict[str, dict[str, Any]]:
    """The live peer set the site asks for, keyed by public key: disabled and expired peers
    are not in it."""
    out = {}
    for p in site.peers:
        if not p.active:
            continue
        pk = keys.peers[p.name]
        out[pk.public] = {
            "name": p.name,
            "allowed_ips": sorted(str(n) for n in p.allowed_ips),
            "psk_sha256": hashlib.sha256(pk.psk.encode()).hexdigest() if pk.psk else None,
            "endpoint": str(p.endpoint) if p.endpoint and not p.dns_endpoint else None,
            "port": p.endpoint.port if p.endpoint else None,
            "keepalive": p.keepalive or 0,
        }
    return out


def peer_drift(site: Site, keys: Keys, live: list[dict[str, Any]]) -> list[str]:
    """Differences between the site's peers and wg0's, one line per peer."""
    want = expected_peers(site, keys)
    have = {p["public_key"]: p for p in live}
    drift = []
    for pub, w in want.items():
        h = have.get(pub)
        if h is None:
            drift.append(f"{w['name']}: missing on the appliance")
            continue
        diffs = []
        if h["allowed_ips"] != w["allowed_ips"]:
            diffs.append(f"AllowedIPs {','.join(h['allowed_ips'])} != {','.join(w['allowed_ips'])}")
        if h["psk_sha256"] != w["psk_sha256"]:
            diffs.append("preshared key differs")
        if w["endpoint"] and h["endpoint"] != w["endpoint"]:
            diffs.append(f"endpoint {h['endpoint']} != {w['endpoint']}")
        elif w["port"] and not (h["endpoint"] or "").endswith(f":{w['port']}"):
            # A name: the appliance holds whatever it resolved last; the port must agree.
            diffs.append(f"endpoint {h['endpoint']} is not on port {w['port']}")
        if h["keepalive"] != w["keepalive"]:
            diffs.append(f"keepalive {h['keepalive']} != {w['keepalive']}")
        if diffs:
            drift.append(f"{w['name']}: " + "; ".join(diffs))
    inactive = {keys.peers[p.name].public: p for p in site.peers if not p.active}
    for pub in have.keys() - want.keys():
        if pub in inactive:
            drift.append(f"{inactive[pub].name}: {inactive_reason(inactive[pub])}, still on wg0")
        else:
            drift.append(f"unknown peer {pub[:10]}... on the appliance (not in the site file)")
    return drift


def inactive_reason(p: Peer) -> str:
    return "disabled" if not p.enabled else f"expired at {expiry_text(p.expires)}"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def vm_changes(site: Site, facts: dict, metadata: dict[str, str] | None) -> list[str]:
    """Differences only a new VM can bring, each with the site key that asks for it."""
    out = []
    lan = facts["addresses"].get("lan0", [])
    want = [str(a) for a in site.lan.addresses]
    if not set(want) <= set(lan):
        have = _shown(", ".join(lan)) or "none"
        out.append(f"lan.address: appliance has {have}, site says {', '.join(want)}")
    if "routes" in facts:
        gw_have = lan_gateways(facts["routes"])
        gw_want = sorted(str(g) for g in site.lan.gateways)
        if gw_have != gw_want:
            have = _shown(", ".join(gw_have)) or "none"
            out.append(f"lan.gateway: appliance routes via {have}, site says {', '.join(gw_want)}")
    wg_have = set(facts["addresses"].get("wg0", []))
    wg_want = {str(a) for a in site.wireguard.addresses}
    if wg_have and wg_have != wg_want:
        out.append(
            f"wireguard.address: appliance has {_shown(', '.join(sorted(wg_have)))}, "
            f"site says {', '.join(sorted(wg_want))}"
        )
    if metadata:
        for meta_key, attr in VM_KEYS.items():
            want = str(getattr(site.appliance, attr))
            if meta_key in metadata and metadata[meta_key] != want:
                out.append(f"appliance.{attr}: {_shown(metadata[meta_key])} -> {want}")
    return out


def lan_gateways(routes: list[dict[str, Any]]) -> list[str]:
    """The default routes' gateways on lan0, as the seed's network-config made them (a
    router's link-local one, from an advertisement, is not the site's to name)."""
    gateways = {
        str(r.get("gateway"))
        for r in routes
        if r.get("dst") == "default" and r.get("dev") == "lan0" and r.get("gateway")
    }
    return sorted(g for g in gateways if not g.lower().startswith("fe80:"))


def changes(site: Site, keys: Keys, facts: dict, files: dict[str, str] | None = None) -> list[str]:
    """What sync would change, one line each (peers by name, then files); the lines quote
    the guest (endpoints, AllowedIPs) and go to the terminal, so they are escaped here.
    `files`: the appliance's files when the caller has rendered them already."""
    from builder.render.appliance import appliance_files  # jinja2: not for status or verify

    changes = [_shown(d) for d in peer_drift(site, keys, facts["wg"].get("peers", []))]
    files = appliance_files(site, keys) if files is None else files
    have = facts.get("files", {})
    if have.get("nftables.conf") != _sha(files["nftables.conf"]):
        changes.append(f"firewall: ruleset for {site.wireguard.mode} mode")
    if have.get("sysctl") != _sha(files["sysctl"]):
        changes.append("forwarding settings")
    if have.get("peers.json") != _sha(files["peers.json"]):
        changes.append("peer expiry and endpoint names")
    if have.get("resolv.conf") != _sha(files["resolv.conf"]):
        changes.append("DNS servers (lan.dns)")
    if any(have.get(k) != _sha(files[k]) for k in ("agent", "peers.service", "peers.timer")):
        changes.append("the appliance's agent and its timer")
    if have.get("wg0.conf") != _sha(files["wg0.conf"]) and not changes:
        changes.append("wg0.conf (comments, port or MTU)")
    changes += metrics_changes(site, files, facts)
    return changes


def metrics_changes(site: Site, files: dict[str, str], facts: dict) -> list[str]:
    """The exporter: on or off as the site says, with this tool's program, unit and names
    (the peers' names change with the peers, so they are not a line of their own)."""
    have = facts.get("files", {})
    enabled = bool(facts.get("metrics", {}).get("enabled"))
    m = site.metrics
    if m.enabled != enabled:
        where = f", port {m.port}" if m.enabled else ""
        return [f"metrics: turned {'on' if m.enabled else 'off'}{where}"]
    out = []
    if have.get("metrics.service") != _sha(files["metrics.service"]):
        out.append(f"metrics: exporter unit (port {m.port})")
    if have.get("metrics.py") != _sha(files["metrics.py"]):
        out.append("metrics: exporter program")
    if have.get("names.json") != _sha(files["names.json"]) and not out:
        out.append("metrics: peer names")
    return out


def _shown(text: str) -> str:
    """Guest text on one terminal line: controls and newlines escaped."""
    return printable(text, keep_newlines=False)
