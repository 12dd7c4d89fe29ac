"""The libvirt pieces against the lab's real libvirtd: pool, stream upload, disk, a boot.

The boot uses the smallest bootable thing: a 512-byte boot sector that writes a line to the
first serial port and halts. It proves the disk chain (uploaded qcow2, overlay), the bridged
NIC on green0, the serial log and autostart, in a second instead of a minute.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from builder.local.run import run
from builder.progress import Progress
from builder.remote import libvirtd as lh
from builder.render.libvirt_xml import DomainSpec, seed_source, volume_xml
from tests.lab.lab import BRIDGE, HOST_NS, POOL_NAME, POOL_PATH, URI, Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

BOOT_MESSAGE = b"wga-boot-sector-ok\r\n"


def boot_sector(message: bytes) -> bytes:
    """Real-mode code for 0x7c00: print `message` on COM1, then halt forever."""
    code_len = 23  # the message follows the code
    code = bytes.fromhex("31c0 8ed8 fc")  # xor ax,ax; mov ds,ax; cld
    code += b"\xbe" + (0x7C00 + code_len).to_bytes(2, "little")  # mov si, message
    code += bytes.fromhex("baf803")  # mov dx, 0x3f8
    code += bytes.fromhex("ac 84c0 7403 ee ebf8")  # next: lodsb; test al,al; jz end; out; jmp next
    code += bytes.fromhex("fa f4 ebfd")  # end: cli; hlt; jmp back to hlt
    sector = code + message + b"\0"
    assert len(code) == code_len and len(sector) <= 510
    return sector.ljust(510, b"\0") + b"\x55\xaa"


@pytest.fixture
def conn(lab: Lab) -> Iterator[libvirt.virConnect]:
    c = lh.connect(URI)
    yield c
    c.close()


@pytest.fixture
def boot_image(tmp_path: Path) -> Path:
    raw = tmp_path / "boot.raw"
    raw.write_bytes(boot_sector(BOOT_MESSAGE))
    image = tmp_path / "boot.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image])
    return image


def test_green0_passes_the_bridge_check_and_lo_does_not(conn: libvirt.virConnect) -> None:
    lh.check_bridge(conn, BRIDGE)
    with pytest.raises(lh.HostError, match="not a bridge"):
        lh.check_bridge(conn, "lo")


def test_pool_and_stream_upload_through_the_lab_libvirtd(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    pool = lh.ensure_pool(conn, POOL_NAME, str(POOL_PATH))
    assert pool.isActive() and pool.autostart()
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(9 * 1024 * 1024 + 123))
    out = io.StringIO()
    t0 = time.monotonic()
    vol = lh.upload_volume(pool, "data-1.bin", src, Progress(stream=out))
    elapsed = time.monotonic() - t0
    on_host = Path(vol.path())
    assert on_host.parent == POOL_PATH
    assert (
        hashlib.sha256(on_host.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    )
    assert "upload data-1.bin: 9.4/9.4 MB (100%), " in out.getvalue()
    assert re.search(r"\d+\.\d MB/s, took \d+\.\d s", out.getvalue()), out.getvalue()
    assert lh.find_volume(pool, "data-1.bin" + lh.PART) is None
    print(f"uploaded 9 MiB in {elapsed:.2f}s")

    mtime = on_host.stat().st_mtime_ns
    out = io.StringIO()
    assert lh.upload_volume(pool, "data-1.bin", src, Progress(stream=out)).key() == vol.key()
    assert "already on the host" in out.getvalue()
    assert on_host.stat().st_mtime_ns == mtime
    vol.delete(0)


def test_an_upload_cut_short_is_done_again_not_taken_as_complete(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """What a killed upload leaves (the volume at full size but half garbage, its `.part`
    marker beside it) is uploaded again, not kept."""
    pool = lh.ensure_pool(conn, POOL_NAME, str(POOL_PATH))
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    pool.createXML(volume_xml("data-2.bin", src.stat().st_size, "raw"), 0)
    pool.createXML(volume_xml("data-2.bin" + lh.PART, 0, "raw"), 0)
    vol = lh.upload_volume(pool, "data-2.bin", src)
    try:
        assert Path(vol.path()).read_bytes() == src.read_bytes()
        assert lh.find_volume(pool, "data-2.bin" + lh.PART) is None
    finally:
        vol.delete(0)


def test_tiny_domain_boots_on_green0_and_is_destroyed(
    lab: Lab, conn: libvirt.virConnect, boot_image: Path, tmp_path: Path
) -> None:
    """Also: its volumes are 0600, and the seed comes out of the running domain and its
    definition."""
    pool = lh.ensure_pool(conn, POOL_NAME, str(POOL_PATH))
    lh.check_memory(conn, 64)
    base = lh.upload_volume(pool, "boot-1.qcow2", boot_image)
    disk = lh.create_disk(pool, "wga-tiny-disk.qcow2", base, 1)
    disk_file = Path(disk.path())
    (tmp_path / "seed.iso").write_bytes(b"\0" * 65536)
    seed = lh.upload_volume(pool, "wga-tiny-seed.iso", tmp_path / "seed.iso")
    for private in (disk_file, Path(seed.path())):
        assert private.stat().st_mode & 0o777 == 0o600, private
    info = run(["qemu-img", "info", "-U", disk_file]).stdout
    assert f"backing file: {base.path()}" in info
    virt_type, _ = lh.choose_virt_type(conn)
    name = "wga-tiny"
    spec = DomainSpec(
        name=name,
        memory_mib=64,
        vcpus=1,
        virt_type=virt_type,
        disk_path=str(disk_file),
        seed_path=seed.path(),
        bridge=BRIDGE,
        mac="52:54:00:77:00:02",
        serial_log_path=f"/var/log/libvirt/qemu/{name}-serial.log",
        metadata={
            "site": "tiny",
            "pool": POOL_NAME,
            "volumes": "wga-tiny-disk.qcow2 wga-tiny-seed.iso",
        },
    )
    t0 = time.monotonic()
    out = io.StringIO()
    dom = lh.start_domain(conn, spec, Progress(stream=out), kvm_watch_s=3.0)
    try:
        assert dom.isActive() and dom.autostart()
        ran_as = ET.fromstring(dom.XMLDesc(0)).get("type")
        fell_back = "does not run under KVM" in out.getvalue()
        assert ran_as == ("qemu" if fell_back else virt_type), out.getvalue()
        log = lab.host_path(spec.serial_log_path)
        deadline = time.monotonic() + 60
        while BOOT_MESSAGE.strip() not in (log.read_bytes() if log.exists() else b""):
            assert time.monotonic() < deadline, f"no boot message in {log}"
            time.sleep(0.2)
        print(f"boot sector ran {time.monotonic() - t0:.1f}s after start ({ran_as})")
        ports = lab.exec(HOST_NS, ["ip", "-br", "link", "show", "master", BRIDGE]).stdout
        assert len(ports.splitlines()) == 2, ports  # the LAN veth and the guest's tap
        assert seed_source(dom.XMLDesc(0)) == (True, seed.path())
        assert lh.retire_seed(dom) is True
        assert seed_source(dom.XMLDesc(0)) == (True, None), "the tray is empty"
        assert seed_source(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == (False, None)
        assert lh.retire_seed(dom) is False, "a second run has nothing to do"
        assert dom.isActive()
    finally:
        removed = lh.destroy_domain(conn, name)
    assert removed == [f"domain {name}", "volume wga-tiny-disk.qcow2", "volume wga-tiny-seed.iso"]
    assert lh.find_volume(pool, "boot-1.qcow2") is not None
    assert not disk_file.exists()
