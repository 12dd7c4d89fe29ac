"""`wg-appliance ipfire`: check the IPFire host, then write the merged files or install them.

The SSH side is builder.remote.ipfire, imported only when a host is named, so writing the
files with --out alone starts without paramiko.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.checks.ipfire import judge, try_files
from builder.checks.result import Check
from builder.errors import InputError
from builder.local.files import OutDir
from builder.local.state import STATE_FIX, State
from builder.model.login import HostAccess
from builder.model.site import Site
from builder.render import ipfire

if TYPE_CHECKING:
    from builder.remote.ipfire import Applied


@dataclass
class IpfireRun:
    """What the run did; a step that did not happen stays None (and out of the JSON)."""

    appliance: str
    mode: str
    host: str | None = None
    checks: list[Check] | None = None
    ok: bool | None = None
    notes: list[str] | None = None
    source: str | None = None
    out: dict[str, str] | None = None
    applied: Applied | None = None


def run_ipfire(
    site: Site,
    *,
    access: HostAccess | None = None,
    apply: bool = False,
    remove: bool = False,
    out: Path | None = None,
    state: str | None = None,
) -> IpfireRun:
    """Without a host: IPFire's stock files merged. With one: its checks, then its own files
    merged (once) and written, or installed when `apply`."""
    if apply and access is None:
        raise InputError(
            "--apply", "", "needs --ssh root@HOST[:222] or a remote host.uri to reach the host"
        )
    if not remove:
        ipfire.require_ipv4(site)
    run = IpfireRun(site.name, site.wireguard.mode)
    if access is None:
        files = ipfire.host_files(site, remove=remove)
        return _written(run, write_out(site, files, out, state), files, "IPFire's stock files")

    from builder.remote.ipfire import apply as install
    from builder.remote.ipfire import gather
    from builder.remote.ssh import connect_host

    login = access.login
    client = connect_host(access)
    try:
        facts = gather(client, site)
        files = try_files(site, facts, remove)
        run.checks = judge(site, facts, remove, files)
        run.host, run.ok = str(login), all(c.ok for c in run.checks)
        if not run.ok:
            return run
        if not apply:
            source = f"the current files on {login.host}"
            return _written(run, write_out(site, files, out, state), files, source)
        run.notes = list(files.notes)
        run.applied = install(client, site, facts, files, remove)
    finally:
        client.close()
    return run


def _written(
    run: IpfireRun, paths: dict[str, str], files: ipfire.HostFiles, source: str
) -> IpfireRun:
    run.out, run.notes, run.source = paths, list(files.notes), source
    return run


def write_out(
    site: Site, files: ipfire.HostFiles, out: Path | None, state: str | None
) -> dict[str, str]:
    """Both files into `out`, else STATE/ipfire in a state dir made (or checked) private first;
    the host's bytes as they were, UTF-8 or not. Returns where each went."""
    if out:
        folder = OutDir(out, option="--out")
    else:
        own = State.for_site(site, state)
        own.ensure()
        folder = OutDir(own.path / "ipfire", fix=STATE_FIX)
    with folder:
        folder.write("firewall.local", ipfire.host_bytes(files.firewall_local), 0o755)
        folder.write("routing", ipfire.host_bytes(files.routing), 0o644)
    return {name: str(folder.path / name) for name in ("firewall.local", "routing")}
