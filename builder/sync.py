"""sync: the site file applied to a running appliance over SSH, without a restart.

What the VM itself is made of (memory, disk, LAN or tunnel address) cannot change live; such
changes are refused with the command that does them. Everything else (peers, AllowedIPs,
keys, PSKs, endpoints, keepalive, peer networks and their routes, mode, port, MTU) is a new
wg0.conf and ruleset, applied by `wg syncconf` and one `nft -f` transaction, rolled back as a
whole when any step fails.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ApplianceError, GuestError, HostError
from builder.local.state import Keys, State
from builder.model.site import Site
from builder.remote import libvirtd as lh
from builder.remote.ssh import connect
from builder.render.appliance import (
    render_nftables,
    render_seed,
    render_sysctl,
    render_wg_conf,
    seed_digest,
)
from builder.render.libvirt_xml import META_DISK_GIB, META_MEMORY_MIB, META_SEED_DIGEST, META_VCPUS
from builder.text import printable
from builder.verify import PROBE, peer_drift, target_for

APPLIER = Path(__file__).parent / "guest" / "apply.py"
VM_KEYS = {META_MEMORY_MIB: "memory_mib", META_VCPUS: "vcpus", META_DISK_GIB: "disk_gib"}


@dataclass(frozen=True)
class SyncResult:
    appliance: str
    changes: tuple[str, ...]
    applied: bool
    seconds: float
    routes_added: tuple[str, ...] = ()
    routes_removed: tuple[str, ...] = ()


def wanted_files(site: Site, keys: Keys) -> dict[str, str]:
    return {
        "wg0.conf": render_wg_conf(site, keys),
        "nftables.conf": render_nftables(site),
        "sysctl": render_sysctl(site),
    }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def vm_changes(site: Site, facts: dict, metadata: dict[str, str] | None) -> list[str]:
    """Differences only a new VM can bring, each with the site key that asks for it."""
    out = []
    lan = facts["addresses"].get("lan0", [])
    if str(site.lan.address) not in lan:
        have = _shown(", ".join(lan)) or "none"
        out.append(f"lan.address: appliance has {have}, site says {site.lan.address}")
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


def plan(site: Site, keys: Keys, facts: dict) -> list[str]:
    """What sync would change, one line each (peers by name, then files); the lines quote
    the guest (endpoints, AllowedIPs) and go to the terminal, so they are escaped here."""
    changes = [_shown(d) for d in peer_drift(site, keys, facts["wg"].get("peers", []))]
    files = wanted_files(site, keys)
    have = facts.get("files", {})
    if have.get("nftables.conf") != _sha(files["nftables.conf"]):
        changes.append(f"firewall: ruleset for {site.wireguard.mode} mode")
    if have.get("sysctl") != _sha(files["sysctl"]):
        changes.append("forwarding settings")
    if have.get("wg0.conf") != _sha(files["wg0.conf"]) and not changes:
        changes.append("wg0.conf (comments, port or MTU)")
    return changes


def _metadata(site: Site):
    """The domain's metadata through libvirt, or None when the host cannot be asked."""
    try:
        conn = lh.connect(site.host.uri)
    except ApplianceError:
        return None, None
    dom = lh.find_domain(conn, site.name)
    return conn, (lh.domain_metadata(dom) if dom is not None else None)


def sync(site: Site, state: State, dry_run: bool = False) -> SyncResult:
    t0 = time.monotonic()
    if state.load() is None:
        raise HostError(f"no keys in {state.path}", "deploy first, or pass the right --state DIR")
    keys = state.keys_for(site) if not dry_run else _keys_without_saving(site, state)
    client = connect(target_for(site, keys))
    program = f"PROBE = {PROBE.read_text()!r}\n" + APPLIER.read_text()
    stdin, stdout, stderr = client.exec_command(
        f"sudo -n python3 -S -c {shlex.quote(program)}", timeout=120
    )
    conn, metadata = None, None
    try:
        facts = _answer(site, stdout, stderr)
        conn, metadata = _metadata(site)
        refused = vm_changes(site, facts, metadata)
        if refused:
            raise HostError(
                f"{site.name}: these changes need a new VM: " + "; ".join(refused),
                f"run `wg-appliance deploy --site {site.path} --replace` (keys are kept)",
            )
        changes = plan(site, keys, facts)
        if dry_run or not changes:
            return SyncResult(site.name, tuple(changes), False, time.monotonic() - t0)
        payload = {**wanted_files(site, keys), "mtu": site.wireguard.mtu}
        stdin.write(json.dumps(payload) + "\n")
        stdin.flush()
        result = _answer(site, stdout, stderr)
        if not result.get("ok"):
            raise GuestError(
                f"sync failed on {site.name}: {failure(result)}",
                "fix the site file and run sync again; `wg-appliance verify` shows the live state",
            )
        if conn is not None and metadata is not None:
            _record_seed(conn, site, keys)
        return SyncResult(
            site.name,
            tuple(changes),
            True,
            time.monotonic() - t0,
            tuple(_shown(str(r)) for r in result.get("routes_added", ())),
            tuple(_shown(str(r)) for r in result.get("routes_removed", ())),
        )
    finally:
        stdin.channel.shutdown_write()
        client.close()
        if conn is not None:
            conn.close()


def _shown(text: str) -> str:
    """Guest text on one terminal line: controls and newlines escaped."""
    return printable(text, keep_newlines=False)


def failure(result: dict) -> str:
    """The guest's outcome line for a failed apply, as one safe line saying where it left
    the appliance."""
    error = _shown(str(result.get("error") or "no reason given"))
    if result.get("untouched"):
        return f"{error}; nothing was changed"
    if result.get("rolled_back"):
        return f"{error}; rolled back to the previous files, ruleset, peers, MTU and routes"
    left = [_shown(str(x)) for x in result.get("not_restored") or ["(not said)"]]
    return f"{error}; NOT fully rolled back, could not restore: " + "; ".join(left)


def _keys_without_saving(site: Site, state: State) -> Keys:
    """--dry-run writes nothing: new peers get throwaway keys just to show them as added."""
    from builder.local.state import PeerKeys, wg_genkey, wg_pubkey

    stored = state.load()
    peers = {}
    for p in site.peers:
        known = stored.peers.get(p.name)
        if known and (p.public_key is None or known.public == p.public_key):
            peers[p.name] = known
        else:
            priv = None if p.public_key else wg_genkey()
            pub = p.public_key or wg_pubkey(priv)
            peers[p.name] = PeerKeys(pub, priv, "(new)" if p.preshared_key else None)
    return Keys(stored.wg_private, stored.host_key, stored.admin_key, peers)


def _answer(site: Site, stdout, stderr) -> dict:
    """One JSON line from the guest program, or what went wrong there."""
    line = stdout.readline()
    try:
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError(line)
        return answer
    except ValueError:
        err = stderr.channel.recv_stderr(4096).decode(errors="replace").strip()
        raise GuestError(
            f"sync: the appliance did not answer: {_shown((err or line)[-300:])}",
            "check that the admin user has passwordless sudo; `wg-appliance verify` shows more",
        ) from None


def _record_seed(conn, site: Site, keys: Keys) -> None:
    """Record the synced seed digest, so `deploy` sees the appliance as up to date."""
    dom = lh.find_domain(conn, site.name)
    if dom is None:
        return
    meta = lh.domain_metadata(dom) or {}
    meta[META_SEED_DIGEST] = seed_digest(render_seed(site, keys))
    lh.set_domain_metadata(dom, meta)
