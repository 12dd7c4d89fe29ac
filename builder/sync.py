"""sync: the site file applied to a running appliance over SSH, without a restart.

What the VM itself is made of (memory, disk, LAN or tunnel address) cannot change live; such
changes are refused with the command that does them. Everything else (peers, AllowedIPs,
keys, PSKs, endpoints, keepalive, peer networks and their routes, mode, port, MTU, metrics) is
a new wg0.conf and ruleset, applied by `wg syncconf` and one `nft -f` transaction, and the
metrics exporter's unit enabled or disabled, rolled back as a whole when any step fails.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from builder.checks.drift import changes, vm_changes
from builder.errors import ApplianceError, ConnectError, GuestError, HostError
from builder.local.state import State
from builder.model.keys import Keys
from builder.model.login import HostAccess
from builder.model.site import Site
from builder.remote import libvirtd as lh
from builder.remote.appliance import sync_channel
from builder.remote.slots import active_domain
from builder.render.appliance import appliance_files, render_seed, seed_digest
from builder.render.libvirt_xml import META_SEED_DIGEST
from builder.text import printable


@dataclass(frozen=True)
class SyncResult:
    appliance: str
    changes: tuple[str, ...]
    applied: bool
    seconds: float
    routes_added: tuple[str, ...] = ()
    routes_removed: tuple[str, ...] = ()


def _metadata(site: Site, access: HostAccess | None):
    """The domain's metadata through libvirt, or None when the host cannot be asked; a host
    key that is wrong or unknown is never passed over."""
    try:
        conn = lh.connect_site(site, access)
    except ConnectError:
        raise
    except ApplianceError:
        return None, None
    dom = active_domain(conn, site.name)
    return conn, (lh.domain_metadata(dom) if dom is not None else None)


def sync(
    site: Site, state: State, dry_run: bool = False, access: HostAccess | None = None
) -> SyncResult:
    t0 = time.monotonic()
    keys = state.look(site) if dry_run else state.keys_for(site, existing=True)
    # The host's libvirt is asked beside the appliance's SSH login, not after it: each is
    # mostly waiting for the other side.
    with ThreadPoolExecutor(1) as pool:
        host = pool.submit(_metadata, site, access)
        try:
            return _sync(site, keys, dry_run, host, t0)
        finally:
            conn = None if host.cancel() or host.exception() else host.result()[0]
            if conn is not None:
                conn.close()


def _sync(site: Site, keys: Keys, dry_run: bool, host: Future, t0: float) -> SyncResult:
    with sync_channel(site, keys) as channel:
        # Rendered once (compared, sent, recorded) while the agent gathers its facts.
        files = appliance_files(site, keys)
        seed = seed_digest(render_seed(site, keys, files))
        facts = channel.answer()
        conn, metadata = host.result()
        refused = vm_changes(site, facts, metadata)
        if refused:
            raise HostError(
                f"{site.name}: these changes need a new VM: " + "; ".join(refused),
                f"run `wg-appliance deploy --site {site.path} --replace` (keys are kept)",
            )
        found = changes(site, keys, facts, files)
        if dry_run or not found:
            if not dry_run and conn is not None and metadata is not None:
                _record_expiry(conn, site, keys, metadata, seed)
            return SyncResult(site.name, tuple(found), False, time.monotonic() - t0)
        channel.send({**files, "mtu": site.wireguard.mtu, "metrics": site.metrics.enabled})
        result = channel.answer()
        if not result.get("ok"):
            raise GuestError(
                f"sync failed on {site.name}: {failure(result)}",
                "fix the site file and run sync again; `wg-appliance verify` shows the live state",
            )
        if conn is not None and metadata is not None:
            _record_seed(conn, site, seed)
    return SyncResult(
        site.name,
        tuple(found),
        True,
        time.monotonic() - t0,
        tuple(_shown(str(r)) for r in result.get("routes_added", ())),
        tuple(_shown(str(r)) for r in result.get("routes_removed", ())),
    )


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


def _record_seed(conn, site: Site, digest: str) -> None:
    """Record the synced seed's digest, so `deploy` sees the appliance as up to date."""
    dom = active_domain(conn, site.name)
    if dom is None:
        return
    meta = lh.domain_metadata(dom) or {}
    meta[META_SEED_DIGEST] = digest
    lh.set_domain_metadata(dom, meta)


def _record_expiry(conn, site: Site, keys: Keys, metadata: dict[str, str], seed: str) -> None:
    """Nothing to send, but the appliance removed expired peers by itself: when that is the
    only difference from the recorded seed, record the seed as it is now, so `deploy` says
    up to date. Any other difference (an SSH key, say) stays for deploy to report."""
    recorded = metadata.get(META_SEED_DIGEST)
    if not any(p.expired for p in site.peers) or recorded is None:
        return
    before = replace(site, peers=tuple(replace(p, expired=False) for p in site.peers))
    if recorded == seed_digest(render_seed(before, keys)):
        _record_seed(conn, site, seed)
