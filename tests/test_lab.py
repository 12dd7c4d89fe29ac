"""Facts about the lab, checked the way an admin would check an IPFire host."""

from __future__ import annotations

import json
import shutil
import sys

import libvirt
import pytest

from builder.local.run import run
from tests.conftest import EXAMPLE, ROOT
from tests.lab.host_sshd import host_flags, start_lab_sshd
from tests.lab.lab import (
    BRIDGE,
    HOST_GREEN,
    HOST_GREEN6,
    HOST_NS,
    LAN_NS,
    LIBVIRT_SOCK,
    URI,
    Lab,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]  # it brings the machine-wide lab up and down


def test_green_is_a_bridge_in_the_host(lab: Lab) -> None:
    out = lab.exec(HOST_NS, ["cat", f"/sys/class/net/{BRIDGE}/bridge/stp_state"]).stdout
    assert out.strip() in ("0", "1")


def test_lan_host_reaches_the_host_over_green(lab: Lab) -> None:
    lab.exec(LAN_NS, ["ping", "-c", "1", "-W", "2", str(HOST_GREEN.ip)], timeout=10)


def test_lan_host_reaches_the_host_over_green_ipv6(lab: Lab) -> None:
    """GREEN is dual-stack: the LAN host's IPv6 default route goes to the host."""
    lab.exec(LAN_NS, ["ping", "-c", "1", "-W", "2", str(HOST_GREEN6.ip)], timeout=10)
    route = lab.exec(LAN_NS, ["ip", "-6", "route", "show", "default"]).stdout
    assert f"via {HOST_GREEN6.ip}" in route, route


def test_host_forwards(lab: Lab) -> None:
    assert lab.exec(HOST_NS, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert lab.exec(HOST_NS, ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout == "1\n"


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


def test_the_workstation_reaches_libvirt_only_over_pinned_ssh(lab: Lab, tmp_path) -> None:
    """What `make appliance` runs: the host's sshd, its flags, a command on the workstation
    that cannot see the host's libvirt socket but reaches libvirtd through SSH."""
    sshd = start_lab_sshd(lab)
    try:
        lab_cli = [sys.executable, "-m", "tests.lab"]
        flags = run([*lab_cli, "host-flags"], cwd=ROOT).stdout.split()
        assert flags == host_flags(sshd) and sshd.fingerprint() in flags
        seen = run([*lab_cli, "workstation", "test", "-e", str(LIBVIRT_SOCK)], check=False)
        assert seen.returncode == 1, "the workstation must not see the host's socket"
        site = tmp_path / "site.toml"
        shutil.copy(EXAMPLE, site)
        argv = [*lab_cli, "workstation", sys.executable, "-m", "builder", "destroy"]
        r = run([*argv, "--site", str(site), *flags, "--json"], cwd=ROOT)
        assert json.loads(r.stdout) == {"removed": []}
    finally:
        sshd.stop()
        lab.pid_file("sshd").unlink(missing_ok=True)
