"""Is this IPFire host ready for the appliance? Pure judgements of the facts the probe read.

Every check says what it saw and, when it fails, what the admin does about it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from builder.checks.result import Check
from builder.errors import HostError
from builder.model.site import Site
from builder.render import ipfire

MEMORY_MARGIN_MIB = 128


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


def judge(
    site: Site,
    facts: Facts,
    removing: bool = False,
    files: ipfire.HostFiles | HostError | None = None,
) -> list[Check]:
    """Every check with its fix. When removing, only what removal needs. `files` is what
    `try_files` gave, so a run merges the host's files once."""
    if files is None:
        files = try_files(site, facts, removing)
    checks = [
        Check(
            "root login",
            facts.get("uid") == "0",
            f"uid {facts.get('uid') or '?'}",
            "log in as root (ssh root@HOST:222): IPFire's files and iptables need it",
        )
    ]
    checks.append(_files_check(facts, removing, files))
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


def _files_check(facts: Facts, removing: bool, files: ipfire.HostFiles | HostError) -> Check:
    """The merge itself as a check: broken markers or a port clash are reported, not raised."""
    if isinstance(files, HostError):
        return Check("host files", False, files.what, files.fix)
    blocks = [b.name for b in ipfire.find_blocks(facts.files.get("firewall_local") or "")]
    verb = "removes" if removing else "merges into"
    detail = f"{verb} {ipfire.FIREWALL_LOCAL} (appliance blocks now: {', '.join(blocks) or 'none'})"
    return Check("host files", True, detail + "".join(f"; note: {n}" for n in files.notes))


def current_files(site: Site, facts: Facts, removing: bool) -> ipfire.HostFiles:
    """The host's two files as they should be, merged into what the probe read."""
    return ipfire.host_files(
        site, facts.files.get("firewall_local"), facts.files.get("routing"), remove=removing
    )


def try_files(site: Site, facts: Facts, removing: bool) -> ipfire.HostFiles | HostError:
    """`current_files`, with a file that cannot be merged as the error instead of raised."""
    try:
        return current_files(site, facts, removing)
    except HostError as e:
        return e
