"""`wg-appliance ipfire`: the IPFire host's side, over SSH as root on port 222.

One SSH round trip gathers every fact (a POSIX sh probe: IPFire promises no Python) and
the two files the tool edits; pure checks judge the facts; builder.render.ipfire merges the files.
Applying is a second round trip that refuses to write if a file changed since it was read
(comparing the files' bytes: they need not be UTF-8), keeps a timestamped copy of each file
it changes, stops the firewall.local hooks with the old file (so chains of a removed or
renamed block go too), installs the new files, runs IPFire's own `firewall.local reload` and
`static-routes start`, and checks the jumps and routes are live. If any step after the stop
fails, the same script puts the old files back and starts the old rules again.

The host key is checked against known_hosts or a SHA256 fingerprint and never learned.
Login uses the admin's own key or agent, not the appliance's key.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from builder.errors import ConnectError, HostError, InputError
from builder.model.site import Site
from builder.remote.ssh import execute
from builder.render import ipfire
from builder.text import printable

DEFAULT_PORT = 222
MEMORY_MARGIN_MIB = 128
PAKFIRE_INSTALLED = "/opt/pakfire/db/installed"
WG_SETTINGS = "/var/ipfire/wireguard/settings"
WG_PEERS = "/var/ipfire/wireguard/peers"
SSH_RE = re.compile(r"^(?:([A-Za-z0-9._-]+)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?$")


# --- connecting -------------------------------------------------------------------------


@dataclass(frozen=True)
class HostLogin:
    user: str
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_login(value: str) -> HostLogin:
    m = SSH_RE.match(value.strip())
    if not m:
        raise InputError(value, "--ssh", "expected root@HOST or root@HOST:PORT")
    user, host, port = m.group(1) or "root", m.group(2).strip("[]"), m.group(3)
    if port is not None and not 1 <= int(port) <= 65535:
        raise InputError(value, "--ssh", f"port {port} is out of range (1..65535)")
    return HostLogin(user, host, int(port) if port else DEFAULT_PORT)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256:base64-without-padding."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


class _PinnedFingerprint(paramiko.MissingHostKeyPolicy):
    def __init__(self, expected: str):
        self.expected = expected

    def missing_host_key(self, client, hostname, key) -> None:
        offered = fingerprint(key)
        if offered != self.expected:
            raise ConnectError(
                f"{hostname}: host key mismatch: the host offered {key.get_name()} {offered}, "
                f"not {self.expected}. Not connecting: check the fingerprint on the IPFire "
                "console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)"
            )


def connect_host(
    login: HostLogin,
    known_hosts: Path | None = None,
    host_key: str | None = None,
    identity: Path | None = None,
    timeout: float = 15.0,
) -> paramiko.SSHClient:
    """Connect as the admin: own key or agent, host key pinned by known_hosts or fingerprint."""
    client = paramiko.SSHClient()
    where = str(login)
    if host_key:
        if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", host_key):
            raise InputError(host_key, "--host-key", "expected SHA256:... as ssh-keygen -lf shows")
        client.set_missing_host_key_policy(_PinnedFingerprint(host_key))
    else:
        path = (known_hosts or Path("~/.ssh/known_hosts")).expanduser()
        try:
            client.get_host_keys().load(str(path))
        except FileNotFoundError:
            if known_hosts is not None:
                raise InputError(str(path), "--known-hosts", "no such file") from None
        except (OSError, paramiko.SSHException) as e:
            raise InputError(str(path), "--known-hosts", f"cannot read: {e}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            login.host,
            port=login.port,
            username=login.user,
            key_filename=str(identity.expanduser()) if identity else None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=True,
            look_for_keys=identity is None,
        )
    except ConnectError:
        client.close()
        raise
    except paramiko.BadHostKeyException as e:
        client.close()
        raise ConnectError(
            f"{where}: host key mismatch: the host offered {e.key.get_name()} "
            f"{fingerprint(e.key)}, known_hosts has another. Not connecting: treat it as an "
            "attack unless IPFire was reinstalled (then fix the known_hosts line)"
        ) from None
    except paramiko.SSHException as e:
        client.close()
        if "not found in known_hosts" in str(e):
            raise ConnectError(
                f"{where}: the host key is not in known_hosts. Not connecting: compare the "
                "fingerprint with the IPFire console, then pass it with --host-key SHA256:... "
                "or add the key to known_hosts"
            ) from None
        if isinstance(e, paramiko.AuthenticationException):
            raise ConnectError(
                f"{where}: authentication failed (enable SSH key authentication in the web UI "
                "under System > SSH Access and add your public key to /root/.ssh/authorized_keys)"
            ) from None
        raise ConnectError(f"{where}: cannot connect: {e}") from None
    except (OSError, EOFError) as e:
        client.close()
        raise ConnectError(
            f"{where}: cannot connect: {e or type(e).__name__} "
            "(is SSH enabled in the web UI, System > SSH Access, on port 222?)"
        ) from None
    return client


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


@dataclass(frozen=True)
class Facts:
    values: dict[str, str]
    # None: the file does not exist. Text from ipfire.host_text: it encodes back to the
    # file's exact bytes, UTF-8 or not.
    files: dict[str, str | None]

    def get(self, key: str) -> str:
        return self.values.get(key, "")


FILE_KEYS = ("firewall_local", "routing", "red_iface", "wg_settings", "wg_peers", "release")


def parse_probe(stdout: str) -> Facts:
    values: dict[str, str] = {}
    files: dict[str, str | None] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key in FILE_KEYS:
            files[key] = ipfire.host_text(base64.b64decode(value[4:])) if value != "-" else None
        else:
            values[key] = value
    return Facts(values, files)


def gather(client: paramiko.SSHClient, site: Site) -> Facts:
    r = execute(client, "/bin/sh -s", input=probe_script(site), timeout=60)
    if r.rc != 0 or "uid=" not in r.stdout:
        raise HostError(
            f"the host probe failed (exit {r.rc}): {r.stderr.strip()[-300:]}",
            "check that the login shell is a POSIX sh and the account is root",
        )
    return parse_probe(r.stdout)


# --- judging the facts: pure ----------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _readhash(text: str | None) -> dict[str, str]:
    """IPFire's KEY=value settings files."""
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _ipfire_wireguard(site: Site, facts: Facts) -> Check:
    port = ipfire.red_port(site)
    settings = _readhash(facts.files.get("wg_settings"))
    fix = (
        "give the site another wireguard.endpoint port (and the same in the client configs), "
        "or move or disable IPFire's WireGuard under Services > WireGuard"
    )
    if settings.get("ENABLED") == "on" and settings.get("PORT") == str(port):
        return Check(
            "IPFire WireGuard",
            False,
            f"IPFire's own WireGuard is enabled on udp/{port}, the port this site forwards",
            fix,
        )
    for line in (facts.files.get("wg_peers") or "").splitlines():
        parts = line.split(",")
        if len(parts) > 6 and parts[1] == "on" and parts[2] == "net" and parts[6] == str(port):
            return Check(
                "IPFire WireGuard",
                False,
                f"IPFire's net-to-net WireGuard connection {parts[3]!r} listens on udp/{port}",
                fix,
            )
    if settings.get("ENABLED") == "on":
        return Check(
            "IPFire WireGuard", True, f"enabled on udp/{settings.get('PORT') or '?'}, no clash"
        )
    return Check("IPFire WireGuard", True, "not enabled")


def _lan_address(site: Site, facts: Facts) -> Check:
    addr = site.lan.address.ip
    name = "LAN address free"
    if facts.get("addr_local") not in ("", "0"):
        return Check(
            name,
            False,
            f"{addr} is an address of the IPFire host itself",
            "pick another lan.address",
        )
    m = re.search(r"lladdr ([0-9a-f:]{17})", facts.get("neigh"))
    if m and m.group(1) == site.lan.mac:
        return Check(name, True, f"{addr} answers with this appliance's MAC {site.lan.mac}")
    if m or facts.get("ping_rc") == "0":
        who = f"MAC {m.group(1)}" if m else "a device"
        return Check(
            name,
            False,
            f"{addr} is in use by {who}, not this appliance ({site.lan.mac})",
            "pick a free lan.address outside the DHCP range (Network > DHCP Server)",
        )
    return Check(name, True, f"{addr}: no answer, no neighbour entry")


def judge(site: Site, facts: Facts, removing: bool = False) -> list[Check]:
    """Every check with its fix. When removing, only what removal needs."""
    checks = [
        Check(
            "root login",
            facts.get("uid") == "0",
            f"uid {facts.get('uid') or '?'}",
            "log in as root (ssh root@HOST:222): IPFire's files and iptables need it",
        )
    ]
    checks.append(_files_check(site, facts, removing))
    if removing:
        return checks
    release = (facts.files.get("release") or "").strip()
    checks.append(
        Check(
            "IPFire version",
            release.startswith("IPFire"),
            release or "/etc/system-release missing",
            "this command is for IPFire 2.x hosts; elsewhere use deploy and your own firewall",
        )
    )
    for addon, binary, pak in (
        ("libvirt", facts.get("virsh"), facts.get("pak_libvirt")),
        ("qemu", facts.get("qemu"), facts.get("pak_qemu")),
    ):
        missing = [w for w, ok in (("add-on", pak == "yes"), ("binary", bool(binary))) if not ok]
        checks.append(
            Check(
                f"{addon} add-on",
                not missing,
                f"installed ({binary})" if not missing else f"missing: {', '.join(missing)}",
                "install the add-ons: pakfire install libvirt qemu "
                "(or web UI: IPFire > Pakfire), then /etc/init.d/libvirtd start",
            )
        )
    running = bool(facts.get("libvirtd")) or facts.get("libvirt_sock") == "yes"
    checks.append(
        Check(
            "libvirtd running",
            running,
            f"pid {facts.get('libvirtd')}" if facts.get("libvirtd") else "not running",
            "/etc/init.d/libvirtd start",
        )
    )
    checks.append(
        Check(
            "/dev/kvm",
            facts.get("kvm") == "yes",
            "present" if facts.get("kvm") == "yes" else "missing",
            "enable virtualisation (VT-x/AMD-V) in the firmware setup; without KVM the "
            "appliance runs emulated and slowly",
        )
    )
    br = site.host.bridge
    if facts.get("bridge_is") == "yes":
        detail, ok = f"{br} is a bridge", True
    elif facts.get("bridge_dev") == "yes":
        detail, ok = f"{br} exists but is not a bridge", False
    else:
        detail, ok = f"{br} does not exist", False
    checks.append(
        Check(
            "GREEN bridge",
            ok,
            detail,
            "set GREEN to bridge mode in the web UI (Network > Zone Configuration: GREEN "
            "'Bridge'), then reboot; the appliance's NIC joins that bridge",
        )
    )
    need_mib = site.appliance.memory_mib + MEMORY_MARGIN_MIB
    have_mib = int(facts.get("mem_kib") or 0) // 1024
    checks.append(
        Check(
            "free memory",
            have_mib >= need_mib,
            f"{have_mib} MiB available, the appliance needs {site.appliance.memory_mib} MiB "
            f"+ {MEMORY_MARGIN_MIB}",
            "free memory on the host or lower appliance.memory_mib",
        )
    )
    need_kib = site.appliance.disk_gib * 1024 * 1024
    have_kib = int(facts.get("disk_kib") or 0)
    checks.append(
        Check(
            "free disk",
            have_kib >= need_kib,
            f"{have_kib / 1024**2:.1f} GiB free in {facts.get('disk_dir') or '?'}, the disk "
            f"may grow to {site.appliance.disk_gib} GiB",
            "free space there, or lower appliance.disk_gib",
        )
    )
    checks.append(_ipfire_wireguard(site, facts))
    red = (facts.files.get("red_iface") or "").strip()
    checks.append(
        Check(
            "RED interface",
            bool(red),
            f"{red} (from {ipfire.RED_IFACE})" if red else f"{ipfire.RED_IFACE} is empty",
            "connect RED first: the port forward is bound to the RED interface",
        )
    )
    checks.append(_lan_address(site, facts))
    return checks


def _files_check(site: Site, facts: Facts, removing: bool) -> Check:
    """The merge itself as a check: broken markers or a port clash are reported, not raised."""
    try:
        p = current_plan(site, facts, removing)
    except HostError as e:
        return Check("host files", False, e.what, e.fix)
    blocks = [b.name for b in ipfire.find_blocks(facts.files.get("firewall_local") or "")]
    verb = "removes" if removing else "merges into"
    detail = f"{verb} {ipfire.FIREWALL_LOCAL} (appliance blocks now: {', '.join(blocks) or 'none'})"
    return Check("host files", True, detail + "".join(f"; note: {n}" for n in p.notes))


def current_plan(site: Site, facts: Facts, removing: bool) -> ipfire.Plan:
    return ipfire.plan(
        site, facts.files.get("firewall_local"), facts.files.get("routing"), remove=removing
    )


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


def _host_files(facts: Facts, plan: ipfire.Plan) -> tuple[_HostFile, _HostFile]:
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


def apply_script(site: Site, facts: Facts, plan: ipfire.Plan, removing: bool) -> str:
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
    client: paramiko.SSHClient, site: Site, facts: Facts, plan: ipfire.Plan, removing: bool
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
