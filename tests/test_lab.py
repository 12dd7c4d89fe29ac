"""Facts about the lab, checked the way an admin would check an IPFire host."""

from __future__ import annotations

import libvirt
import pytest

from tests.lab.lab import BRIDGE, HOST_GREEN, HOST_NS, LAN_NS, URI, Lab

pytestmark = pytest.mark.root


def test_green_is_a_bridge_in_the_host(lab: Lab) -> None:
    out = lab.exec(HOST_NS, ["cat", f"/sys/class/net/{BRIDGE}/bridge/stp_state"]).stdout
    assert out.strip() in ("0", "1")


def test_lan_host_reaches_the_host_over_green(lab: Lab) -> None:
    lab.exec(LAN_NS, ["ping", "-c", "1", "-W", "2", str(HOST_GREEN.ip)], timeout=10)


def test_host_forwards(lab: Lab) -> None:
    assert lab.exec(HOST_NS, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"


def test_libvirtd_runs_in_the_host_namespace_without_default_network(lab: Lab) -> None:
    pid = lab.daemon_pid("libvirtd")
    assert pid is not None
    host_ns = lab.exec(HOST_NS, ["readlink", "/proc/self/ns/net"]).stdout.strip()
    assert lab.exec(HOST_NS, ["readlink", f"/proc/{pid}/ns/net"]).stdout.strip() == host_ns
    conn = libvirt.open(URI)
    try:
        assert conn.listAllNetworks() == []
    finally:
        conn.close()
