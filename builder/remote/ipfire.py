"""The IPFire host's side of `wg-appliance ipfire`: the probe and apply protocol over SSH.

One SSH round trip gathers every fact (a POSIX sh probe: IPFire promises no Python) and
the two files the tool edits; pure checks judge the facts; builder.render.ipfire merges the files.
Applying is a second round trip that refuses to write if a file changed since it was read
(comparing the files' bytes: they need not be UTF-8), keeps a timestamped copy of each file
it changes, stops the firewall.local hooks with the old file (so chains of a removed or
renamed block go too), installs the new files, runs IPFire's own `firewall.local reload` and
`static-routes start`, and checks the jumps and routes are live. If any step after the stop
fails, the same script puts the old files back and starts the old rules again.

The login is builder.remote.ssh.connect_host: the admin's key, the host key pinned.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from dataclasses import dataclass, field

import paramiko

from builder.checks.ipfire import Facts, parse_probe
from builder.errors import HostError
from builder.model.site import Site
from builder.remote.ssh import execute
from builder.render import ipfire
from builder.text import printable

PAKFIRE_INSTALLED = "/opt/pakfire/db/installed"
WG_SETTINGS = "/var/ipfire/wireguard/settings"
WG_PEERS = "/var/ipfire/wireguard/peers"


# --- the probe: one round trip ------------------------------------------------------------


def probe_script(site: Site) -> str:
    """POSIX sh printing key=value lines; files come base64 encoded ('-' when absent)."""
    q = shlex.quote
    files = {
        "firewall_local": ipfire.FIREWALL_LOCAL,
        "routing": ipfire.ROUTING,
        "red_iface": ipfire.RED_IFACE,
        "wg_settings": WG_SETTINGS,
        "wg_peers": WG_PEERS,
        "release": "/etc/system-release",
    }
    lines = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        'kv() { printf \'%s=%s\\n\' "$1" "$2"; }',
        'file() { if [ -f "$2" ]; then printf "%s=b64:" "$1"; base64 < "$2" | tr -d "\\n"; '
        'echo; else kv "$1" -; fi; }',
        'yes_if() { if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }',
        'kv uid "$(id -u)"',
        *(f"file {k} {q(v)}" for k, v in files.items()),
        'kv virsh "$(command -v virsh)"',
        'kv qemu "$(command -v qemu-system-x86_64)"',
        f'kv pak_libvirt "$(yes_if test -e {PAKFIRE_INSTALLED}/meta-libvirt)"',
        f'kv pak_qemu "$(yes_if test -e {PAKFIRE_INSTALLED}/meta-qemu)"',
        'kv libvirtd "$(pidof libvirtd)"',
        'kv libvirt_sock "$(yes_if test -S /var/run/libvirt/libvirt-sock)"',
        'kv kvm "$(yes_if test -c /dev/kvm)"',
        f'kv bridge_dev "$(yes_if test -e /sys/class/net/{q(site.host.bridge)})"',
        f'kv bridge_is "$(yes_if test -d /sys/class/net/{q(site.host.bridge)}/bridge)"',
        "kv mem_kib \"$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)\"",
        f"d={q(site.host.pool_path)}",
        'while [ ! -d "$d" ]; do d=$(dirname "$d"); done',
        'kv disk_dir "$d"',
        'kv disk_kib "$(df -Pk "$d" | awk \'NR==2 {print $4}\')"',
        f"a={q(str(site.lan.address.ip))}",
        'kv addr_local "$(ip -o -4 addr show | awk \'{print $4}\' | grep -c "^$a/")"',
        # A stale neighbour entry may name a device long gone: ask afresh.
        f'ip neigh del "$a" dev {q(site.host.bridge)} >/dev/null 2>&1',
        'ping -c 1 -W 1 "$a" >/dev/null 2>&1; kv ping_rc $?',
        'kv neigh "$(ip neigh show "$a" | head -n 1)"',
    ]
    return "\n".join(lines) + "\n"


def gather(client: paramiko.SSHClient, site: Site) -> Facts:
    r = execute(client, "/bin/sh -s", input=probe_script(site), timeout=60)
    if r.rc != 0 or "uid=" not in r.stdout:
        raise HostError(
            f"the host probe failed (exit {r.rc}): {r.stderr.strip()[-300:]}",
            "check that the login shell is a POSIX sh and the account is root",
        )
    return parse_probe(r.stdout)


# --- applying: the second round trip ---------------------------------------------------------


# The apply script's exits: 3 a file changed since the probe, 4 the new files could not be
# staged (nothing changed), 5 a step after stopping the old hooks failed (then it restored
# what it could and says so in restored=1/0 and left=).
CHANGED, NOT_STAGED, ROLLED_BACK = 3, 4, 5


def _sha(text: str | None) -> str:
    return "absent" if text is None else hashlib.sha256(ipfire.host_bytes(text)).hexdigest()


def _b64(text: str) -> str:
    return base64.b64encode(ipfire.host_bytes(text)).decode()


@dataclass(frozen=True)
class _HostFile:
    """One file apply may replace; `var` names its shell variables."""

    var: str
    path: str
    mode: str
    owner: str
    old: str | None
    new: str

    @property
    def changed(self) -> bool:
        return self.new != self.old


def _host_files(facts: Facts, plan: ipfire.HostFiles) -> tuple[_HostFile, _HostFile]:
    return (
        _HostFile(
            "fw",
            ipfire.FIREWALL_LOCAL,
            "755",
            "root:root",
            facts.files.get("firewall_local"),
            plan.firewall_local,
        ),
        _HostFile(
            "rt", ipfire.ROUTING, "644", "nobody:nobody", facts.files.get("routing"), plan.routing
        ),
    )


def _b64_out(key: str, var: str) -> str:
    return f'echo "{key}=b64:$(printf "%s" "${var}" | base64 | tr -d "\\n")"'


def _stage_lines(f: _HostFile) -> list[str]:
    """Write the new file next to the old one and back the old one up: before anything
    stops, so a failure here changes nothing."""
    q, v = shlex.quote, f.var
    return [
        f"{v}_new=$(mktemp {q(f.path + '.wg-appliance-XXXXXX')}) || "
        f"early {q('cannot create a file next to ' + f.path)}",
        f"printf '%s' {_b64(f.new)} | base64 -d > \"${v}_new\" && "
        f'chmod {f.mode} "${v}_new" && chown {f.owner} "${v}_new" || '
        f"early {q('cannot write ' + f.path + '.wg-appliance-*')}",
        f"if [ -f {q(f.path)} ]; then {v}_bak={q(f.path)}.bak-wg-appliance-$ts; "
        f'[ ! -e "${v}_bak" ] || {v}_bak="${v}_bak.$$"; '
        f'cp -p {q(f.path)} "${v}_bak" || early {q("cannot back up " + f.path)}; fi',
    ]


def _step(command: str, what: str) -> str:
    """A step after the old hooks stopped: skipped once one failed, `failed` says which."""
    return f'[ -n "$failed" ] || {{ {command}; }} || failed="{what}"'


def _readback_lines(site: Site, removing: bool) -> list[str]:
    """Are the appliance's jumps and routes live? Mismatches go to `bad`."""
    c = ipfire.chains_for(site.name)
    want = 0 if removing else 1
    lines = [
        "jump() {",
        '\tn=$(iptables -w -t "$1" -S "$2" 2>/dev/null | grep -c -- "-j $3\\$")',
        '\techo "jump_$4=$n"',
        f'\t[ "$n" = {want} ] || bad="$bad; $n jumps $2 -> $3"',
        "}",
        "bad=",
        f"jump filter CUSTOMFORWARD {c.forward} forward",
        f"jump nat CUSTOMPREROUTING {c.nat} nat",
        f"jump raw PREROUTING {c.raw} raw",
    ]
    for r in [] if removing else ipfire.routes(site):
        shown = r.network.network_address if r.network.prefixlen == 32 else r.network
        lines.append(
            f'ip route show table 200 | cut -d" " -f1 | grep -qxF {shlex.quote(str(shown))} || '
            f'bad="$bad; no route {r.network} in table 200"'
        )
    return lines


def _rollback_lines(files: tuple[_HostFile, ...], teardown: list[str]) -> list[str]:
    """Stop with whatever file is in place (it knows its chains), put the old files back
    (a file that was absent goes again), start the old rules, say what is left."""
    q = shlex.quote
    fw = q(ipfire.FIREWALL_LOCAL)
    routes = ipfire.STATIC_ROUTES
    lines = ["restored=1", f"[ -f {fw} ] && sh {fw} stop >/dev/null 2>&1", *teardown]
    for f in files:
        if not f.changed:
            continue
        p, v = q(f.path), f.var
        lines += [
            f'if [ "${v}_in" = 1 ]; then',
            f'\tif [ -n "${v}_bak" ]; then mv -f "${v}_bak" {p} || '
            f'{{ restored=0; left="$left; {f.path} is the new one, the old is ${v}_bak"; }}',
            f'\telse rm -f {p} || {{ restored=0; left="$left; {f.path} is new, it was absent"; }}',
            "\tfi",
            f'else drop "${v}_bak"',
            "fi",
        ]
    lines += [
        f"if [ -f {fw} ]; then out=$(sh {fw} start 2>&1) || "
        f'{{ restored=0; left="$left; {ipfire.FIREWALL_LOCAL} start failed: '
        '$(printf "%s" "$out" | tail -n 3)"; }; fi',
        f'out=$({routes} start 2>&1) || {{ restored=0; left="$left; {routes} start failed: '
        '$(printf "%s" "$out" | tail -n 3)"; }',
    ]
    return lines


HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def apply_script(site: Site, facts: Facts, plan: ipfire.HostFiles, removing: bool) -> str:
    """Check nothing changed since the probe, stage and back up the changed files, stop the
    old hooks, install, run IPFire's own hooks and check what is live. A failure after the
    stop puts the old files and rules back, all in this one round trip."""
    q = shlex.quote
    c = ipfire.chains_for(site.name)
    files = _host_files(facts, plan)
    fw_file, _ = files
    fw = q(ipfire.FIREWALL_LOCAL)
    teardown = ipfire.teardown_lines(c)
    lines = [
        f"PATH={HOST_PATH}",
        # A dropped SSH connection must not stop the script half way.
        "trap '' HUP PIPE",
        "ts=$(date +%Y%m%d-%H%M%S)",
        'sum() { if [ -f "$1" ]; then sha256sum < "$1" | cut -d" " -f1; else echo absent; fi; }',
        *(
            f'[ "$(sum {q(f.path)})" = {_sha(f.old)} ] || '
            f"{{ echo changed={q(f.path)}; exit {CHANGED}; }}"
            for f in files
        ),
        "fw_new= rt_new= fw_bak= rt_bak= fw_in=0 rt_in=0 failed= left= reload_out= reload_rc=",
        'drop() { for f in "$@"; do [ -z "$f" ] || rm -f "$f"; done; }',
        'trap \'drop "$fw_new" "$rt_new"\' EXIT',
        f'early() {{ drop "$fw_bak" "$rt_bak"; echo "failed=$1"; exit {NOT_STAGED}; }}',
    ]
    for f in files:
        if f.changed:
            lines += _stage_lines(f)
    if fw_file.changed:
        # Stop with the old file: its stop knows the chains of a block that is going away.
        lines.append(f"[ -f {fw} ] && sh {fw} stop >/dev/null 2>&1")
    for f in files:
        if f.changed:
            lines.append(
                _step(
                    f'mv -f "${f.var}_new" {q(f.path)} && {f.var}_new= && {f.var}_in=1',
                    f"installing {f.path}",
                )
            )
    if removing:
        # In case the block was edited away by hand: its chains go all the same.
        lines += teardown
    lines += [
        _step(
            f'reload_out=$({fw} reload 2>&1); reload_rc=$?; [ "$reload_rc" = 0 ]',
            f"{ipfire.FIREWALL_LOCAL} reload exited $reload_rc",
        ),
        _step(
            f'routes_out=$({ipfire.STATIC_ROUTES} start 2>&1); routes_rc=$?; [ "$routes_rc" = 0 ]',
            f"{ipfire.STATIC_ROUTES} start exited $routes_rc: $(printf '%s' \"$routes_out\" "
            "| tail -n 1)",
        ),
        'if [ -z "$failed" ]; then',
        *("\t" + line for line in _readback_lines(site, removing)),
        '\t[ -z "$bad" ] || failed="the read-back found${bad#;}"',
        "fi",
        "echo reload_rc=$reload_rc",
        _b64_out("reload_out", "reload_out"),
        'if [ -n "$failed" ]; then',
        *("\t" + line for line in _rollback_lines(files, teardown)),
        "\t" + _b64_out("failed", "failed"),
        "\techo restored=$restored",
        "\t" + _b64_out("left", "left"),
        f"\texit {ROLLED_BACK}",
        "fi",
        f'echo "rules=b64:$( (iptables -w -S {c.forward}; iptables -w -t nat -S {c.nat}; '
        f'iptables -w -t raw -S {c.raw}) 2>/dev/null | base64 | tr -d "\\n")"',
        'echo "table200=b64:$(ip route show table 200 | base64 | tr -d "\\n")"',
        *(f"echo {f.var}_changed={int(f.changed)}" for f in files),
        *(f'[ -z "${f.var}_bak" ] || echo "backup=${f.var}_bak"' for f in files),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Applied:
    firewall_local_changed: bool
    routing_changed: bool
    backups: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    jumps: dict[str, int] = field(default_factory=dict)
    reload_rc: int = 0
    reload_output: str = ""


def parse_apply(stdout: str) -> tuple[dict[str, str], list[str]]:
    """key=value lines (b64: values decoded for display); backup= lines collected."""
    values: dict[str, str] = {}
    backups = []
    for line in stdout.split("\n"):
        key, sep, value = line.strip().partition("=")
        if not sep:
            continue
        if value.startswith("b64:"):
            value = base64.b64decode(value[4:]).decode(errors="replace")
        if key == "backup":
            backups.append(value)
        else:
            values[key] = value
    return values, backups


def _tail(text: str, lines: int = 5) -> str:
    """The end of host output, on one line and safe for the terminal."""
    return printable(" | ".join(text.strip().splitlines()[-lines:]), keep_newlines=False)


def _rolled_back(values: dict[str, str]) -> HostError:
    failed = _tail(values.get("failed", "a step"))
    out = _tail(values.get("reload_out", ""))
    what = f"applying on the host failed: {failed}" + (f" (reload said: {out})" if out else "")
    if values.get("restored") == "1":
        return HostError(
            f"{what}; restored the previous files and rules",
            "the host is as it was; fix the cause and run the command again",
        )
    left = _tail(values.get("left", "").lstrip("; ").replace("; ", "\n"), lines=10)
    return HostError(
        f"{what}; restoring failed too: {left or 'unknown'}",
        f"repair by hand: put the backups next to {ipfire.FIREWALL_LOCAL} and {ipfire.ROUTING} "
        f"back, then run {ipfire.FIREWALL_LOCAL} reload and {ipfire.STATIC_ROUTES} start",
    )


def apply(
    client: paramiko.SSHClient, site: Site, facts: Facts, plan: ipfire.HostFiles, removing: bool
) -> Applied:
    r = execute(client, "/bin/sh -s", input=apply_script(site, facts, plan, removing), timeout=120)
    values, backups = parse_apply(r.stdout)
    if r.rc == CHANGED:
        raise HostError(
            f"{printable(values.get('changed', 'a file'))} changed on the host since it was read",
            "run the command again",
        )
    if r.rc == NOT_STAGED:
        raise HostError(
            f"applying on the host failed: {_tail(values.get('failed', ''))}",
            "nothing was changed on the host",
        )
    if r.rc == ROLLED_BACK:
        raise _rolled_back(values)
    if r.rc != 0:
        raise HostError(
            f"applying on the host failed (exit {r.rc}): {_tail(r.stderr)}",
            f"look at {ipfire.FIREWALL_LOCAL} and {ipfire.ROUTING} on the host; "
            "the backups next to them hold the old versions",
        )
    return Applied(
        firewall_local_changed=values.get("fw_changed") == "1",
        routing_changed=values.get("rt_changed") == "1",
        backups=backups,
        rules=[ln for ln in values.get("rules", "").splitlines() if ln.strip()],
        routes=[ln for ln in values.get("table200", "").splitlines() if ln.strip()],
        jumps={k: int(values.get(f"jump_{k}") or 0) for k in ("forward", "nat", "raw")},
        reload_rc=int(values.get("reload_rc") or 0),
        reload_output=values.get("reload_out", "").strip()[-2000:],
    )
