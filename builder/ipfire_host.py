"""`wg-appliance ipfire`: the IPFire host's side, over SSH as root on port 222.

One SSH round trip gathers every fact (a POSIX sh probe: IPFire promises no Python) and
the two files the tool edits; pure checks judge the facts; builder.ipfire merges the files.
Applying is a second round trip that refuses to write if a file changed since it was read,
keeps a timestamped copy of each file it changes, stops the firewall.local hooks with the
old file (so chains of a removed or renamed block go too), installs the new files, and runs
IPFire's own `firewall.local reload` and `static-routes start`.

The host key is checked against known_hosts or a SHA256 fingerprint and never learned.
Login uses the admin's own key or agent, not the appliance's key.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paramiko

from builder import ipfire
from builder.errors import ConnectError, HostError, InputError
from builder.site import Site
from builder.ssh import execute

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
    files: dict[str, str | None]  # None: the file does not exist

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
            files[key] = (
                base64.b64decode(value[4:]).decode(errors="replace") if value != "-" else None
            )
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


def _sha(text: str | None) -> str:
    return "absent" if text is None else hashlib.sha256(text.encode()).hexdigest()


def apply_script(site: Site, facts: Facts, plan: ipfire.Plan, removing: bool) -> str:
    """Check nothing changed since the probe, back up and install changed files, then run
    IPFire's own hooks and report what is live."""
    q = shlex.quote
    c = ipfire.chains_for(site.name)
    old_fw, old_rt = facts.files.get("firewall_local"), facts.files.get("routing")
    fw_changed, rt_changed = plan.firewall_local != old_fw, plan.routing != old_rt
    b64 = {
        k: base64.b64encode(v.encode()).decode() for k, v in asdict(plan).items() if k != "notes"
    }
    fw, rt = q(ipfire.FIREWALL_LOCAL), q(ipfire.ROUTING)
    lines = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ts=$(date +%Y%m%d-%H%M%S)",
        'sum() { if [ -f "$1" ]; then sha256sum < "$1" | cut -d" " -f1; else echo absent; fi; }',
        f'[ "$(sum {fw})" = {_sha(old_fw)} ] || {{ echo changed={fw}; exit 3; }}',
        f'[ "$(sum {rt})" = {_sha(old_rt)} ] || {{ echo changed={rt}; exit 3; }}',
        "install_file() {",
        '\tprintf "%s" "$4" | base64 -d > "$1.wg-appliance-new" || exit 4',
        '\tchmod "$2" "$1.wg-appliance-new" && chown "$3" "$1.wg-appliance-new" || exit 4',
        '\tif [ -f "$1" ]; then cp -p "$1" "$1.bak-wg-appliance-$ts" && '
        'echo "backup=$1.bak-wg-appliance-$ts"; fi',
        '\tmv -f "$1.wg-appliance-new" "$1" || exit 4',
        "}",
    ]
    if fw_changed:
        # Stop with the old file: its stop knows the chains of a block that is going away.
        lines.append(f"[ -f {fw} ] && sh {fw} stop >/dev/null 2>&1")
        lines.append(f"install_file {fw} 755 root:root {b64['firewall_local']}")
    if rt_changed:
        lines.append(f"install_file {rt} 644 nobody:nobody {b64['routing']}")
    if removing:
        lines.append(ipfire.teardown_script(site.name).strip())
    lines += [
        f"{fw} reload > /tmp/wg-appliance-reload.$$ 2>&1; echo reload_rc=$?",
        'echo "reload_out=b64:$(base64 < /tmp/wg-appliance-reload.$$ | tr -d "\\n")"',
        "rm -f /tmp/wg-appliance-reload.$$",
        f"{ipfire.STATIC_ROUTES} start >/dev/null 2>&1; echo routes_rc=$?",
        f'echo "jump_forward=$(iptables -w -S CUSTOMFORWARD | grep -c -- "-j {c.forward}$")"',
        f'echo "jump_nat=$(iptables -w -t nat -S CUSTOMPREROUTING | grep -c -- "-j {c.nat}$")"',
        f'echo "jump_raw=$(iptables -w -t raw -S PREROUTING | grep -c -- "-j {c.raw}$")"',
        f'echo "rules=b64:$( (iptables -w -S {c.forward}; iptables -w -t nat -S {c.nat}; '
        f'iptables -w -t raw -S {c.raw}) 2>/dev/null | base64 | tr -d "\\n")"',
        'echo "table200=b64:$(ip route show table 200 | base64 | tr -d "\\n")"',
        f"echo fw_changed={int(fw_changed)} rt_changed={int(rt_changed)}",
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
    values: dict[str, str] = {}
    backups = []
    for token in stdout.split("\n"):
        for part in token.split(" ") if token.startswith("fw_changed=") else [token]:
            key, sep, value = part.partition("=")
            if not sep:
                continue
            if value.startswith("b64:"):
                value = base64.b64decode(value[4:]).decode(errors="replace")
            if key == "backup":
                backups.append(value)
            else:
                values[key] = value
    return values, backups


def apply(
    client: paramiko.SSHClient, site: Site, facts: Facts, plan: ipfire.Plan, removing: bool
) -> Applied:
    r = execute(client, "/bin/sh -s", input=apply_script(site, facts, plan, removing), timeout=120)
    values, backups = parse_apply(r.stdout)
    if r.rc == 3:
        raise HostError(
            f"{values.get('changed', 'a file')} changed on the host since it was read",
            "run the command again",
        )
    if r.rc != 0:
        raise HostError(
            f"applying on the host failed (exit {r.rc}): {r.stderr.strip()[-300:]}",
            "nothing was reloaded; the backups next to the files hold the old versions",
        )
    applied = Applied(
        firewall_local_changed=values.get("fw_changed") == "1",
        routing_changed=values.get("rt_changed") == "1",
        backups=backups,
        rules=[ln for ln in values.get("rules", "").splitlines() if ln.strip()],
        routes=[ln for ln in values.get("table200", "").splitlines() if ln.strip()],
        jumps={k: int(values.get(f"jump_{k}") or 0) for k in ("forward", "nat", "raw")},
        reload_rc=int(values.get("reload_rc") or 0),
        reload_output=values.get("reload_out", "").strip()[-2000:],
    )
    want = 0 if removing else 1
    wrong = {k: n for k, n in applied.jumps.items() if n != want}
    missing = [str(r.network) for r in ([] if removing else ipfire.routes(site))]
    missing = [n for n in missing if not any(ln.startswith(n + " ") for ln in applied.routes)]
    if wrong or missing:
        out = " | ".join(values.get("reload_out", "").strip().splitlines()[-5:])
        raise HostError(
            f"after reload the host is not as planned: jumps {wrong or 'ok'}, "
            f"routes missing {missing or 'none'}, reload exit {values.get('reload_rc')}: {out}",
            f"look at {ipfire.FIREWALL_LOCAL} on the host; the backups are next to it",
        )
    return applied
