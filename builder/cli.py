"""Command line: the only place that prints results and maps errors to exit codes."""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from builder import __version__
from builder.errors import ApplianceError, InputError
from builder.ipfire import add_ipfire_arguments, cmd_ipfire
from builder.local.files import OutDir, file_target, write_files
from builder.local.state import STATE_FIX, State
from builder.model.site import Site, load_site
from builder.progress import Progress
from builder.render.seed import SECRET, make_seed

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {}


def _site_and_state(args: argparse.Namespace) -> tuple[Site, State]:
    site = load_site(args.site)
    return site, State.for_site(site, args.state)


def cmd_check(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    kinds = sum(1 for p in site.peers if p.is_site)
    print(
        f"{args.site}: ok: appliance {site.name}, {len(site.peers)} peers "
        f"({len(site.peers) - kinds} road warriors, {kinds} site-to-site), "
        f"{site.wireguard.mode} mode"
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
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


def cmd_peer_config(args: argparse.Namespace) -> int:
    from builder.render.appliance import render_peer_config

    site, state = _site_and_state(args)
    peer = site.peer(args.name)
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


def cmd_image(args: argparse.Namespace) -> int:
    from builder.image.build import build_image, default_cache_dir

    progress = Progress(quiet=args.quiet)
    image = build_image(
        out=Path(args.out) if args.out else None,
        cache=Path(args.cache) if args.cache else default_cache_dir(),
        mirror=args.mirror,
        progress=progress,
        force=args.force,
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


def cmd_verify(args: argparse.Namespace) -> int:
    from builder.verify import verify

    site, state = _site_and_state(args)
    report = verify(site, state, timeout=args.timeout, required=set(args.require_handshake))
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1


def _image_for(args: argparse.Namespace, progress: Progress) -> tuple[Path, str]:
    """(qcow2 path, content sha256): the given --image, else the cached build."""
    if getattr(args, "image", None):
        from builder.image.build import image_file

        path = Path(args.image)
        if not path.is_file():
            raise InputError(str(path), "--image", "no such file")
        return image_file(path)
    from builder.image.build import build_image, default_cache_dir

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


def cmd_destroy(args: argparse.Namespace) -> int:
    from builder.deploy import destroy

    site = load_site(args.site)
    removed = destroy(site, keep_disk=args.keep_disk, everything=args.all)
    if args.json:
        print(json.dumps({"removed": removed}))
    else:
        print("removed: " + ", ".join(removed) if removed else f"{site.name}: nothing to remove")
    return 0


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


def cmd_sync(args: argparse.Namespace) -> int:
    from builder.sync import sync

    site, state = _site_and_state(args)
    result = sync(site, state, dry_run=args.dry_run)
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wg-appliance",
        description="A WireGuard gateway VM appliance for IPFire and other libvirt hosts, "
        "from one site file.",
        epilog="example: wg-appliance check --site site.toml",
    )
    p.add_argument("--version", action="version", version=f"wg-appliance {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, example: str, handler: Handler, site: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example: {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if site:
            sp.add_argument("--site", required=True, metavar="FILE", help="the site file (TOML)")
            sp.add_argument(
                "--state",
                metavar="DIR",
                help="state dir with keys (default: .wg-appliance/NAME beside the site)",
            )
        COMMANDS[name] = handler
        return sp

    command(
        "check",
        "validate a site file and change nothing",
        "wg-appliance check --site site.toml",
        cmd_check,
    )

    sp = command(
        "render",
        "render the cloud-init seed (user-data, meta-data, network-config, seed.iso)",
        "wg-appliance render --site site.toml --out seed/",
        cmd_render,
    )
    sp.add_argument("--out", metavar="DIR", help="output folder (default: STATE/seed)")
    sp.add_argument("--json", action="store_true", help="machine-readable result")

    sp = command(
        "peer-config",
        "print a wg-quick config for one peer",
        "wg-appliance peer-config --site site.toml laptop --qr -",
        cmd_peer_config,
    )
    sp.add_argument("name", help="peer name from the site file")
    sp.add_argument(
        "--qr", metavar="PNG|-", help="also write a QR code PNG, or '-' for the terminal"
    )
    sp.add_argument(
        "--full-tunnel",
        action="store_true",
        help="route everything through the tunnel (AllowedIPs 0.0.0.0/0, ::/0)",
    )

    sp = command(
        "image",
        "build the appliance disk image (cached by recipe digest)",
        "wg-appliance image --out appliance.qcow2",
        cmd_image,
        site=False,
    )
    sp.add_argument("--out", metavar="FILE", help="also copy the qcow2 here")
    sp.add_argument("--cache", metavar="DIR", help="image cache folder")
    sp.add_argument(
        "--mirror", metavar="URL", help="Debian mirror (default: the host's apt sources)"
    )
    sp.add_argument("--force", action="store_true", help="rebuild even when cached")
    sp.add_argument("--quiet", action="store_true", help="no progress output")
    sp.add_argument("--json", action="store_true", help="machine-readable result")

    for name, help, example, handler in (
        (
            "deploy",
            "deploy the appliance to the site's libvirt host and wait for SSH",
            "wg-appliance deploy --site site.toml",
            cmd_deploy,
        ),
        (
            "up",
            "image, deploy and verify in one go (what `make appliance` runs)",
            "wg-appliance up --site site.toml",
            cmd_up,
        ),
    ):
        sp = command(name, help, example, handler)
        sp.add_argument(
            "--image", metavar="FILE", help="a built qcow2 (default: build or reuse the cached one)"
        )
        sp.add_argument(
            "--replace",
            action="store_true",
            help="recreate the VM when the site changed (keys are kept)",
        )
        sp.add_argument(
            "--timeout",
            type=float,
            default=900.0,
            metavar="S",
            help="how long to wait for the appliance's SSH (default 900)",
        )
        if name == "deploy":
            sp.add_argument("--json", action="store_true", help="machine-readable result")

    sp = command(
        "destroy",
        "remove the appliance's VM and its own volumes",
        "wg-appliance destroy --site site.toml --keep-disk",
        cmd_destroy,
    )
    sp.add_argument("--keep-disk", action="store_true", help="keep the appliance's disk volume")
    sp.add_argument(
        "--all",
        action="store_true",
        help="also remove the shared base image when no other appliance uses it",
    )
    sp.add_argument("--json", action="store_true", help="machine-readable result")

    sp = command(
        "sync",
        "apply peer, route and firewall changes to the running appliance, no restart",
        "wg-appliance sync --site site.toml --dry-run",
        cmd_sync,
    )
    sp.add_argument("--dry-run", action="store_true", help="show the changes, apply nothing")
    sp.add_argument("--json", action="store_true", help="machine-readable result")

    add_ipfire_arguments(
        command(
            "ipfire",
            "make the IPFire host side right: port forward, routes, firewall (checks first)",
            "wg-appliance ipfire --site site.toml --ssh root@ipfire:222 --apply",
            cmd_ipfire,
        )
    )

    sp = command(
        "verify",
        "check a deployed appliance over SSH (exit 0 all pass, 1 a check failed, "
        "2 bad input, 3 could not connect)",
        "wg-appliance verify --site site.toml --require-handshake branch --json",
        cmd_verify,
    )
    sp.add_argument("--json", action="store_true", help="one JSON document on stdout")
    sp.add_argument("--timeout", type=float, default=20.0, metavar="S", help="SSH timeout")
    sp.add_argument(
        "--require-handshake",
        nargs="*",
        default=[],
        metavar="PEER",
        help="peers that must have a handshake in the last 180 s",
    )

    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
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
