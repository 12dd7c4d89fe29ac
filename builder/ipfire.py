"""`wg-appliance ipfire`: arguments and output. The SSH side is builder.remote.ipfire,
imported only when the command runs, so the CLI starts without paramiko."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from builder.checks.ipfire import judge, try_files
from builder.errors import InputError
from builder.local.files import OutDir
from builder.local.state import STATE_FIX, State
from builder.model.login import parse_login
from builder.model.site import Site, load_site
from builder.render import ipfire
from builder.text import printable


def add_ipfire_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--out", metavar="DIR", help="write the merged files here (default: STATE/ipfire)"
    )
    sp.add_argument("--apply", action="store_true", help="install the files on the host and reload")
    sp.add_argument(
        "--remove", action="store_true", help="remove this appliance's block and routes"
    )
    sp.add_argument(
        "--ssh", metavar="root@HOST[:222]", help="the IPFire host (SSH port 222 by default)"
    )
    pin = sp.add_mutually_exclusive_group()
    pin.add_argument("--host-key", metavar="SHA256:...", help="the host key's fingerprint")
    pin.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="known_hosts to check the host key against (default ~/.ssh/known_hosts)",
    )
    sp.add_argument("--identity", metavar="FILE", help="SSH private key (default: agent, ~/.ssh)")
    sp.add_argument("--json", action="store_true", help="one JSON document on stdout")


def cmd_ipfire(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    if args.apply and not args.ssh:
        raise InputError("--apply", "", "needs --ssh root@HOST[:222] to reach the IPFire host")
    removing = bool(args.remove)
    result: dict = {"appliance": site.name, "mode": site.wireguard.mode}
    if not args.ssh:
        plan = ipfire.host_files(site, remove=removing)
        result["source"] = "IPFire's stock files"
        return _write_out(args, site, plan, result)

    from builder.remote.ipfire import apply, gather
    from builder.remote.ssh import connect_host

    login = parse_login(args.ssh)
    client = connect_host(
        login,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        host_key=args.host_key,
        identity=Path(args.identity) if args.identity else None,
    )
    try:
        facts = gather(client, site)
        files = try_files(site, facts, removing)
        checks = judge(site, facts, removing, files)
        result["host"] = str(login)
        result["checks"] = [asdict(c) for c in checks]
        result["ok"] = all(c.ok for c in checks)
        if not result["ok"]:
            _print(args, result, checks)
            return 1
        plan = files
        result["notes"] = list(plan.notes)
        if not args.apply:
            result["source"] = f"the current files on {login.host}"
            return _write_out(args, site, plan, result, checks)
        applied = apply(client, site, facts, plan, removing)
    finally:
        client.close()
    result["applied"] = asdict(applied)
    _print(args, result, checks)
    return 0


def _out_dir(args: argparse.Namespace, site: Site) -> OutDir:
    """--out as given, else STATE/ipfire in a state dir made (or checked) private first."""
    if args.out:
        return OutDir(Path(args.out), option="--out")
    state = State.for_site(site, getattr(args, "state", None))
    state.ensure()
    return OutDir(state.path / "ipfire", fix=STATE_FIX)


def _write_out(
    args: argparse.Namespace,
    site: Site,
    plan: ipfire.HostFiles,
    result: dict,
    checks: list | None = None,
) -> int:
    with _out_dir(args, site) as out:
        out.write("firewall.local", ipfire.host_bytes(plan.firewall_local), 0o755)
        out.write("routing", ipfire.host_bytes(plan.routing), 0o644)
    fw, rt = out.path / "firewall.local", out.path / "routing"
    result["out"] = {"firewall.local": str(fw), "routing": str(rt)}
    result["notes"] = list(plan.notes)
    _print(args, result, checks or [])
    if not args.json:
        host = args.ssh or "root@ipfire:222"
        login = parse_login(host)
        ssh = f"ssh -p {login.port} {login.user}@{login.host}"
        scp = f"scp -P {login.port}"
        print(
            "\n".join(
                [
                    f"wrote {fw} and {rt} (merged into {result['source']})",
                    "to install them by hand:",
                    f"  {ssh} '{ipfire.FIREWALL_LOCAL} stop'",
                    f"  {scp} {fw} {login.user}@{login.host}:{ipfire.FIREWALL_LOCAL}",
                    f"  {scp} {rt} {login.user}@{login.host}:{ipfire.ROUTING}",
                    f"  {ssh} 'chown nobody:nobody {ipfire.ROUTING} && "
                    f"{ipfire.FIREWALL_LOCAL} start && {ipfire.STATIC_ROUTES} start'",
                    f"or let the tool do it (backups included): wg-appliance ipfire --site "
                    f"{args.site} --ssh {host} --apply" + (" --remove" if args.remove else ""),
                ]
            )
        )
    return 0


def _print(args: argparse.Namespace, result: dict, checks: list) -> None:
    """The result for the admin; every value the host reported goes through _shown."""
    if args.json:
        print(json.dumps(result))
        return
    if checks:
        width = max(len(c.name) for c in checks)
        failed = sum(not c.ok for c in checks)
        print(f"{result.get('host', 'host')}: " + (f"{failed} failed" if failed else "all ok"))
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {_shown(c.detail)}")
            if not c.ok and c.fix:
                print(f"{'':6}{'':<{width}}  fix: {_shown(c.fix)}")
    for note in result.get("notes", []):
        print(f"note: {_shown(note)}", file=sys.stderr)
    applied = result.get("applied")
    if applied:
        what = [
            name
            for name, changed in (
                (ipfire.FIREWALL_LOCAL, applied["firewall_local_changed"]),
                (ipfire.ROUTING, applied["routing_changed"]),
            )
            if changed
        ]
        verb = "removed" if args.remove else "applied"
        print(f"{verb}: " + (", ".join(what) + " changed" if what else "files unchanged"))
        for b in applied["backups"]:
            print(f"backup: {_shown(b)}")
        for line in _shown(applied["reload_output"], one_line=False).splitlines():
            print(f"reload: {line}")
        print(
            f"live: {len(applied['rules'])} rules in the appliance's chains, "
            f"{len(applied['routes'])} routes in table 200"
        )
        if not args.remove:
            print(f"next: wg-appliance verify --site {args.site}")


def _shown(text: str, one_line: bool = True) -> str:
    """Host text with control characters escaped and bytes that are not UTF-8 as \\xNN."""
    text = text.encode(errors="surrogateescape").decode(errors="backslashreplace")
    return printable(text, keep_newlines=not one_line)
