"""Every libvirt XML the tool writes or reads: the domain (from a DomainSpec) and its
metadata, the storage pool and volumes, and the few fields read back from libvirt's XML.

Pure: strings in, strings out, no libvirt connection. Writer and reader of an element sit
together. The metadata in our own XML namespace is how `deploy`, `sync` and `destroy` know
which domain and which volumes the tool owns and what the domain was made from.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

XMLNS = "https://wg-appliance.invalid/xmlns/1"
PREFIX = "wga"
ROOT_TAG = "appliance"

# Metadata keys: deploy writes them, sync and destroy read them.
META_SITE = "site"
META_IMAGE_DIGEST = "image-digest"
META_SEED_DIGEST = "seed-digest"
META_POOL = "pool"
META_VOLUMES = "volumes"  # space-separated names of volumes this domain owns (disk, seed)
META_MEMORY_MIB = "memory-mib"
META_VCPUS = "vcpus"
META_DISK_GIB = "disk-gib"
META_BRIDGE = "bridge"
META_MAC = "mac"
META_ROLE = "role"  # ROLE_*: which of a site's two domains serves; absent means active

ROLE_ACTIVE = "active"  # holds the LAN address, autostarts
ROLE_STAGED = "staged"  # an upgrade's new appliance, link down until it takes over
ROLE_PREVIOUS = "previous"  # stopped after an upgrade, kept for `rollback`

VIRT_TYPES = ("kvm", "qemu")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^[a-z][a-z0-9-]*$")

ET.register_namespace(PREFIX, XMLNS)


@dataclass(frozen=True)
class DomainSpec:
    """What the domain XML needs; paths are as the libvirt host sees them."""

    name: str
    memory_mib: int
    vcpus: int
    virt_type: str
    disk_path: str
    seed_path: str | None
    bridge: str
    mac: str
    serial_log_path: str
    metadata: dict[str, str]
    uuid: str | None = None  # set when redefining: libvirt keeps a domain's UUID for its name
    link_up: bool = True  # an upgrade stages the new appliance with its link down

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"domain name {self.name!r}: letters, digits, '_.-', at most 64")
        if self.virt_type not in VIRT_TYPES:
            raise ValueError(f"virt_type {self.virt_type!r}: one of {', '.join(VIRT_TYPES)}")
        if not _MAC.match(self.mac):
            raise ValueError(f"mac {self.mac!r}: six lower-case hex pairs separated by ':'")
        if self.memory_mib < 64 or self.vcpus < 1:
            raise ValueError("memory_mib must be >= 64 and vcpus >= 1")
        for key in self.metadata:
            if not _KEY.match(key):
                raise ValueError(f"metadata key {key!r}: lower-case letters, digits and '-'")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def domain_xml(spec: DomainSpec) -> str:
    """The domain XML: pc machine, virtio disk, IDE cdrom seed, bridged virtio NIC, logged
    serial console, virtio-rng, and our metadata."""
    dom = ET.Element("domain", type=spec.virt_type)
    _sub(dom, "name", spec.name)
    if spec.uuid is not None:
        _sub(dom, "uuid", spec.uuid)
    site = spec.metadata.get(META_SITE, spec.name)
    _sub(dom, "description", f"WireGuard gateway for site {site}; managed by wg-appliance")
    meta = _sub(dom, "metadata")
    meta.append(_appliance(spec.metadata, f"{{{XMLNS}}}"))
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.virt_type == "kvm":
        # WireGuard's ChaCha20 wants the host's vector instructions.
        _sub(dom, "cpu", mode="host-passthrough")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "restart")

    dev = _sub(dom, "devices")
    disk = _sub(dev, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(disk, "source", file=spec.disk_path)
    _sub(disk, "target", dev="vda", bus="virtio")
    if spec.seed_path is not None:
        # The Debian cloud kernel finds the NoCloud seed on `pc` only as an IDE cdrom.
        dev.append(ET.fromstring(seed_cdrom_xml(spec.seed_path)))
    nic = _sub(dev, "interface", type="bridge")
    _sub(nic, "mac", address=spec.mac)
    _sub(nic, "source", bridge=spec.bridge)
    _sub(nic, "model", type="virtio")
    _sub(nic, "link", state="up" if spec.link_up else "down")
    # A pty keeps `virsh console` working; the log keeps the boot for later reading.
    serial = _sub(dev, "serial", type="pty")
    _sub(serial, "target", port="0")
    _sub(serial, "log", file=spec.serial_log_path, append="off")
    console = _sub(dev, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    # The guest agent: how an upgrade checks a new appliance whose link is still down.
    channel = _sub(dev, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=AGENT_CHANNEL)
    rng = _sub(dev, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(dev, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _appliance(values: dict[str, str], ns: str) -> ET.Element:
    """`<appliance>` with one child per key, its tags in namespace `ns` ("{uri}" or "")."""
    root = ET.Element(f"{ns}{ROOT_TAG}")
    for key, value in values.items():
        ET.SubElement(root, f"{ns}{key}").text = value
    return root


def metadata_xml(values: dict[str, str]) -> str:
    """The metadata element for libvirt's setMetadata, which adds our namespace itself."""
    return ET.tostring(_appliance(values, ""), encoding="unicode")


def parse_metadata(xml: str) -> dict[str, str] | None:
    """The tool's metadata from a domain's XML, or None when the domain is not the tool's."""
    root = ET.fromstring(xml)
    el = root.find(f"metadata/{{{XMLNS}}}{ROOT_TAG}")
    if el is None:
        return None
    prefix = f"{{{XMLNS}}}"
    return {
        child.tag.removeprefix(prefix): child.text or ""
        for child in el
        if child.tag.startswith(prefix)
    }


def owned_volumes(metadata: dict[str, str]) -> list[str]:
    return metadata.get(META_VOLUMES, "").split()


SEED_TARGET = "hdc"
AGENT_CHANNEL = "org.qemu.guest_agent.0"


def seed_cdrom_xml(source: str | None = None) -> str:
    """The seed's cdrom device: with `source` as attached, without it an empty tray."""
    cd = ET.Element("disk", type="file", device="cdrom")
    ET.SubElement(cd, "driver", name="qemu", type="raw")
    if source is not None:
        ET.SubElement(cd, "source", file=source)
    ET.SubElement(cd, "target", dev=SEED_TARGET, bus="ide")
    ET.SubElement(cd, "readonly")
    return ET.tostring(cd, encoding="unicode")


def seed_source(xml: str) -> tuple[bool, str | None]:
    """(has the seed's cdrom drive, the file in it) in a domain's XML."""
    for disk in ET.fromstring(xml).iterfind("devices/disk[@device='cdrom']"):
        target = disk.find("target")
        if target is not None and target.get("dev") == SEED_TARGET:
            source = disk.find("source")
            return True, source.get("file") if source is not None else None
    return False, None


def interface_xml(xml: str, link_up: bool) -> str | None:
    """The domain's LAN NIC from its XML with the link state set, for updateDeviceFlags;
    None when the domain has no such NIC."""
    nic = ET.fromstring(xml).find("devices/interface")
    if nic is None:
        return None
    link = nic.find("link")
    if link is None:
        link = ET.SubElement(nic, "link")
    link.set("state", "up" if link_up else "down")
    return ET.tostring(nic, encoding="unicode")


def link_is_up(xml: str) -> bool:
    """The LAN NIC's link state in a domain's XML (up when not said)."""
    link = ET.fromstring(xml).find("devices/interface/link")
    return link is None or link.get("state", "up") == "up"


def has_agent_channel(xml: str) -> bool:
    """Whether a domain's XML has the guest agent's channel (domains made before it do not)."""
    return any(
        t.get("name") == AGENT_CHANNEL
        for t in ET.fromstring(xml).iterfind("devices/channel/target")
    )


def domain_type(xml: str) -> str:
    """The virtualisation type a domain's XML runs under (`kvm`, `qemu`)."""
    return ET.fromstring(xml).get("type", "")


# --- storage ------------------------------------------------------------------


PRIVATE = "0600"  # every volume the tool makes but the base image: only its owner reads it
POOL_MODE = "0711"  # a new pool's folder: qemu may open files in it, nobody may list it


def pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = path
    ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = POOL_MODE
    return ET.tostring(pool, encoding="unicode")


def pool_target_path(xml: str) -> str:
    return ET.fromstring(xml).findtext("target/path", "")


def pool_mode(xml: str) -> int | None:
    """The pool folder's mode as libvirt reports it, or None when it does not."""
    mode = ET.fromstring(xml).findtext("target/permissions/mode")
    return int(mode, 8) if mode else None


def volume_xml(
    name: str,
    capacity: int,
    fmt: str,
    backing_path: str | None = None,
    backing_fmt: str = "",
    mode: str | None = PRIVATE,
) -> str:
    """A volume; `mode` None leaves libvirt's default (the base image, which holds no
    secret)."""
    vol = ET.Element("volume", type="file")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type=fmt)
    if mode is not None:
        ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = mode
    if backing_path is not None:
        backing = ET.SubElement(vol, "backingStore")
        ET.SubElement(backing, "path").text = backing_path
        ET.SubElement(backing, "format", type=backing_fmt)
    return ET.tostring(vol, encoding="unicode")


def volume_file_bytes(xml: str) -> int:
    """Bytes of the volume's file (`physical`; capacity where libvirt reports no physical)."""
    root = ET.fromstring(xml)
    physical = root.findtext("physical")
    return int(physical if physical is not None else root.findtext("capacity", "0"))


# --- host interfaces ----------------------------------------------------------


def interface_type(xml: str) -> str | None:
    """An interface's kind (`bridge`, `ethernet`, ...) from its XML."""
    return ET.fromstring(xml).get("type")
