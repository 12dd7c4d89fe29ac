"""Connect, preflight, pool, volume and domain logic against libvirt's test driver.

test:///default keeps one state per process, so every test uses fresh names and cleans up.
Stream uploads need a real libvirtd: see tests/test_libvirtd_lab.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from builder.errors import HostError, InputError
from builder.model.login import host_access, login_of_uri
from builder.model.site import Host
from builder.remote import libvirtd as lh
from builder.render.libvirt_xml import parse_metadata, volume_xml
from tests.plugins.samples import spec


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = lh.connect("test:///default")
    yield c
    c.close()


@pytest.fixture
def pool(conn: libvirt.virConnect, tmp_path: Path) -> Iterator[libvirt.virStoragePool]:
    p = lh.ensure_pool(conn, unique("pool"), str(tmp_path / "images"))
    yield p
    for vol in p.listAllVolumes(0):
        vol.delete(0)
    p.destroy()
    p.undefine()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- connect and preflight ----------------------------------------------------


def test_unknown_uri_says_which_uris_work() -> None:
    with pytest.raises(HostError) as e:
        lh.connect("foo:///system")
    assert "qemu+ssh://root@HOST:222/system" in e.value.fix


def test_missing_daemon_says_to_start_libvirtd(tmp_path: Path) -> None:
    with pytest.raises(HostError) as e:
        lh.connect(f"qemu:///system?socket={tmp_path}/no-such-sock")
    assert "libvirtd is not running" in e.value.what
    assert "libvirtd -d" in e.value.fix


def test_unreachable_ssh_host_is_exit_1_with_the_fix(tmp_path: Path) -> None:
    """Nothing is sent to libvirt when the SSH login itself cannot be made."""
    uri = "qemu+ssh://root@127.0.0.1:1/system"
    access = host_access(
        Host(uri=uri), "site.toml", login_of_uri(uri), host_key="SHA256:" + "A" * 43
    )
    with pytest.raises(HostError) as e:
        lh.connect(uri, access)
    assert e.value.exit_code == 1
    assert "root@127.0.0.1:1: cannot connect: connection refused" in e.value.what
    assert "port 222" in e.value.fix


def test_remote_uri_without_a_login_is_refused() -> None:
    with pytest.raises(HostError, match="no SSH login"):
        lh.connect("qemu+ssh://root@127.0.0.1:1/system")


def test_virt_type_follows_libvirt_and_the_override(
    conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(lh.ENV_VIRT_TYPE, raising=False)
    assert lh.kvm_offered(conn) is False
    assert lh.choose_virt_type(conn)[0] == "qemu"
    monkeypatch.setenv(lh.ENV_VIRT_TYPE, "kvm")
    assert lh.choose_virt_type(conn) == ("kvm", f"{lh.ENV_VIRT_TYPE}=kvm")
    monkeypatch.setenv(lh.ENV_VIRT_TYPE, "xen")
    with pytest.raises(InputError):
        lh.choose_virt_type(conn)


def test_a_learned_virt_type_skips_the_probe_unless_overridden(
    conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(lh.ENV_VIRT_TYPE, raising=False)
    monkeypatch.setattr(lh, "kvm_offered", lambda _conn: True)
    assert lh.choose_virt_type(conn) == ("kvm", "libvirt offers KVM")
    assert lh.choose_virt_type(conn, "kvm") == ("kvm", "KVM worked here before")
    virt_type, why = lh.choose_virt_type(conn, "qemu")
    assert virt_type == "qemu" and f"{lh.ENV_VIRT_TYPE}=kvm" in why
    monkeypatch.setenv(lh.ENV_VIRT_TYPE, "kvm")
    assert lh.choose_virt_type(conn, "qemu")[0] == "kvm"
    assert lh.host_identity(conn) == f"test:///default {conn.getHostname()}"


def test_a_kvm_known_to_work_is_not_watched(
    conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched: list[float] = []
    monkeypatch.setattr(lh, "stopped_by_qemu", lambda _dom, s: watched.append(s) or False)
    s = spec(name=unique("wga"), virt_type="kvm")
    try:
        lh.start_domain(conn, s)
        assert watched == [lh.KVM_WATCH_S]
        lh.start_domain(conn, s, kvm_watch_s=0)
        assert watched == [lh.KVM_WATCH_S], "a KVM known to work must start without a watch"
        assert lh.domain_virt_type(lh.find_domain(conn, s.name)) == "kvm"
    finally:
        lh.destroy_domain(conn, s.name)


def test_missing_bridge_and_plain_interface_ask_for_bridge_mode(
    conn: libvirt.virConnect,
) -> None:
    with pytest.raises(HostError) as e:
        lh.check_bridge(conn, "green0")
    assert "no interface green0" in e.value.what
    assert "bridge mode" in e.value.fix
    with pytest.raises(HostError) as e:
        lh.check_bridge(conn, "eth1")  # the test driver's one interface: ethernet
    assert "not a bridge" in e.value.what


def test_memory_check(conn: libvirt.virConnect) -> None:
    assert lh.available_memory_mib(conn) > 0
    lh.check_memory(conn, 1)
    with pytest.raises(HostError) as e:
        lh.check_memory(conn, 10**9)
    assert "memory_mib" in e.value.fix


# --- storage ------------------------------------------------------------------


def test_ensure_pool_defines_starts_and_autostarts_once(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    name = unique("pool")
    first = lh.ensure_pool(conn, name, str(tmp_path))
    try:
        assert first.isActive() and first.autostart()
        first.destroy()
        again = lh.ensure_pool(conn, name, str(tmp_path))
        assert again.UUIDString() == first.UUIDString()
        assert again.isActive()
        # An admin's pool on the same directory is used, not duplicated.
        assert lh.ensure_pool(conn, unique("other"), str(tmp_path)).name() == name
    finally:
        first.destroy()
        first.undefine()


def test_failed_upload_leaves_no_volume(pool: libvirt.virStoragePool, tmp_path: Path) -> None:
    """The test driver cannot stream; a failed upload must not leave a volume that the next
    run would take for a finished one."""
    src = tmp_path / "img"
    src.write_bytes(b"x" * 4096)
    with pytest.raises(HostError, match="uploading"):
        lh.upload_volume(pool, "img-abc.qcow2", src)
    assert lh.find_volume(pool, "img-abc.qcow2") is None
    assert lh.find_volume(pool, "img-abc.qcow2" + lh.PART) is None


def test_existing_volume_of_same_size_is_kept(pool: libvirt.virStoragePool, tmp_path: Path) -> None:
    src = tmp_path / "img"
    src.write_bytes(b"x" * 4096)
    kept = pool.createXML(volume_xml("img-abc.qcow2", 4096, "raw"), 0)
    assert lh.upload_volume(pool, "img-abc.qcow2", src).key() == kept.key()


def test_disk_is_an_overlay_or_a_copy_of_disk_gib(pool: libvirt.virStoragePool) -> None:
    base = pool.createXML(volume_xml("base.qcow2", 2 * lh.GIB, "qcow2"), 0)
    overlay = lh.create_disk(pool, "home-disk.qcow2", base, 4)
    assert overlay.info()[1] == 4 * lh.GIB
    assert f"<path>{base.path()}</path>" in overlay.XMLDesc(0)
    copy = lh.create_disk(pool, "home-copy.qcow2", base, 4, backing=False)
    assert copy.info()[1] == 4 * lh.GIB
    assert "backingStore" not in copy.XMLDesc(0)
    assert lh.create_disk(pool, "home-disk.qcow2", base, 4).key() == overlay.key()
    with pytest.raises(HostError, match="smaller than the image"):
        lh.create_disk(pool, "tiny.qcow2", base, 1)


# --- domain -------------------------------------------------------------------


def test_start_defines_starts_and_autostarts(conn: libvirt.virConnect) -> None:
    s = spec(name=unique("wga"), virt_type="qemu")
    dom = lh.start_domain(conn, s)
    try:
        assert dom.isActive() and dom.autostart()
        assert parse_metadata(dom.XMLDesc(0))["site"] == "home"
        assert lh.stopped_by_qemu(dom, 1.0) is False
        again = lh.start_domain(conn, replace(s, memory_mib=1024))
        assert again.UUIDString() == dom.UUIDString()
        assert again.maxMemory() == 1024 * 1024
    finally:
        lh.destroy_domain(conn, s.name)


def test_foreign_domain_is_never_taken_over_or_destroyed(conn: libvirt.virConnect) -> None:
    name = unique("admins-vm")
    foreign = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    try:
        with pytest.raises(HostError, match="did not make"):
            lh.define_domain(conn, spec(name=name))
        with pytest.raises(HostError, match="not made by wg-appliance"):
            lh.destroy_domain(conn, name)
        assert lh.find_domain(conn, name) is not None
    finally:
        foreign.undefine()


def test_destroy_removes_only_what_metadata_owns(
    conn: libvirt.virConnect, pool: libvirt.virStoragePool
) -> None:
    for vol in ("home-disk.qcow2", "home-seed.iso", "base-abc.qcow2"):
        pool.createXML(volume_xml(vol, 1024, "raw"), 0)
    s = spec(name=unique("wga"), virt_type="qemu")
    s = replace(s, metadata={**s.metadata, "pool": pool.name()})
    lh.start_domain(conn, s)
    removed = lh.destroy_domain(conn, s.name)
    assert removed == [f"domain {s.name}", "volume home-disk.qcow2", "volume home-seed.iso"]
    assert lh.find_domain(conn, s.name) is None
    assert [v.name() for v in pool.listAllVolumes(0)] == ["base-abc.qcow2"]
    assert lh.destroy_domain(conn, s.name) == []
