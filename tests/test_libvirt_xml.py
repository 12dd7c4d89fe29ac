"""The appliance's domain XML: valid for libvirt, shaped for IPFire, metadata round-trips."""

from __future__ import annotations

import shutil
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from builder.local.run import run
from builder.render.libvirt_xml import (
    XMLNS,
    domain_xml,
    owned_volumes,
    parse_metadata,
    pool_mode,
    pool_xml,
    seed_cdrom_xml,
    seed_source,
    volume_xml,
)
from tests.plugins.samples import META, spec


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="needs libvirt-clients")
@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_xml_passes_virt_xml_validate(tmp_path: Path, virt_type: str) -> None:
    path = tmp_path / "domain.xml"
    path.write_text(domain_xml(spec(virt_type=virt_type)))
    run(["virt-xml-validate", path, "domain"])


def test_xml_has_what_ipfire_and_the_debian_kernel_need() -> None:
    dom = ET.fromstring(domain_xml(spec()))
    assert dom.get("type") == "kvm"
    assert dom.find("os/type").get("machine") == "pc"
    disk, cdrom = dom.findall("devices/disk")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").get("type") == "qcow2"
    assert cdrom.get("device") == "cdrom"
    assert cdrom.find("target").get("bus") == "ide"
    assert cdrom.find("readonly") is not None
    nic = dom.find("devices/interface")
    assert nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == "green0"
    assert nic.find("mac").get("address") == "52:54:00:12:34:56"
    assert nic.find("model").get("type") == "virtio"
    assert dom.find("devices/serial/log").get("file").endswith("wga-home-serial.log")
    assert dom.find("devices/rng").get("model") == "virtio"


def test_tcg_guest_gets_no_host_cpu_and_no_seed_means_no_cdrom() -> None:
    dom = ET.fromstring(domain_xml(spec(virt_type="qemu", seed_path=None)))
    assert dom.get("type") == "qemu"
    assert dom.find("cpu") is None
    assert [d.get("device") for d in dom.findall("devices/disk")] == ["disk"]


def test_metadata_round_trips() -> None:
    assert parse_metadata(domain_xml(spec())) == META
    assert owned_volumes(META) == ["home-disk.qcow2", "home-seed.iso"]


def test_foreign_domain_has_no_metadata() -> None:
    assert parse_metadata("<domain type='kvm'><name>x</name></domain>") is None
    other = "<domain><name>x</name><metadata><a:x xmlns:a='urn:other'/></metadata></domain>"
    assert parse_metadata(other) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"virt_type": "xen"},
        {"mac": "52:54:00:12:34"},
        {"name": "has space"},
        {"memory_mib": 16},
        {"metadata": {"Bad Key": "x"}},
    ],
)
def test_bad_spec_is_refused(changes: dict) -> None:
    with pytest.raises(ValueError):
        spec(**changes)


def test_libvirt_keeps_our_metadata_through_define() -> None:
    """libvirt parses and rewrites the XML; our namespace must survive that."""
    conn = libvirt.open("test:///default")
    name = f"wga-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(domain_xml(spec(name=name, virt_type="qemu")))
    try:
        xml = dom.XMLDesc(0)
        assert parse_metadata(xml) == META
        assert XMLNS in xml
    finally:
        dom.undefine()
        conn.close()


def test_volumes_are_private_unless_asked_and_new_pools_unlistable():
    private = ET.fromstring(volume_xml("seed.iso", 1, "raw"))
    assert private.findtext("target/permissions/mode") == "0600"
    assert (
        ET.fromstring(volume_xml("base.qcow2", 1, "raw", mode=None)).find("target/permissions")
        is None
    )
    assert pool_mode(pool_xml("p", "/srv/p")) == 0o711


def test_the_seed_drive_is_found_with_or_without_its_file():
    assert seed_source(domain_xml(spec(seed_path="/p/s.iso"))) == (True, "/p/s.iso")
    assert seed_source(domain_xml(spec(seed_path=None))) == (False, None)
    empty = ET.fromstring(seed_cdrom_xml())
    assert empty.find("source") is None and empty.find("target").get("dev") == "hdc"
