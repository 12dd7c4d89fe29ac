"""The libvirt host: connect, preflight, storage pool and volumes, the appliance domain.

Small functions over libvirt-python, against `qemu:///system` on the host or
`qemu+ssh://root@HOST:222/system` from a workstation. Everything moves through the libvirt
API (volume uploads and the serial log are streams), so remote hosts need nothing but
libvirtd. The XML these calls send and read is made and parsed in builder.render.libvirt_xml.

Virtualisation type: libvirt can say whether it offers KVM, but not whether KVM works. Nested
KVM can be offered and still stop the guest with "KVM internal error ... emulation failure";
qemu then pauses the domain. So `start_domain` watches a KVM guest for a few seconds and, if
qemu pauses it, restarts it under TCG (`type='qemu'`) with a warning. That watch is paid once
per host: the caller keeps what it showed (`host_identity`, the learned type) and passes it to
`choose_virt_type`, which then neither watches a KVM that worked nor tries one that failed. The
environment variable WG_APPLIANCE_VIRT_TYPE=kvm|qemu overrides the choice (and with `kvm` turns
the fallback into an error).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import libvirt

from builder.errors import HostError, InputError
from builder.model.login import HostAccess, access_of, known_hosts_lines, libvirt_uri
from builder.model.site import Site, host_uri_problem
from builder.progress import Progress
from builder.remote.ssh import HostUnreachable, connect_host, execute, fingerprint, identity_file
from builder.render.libvirt_xml import (
    META_POOL,
    PREFIX,
    PRIVATE,
    XMLNS,
    DomainSpec,
    domain_type,
    domain_xml,
    interface_type,
    metadata_xml,
    owned_volumes,
    parse_metadata,
    pool_mode,
    pool_target_path,
    pool_xml,
    seed_cdrom_xml,
    seed_source,
    volume_file_bytes,
    volume_xml,
)
from builder.text import printable

ENV_VIRT_TYPE = "WG_APPLIANCE_VIRT_TYPE"
KVM_WATCH_S = 15.0
MIB = 1024**2
GIB = 1024**3
CHUNK = 4 * MIB
URI_FIX = "use qemu:///system on the host itself or qemu+ssh://root@HOST:222/system"
BRIDGE_FIX = (
    "put GREEN in bridge mode in the IPFire web UI (Network > Zone Configuration), "
    "or name an existing bridge"
)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is set; we raise them instead."""


libvirt.registerErrorHandler(_quiet, None)


# --- connection and preflight -------------------------------------------------


def connect(
    uri: str, access: HostAccess | None = None, progress: Progress | None = None
) -> libvirt.virConnect:
    """Open `uri`, turning libvirt's errors into what to do about them. A remote URI needs
    `access`: the host key is checked against its pin before libvirt sends anything."""
    scheme = uri.split(":", 1)[0]
    if scheme.split("+")[0] not in ("qemu", "test") or "://" not in uri:
        raise HostError(f"{uri} is not a libvirt URI for qemu guests", URI_FIX)
    problem = host_uri_problem(uri) if scheme not in ("test", "qemu") else None
    if problem:
        raise HostError(f"{uri}: {problem}", URI_FIX)
    if "ssh" in scheme:
        if access is None:
            raise HostError(f"{uri}: no SSH login to the host was given", URI_FIX)
        return _connect_ssh(access, progress)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        msg = str(e)
        if e.get_error_code() == libvirt.VIR_ERR_NO_CONNECT or "URI" in msg:
            raise HostError(f"no libvirt driver for {uri}: {msg}", URI_FIX) from e
        if "Failed to connect socket" in msg or "No such file" in msg:
            raise HostError(
                f"libvirtd is not running for {uri}: {msg}",
                "start libvirtd and virtlogd on the host (`libvirtd -d; virtlogd -d` without "
                "an init system)",
            ) from e
        raise HostError(f"cannot connect to {uri}: {msg}", URI_FIX) from e


def connect_site(
    site: Site, access: HostAccess | None = None, progress: Progress | None = None
) -> libvirt.virConnect:
    """The site's libvirt host, logged in with `access` (the command line's pins), else with
    what the site's [host] says."""
    return connect(site.host.uri, access or access_of(site.host, str(site.path)), progress)


# What libvirt's SSH transport runs on the far side needs there: a libvirtd socket and
# virt-ssh-helper (libvirt >= 8.4) or nc; one line per thing missing. Then the host's public
# keys, for the known_hosts libvirt reads.
FAR_SIDE = r"""
found=
for s in /run/libvirt/libvirt-sock /var/run/libvirt/libvirt-sock; do
  [ -S "$s" ] && found=1
done
[ -n "$found" ] || echo no-socket
command -v virt-ssh-helper >/dev/null 2>&1 || command -v nc >/dev/null 2>&1 || echo no-helper
cat /etc/ssh/ssh_host_*_key.pub 2>/dev/null
true
"""
START_LIBVIRTD = (
    "start libvirtd on the host (IPFire: install the libvirt add-on with Pakfire, then "
    "/etc/init.d/libvirtd start)"
)


def _connect_ssh(access: HostAccess, progress: Progress | None) -> libvirt.virConnect:
    """Pin-check the host with paramiko, look at what the far side needs, then let libvirt
    (libssh2) connect with a known_hosts file that holds only the key just checked."""
    login = access.login
    client = connect_host(access)
    try:
        key = client.get_transport().get_remote_server_key()
        far_side = execute(client, FAR_SIDE, timeout=30).stdout
    finally:
        client.close()
    missing = far_side.splitlines()
    if "no-socket" in missing:
        raise HostUnreachable(f"{login}: libvirtd is not running on the host", START_LIBVIRTD)
    if "no-helper" in missing:
        raise HostUnreachable(
            f"{login}: the host has neither virt-ssh-helper nor nc for libvirt's SSH transport",
            "install libvirt (it brings virt-ssh-helper) on the host",
        )
    if progress:
        progress.say(f"  host key {fingerprint(key)} matches {access.pinned_by}")
    with tempfile.TemporaryDirectory(prefix="wg-appliance-") as tmp:
        known = Path(tmp) / "known_hosts"
        verified = f"{key.get_name()} {key.get_base64()}"
        known.write_text(known_hosts_lines(login, verified, far_side))
        uri = libvirt_uri(login, known, identity_file(access))
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as e:
            msg = printable(str(e), keep_newlines=False)
            if "Failed to connect socket" in msg or "No such file" in msg:
                raise HostUnreachable(
                    f"{login}: libvirtd does not answer: {msg}", START_LIBVIRTD
                ) from None
            raise HostUnreachable(
                f"{login}: libvirt cannot connect over SSH: {msg}",
                "check that the key in host.ssh_key (or ssh-agent) logs in as "
                f"`ssh -p {login.port} {login.user}@{login.host}` does",
            ) from None


def kvm_offered(conn: libvirt.virConnect) -> bool:
    """Whether libvirt offers KVM for x86_64 `pc` guests (it may still fail when nested)."""
    try:
        conn.getDomainCapabilities(None, "x86_64", "pc", "kvm", 0)
    except libvirt.libvirtError:
        return False
    return True


def host_identity(conn: libvirt.virConnect) -> str:
    """The host a learned virtualisation type belongs to: the URI and the host's own name."""
    return f"{conn.getURI()} {conn.getHostname()}"


# What the admin should know of an emulated appliance: its initramfs turns address-space
# randomization off there, which halves each process start under TCG (README, Under TCG).
TCG = "TCG (slow, and without address-space randomization: see README)"


def choose_virt_type(conn: libvirt.virConnect, learned: str | None = None) -> tuple[str, str]:
    """(virt_type, why): the environment override, else what an earlier start on this host
    showed (`learned`), else KVM when libvirt offers it."""
    forced = os.environ.get(ENV_VIRT_TYPE, "")
    if forced:
        if forced not in ("kvm", "qemu"):
            raise InputError("environment", ENV_VIRT_TYPE, f"{forced!r}: use kvm or qemu")
        return forced, f"{ENV_VIRT_TYPE}={forced}"
    if learned == "qemu":
        return "qemu", (
            f"KVM failed here before, so the appliance runs under {TCG}; "
            f"{ENV_VIRT_TYPE}=kvm tries KVM again"
        )
    if kvm_offered(conn):
        return "kvm", "KVM worked here before" if learned == "kvm" else "libvirt offers KVM"
    return "qemu", f"libvirt offers no KVM; the appliance runs under {TCG}"


def check_bridge(conn: libvirt.virConnect, bridge: str) -> None:
    """Raise when libvirt knows `bridge` is missing or not a bridge; pass when it cannot tell
    (no interface driver), since start_domain then explains the start error."""
    try:
        iface = conn.interfaceLookupByName(bridge)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_INTERFACE:
            raise HostError(f"the host has no interface {bridge}", BRIDGE_FIX) from e
        return
    kind = interface_type(iface.XMLDesc(0))
    if kind != "bridge":
        raise HostError(f"{bridge} on the host is a {kind} interface, not a bridge", BRIDGE_FIX)


def available_memory_mib(conn: libvirt.virConnect) -> int:
    """Memory the host can give a new guest: free plus page cache."""
    try:
        stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
    except libvirt.libvirtError:
        return conn.getFreeMemory() // MIB
    kib = sum(stats.get(k, 0) for k in ("free", "buffers", "cached"))
    return kib // 1024


def check_memory(conn: libvirt.virConnect, need_mib: int) -> None:
    have = available_memory_mib(conn)
    if have < need_mib:
        raise HostError(
            f"the host has {have} MiB available, the appliance needs {need_mib} MiB",
            "lower appliance.memory_mib in the site file or free memory on the host",
        )


# --- storage ------------------------------------------------------------------


def pool_path(pool: libvirt.virStoragePool) -> str:
    return pool_target_path(pool.XMLDesc(0))


def _lookup(lookup, name: str, missing: int, what: str):
    """libvirt's lookup by name, with "no such object" as None rather than an error."""
    try:
        return lookup(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == missing:
            return None
        raise HostError(f"cannot look up {what} {name}: {e}") from e


def find_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    return _lookup(conn.storagePoolLookupByName, name, libvirt.VIR_ERR_NO_STORAGE_POOL, "pool")


def ensure_pool(conn: libvirt.virConnect, name: str, path: str) -> libvirt.virStoragePool:
    """Pool `name` (or an admin's pool on the same directory), active and autostarted.

    IPFire defines no pool, so the first deploy makes a `dir` pool; libvirt refuses two pools
    on one directory, hence the reuse.
    """
    pool = find_pool(conn, name)
    if pool is None:
        pool = next((p for p in conn.listAllStoragePools(0) if pool_path(p) == path), None)
    try:
        if pool is None:
            pool = conn.storagePoolDefineXML(pool_xml(name, path), 0)
            pool.build(0)
        if not pool.isActive():
            pool.create(0)
        if not pool.autostart():
            pool.setAutostart(1)
        pool.refresh(0)
    except libvirt.libvirtError as e:
        raise HostError(f"storage pool {name} at {path}: {e}", "check the directory") from e
    return pool


def find_volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    return _lookup(pool.storageVolLookupByName, name, libvirt.VIR_ERR_NO_STORAGE_VOL, "volume")


def volume_file_size(vol: libvirt.virStorageVol) -> int:
    return volume_file_bytes(vol.XMLDesc(0))


PART = ".part"  # beside a volume while its upload runs: the volume is not complete yet


def upload_volume(
    pool: libvirt.virStoragePool,
    name: str,
    local_file: Path,
    progress: Progress | None = None,
    mode: str | None = PRIVATE,
) -> libvirt.virStorageVol:
    """Upload `local_file` as volume `name` through a libvirt stream (works over SSH), with
    file mode `mode` (None: libvirt's default, for what holds no secret).

    Names carry the content digest, so a volume of that name and size is the same content and
    is kept, unless the marker `name.part` is beside it: that is made before the first byte
    and removed after the last, so a run killed half way leaves it, and the next run uploads
    again rather than booting a half image. A finished upload is never repeated.
    """
    size = local_file.stat().st_size
    vol, marker = find_volume(pool, name), find_volume(pool, name + PART)
    if vol is not None and marker is None and volume_file_size(vol) == size:
        if progress:
            progress.say(f"volume {name} is already on the host")
        return vol
    for old in (vol, marker):
        if old is not None:
            old.delete(0)
    marker = pool.createXML(volume_xml(name + PART, 0, "raw"), 0)
    vol = pool.createXML(volume_xml(name, size, "raw", mode=mode), 0)
    stream = pool.connect().newStream(0)
    try:
        vol.upload(stream, 0, size, 0)
        done = 0
        with local_file.open("rb") as f:
            while chunk := f.read(CHUNK):
                sent = 0
                while sent < len(chunk):
                    sent += stream.send(chunk[sent:])
                done += len(chunk)
                if progress:
                    progress.bytes(f"upload {name}", done, size)
        stream.finish()
        marker.delete(0)
    except BaseException as e:
        _abort_upload(stream, vol, marker)
        if isinstance(e, libvirt.libvirtError):
            raise HostError(f"uploading {local_file} as {name} failed: {e}") from e
        raise
    pool.refresh(0)
    return pool.storageVolLookupByName(name)


def _abort_upload(stream: libvirt.virStream, *vols: libvirt.virStorageVol) -> None:
    """Leave no half volume behind (and no marker for one that is gone)."""
    for undo in (stream.abort, *(lambda v=v: v.delete(0) for v in vols)):
        with contextlib.suppress(libvirt.libvirtError):
            undo()


def serial_tail(pool: libvirt.virStoragePool, name: str, max_bytes: int = 4096) -> str:
    """The end of the serial log, read through libvirt so it works on remote hosts too; the
    guest wrote it, so its controls are escaped (a console's CRLF line ends become LF)."""
    try:
        pool.refresh(0)
        vol = pool.storageVolLookupByName(name)
        size = volume_file_size(vol)
        offset = max(0, size - max_bytes)
        stream = pool.connect().newStream(0)
        vol.download(stream, offset, size - offset, 0)
        chunks = []
        while data := stream.recv(65536):
            if isinstance(data, int):
                break
            chunks.append(data)
        stream.finish()
        text = b"".join(chunks).decode(errors="replace")
        return printable(text.replace("\r\n", "\n"))
    except libvirt.libvirtError as e:
        return printable(f"(serial log {name} unreadable: {e})")


def create_disk(
    pool: libvirt.virStoragePool,
    name: str,
    base: libvirt.virStorageVol,
    disk_gib: int,
    backing: bool = True,
) -> libvirt.virStorageVol:
    """The appliance's own qcow2 of `disk_gib`: an overlay on `base` (fast, small, but `base`
    must stay) or a full copy (independent). An existing volume `name` is reused."""
    existing = find_volume(pool, name)
    if existing is not None:
        return existing
    capacity = disk_gib * GIB
    base_capacity = base.info()[1]
    if capacity < base_capacity:
        raise HostError(
            f"disk_gib {disk_gib} is smaller than the image ({base_capacity / GIB:.1f} GiB)",
            "raise appliance.disk_gib in the site file",
        )
    try:
        if backing:
            xml = volume_xml(name, capacity, "qcow2", base.path(), "qcow2")
            return pool.createXML(xml, 0)
        vol = pool.createXMLFrom(volume_xml(name, capacity, "qcow2"), base, 0)
        if vol.info()[1] < capacity:
            vol.resize(capacity, 0)
        return vol
    except libvirt.libvirtError as e:
        raise HostError(f"creating disk {name} from {base.name()}: {e}") from e


# --- the domain ---------------------------------------------------------------


def find_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    return _lookup(conn.lookupByName, name, libvirt.VIR_ERR_NO_DOMAIN, "domain")


def domain_metadata(dom: libvirt.virDomain) -> dict[str, str] | None:
    """The tool's metadata of `dom`, or None when the tool did not make it."""
    return parse_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def appliance_serial_tail(conn: libvirt.virConnect, name: str, lines: int = 25) -> str | None:
    """The end of appliance `name`'s serial log, found through its metadata (pool and
    volumes), or None when the host has no such appliance or log."""
    dom = find_domain(conn, name)
    meta = domain_metadata(dom) if dom is not None else None
    pool = find_pool(conn, meta.get(META_POOL, "")) if meta else None
    logs = [v for v in owned_volumes(meta) if v.endswith("-serial.log")] if meta else []
    if pool is None or not logs:
        return None
    return "\n".join(serial_tail(pool, logs[0]).splitlines()[-lines:])


def retire_seed(dom: libvirt.virDomain) -> bool:
    """Take the seed out of `dom`: the tray emptied in the running guest (IDE cannot be
    unplugged live) and the drive removed from the persistent definition. True if anything
    changed; safe to repeat."""
    changed = False
    try:
        if dom.isActive():
            _, live = seed_source(dom.XMLDesc(0))
            if live is not None:
                dom.updateDeviceFlags(seed_cdrom_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
                changed = True
        present, saved = seed_source(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if present:
            dom.detachDeviceFlags(seed_cdrom_xml(saved), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            changed = True
    except libvirt.libvirtError as e:
        raise HostError(f"taking the seed out of {dom.name()}: {e}", "run deploy again") from e
    return changed


def check_pool_privacy(pool: libvirt.virStoragePool) -> str | None:
    """A note when others may list the pool's folder (the volumes themselves are 0600)."""
    mode = pool_mode(pool.XMLDesc(0))
    if mode is None or not mode & 0o004:
        return None
    return (
        f"the pool folder {pool_path(pool)} is readable by others (mode {mode:04o}); the "
        f"volumes are {PRIVATE}, but `chmod 0711` on the folder also hides their names"
    )


def domain_virt_type(dom: libvirt.virDomain) -> str:
    """The virtualisation type `dom` runs under, as libvirt has it now."""
    return domain_type(dom.XMLDesc(0))


def set_domain_metadata(dom: libvirt.virDomain, values: dict[str, str]) -> None:
    """Replace the tool's metadata on `dom`, live and in its saved definition."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        metadata_xml(values),
        PREFIX,
        XMLNS,
        flags,
    )


def define_domain(conn: libvirt.virConnect, spec: DomainSpec) -> libvirt.virDomain:
    """Define (or redefine) the appliance; never take over a domain the tool did not make."""
    existing = find_domain(conn, spec.name)
    if existing is not None and domain_metadata(existing) is None:
        raise HostError(
            f"the host already has a domain {spec.name} that wg-appliance did not make",
            "choose another appliance name, or remove that domain yourself",
        )
    if existing is not None:
        spec = replace(spec, uuid=existing.UUIDString())
    try:
        return conn.defineXML(domain_xml(spec))
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt rejected the domain {spec.name}: {e}") from e


def _create(dom: libvirt.virDomain, spec: DomainSpec) -> None:
    try:
        dom.create()
    except libvirt.libvirtError as e:
        if f"'{spec.bridge}'" in str(e) or "bridge" in str(e).lower():
            raise HostError(f"starting {spec.name} failed at {spec.bridge}: {e}", BRIDGE_FIX) from e
        raise HostError(f"starting {spec.name} failed: {e}") from e


def stopped_by_qemu(dom: libvirt.virDomain, watch_s: float) -> bool:
    """True when qemu pauses or crashes the guest within `watch_s` seconds, as nested KVM does
    in the guest kernel's decompressor."""
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline:
        state, reason = dom.state()
        if state == libvirt.VIR_DOMAIN_CRASHED:
            return True
        if state == libvirt.VIR_DOMAIN_PAUSED and reason != libvirt.VIR_DOMAIN_PAUSED_USER:
            return True
        time.sleep(0.5)
    return False


def _kvm_problem(dom: libvirt.virDomain, spec: DomainSpec, watch_s: float) -> str | None:
    """Start `dom` under KVM; say what went wrong, or None when it still runs after `watch_s`.

    Nested KVM fails in two ways: qemu refuses to start (e.g. "failed to set MSR") or pauses
    the guest with "KVM internal error" once it runs.
    """
    try:
        _create(dom, spec)
    except HostError as e:
        if e.fix == BRIDGE_FIX:
            raise
        return e.what
    if watch_s > 0 and stopped_by_qemu(dom, watch_s):
        dom.destroy()
        return "qemu paused the guest (KVM internal error)"
    return None


def start_domain(
    conn: libvirt.virConnect,
    spec: DomainSpec,
    progress: Progress | None = None,
    kvm_watch_s: float = KVM_WATCH_S,
    autostart: bool = True,
) -> libvirt.virDomain:
    """Define, start and (unless staged by an upgrade) autostart the appliance; fall back
    from KVM to TCG when KVM fails (unless WG_APPLIANCE_VIRT_TYPE=kvm insists). The domain
    keeps the type that worked. `kvm_watch_s` 0 starts a KVM known to work without watching it."""
    dom = define_domain(conn, spec)
    if dom.isActive():
        dom.destroy()
    problem = _kvm_problem(dom, spec, kvm_watch_s) if spec.virt_type == "kvm" else None
    if spec.virt_type == "qemu":
        _create(dom, spec)
    elif problem is not None:
        if os.environ.get(ENV_VIRT_TYPE) == "kvm":
            raise HostError(
                f"{spec.name} does not run under KVM: {problem}",
                f"unset {ENV_VIRT_TYPE} or set it to qemu (nested virtualisation?)",
            )
        if progress:
            progress.say(
                f"warning: {spec.name} does not run under KVM ({problem}); running it under "
                f"{TCG}. Set {ENV_VIRT_TYPE}=qemu to skip trying KVM."
            )
        spec = replace(spec, virt_type="qemu")
        dom = define_domain(conn, spec)
        _create(dom, spec)
    dom.setAutostart(1 if autostart else 0)
    return dom


def destroy_domain(conn: libvirt.virConnect, name: str, keep: Collection[str] = ()) -> list[str]:
    """Stop and remove domain `name` and the volumes its metadata names, except those in
    `keep`; nothing else.

    Returns what was removed. A missing domain is no error (destroy runs twice safely).
    """
    dom = find_domain(conn, name)
    if dom is None:
        return []
    meta = domain_metadata(dom)
    if meta is None:
        raise HostError(
            f"domain {name} was not made by wg-appliance; leaving it alone",
            "remove it yourself if it should go",
        )
    removed = []
    try:
        if dom.isActive():
            dom.destroy()
        dom.setAutostart(0)
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
        removed.append(f"domain {name}")
        pool = find_pool(conn, meta[META_POOL]) if meta.get(META_POOL) else None
        if pool is not None:
            pool.refresh(0)  # files qemu made (the serial log) are volumes only after this
        for vol_name in owned_volumes(meta) if pool is not None else []:
            if vol_name in keep:
                continue
            vol = find_volume(pool, vol_name)
            if vol is not None:
                vol.delete(0)
                removed.append(f"volume {vol_name}")
    except libvirt.libvirtError as e:
        raise HostError(f"removing {name}: {e}") from e
    return removed
