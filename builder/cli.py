"""Command line: the only place that prints results and maps errors to exit codes.

Each command is a handler with the arguments it takes declared just above it; `@command`
adds it to the table the parser is built from, with --site/--state and --json switched on
per command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from builder import __version__
from builder.errors import ApplianceError, InputError
from builder.local.files import OutDir, file_target, write_files
from builder.local.state import STATE_FIX, State
from builder.model.login import HostAccess, access_of, host_access, login_of_uri, parse_login
from builder.model.site import Site, expiry_text, host_uri_problem, load_site
from builder.progress import Progress
from builder.render import ipfire
from builder.text import printable

if TYPE_CHECKING:
    from builder.checks.result import Check
    from builder.checks.status import Status
    from builder.ipfire import IpfireRun
    from builder.remote.ipfire import Applied

Handler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]

RESULT = "machine-readable result"
DOCUMENT = "one JSON document on stdout"


@dataclass(frozen=True)
class Command:
    help: str
    example: str
    handler: Handler
    arguments: Arguments | None
    site: bool  # takes --site FILE and --state DIR
    json: str  # the help of its --json; empty: no --json
    host: bool  # talks to the libvirt host: takes --host-key/--known-hosts/--identity


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    example: str,
    arguments: Arguments | None = None,
    site: bool = True,
    json: str = "",
    host: bool = False,
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(help, example, handler, arguments, site, json, host)
        return handler

    return register


def _load(args: argparse.Namespace) -> Site:
    """The site, with its warnings (a past expiry) on stderr: not errors, but they change
    what is rendered."""
    site = load_site(args.site)
    for line in site.warnings():
        print(f"warning: {_shown(line)}", file=sys.stderr)
    return site


def _site(args: argparse.Namespace) -> Site:
    """The site file, with --host-uri (on the commands that talk to the host) over host.uri."""
    site = _load(args)
    uri = getattr(args, "host_uri", None)
    if uri is None:
        return site
    problem = host_uri_problem(uri)
    if problem:
        raise InputError(uri, "--host-uri", problem)
    return replace(site, host=replace(site.host, uri=uri))


def _site_and_state(args: argparse.Namespace) -> tuple[Site, State]:
    site = _site(args)
    return site, State.for_site(site, args.state)


def _host_arguments(p: argparse.ArgumentParser) -> None:
    """The login to the host: flags that override the site's [host] keys."""
    p.add_argument(
        "--host-uri",
        metavar="URI",
        help="libvirt URI of the host (host.uri), e.g. qemu+ssh://root@ipfire:222/system",
    )
    pin = p.add_mutually_exclusive_group()
    pin.add_argument(
        "--host-key", metavar="SHA256:...", help="the host key's fingerprint (host.host_key)"
    )
    pin.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="known_hosts that pins the host key (host.known_hosts; default ~/.ssh/known_hosts)",
    )
    p.add_argument(
        "--identity",
        metavar="FILE",
        help="SSH private key for the host (host.ssh_key; default: ssh-agent, ~/.ssh/id_*)",
    )


def _pins(args: argparse.Namespace) -> dict:
    return {
        "host_key": args.host_key,
        "known_hosts": _path(args.known_hosts),
        "identity": _path(args.identity),
    }


def _access(args: argparse.Namespace, site: Site) -> HostAccess | None:
    """The login to the site's libvirt host with the command line's pins, or None (local)."""
    return access_of(site.host, args.site, **_pins(args))


@command("check", "validate a site file and change nothing", "wg-appliance check --site site.toml")
def cmd_check(args: argparse.Namespace) -> int:
    site = _load(args)
    kinds = sum(1 for p in site.peers if p.is_site)
    off = sum(1 for p in site.peers if not p.enabled)
    expired = sum(1 for p in site.peers if p.enabled and p.expired)
    lifecycle = "".join(
        f", {n} {what}" for n, what in ((off, "disabled"), (expired, "expired")) if n
    )
    print(
        f"{args.site}: ok: appliance {site.name}, {len(site.peers)} peers "
        f"({len(site.peers) - kinds} road warriors, {kinds} site-to-site{lifecycle}), "
        f"{site.wireguard.mode} mode"
    )
    return 0


def _render_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder (default: STATE/seed)")


@command(
    "render",
    "render the cloud-init seed (user-data, meta-data, network-config, seed.iso)",
    "wg-appliance render --site site.toml --out seed/",
    _render_arguments,
    json=RESULT,
)
def cmd_render(args: argparse.Namespace) -> int:
    from builder.render.seed import SECRET, make_seed

    site, state = _site_and_state(args)
    if args.out:
        out = OutDir(Path(args.out), option="--out")
    else:
        state.ensure()
        out = OutDir(state.path / "seed", fix=STATE_FIX)
    with out:
        seed = make_seed(site, state.keys_for(site))
        changed = write_files(out, seed.files, secret=SECRET)
    result = {
        "out": str(out.path),
        "changed": changed,
        "seed_digest": seed.digest,
        "files": ["user-data", "meta-data", "network-config", "seed.iso"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        what = ", ".join(changed) if changed else "nothing changed"
        print(f"rendered {site.name} into {out.path}/ ({what})")
        print(f"next: wg-appliance deploy --site {args.site}")
    return 0


def _peer_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="peer name from the site file")
    p.add_argument(
        "--qr", metavar="PNG|-", help="also write a QR code PNG, or '-' for the terminal"
    )
    p.add_argument(
        "--full-tunnel",
        action="store_true",
        help="route everything through the tunnel (AllowedIPs 0.0.0.0/0, ::/0)",
    )


@command(
    "peer-config",
    "print a wg-quick config for one peer",
    "wg-appliance peer-config --site site.toml laptop --qr -",
    _peer_config_arguments,
)
def cmd_peer_config(args: argparse.Namespace) -> int:
    from builder.render.appliance import render_peer_config

    site, state = _site_and_state(args)
    peer = site.peer(args.name)
    if not peer.active:
        why = (
            "is disabled (enabled = false)"
            if not peer.enabled
            else f"expired at {expiry_text(peer.expires)}"
        )
        print(
            f"warning: peer {peer.name!r} {why}: the appliance does not accept it "
            "until the site file enables it and sync runs",
            file=sys.stderr,
        )
    if args.qr and args.qr != "-":
        folder, name = file_target(Path(args.qr), "--qr")
        with folder:
            text = render_peer_config(site, state.keys_for(site), peer, args.full_tunnel)
            png = io.BytesIO()
            _qr(text).save(png, kind="png", scale=6)
            folder.write(name, png.getvalue(), 0o600)
        print(
            f"# QR code written to {args.qr} (it holds the private key: keep it private)",
            file=sys.stderr,
        )
    else:
        text = render_peer_config(site, state.keys_for(site), peer, args.full_tunnel)
    sys.stdout.write(text)
    if args.qr == "-":
        _qr(text).terminal(out=sys.stdout, compact=True)
    return 0


def _qr(text: str):
    import segno

    return segno.make(text, error="l")


def _image_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="FILE", help="also copy the qcow2 here")
    p.add_argument("--cache", metavar="DIR", help="image cache folder")
    p.add_argument(
        "--mirror", metavar="URL", help="Debian mirror (default: the host's apt sources)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--recipe", metavar="DIR", help="an image recipe folder (default: the project's images/)"
    )


@command(
    "image",
    "build the appliance disk image (cached by recipe digest)",
    "wg-appliance image --out appliance.qcow2",
    _image_arguments,
    site=False,
    json=RESULT,
)
def cmd_image(args: argparse.Namespace) -> int:
    from builder.image.build import build_image, default_cache_dir

    progress = Progress(quiet=args.quiet)
    if args.recipe and not (Path(args.recipe) / "packages.txt").is_file():
        raise InputError(args.recipe, "--recipe", "not an image recipe (no packages.txt)")
    image = build_image(
        out=Path(args.out) if args.out else None,
        cache=Path(args.cache) if args.cache else default_cache_dir(),
        mirror=args.mirror,
        progress=progress,
        force=args.force,
        **({"recipe": Path(args.recipe)} if args.recipe else {}),
    )
    info = {
        "path": str(image.path),
        "manifest": str(image.manifest_path),
        "digest": image.digest,
        "sha256": image.sha256,
        "size": image.size,
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"image {image.path} ({image.size / 1e6:.1f} MB, recipe {image.digest[:12]})")
    return 0


def _image_for(args: argparse.Namespace, progress: Progress) -> tuple[Path, str]:
    """(qcow2 path, content sha256): the given --image, else the cached build."""
    from builder.image.build import build_image, default_cache_dir, image_file

    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise InputError(str(path), "--image", "no such file")
        return image_file(path)

    image = build_image(cache=default_cache_dir(), progress=progress)
    return image.path, image.sha256


def _deploy(args: argparse.Namespace, site: Site, state: State, progress: Progress):
    from builder.deploy import deploy

    image_path, image_sha = _image_for(args, progress)
    return deploy(
        site,
        state,
        image_path,
        image_sha,
        progress,
        replace=args.replace,
        boot_timeout=args.timeout,
        access=_access(args, site),
    )


def _deploy_arguments(p: argparse.ArgumentParser) -> None:
    """deploy's and up's: both put the appliance on the host."""
    p.add_argument(
        "--image", metavar="FILE", help="a built qcow2 (default: build or reuse the cached one)"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="hand over to a new VM when the site changed (keys kept, as `upgrade` does)",
    )
    _timeout_argument(p)


@command(
    "deploy",
    "deploy the appliance to the site's libvirt host and wait for SSH",
    "wg-appliance deploy --site site.toml",
    _deploy_arguments,
    json=RESULT,
    host=True,
)
def cmd_deploy(args: argparse.Namespace) -> int:
    site, state = _site_and_state(args)
    result = _deploy(args, site, state, Progress(quiet=args.json))
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        print(
            f"{result.name}: {result.outcome} ({result.virt_type}) at {result.address}, "
            f"{result.seconds:.0f}s"
        )
        print(f"next: wg-appliance verify --site {args.site}")
    return 0


@command(
    "up",
    "image, deploy and verify in one go (what `make appliance` runs)",
    "wg-appliance up --site site.toml",
    _deploy_arguments,
    host=True,
)
def cmd_up(args: argparse.Namespace) -> int:
    """The whole path: image, seed, deploy, verify; the state dir keeps the keys."""
    from builder.verify import verify

    site, state = _site_and_state(args)
    progress = Progress()
    result = _deploy(args, site, state, progress)
    progress.say(f"{result.name}: {result.outcome} ({result.virt_type}) at {result.address}")
    with progress.stage("verify"):
        report = verify(site, state)
    print(report.table())
    print(
        f"\nlog in: ssh -i {state.admin_key_path} -o UserKnownHostsFile={state.known_hosts_path} "
        f"{site.ssh.user}@{result.address}"
    )
    print(f"client config: wg-appliance peer-config --site {args.site} PEER --qr -")
    return 0 if report.ok else 1


def _upgrade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image", metavar="FILE", help="a built qcow2 (default: build or reuse the cached one)"
    )
    p.add_argument("--prune", action="store_true", help="remove the previous appliance afterwards")
    _timeout_argument(p)


def _timeout_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="how long to wait for the new appliance's first boot (default 900)",
    )


def _print_handover(args: argparse.Namespace, done) -> None:
    if args.json:
        print(json.dumps(asdict(done)))
        return
    print(f"{done.name}: {done.outcome}; {done.domain} serves at {done.address}")
    if done.outage_s is not None:
        print(
            f"outage as seen from here: {done.outage_s:.1f}s (old link down until the new "
            f"appliance answered SSH); handshakes started for {done.kicked} peers"
        )
    if done.previous:
        print(f"previous: {done.previous} (stopped; `wg-appliance rollback` returns to it)")
    for line in done.removed:
        print(f"removed: {line}")


@command(
    "upgrade",
    "move the appliance to a new image, memory, vCPUs or disk without dropping tunnels",
    "wg-appliance upgrade --site site.toml --image build/wg-appliance.qcow2",
    _upgrade_arguments,
    json=RESULT,
    host=True,
)
def cmd_upgrade(args: argparse.Namespace) -> int:
    """A new appliance is booted and checked beside the old one, then takes over."""
    from builder.handover import upgrade

    site, state = _site_and_state(args)
    progress = Progress(quiet=args.json)
    image = _image_for(args, progress)
    done = upgrade(
        site,
        state,
        image,
        progress,
        access=_access(args, site),
        prune=args.prune,
        boot_timeout=args.timeout,
    )
    _print_handover(args, done)
    return 0


@command(
    "rollback",
    "return to the appliance an upgrade replaced, by the same handover",
    "wg-appliance rollback --site site.toml",
    _timeout_argument,
    json=RESULT,
    host=True,
)
def cmd_rollback(args: argparse.Namespace) -> int:
    from builder.handover import rollback

    site, state = _site_and_state(args)
    progress = Progress(quiet=args.json)
    done = rollback(site, state, progress, access=_access(args, site), boot_timeout=args.timeout)
    _print_handover(args, done)
    return 0


def _destroy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-disk", action="store_true", help="keep the appliance's disk volume")
    p.add_argument(
        "--all",
        action="store_true",
        help="also remove the shared base image when no other appliance uses it",
    )


@command(
    "destroy",
    "remove the appliance's VM and its own volumes",
    "wg-appliance destroy --site site.toml --keep-disk",
    _destroy_arguments,
    json=RESULT,
    host=True,
)
def cmd_destroy(args: argparse.Namespace) -> int:
    from builder.deploy import destroy

    site = _site(args)
    removed = destroy(
        site, keep_disk=args.keep_disk, everything=args.all, access=_access(args, site)
    )
    if args.json:
        print(json.dumps({"removed": removed}))
    else:
        print("removed: " + ", ".join(removed) if removed else f"{site.name}: nothing to remove")
    return 0


def _sync_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="show the changes, apply nothing")


@command(
    "sync",
    "apply peer, route and firewall changes to the running appliance, no restart",
    "wg-appliance sync --site site.toml --dry-run",
    _sync_arguments,
    json=RESULT,
    host=True,
)
def cmd_sync(args: argparse.Namespace) -> int:
    from builder.sync import sync

    site, state = _site_and_state(args)
    result = sync(site, state, dry_run=args.dry_run, access=_access(args, site))
    if args.json:
        print(json.dumps(result.__dict__))
        return 0
    if not result.changes:
        print(f"{site.name}: in sync, nothing to change")
        return 0
    print(f"{site.name}: {len(result.changes)} change(s):")
    for change in result.changes:
        print(f"  {change}")
    if result.applied:
        routes = [f"+{r}" for r in result.routes_added] + [f"-{r}" for r in result.routes_removed]
        print(
            f"applied in {result.seconds:.1f}s" + (f"; routes {' '.join(routes)}" if routes else "")
        )
    else:
        print("dry run: nothing applied")
    return 0


def _ipfire_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", metavar="DIR", help="write the merged files here (default: STATE/ipfire)"
    )
    p.add_argument("--apply", action="store_true", help="install the files on the host and reload")
    p.add_argument("--remove", action="store_true", help="remove this appliance's block and routes")
    p.add_argument(
        "--ssh",
        metavar="root@HOST[:222]",
        help="the IPFire host (SSH port 222 by default; default: the host in host.uri)",
    )


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


@command(
    "ipfire",
    "make the IPFire host side right: port forward, routes, firewall (checks first)",
    "wg-appliance ipfire --site site.toml --ssh root@ipfire:222 --apply",
    _ipfire_arguments,
    json=DOCUMENT,
    host=True,
)
def cmd_ipfire(args: argparse.Namespace) -> int:
    from builder.ipfire import run_ipfire

    site = _site(args)
    login = parse_login(args.ssh) if args.ssh else login_of_uri(site.host.uri)
    access = host_access(site.host, args.site, login, **_pins(args)) if login else None
    run = run_ipfire(
        site,
        access=access,
        apply=args.apply,
        remove=args.remove,
        out=_path(args.out),
        state=args.state,
    )
    return _show_ipfire(args, run)


def _show_ipfire(args: argparse.Namespace, run: IpfireRun) -> int:
    """Prints the run, every value the host reported through _shown; returns the exit code
    (1 when a check failed)."""
    if args.json:
        print(json.dumps({key: v for key, v in asdict(run).items() if v is not None}))
    else:
        if run.checks:
            _print_checks(run.host, run.checks)
        for note in run.notes or []:
            print(f"note: {_shown(note)}", file=sys.stderr)
        if run.applied:
            _print_applied(args, run.applied)
        if run.out:
            _print_install(args, run.out, run.source, run.host)
    return 1 if run.ok is False else 0


def _print_checks(host: str | None, checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    failed = sum(not c.ok for c in checks)
    print(f"{host}: " + (f"{failed} failed" if failed else "all ok"))
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {_shown(c.detail)}")
        if not c.ok and c.fix:
            print(f"{'':6}{'':<{width}}  fix: {_shown(c.fix)}")


def _print_applied(args: argparse.Namespace, applied: Applied) -> None:
    what = [
        name
        for name, changed in (
            (ipfire.FIREWALL_LOCAL, applied.firewall_local_changed),
            (ipfire.ROUTING, applied.routing_changed),
        )
        if changed
    ]
    verb = "removed" if args.remove else "applied"
    print(f"{verb}: " + (", ".join(what) + " changed" if what else "files unchanged"))
    for b in applied.backups:
        print(f"backup: {_shown(b)}")
    for line in _shown(applied.reload_output, one_line=False).splitlines():
        print(f"reload: {line}")
    print(
        f"live: {len(applied.rules)} rules in the appliance's chains, "
        f"{len(applied.routes)} routes in table 200"
    )
    if not args.remove:
        print(f"next: wg-appliance verify --site {args.site}")


def _print_install(
    args: argparse.Namespace, out: dict[str, str], source: str | None, reached: str | None
) -> None:
    """Where the files went and how to install them by hand, or with --apply."""
    host = reached or args.ssh or "root@ipfire:222"
    login = parse_login(host)
    fw, rt = out["firewall.local"], out["routing"]
    ssh = f"ssh -p {login.port} {login.user}@{login.host}"
    scp = f"scp -P {login.port}"
    print(
        "\n".join(
            [
                f"wrote {fw} and {rt} (merged into {source})",
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


def _shown(text: str, one_line: bool = True) -> str:
    """Host text with control characters escaped and bytes that are not UTF-8 as \\xNN."""
    text = text.encode(errors="surrogateescape").decode(errors="backslashreplace")
    return printable(text, keep_newlines=not one_line)


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=20.0, metavar="S", help="SSH timeout")
    p.add_argument(
        "--require-handshake",
        nargs="*",
        default=[],
        metavar="PEER",
        help="peers that must have a handshake in the last 180 s",
    )


@command(
    "verify",
    "check a deployed appliance over SSH (exit 0 all pass, 1 a check failed, "
    "2 bad input, 3 could not connect)",
    "wg-appliance verify --site site.toml --require-handshake branch --json",
    _verify_arguments,
    json=DOCUMENT,
    host=True,
)
def cmd_verify(args: argparse.Namespace) -> int:
    from builder.verify import Unreachable, verify

    site, state = _site_and_state(args)
    try:
        report = verify(
            site,
            state,
            timeout=args.timeout,
            required=set(args.require_handshake),
            access=_access(args, site),
        )
    except Unreachable as e:
        if e.serial:
            print("--- the appliance's serial log, from its host ---", file=sys.stderr)
            print(_shown(e.serial, one_line=False), file=sys.stderr)
        raise
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=20.0, metavar="S", help="SSH timeout")
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="read again every SECONDS (default 2) and show rates; Ctrl-C ends",
    )


CLEAR = "\x1b[H\x1b[2J"


@command(
    "status",
    "show the appliance's peers by name: endpoint, last handshake, traffic (exit 0 read, "
    "2 bad input, 3 could not connect)",
    "wg-appliance status --site site.toml --watch 5",
    _status_arguments,
    json="one JSON document on stdout (with --watch: one a line)",
)
def cmd_status(args: argparse.Namespace) -> int:
    from builder import status

    site, state = _site_and_state(args)
    if args.watch is None:
        _print_status(args, status.status(site, state, timeout=args.timeout))
        return 0
    if not args.watch > 0:
        raise InputError("--watch", "", f"must be a number of seconds above 0, not {args.watch}")
    try:
        for reading in status.watch(site, state, args.watch, timeout=args.timeout):
            if not args.json and sys.stdout.isatty():
                sys.stdout.write(CLEAR)
            _print_status(args, reading)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def _print_status(args: argparse.Namespace, reading: Status) -> None:
    if args.json:
        print(json.dumps(reading.to_dict()))
    else:
        print(reading.table() + ("\n" if args.watch else ""))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wg-appliance",
        description="A WireGuard gateway VM appliance for IPFire and other libvirt hosts, "
        "from one site file.",
        epilog="example: wg-appliance check --site site.toml",
    )
    p.add_argument("--version", action="version", version=f"wg-appliance {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, c in COMMANDS.items():
        sp = sub.add_parser(
            name,
            help=c.help,
            description=c.help,
            epilog=f"example: {c.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if c.site:
            sp.add_argument("--site", required=True, metavar="FILE", help="the site file (TOML)")
            sp.add_argument(
                "--state",
                metavar="DIR",
                help="state dir with keys (default: .wg-appliance/NAME beside the site)",
            )
        if c.arguments:
            c.arguments(sp)
        if c.host:
            _host_arguments(sp)
        if c.json:
            sp.add_argument("--json", action="store_true", help=c.json)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = COMMANDS[args.command].handler(args)
        sys.stdout.flush()
        return code
    except ApplianceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError as e:
        if _stdout_closed():
            return _quiet_on_closed_stdout()
        print(
            f"error: {e.strerror}: a program or connection it wrote to went away", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to finish", file=sys.stderr)
        return 130


def _stdout_closed() -> bool:
    """Whether the broken pipe is our stdout (its reader gone), not some other pipe."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))


def _quiet_on_closed_stdout() -> int:
    """The reader went away (`| head`): stop quietly, as cat or grep do when SIGPIPE ends
    them; 141 is the status the shell shows for those (128 + SIGPIPE). Python's own recipe:
    point stdout at /dev/null so the flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE
