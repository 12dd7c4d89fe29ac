"""End to end in the lab, all real: the image boots under qemu on the lab's green0, cloud-init
configures it, real WireGuard clients (wireguard-go) dial it through the host's RED side.

The tool runs as on an admin's workstation: on the LAN host, where the host's libvirt socket
cannot be seen, reaching libvirtd only through the host's sshd on port 222 with its key pinned.

Order matters and is kept by pytest's file order: deploy (interrupted, then converging),
re-deploy, verify, road warrior and site-to-site in masquerade mode, the failure cases, a
road warrior dialling over IPv6 (also with a full tunnel), routed mode (with IPv6 between the
LANs), destroy. The lab is dual-stack, and so is the example site. One appliance boot per
mode keeps the file at a few minutes under TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder.model.keys import ssh_genkey
from builder.render.libvirt_xml import seed_source
from tests.conftest import EXAMPLE
from tests.lab import lab as L
from tests.lab.boot import image_with_files
from tests.lab.clients import PeerAddressServer, Pinger, TcpStream, WgClient, ping, tcp_source_seen
from tests.lab.host_sshd import URI as HOST_URI
from tests.lab.host_sshd import HostSshd, hidden_libvirt, host_flags, workstation
from tests.lab.internet import (
    APPLIANCE6,
    BLAN_HOST,
    BLAN_HOST6,
    BLAN_NET6,
    BLAN_NS,
    BRANCH_NS,
    HOST_RED6,
    INET_RED6,
    PLAIN_RED_UP,
    RW_NS,
    add_internet_host,
    plain_red,
    remove_far_side,
)

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.vm]

APPLIANCE = "192.168.77.50"
LAN_HOST6 = str(L.LAN_GREEN6.ip)


def cli(lab: L.Lab, *args: str, ns: str = L.LAN_NS, check: bool = False, timeout: float = 900):
    """The real command line, run on the LAN host as an admin's workstation would."""
    argv = [sys.executable, "-m", "builder", *args]
    return lab.exec(ns, workstation(argv), check=check, timeout=timeout)


def _if(text: str):
    from ipaddress import ip_interface

    return ip_interface(text)


@pytest.fixture(scope="module")
def host_sshd(lab, tmp_path_factory) -> Iterator[HostSshd]:
    """The host's sshd on GREEN port 222: the workstation's only way to libvirtd."""
    d = tmp_path_factory.mktemp("host-sshd")
    sshd = HostSshd(d / "sshd", d / "admin").make()
    sshd.start()
    yield sshd
    sshd.stop()


def remote_host(text: str, sshd: HostSshd) -> str:
    """A site's [host] as an IPFire admin writes it: the URI, the pin, the identity."""
    return text.replace(
        'uri = "qemu:///system"',
        f'uri = "{HOST_URI}"\nhost_key = "{sshd.fingerprint()}"\nssh_key = "{sshd.identity}"',
        1,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory, host_sshd) -> Path:
    """The example site as the lab needs it: clients dial the host's RED address, the tool
    reaches the host over SSH."""
    d = tmp_path_factory.mktemp("e2e")
    text = EXAMPLE.read_text().replace('"vpn.example.org:51820"', '"203.0.113.1:51820"')
    (d / "site.toml").write_text(remote_host(text, host_sshd))
    return d / "site.toml"


@pytest.fixture(scope="module")
def net(lab):
    plain_red(lab, APPLIANCE)
    yield lab
    lab.remove_namespace(RW2_NS)
    remove_far_side(lab)
    lab.exec(L.HOST_NS, ["iptables", "-t", "nat", "-F", "PREROUTING"], check=False)
    lab.exec(L.HOST_NS, ["ip6tables", "-t", "nat", "-F", "PREROUTING"], check=False)
    lab.remove_namespace(L.INET_NS)
    PLAIN_RED_UP.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def clients(net):
    made: list[WgClient] = []
    servers: list[PeerAddressServer] = []
    yield made, servers
    for c in made:
        c.down()
    for s in servers:
        s.stop()


def _deploy_args(site: Path, image) -> list[str]:
    return ["deploy", "--site", str(site), "--image", str(image.path), "--timeout", "600"]


def test_the_workstation_cannot_see_the_hosts_libvirt_socket(net, site):
    """The proof that what follows goes over SSH: the local socket is not there."""
    r = cli(net, "destroy", "--site", str(site), "--host-uri", "qemu:///system")
    assert r.returncode == 1 and "libvirtd is not running" in r.stderr, r.stderr


def _pool_files() -> list[str]:
    pool_dir = L.Lab.host_path("/var/lib/libvirt/images/wg-appliance")
    return sorted(p.name for p in pool_dir.iterdir()) if pool_dir.is_dir() else []


def test_wrong_or_unknown_host_key_stops_before_anything(net, appliance_image, site, tmp_path):
    """Exit 3, one line with the key the host offered and where the pin came from; no
    domain, pool or volume is made."""
    wrong = "SHA256:" + "A" * 43
    r = cli(net, *_deploy_args(site, appliance_image), "--host-key", wrong)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "host key mismatch" in r.stderr and wrong in r.stderr and "--host-key" in r.stderr
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = cli(net, *_deploy_args(site, appliance_image), "--known-hosts", str(empty))
    assert r.returncode == 3 and "unknown host key" in r.stderr, r.stderr
    assert empty.read_text() == ""
    listed = subprocess.run(
        ["virsh", "-c", L.URI, "list", "--all", "--name"], capture_output=True, text=True
    ).stdout.split()
    assert "wg-gw" not in listed and _pool_files() == []


def test_host_without_libvirtd_fails_with_the_fix(net, appliance_image, site, tmp_path):
    """An sshd whose host has no libvirtd socket: exit 1, what to start, nothing made."""
    other = HostSshd(tmp_path / "sshd", tmp_path / "admin", port=2222).make()
    other.start(wrap=hidden_libvirt)
    try:
        r = cli(
            net,
            *_deploy_args(site, appliance_image),
            "--host-uri",
            HOST_URI.replace(":222/", ":2222/"),
            "--host-key",
            other.fingerprint(),
            "--identity",
            str(other.identity),
        )
    finally:
        other.stop()
    assert r.returncode == 1, r.stderr
    assert "libvirtd is not running on the host" in r.stderr and "libvirtd start" in r.stderr
    assert _pool_files() == []


def test_interrupted_deploy_converges(net, appliance_image, site):
    """Killed right after the volume upload, the next deploy finishes the job."""
    argv = [
        "ip",
        "netns",
        "exec",
        L.LAN_NS,
        *workstation([sys.executable, "-m", "builder", *_deploy_args(site, appliance_image)]),
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "storage done" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(60)
    assert any("storage done" in s for s in seen), "".join(seen)
    assert proc.returncode == -signal.SIGKILL
    r = cli(net, *_deploy_args(site, appliance_image))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wg-gw: created (qemu) at 192.168.77.50" in r.stdout


def test_ssh_from_lan_host_with_pinned_key(net, site):
    """OpenSSH itself, with the state dir's known_hosts and StrictHostKeyChecking=yes."""
    r = _ssh(net, site, "hostname; sudo -n wg show wg0 listen-port")
    assert r.stdout.split() == ["wg-gw", "51820"]


def test_the_appliance_resolves_through_the_sites_dns_and_grew_its_root(net, site):
    """No resolver daemon: the seed wrote lan.dns into resolv.conf, glibc asks it directly;
    the root filesystem grew to the volume by the image's own unit, not cloud-init's."""
    r = _ssh(
        net,
        site,
        "grep '^nameserver' /etc/resolv.conf; systemctl is-active systemd-resolved;"
        " systemctl is-active wg-appliance-growroot; df --output=size -B1M / | tail -1",
        check=False,
    )
    lines = r.stdout.split("\n")
    assert lines[0] == "nameserver 192.168.77.1", r.stdout
    assert lines[1:3] == ["inactive", "active"], r.stdout
    assert int(lines[3]) > 1500, f"root not grown: {r.stdout}"


def test_the_first_boot_started_every_unit_without_reloading_systemd(net, site):
    """The seed's units run from the first boot on, enabled for the next, and systemd was
    never asked to reload (seconds under TCG): its first start read them from disk."""
    units = "nftables wg-quick@wg0 wg-appliance-peers.timer wg-appliance-agent.socket"
    units += " wg-appliance-metrics.socket"
    r = _ssh(
        net,
        site,
        f"systemctl is-active {units}; systemctl is-enabled {units}; "
        "sudo -n journalctl --list-boots --no-pager | grep -cv '^ *IDX'; "
        "sudo -n journalctl -b -o cat _PID=1 --no-pager | grep -c '^Reloading' || true",
        check=False,
    )
    lines = r.stdout.split("\n")
    assert lines[:10] == ["active"] * 5 + ["enabled"] * 5, r.stdout + r.stderr
    assert lines[10] == "1", f"not the first boot: {r.stdout}"
    assert lines[11] == "0", f"systemd reloaded during the first boot: {r.stdout}"
    # The exporter is not part of the boot: its socket listened, and a scrape (this one, or one
    # before it) started it once cloud-init was done.
    scrape = _scrape(net)
    assert scrape.returncode == 0, scrape.stdout + scrape.stderr
    done, exporter, ruleset, wg0 = _monotonic(
        net,
        site,
        ("ActiveEnterTimestampMonotonic", "cloud-final"),
        ("ExecMainStartTimestampMonotonic", "wg-appliance-metrics.service"),
        ("ActiveEnterTimestampMonotonic", "nftables"),
        ("InactiveExitTimestampMonotonic", "wg-quick@wg0"),
    )
    assert 0 < done < exporter, (done, exporter)
    # The ruleset was in before wg0 began to start (no separate nft run in the seed).
    assert 0 < ruleset <= wg0, (ruleset, wg0)


def _monotonic(net, site: Path, *properties: tuple[str, str]) -> list[int]:
    """systemd's monotonic timestamps (microseconds of uptime, 0: never) of (property, unit)
    pairs, from one SSH command."""
    command = "; ".join(f"systemctl show -P {p} {unit}" for p, unit in properties)
    return [int(x) for x in _ssh(net, site, command).stdout.split()]


def test_an_emulated_appliance_maps_its_programs_at_fixed_addresses(net, site):
    """Under TCG (this lab has no KVM) the initramfs turned address-space randomization off,
    so two processes find libc at one address; the domain really is emulated."""
    xml = subprocess.run(
        ["virsh", "-c", L.URI, "dumpxml", "wg-gw"], capture_output=True, text=True, check=True
    ).stdout
    assert "type='qemu'" in xml.split("\n", 1)[0], xml.split("\n", 1)[0]
    r = _ssh(
        net,
        site,
        "cat /proc/sys/kernel/randomize_va_space; grep -m1 libc /proc/self/maps; "
        "grep -m1 libc /proc/self/maps; cat /sys/devices/system/clocksource/*/available_*",
    )
    lines = r.stdout.split("\n")
    assert lines[0] == "0", r.stdout
    assert lines[1].split()[0] == lines[2].split()[0], r.stdout
    assert "kvm-clock" not in lines[3], r.stdout


def test_guest_cloud_init_accepts_its_seed(net, site):
    """The guest's own cloud-init judges the user-data and network-config it booted from, as
    the build host's older cloud-init does in test_render."""
    r = _ssh(net, site, "sudo -n cloud-init schema --system", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Valid schema user-data" in r.stdout, r.stdout


def test_second_deploy_is_up_to_date(net, appliance_image, site, host_sshd, tmp_path):
    """The same site with its host given on the command line, as `make appliance` does."""
    before = subprocess.run(
        ["virsh", "-c", L.URI, "dumpxml", "wg-gw"], capture_output=True, text=True, check=True
    ).stdout
    plain = tmp_path / "site.toml"
    plain.write_text(EXAMPLE.read_text().replace('"vpn.example.org:51820"', '"203.0.113.1:51820"'))
    state = site.parent / ".wg-appliance" / "wg-gw"
    flags = ["--state", str(state), *host_flags(host_sshd)]
    r = cli(net, *_deploy_args(plain, appliance_image), *flags)
    assert r.returncode == 0, r.stderr
    assert "wg-gw: up to date" in r.stdout
    after = subprocess.run(
        ["virsh", "-c", L.URI, "dumpxml", "wg-gw"], capture_output=True, text=True, check=True
    ).stdout
    assert before == after


def _secrets(state: Path) -> dict[str, bytes]:
    """Every secret of the state dir as the bytes a file on the host would hold."""
    keys = json.loads((state / "keys.json").read_text())
    found = {"wg_private": keys["wg_private"].encode()}
    for name, peer in keys["peers"].items():
        for kind in ("private", "psk"):
            if peer.get(kind):
                found[f"{name}.{kind}"] = peer[kind].encode()
    body = [ln for ln in keys["host_key"].splitlines() if "-----" not in ln and len(ln) > 20]
    found |= {f"host_key line {i}": ln.encode() for i, ln in enumerate(body)}
    return found


def _xml(inactive: bool = False) -> str:
    extra = ["--inactive"] if inactive else []
    return subprocess.run(
        ["virsh", "-c", L.URI, "dumpxml", *extra, "wg-gw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_no_secret_is_left_on_the_host(net, site):
    """After deploy the pool holds the appliance's own disk, the base image and the serial
    log; none but the disk holds a private key, PSK or the SSH host key; the seed is gone
    from the domain; what the tool made is 0600."""
    state = site.parent / ".wg-appliance" / "wg-gw"
    secrets = _secrets(state)
    seed = (state / "seed" / "seed.iso").read_bytes()
    assert all(v in seed for k, v in secrets.items() if k.startswith("host_key")), (
        "the scan must find the keys where they are"
    )
    pool = L.Lab.host_path("/var/lib/libvirt/images/wg-appliance")
    names = _pool_files()
    assert not [n for n in names if "-seed-" in n], names
    for name in names:
        if name == "wg-gw-disk.qcow2":
            continue
        data = (pool / name).read_bytes()
        leaked = [k for k, v in secrets.items() if v in data]
        assert not leaked, f"{name} holds {leaked}"
    assert seed_source(_xml()) == (True, None) and seed_source(_xml(inactive=True)) == (False, None)
    for name in ("wg-gw-disk.qcow2", "wg-gw-serial.log"):
        assert (pool / name).stat().st_mode & 0o777 == 0o600, name
    assert cli(net, "verify", "--site", str(site)).returncode == 0


def test_changed_site_is_refused_without_replace(net, appliance_image, site, tmp_path):
    changed = tmp_path / "site.toml"
    changed.write_text(site.read_text().replace("memory_mib = 512", "memory_mib = 640"))
    state = site.parent / ".wg-appliance" / "wg-gw"
    r = cli(net, *_deploy_args(changed, appliance_image), "--state", str(state))
    assert r.returncode == 1
    assert "memory-mib: 512 -> 640" in r.stderr and "--replace" in r.stderr


def test_verify_all_green(net, site):
    t0 = time.monotonic()
    r = cli(net, "verify", "--site", str(site), "--json")
    elapsed = time.monotonic() - t0
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"], r.stdout
    assert doc["appliance"] == "wg-gw"
    names = {c["name"] for c in doc["checks"]}
    assert {"cloud-init", "wg0", "peers", "nftables", "forwarding", "gateway"} <= names
    assert {"LAN", "gateway IPv6"} <= names, names
    assert elapsed < 30


# One call through the kept agent from the LAN host, as the tool makes it: its JSON, or null
# when the appliance could not serve it (then the tool goes through sudo).
SERVED = """
import json, sys
from pathlib import Path
from builder.local.state import State
from builder.model.site import load_site
from builder.remote import appliance as A
from builder.remote.ssh import connect
site = load_site(Path(sys.argv[1]))
client = connect(A.target_for(site, State.for_site(site).look(site)))
r = A.served(client, ["status"])
print(json.dumps(None if r is None else {"rc": r.rc, "out": r.stdout, "err": r.stderr}))
"""


def _served(net, site) -> dict | None:
    return json.loads(net.exec(L.LAN_NS, [sys.executable, "-c", SERVED, str(site)]).stdout)


def test_the_tool_calls_the_kept_agent_and_sudo_when_it_is_gone(net, site):
    """The kept agent answers over SSH's streamlocal channel, as root behind a socket only
    the admin user may open; with its socket stopped, verify still works through sudo."""
    said = _served(net, site)
    assert said is not None and said["rc"] == 0, said
    status = json.loads(said["out"])
    assert status["wg"]["peers"] and status["uptime"] > 0, status
    r = _ssh(
        net,
        site,
        "stat -c '%a %U' /run/wg-appliance-agent.sock; "
        "ps -o user= -p $(systemctl show -P MainPID wg-appliance-agent.service); "
        "sudo -n -u nobody python3 -c 'import socket; "
        'socket.socket(socket.AF_UNIX).connect("/run/wg-appliance-agent.sock")\' 2>&1 | tail -1',
        check=False,
    )
    lines = r.stdout.split("\n")
    assert lines[0] == "600 wgadmin" and lines[1].strip() == "root", r.stdout
    assert "PermissionError" in lines[2], r.stdout
    _ssh(net, site, "sudo -n systemctl stop wg-appliance-agent.socket wg-appliance-agent.service")
    try:
        assert _served(net, site) is None
        r = cli(net, "verify", "--site", str(site), "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout + r.stderr
    finally:
        _ssh(net, site, "sudo -n systemctl start wg-appliance-agent.socket")
    assert _served(net, site)["rc"] == 0


def _client(net, clients, site, peer: str, ns: str, ifname: str) -> WgClient:
    conf = cli(net, "peer-config", "--site", str(site), peer, check=True).stdout
    c = WgClient(net, ns, ifname)
    clients[0].append(c)
    c.up(conf)
    return c


def test_road_warrior_masquerade(net, site, clients):
    server = PeerAddressServer(net, L.LAN_NS)
    server.start()
    clients[1].append(server)
    rw = _client(net, clients, site, "laptop", RW_NS, "wgrw0")
    assert ping(net, RW_NS, "192.168.77.10", count=3), "road warrior cannot ping the LAN host"
    assert rw.latest_handshake() > 0
    assert tcp_source_seen(net, RW_NS, "192.168.77.10") == APPLIANCE
    # IPv6 inside the tunnel to the LAN host, which sees the appliance's LAN IPv6 (NAT66).
    assert ping(net, RW_NS, LAN_HOST6), "road warrior cannot ping the LAN host over IPv6"
    assert tcp_source_seen(net, RW_NS, LAN_HOST6) == APPLIANCE6
    r = cli(net, "verify", "--site", str(site), "--require-handshake", "laptop", "--json")
    doc = json.loads(r.stdout)
    check = next(c for c in doc["checks"] if c["name"] == "handshake laptop")
    assert check["ok"] and "last handshake" in check["detail"], check


def test_site_to_site_masquerade(net, site, clients):
    _client(net, clients, site, "branch", BRANCH_NS, "wgbr0")
    assert ping(net, BLAN_NS, "192.168.77.10"), "branch LAN cannot reach the main LAN"
    assert tcp_source_seen(net, BLAN_NS, "192.168.77.10") == APPLIANCE


def test_status_names_peers_and_marks_a_stranger_unknown(net, site):
    """After the road warrior's and the branch's traffic: both by name with endpoint, a
    recent handshake and bytes; the phone never connected; a peer set by hand on wg0 is
    unknown. The state dir is not written."""
    stranger = "9Tc5QqD3HExMFc2DfHkqEk7z2fTcb3xdN6q3e+4LZxk="
    state = site.parent / ".wg-appliance" / "wg-gw"
    before = {p: p.stat().st_mtime_ns for p in state.rglob("*")}
    _ssh(net, site, f"sudo wg set wg0 peer {stranger} allowed-ips 10.77.0.99/32")
    try:
        r = cli(net, "status", "--site", str(site), "--json")
        table = cli(net, "status", "--site", str(site))
    finally:
        _ssh(net, site, f"sudo wg set wg0 peer {stranger} remove")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    peers = {p["name"] or p["public_key"]: p for p in doc["peers"]}
    for name in ("laptop", "branch"):
        p = peers[name]
        assert p["state"] == "live" and p["endpoint"] and ":" in p["endpoint"], p
        assert doc["appliance"]["time"] - p["latest_handshake"] < 180, p
        assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0, p
    assert peers["phone"]["latest_handshake"] is None and peers["phone"]["endpoint"] is None
    assert peers[stranger]["state"] == "unknown" and peers[stranger]["name"] is None
    assert doc["appliance"]["drift"] == 1 and doc["appliance"]["kernel"]
    assert "Debian" in doc["appliance"]["os"]
    assert table.returncode == 0 and f"{stranger} (unknown)" in table.stdout
    assert "1 difference(s) from the site file" in table.stdout.splitlines()[0]
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*")} == before


METRICS_URL = f"http://{APPLIANCE}:9586/metrics"
SCRAPE = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:\n"
    "    sys.stdout.write(r.read().decode())\n"
)
PEER_METRICS = (
    "wireguard_latest_handshake_seconds",
    "wireguard_sent_bytes_total",
    "wireguard_received_bytes_total",
)


def _scrape(net, ns: str = L.LAN_NS, url: str = METRICS_URL, timeout: float = 20):
    """One GET of the exporter from inside a lab namespace, as Prometheus makes it."""
    return net.exec(ns, [sys.executable, "-c", SCRAPE, url, str(timeout)], check=False)


def _scrape_within(net, seconds: float, url: str = METRICS_URL):
    """The first scrape that answers in `seconds` (a freshly started exporter under TCG)."""
    deadline = time.monotonic() + seconds
    while True:
        r = _scrape(net, url=url, timeout=5)
        if r.returncode == 0 or time.monotonic() > deadline:
            return r
        time.sleep(1)


def _samples(text: str) -> dict[tuple[str, str], float]:
    """(metric, peer name) -> value for the per-peer metrics; wireguard_peers by interface."""
    out = {}
    for line in text.split("\n"):
        if line.startswith("wireguard_"):
            head, value = line.rsplit(" ", 1)
            metric, _, labels = head.partition("{")
            found = dict(part.split("=", 1) for part in labels.rstrip("}").split(","))
            key = found.get("name", found.get("interface", "")).strip('"')
            out[(metric, key)] = float(value)
    return out


def test_metrics_from_the_lan_name_every_peer_and_move_with_traffic(net, site, appliance_image):
    """The LAN host scrapes the exporter: the three metrics for every site peer by name, the
    peer count and the image's digest; after more of the road warrior's traffic its counters
    have moved, and the phone that never connected has no handshake."""
    first = _scrape(net)
    assert first.returncode == 0, first.stderr
    before = _samples(first.stdout)
    for name in ("laptop", "phone", "branch"):
        for metric in PEER_METRICS:
            assert (metric, name) in before, (metric, name, first.stdout[:2000])
    assert before[("wireguard_peers", "wg0")] == 3
    assert f'wg_appliance_image_info{{digest="{appliance_image.digest}"}} 1' in first.stdout
    assert before[("wireguard_latest_handshake_seconds", "laptop")] > 0
    assert before[("wireguard_latest_handshake_seconds", "phone")] == 0
    assert ping(net, RW_NS, "192.168.77.10", count=5)
    after = _samples(_scrape(net).stdout)
    for metric in ("wireguard_sent_bytes_total", "wireguard_received_bytes_total"):
        assert after[(metric, "laptop")] > before[(metric, "laptop")] > 0, metric
    assert (
        after[("wireguard_latest_handshake_seconds", "laptop")]
        >= before[("wireguard_latest_handshake_seconds", "laptop")]
    )


def test_metrics_give_no_answer_outside_allow(net, site):
    """The road warrior reaches the LAN through the tunnel, but its tunnel address is not in
    `allow`: the scrape gets no answer at all (dropped, not refused)."""
    assert ping(net, RW_NS, "192.168.77.10")
    t0 = time.monotonic()
    r = _scrape(net, RW_NS, timeout=5)
    assert r.returncode != 0 and "timed out" in r.stderr, r.stdout[:300] + r.stderr[-500:]
    assert time.monotonic() - t0 >= 4.5
    assert _scrape(net).returncode == 0, "the LAN host still scrapes"


def _wg0_index(net, site) -> str:
    """wg0's interface index: wg-quick down/up would make a new interface with a new one."""
    return _ssh(net, site, "cat /sys/class/net/wg0/ifindex").stdout.strip()


def test_sync_turns_metrics_off_and_on_while_the_tunnel_keeps_pinging(net, site):
    """Off, then on at another port, then back as the site file had it: each by sync on the
    running appliance, with the ruleset following; wg0 is never restarted, so a ping through
    an unchanged peer loses nothing."""
    original = site.read_text()
    index = _wg0_index(net, site)
    pinger = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            RW_NS,
            "ping",
            "-c",
            "400",
            "-i",
            "0.2",
            "-W",
            "1",
            "192.168.77.10",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        site.write_text(original.replace("enabled = true", "enabled = false"))
        off = cli(net, "sync", "--site", str(site))
        assert off.returncode == 0 and "metrics: turned off" in off.stdout, off.stdout + off.stderr
        assert _scrape(net, timeout=3).returncode != 0
        v = cli(net, "verify", "--site", str(site), "--json")
        checks = {c["name"]: c for c in json.loads(v.stdout)["checks"]}
        assert v.returncode == 0 and checks["metrics"]["detail"] == "off", v.stdout
        site.write_text(original.replace("port = 9586", "port = 9100"))
        on = cli(net, "sync", "--site", str(site))
        assert on.returncode == 0 and "metrics: turned on, port 9100" in on.stdout, on.stderr
        moved = _scrape_within(net, 30, url=f"http://{APPLIANCE}:9100/metrics")
        assert moved.returncode == 0 and "wireguard_sent_bytes_total{" in moved.stdout
        site.write_text(original)
        back = cli(net, "sync", "--site", str(site))
        assert back.returncode == 0 and "port 9586" in back.stdout, back.stdout + back.stderr
        assert _scrape_within(net, 30).returncode == 0
        assert _scrape(net, url=f"http://{APPLIANCE}:9100/metrics", timeout=3).returncode != 0
    finally:
        site.write_text(original)
        pinger.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
        out = pinger.communicate(timeout=60)[0]
    assert " 0% packet loss" in out, out
    assert _wg0_index(net, site) == index, "wg0 was restarted"
    assert "in sync, nothing to change" in cli(net, "sync", "--site", str(site)).stdout
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout


def _ssh(net, site, command: str, state: Path | None = None, check: bool = True):
    state = state or site.parent / ".wg-appliance" / "wg-gw"
    return net.exec(
        L.LAN_NS,
        [
            "ssh",
            "-i",
            str(state / "admin_ed25519"),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={state / 'known_hosts'}",
            f"wgadmin@{APPLIANCE}",
            command,
        ],
        check=check,
    )


def diagnostics(net, site) -> str:
    """What a failed connectivity assertion shows: both tunnel ends and the routes."""
    parts = []
    for ns, cmd in (
        (RW_NS, "wg show all"),
        (BRANCH_NS, "wg show all"),
        (L.LAN_NS, "ip route"),
        (L.HOST_NS, "conntrack -L -p udp 2>/dev/null | head -5; ip neigh"),
    ):
        r = net.exec(ns, ["sh", "-c", cmd], check=False)
        parts.append(f"--- {ns}: {cmd}\n{r.stdout}{r.stderr}")
    r = _ssh(net, site, "sudo wg show; ip route; sudo nft list ruleset | head -40", check=False)
    parts.append(f"--- appliance\n{r.stdout}{r.stderr}")
    return "\n".join(parts)


def _failing(r) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in json.loads(r.stdout)["checks"] if not c["ok"]}


def test_verify_names_wg0_when_stopped(net, site):
    _ssh(net, site, "sudo systemctl stop wg-quick@wg0")
    try:
        r = cli(net, "verify", "--site", str(site), "--json")
        assert r.returncode == 1
        assert "wg0" in _failing(r) and "not up" in _failing(r)["wg0"]
    finally:
        _ssh(net, site, "sudo systemctl start wg-quick@wg0")


def test_verify_lists_drift(net, site):
    keys = json.loads((site.parent / ".wg-appliance" / "wg-gw" / "keys.json").read_text())
    _ssh(net, site, f"sudo wg set wg0 peer {keys['peers']['laptop']['public']} remove")
    try:
        r = cli(net, "verify", "--site", str(site), "--json")
        assert r.returncode == 1
        assert _failing(r)["peers"] == "laptop: missing on the appliance"
    finally:
        _ssh(net, site, "sudo systemctl restart wg-quick@wg0")
    assert cli(net, "verify", "--site", str(site)).returncode == 0


def test_verify_refuses_wrong_host_key(net, site, tmp_path):
    state = site.parent / ".wg-appliance" / "wg-gw"
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    keys = json.loads((copy / "keys.json").read_text())
    keys["host_key"] = ssh_genkey()
    (copy / "keys.json").write_text(json.dumps(keys))
    r = cli(net, "verify", "--site", str(site), "--state", str(copy))
    assert r.returncode == 3
    assert "host key mismatch" in r.stderr and r.stderr.count("\n") == 1


def test_verify_of_a_silent_appliance_shows_its_serial_log(net, site):
    """A paused appliance does not answer: exit 3, and the host (over SSH) gives the end of
    the serial log, which shows the appliance's console."""
    virsh = ["virsh", "-c", L.URI]
    subprocess.run([*virsh, "suspend", "wg-gw"], check=True, capture_output=True)
    try:
        r = cli(net, "verify", "--site", str(site), "--timeout", "5")
    finally:
        subprocess.run([*virsh, "resume", "wg-gw"], check=True, capture_output=True)
    assert r.returncode == 3, r.stdout + r.stderr
    _, header, rest = r.stderr.partition("--- the appliance's serial log, from its host ---\n")
    serial, _, error = rest.rpartition("error: ")
    assert header and serial.strip(), r.stderr
    assert APPLIANCE in error and "\n" not in error.strip(), r.stderr
    assert cli(net, "verify", "--site", str(site), "--timeout", "60").returncode == 0


RW6_NS = "wgl-rw6"
RW6_PEER = '\n[[peers]]\nname = "rw6"\naddress = ["10.77.0.7/32", "fd77::7/128"]\n'
RW6_ADDR6 = "2001:db8:100::12"


def _rw6_config(net, site, *flags: str) -> str:
    """rw6's config, dialling RED's IPv6 address (the host forwards it to the appliance)."""
    conf = cli(net, "peer-config", "--site", str(site), "rw6", *flags, check=True).stdout
    return conf.replace("Endpoint = 203.0.113.1:51820", f"Endpoint = [{HOST_RED6}]:51820")


def test_road_warrior_over_ipv6_and_full_tunnel(net, site, clients):
    """A road warrior dialling RED over IPv6 reaches the LAN host over IPv4 and IPv6 inside
    the tunnel (masqueraded to the appliance's addresses); with --full-tunnel its IPv6 to an
    internet host goes through the appliance instead of around it."""
    original = site.read_text()
    site.write_text(original + RW6_PEER)
    rw6 = None
    try:
        assert cli(net, "sync", "--site", str(site)).returncode == 0
        add_internet_host(net, RW6_NS, _if("198.51.100.12/24"), _if(f"{RW6_ADDR6}/64"))
        inet_server = PeerAddressServer(net, L.INET_NS)
        inet_server.start()
        clients[1].append(inet_server)
        assert tcp_source_seen(net, RW6_NS, INET_RED6) == RW6_ADDR6, "no direct path to see"
        rw6 = WgClient(net, RW6_NS, "wgrw6")
        rw6.up(_rw6_config(net, site))
        assert ping(net, RW6_NS, LAN_HOST6), diagnostics(net, site)
        assert ping(net, RW6_NS, "192.168.77.10"), diagnostics(net, site)
        assert tcp_source_seen(net, RW6_NS, LAN_HOST6) == APPLIANCE6
        assert tcp_source_seen(net, RW6_NS, "192.168.77.10") == APPLIANCE
        endpoints = _ssh(net, site, "sudo wg show wg0 endpoints").stdout
        assert f"[{RW6_ADDR6}]:" in endpoints, endpoints
        assert tcp_source_seen(net, RW6_NS, INET_RED6) == RW6_ADDR6, "split tunnel: direct"
        rw6.down()
        rw6 = WgClient(net, RW6_NS, "wgrw6")
        rw6.up(_rw6_config(net, site, "--full-tunnel"))
        assert ping(net, RW6_NS, INET_RED6), diagnostics(net, site)
        assert tcp_source_seen(net, RW6_NS, INET_RED6) == APPLIANCE6, "IPv6 went around"
    finally:
        if rw6 is not None:
            rw6.down()
        net.remove_namespace(RW6_NS)
        site.write_text(original)
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0 and "unknown peer" in r.stdout, r.stdout + r.stderr


BRANCH_NETS = 'networks = ["192.168.88.0/24"]'
BRANCH_NETS6 = f'networks = ["192.168.88.0/24", "{BLAN_NET6}"]'


def test_routed_mode(net, appliance_image, site, clients):
    """Routed: the LAN host sees tunnel addresses (it routes the tunnel and branch nets to the
    appliance), and the branch and main LANs reach each other both ways, in both families
    (the branch has an IPv6 network for this test)."""
    site.write_text(
        site.read_text()
        .replace('mode = "masquerade"', 'mode = "routed"')
        .replace(BRANCH_NETS, BRANCH_NETS6)
    )
    r = cli(net, *_deploy_args(site, appliance_image), "--replace")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replaced" in r.stdout
    assert not [n for n in _pool_files() if "-seed-" in n] and seed_source(_xml())[1] is None
    for dest in ("10.77.0.0/24", "192.168.88.0/24"):
        net.exec(L.LAN_NS, ["ip", "route", "replace", dest, "via", APPLIANCE])
    # Clients notice the new appliance by themselves: no handshake answer for 15 s, retry.
    assert ping(net, RW_NS, "192.168.77.10", count=5, within=150), diagnostics(net, site)
    assert tcp_source_seen(net, RW_NS, "192.168.77.10") == "10.77.0.2"
    assert ping(net, BLAN_NS, "192.168.77.10")
    assert tcp_source_seen(net, BLAN_NS, "192.168.77.10") == BLAN_HOST
    server = PeerAddressServer(net, BLAN_NS)
    server.start()
    clients[1].append(server)
    assert ping(net, L.LAN_NS, BLAN_HOST), "main LAN cannot reach the branch LAN"
    assert tcp_source_seen(net, L.LAN_NS, BLAN_HOST) == "192.168.77.10"
    for dest in ("fd77::/64", BLAN_NET6):
        net.exec(L.LAN_NS, ["ip", "-6", "route", "replace", dest, "via", APPLIANCE6])
    assert ping(net, RW_NS, LAN_HOST6), diagnostics(net, site)
    assert tcp_source_seen(net, RW_NS, LAN_HOST6) == "fd77::2"
    assert BLAN_NET6 in _ssh(net, site, "ip -6 route show dev wg0").stdout
    assert ping(net, BLAN_NS, LAN_HOST6), diagnostics(net, site)
    assert tcp_source_seen(net, BLAN_NS, LAN_HOST6) == BLAN_HOST6
    assert tcp_source_seen(net, L.LAN_NS, BLAN_HOST6) == LAN_HOST6
    r = cli(net, "verify", "--site", str(site), "--require-handshake", "laptop", "branch")
    assert r.returncode == 0, r.stdout
    site.write_text(site.read_text().replace(BRANCH_NETS6, BRANCH_NETS))
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0 and f"-{BLAN_NET6}" in r.stdout, r.stdout + r.stderr
    assert BLAN_NET6 not in _ssh(net, site, "ip -6 route show dev wg0").stdout


RW2_NS = "wgl-rw2"


def _peer_block(name: str, address: str, networks: str = "") -> str:
    return f'\n[[peers]]\nname = "{name}"\naddress = "{address}"\n' + (
        f"networks = {networks}\n" if networks else ""
    )


def test_sync_adds_peer_while_others_keep_pinging(net, site, clients):
    """A peer added live handshakes; a ping through an unchanged peer loses nothing."""
    net.add_namespace(RW2_NS)
    net.add_veth(
        RW2_NS, "eth0", L.INET_NS, "i-rw2", address=_if("198.51.100.11/24"), bridge="inet0"
    )
    net.add_route(RW2_NS, "default", "198.51.100.1")
    site.write_text(site.read_text() + _peer_block("laptop2", "10.77.0.5/32"))
    dry = cli(net, "sync", "--site", str(site), "--dry-run")
    assert dry.returncode == 0 and "laptop2: missing on the appliance" in dry.stdout
    assert "dry run" in dry.stdout
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", RW_NS, "ping", "-c", "40", "-i", "0.2", "-W", "1", "192.168.77.10"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    t0 = time.monotonic()
    r = cli(net, "sync", "--site", str(site))
    sync_s = time.monotonic() - t0
    out = pinger.communicate(timeout=60)[0]
    assert r.returncode == 0, r.stderr
    assert "laptop2" in r.stdout and "applied" in r.stdout
    assert " 0% packet loss" in out, out
    rw2 = _client(net, clients, site, "laptop2", RW2_NS, "wgrw2")
    assert ping(net, RW2_NS, "192.168.77.10"), diagnostics(net, site)
    assert rw2.latest_handshake() > 0
    assert sync_s < 30
    again = cli(net, "sync", "--site", str(site))
    assert "in sync, nothing to change" in again.stdout
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout


def test_sync_removes_peer_at_once(net, site):
    site.write_text(site.read_text().replace(_peer_block("laptop2", "10.77.0.5/32"), ""))
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0 and "unknown peer" in r.stdout, r.stdout + r.stderr
    assert not ping(net, RW2_NS, "192.168.77.10", count=2, within=5)
    assert ping(net, RW_NS, "192.168.77.10")


def test_sync_routes_follow_networks(net, site):
    site.write_text(
        site.read_text().replace(
            'networks = ["192.168.88.0/24"]', 'networks = ["192.168.88.0/24", "192.168.89.0/24"]'
        )
    )
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0, r.stderr
    assert "+192.168.89.0/24" in r.stdout
    routes = _ssh(net, site, "ip route show dev wg0").stdout
    assert "192.168.89.0/24" in routes
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout
    site.write_text(site.read_text().replace(', "192.168.89.0/24"', ""))
    r = cli(net, "sync", "--site", str(site))
    assert "-192.168.89.0/24" in r.stdout
    assert "192.168.89.0/24" not in _ssh(net, site, "ip route show dev wg0").stdout


def test_failed_sync_rolls_back(net, site):
    before = _ssh(net, site, "sudo sha256sum /etc/wireguard/wg0.conf").stdout
    _ssh(net, site, "sudo chattr +i /etc/nftables.conf")
    original = site.read_text()
    try:
        site.write_text(
            original.replace('mode = "routed"', 'mode = "masquerade"')
            + _peer_block("tablet", "10.77.0.6/32")
        )
        r = cli(net, "sync", "--site", str(site))
        assert r.returncode == 1
        assert "rolled back to the previous files" in r.stderr, r.stderr
        assert "EPERM" in r.stderr or "not permitted" in r.stderr, r.stderr
    finally:
        _ssh(net, site, "sudo chattr -i /etc/nftables.conf")
        site.write_text(original)
    assert _ssh(net, site, "sudo sha256sum /etc/wireguard/wg0.conf").stdout == before
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout


ROLLED_BACK = "rolled back to the previous files, ruleset, peers, MTU and routes"


@contextmanager
def _wg0_down(net, site):
    """wg0 down (its IPv6 addresses kept, so sync sees the same VM): a live apply then gets
    through files, sysctl, ruleset, peers and MTU and fails at the last step, since no route
    goes via a device that is not up. Up again afterwards as wg-quick brings it at boot."""
    _ssh(
        net,
        site,
        "sudo sysctl -qw net.ipv6.conf.wg0.keep_addr_on_down=1 && sudo ip link set wg0 down",
    )
    try:
        yield
    finally:
        _ssh(net, site, "sudo systemctl restart wg-quick@wg0")


def test_failed_sync_restores_the_mtu(net, site):
    conf = _ssh(net, site, "sudo sha256sum /etc/wireguard/wg0.conf").stdout
    original = site.read_text()
    site.write_text(original.replace("mtu = 1420", "mtu = 1380"))
    try:
        with _wg0_down(net, site):
            r = cli(net, "sync", "--site", str(site))
            link = _ssh(net, site, "ip link show wg0").stdout
        assert r.returncode == 1, r.stdout + r.stderr
        assert "ip route replace" in r.stderr and ROLLED_BACK in r.stderr, r.stderr
        assert " mtu 1420 " in link, link
    finally:
        site.write_text(original)
    assert _ssh(net, site, "sudo sha256sum /etc/wireguard/wg0.conf").stdout == conf
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout


SYSCTL = "/etc/sysctl.d/90-wg-appliance.conf"


def test_failed_sync_removes_a_file_that_was_not_there(net, site):
    _ssh(net, site, f"sudo rm {SYSCTL}")
    with _wg0_down(net, site):
        r = cli(net, "sync", "--site", str(site))
        after = _ssh(net, site, f"sudo ls {SYSCTL} {SYSCTL}.wga-new", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ip route replace" in r.stderr and ROLLED_BACK in r.stderr, r.stderr
    assert after.returncode != 0 and after.stdout == "", after.stdout
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0 and "forwarding settings" in r.stdout, r.stdout + r.stderr
    assert _ssh(net, site, f"sudo cat {SYSCTL}").stdout.startswith("# Forwarding")
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout


def test_sync_applies_a_changed_lan_dns(net, site):
    """No resolver daemon: lan.dns is the appliance's resolv.conf, which sync replaces live
    (and puts back when the site does)."""
    original = site.read_text()
    site.write_text(original.replace('dns = ["192.168.77.1"]', f'dns = ["{LAN_HOST}"]', 1))
    try:
        r = cli(net, "sync", "--site", str(site))
        resolv = _ssh(net, site, "grep '^nameserver' /etc/resolv.conf").stdout
    finally:
        site.write_text(original)
    assert r.returncode == 0 and "DNS servers (lan.dns)" in r.stdout, r.stdout + r.stderr
    assert resolv == f"nameserver {LAN_HOST}\n", resolv
    assert cli(net, "sync", "--site", str(site)).returncode == 0
    assert _ssh(net, site, "grep '^nameserver' /etc/resolv.conf").stdout == (
        "nameserver 192.168.77.1\n"
    )
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout


def test_sync_refuses_a_changed_lan_gateway_and_changes_nothing(net, site):
    """The gateway lives in the seed's network-config, which only a first boot applies: sync
    names it and the command that brings it, and leaves the appliance and its record alone."""
    original = site.read_text()
    before = _ssh(net, site, "ip -j route show default dev lan0").stdout
    site.write_text(original.replace('"192.168.77.1", "fd77', '"192.168.77.2", "fd77', 1))
    try:
        r = cli(net, "sync", "--site", str(site))
        after = _ssh(net, site, "ip -j route show default dev lan0").stdout
    finally:
        site.write_text(original)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "lan.gateway: appliance routes via 192.168.77.1, fd77:77::1" in r.stderr, r.stderr
    assert "--replace" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert after == before and "192.168.77.1" in before, (before, after)
    s = cli(net, "sync", "--site", str(site), "--dry-run")
    assert s.returncode == 0 and "lan.gateway" not in s.stdout + s.stderr, s.stdout + s.stderr
    v = cli(net, "verify", "--site", str(site), "--json")
    assert json.loads(v.stdout)["ok"], v.stdout


def reboot(net, site: Path) -> subprocess.CompletedProcess:
    """Reboot the appliance and wait until verify passes again, from a fresh boot."""
    _ssh(net, site, "sudo systemctl reboot", check=False)
    time.sleep(5)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        v = cli(net, "verify", "--site", str(site), "--json", "--timeout", "5")
        if v.returncode == 0:
            break
        time.sleep(5)
    assert v.returncode == 0, v.stdout + v.stderr
    uptime = float(_ssh(net, site, "cut -d' ' -f1 /proc/uptime").stdout)
    assert uptime < 300, "the appliance did not reboot"
    return v


def test_synced_state_survives_reboot(net, appliance_image, site):
    site.write_text(site.read_text() + _peer_block("tablet", "10.77.0.6/32"))
    assert cli(net, "sync", "--site", str(site)).returncode == 0
    v = reboot(net, site)
    checks = {c["name"]: c for c in json.loads(v.stdout)["checks"]}
    assert "cloud-init is off" in checks["cloud-init"]["detail"], checks["cloud-init"]
    assert seed_source(_xml())[1] is None, "it booted without the seed"
    deploy = cli(net, *_deploy_args(site, appliance_image))
    assert "up to date" in deploy.stdout, "sync must leave deploy nothing to do"
    # Booted without its seed and with cloud-init off, the appliance still takes a sync.
    site.write_text(site.read_text().replace(_peer_block("tablet", "10.77.0.6/32"), ""))
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0 and "unknown peer" in r.stdout and "applied in" in r.stdout, r.stdout
    assert cli(net, "verify", "--site", str(site)).returncode == 0


# --- upgrade and rollback by handover -------------------------------------------------------

LAN_HOST = "192.168.77.10"
# What makes the new appliance of the failing upgrade fail: its wg0 unit, in its image.
BROKEN_WG0 = "[Service]\nExecStartPre=/bin/false\n"
OUTAGE_LIMIT_S = 10.0  # generous for TCG on a busy machine; `make bench` judges the 3 s goal


def _domains() -> dict[str, tuple[bool, bool]]:
    """Every lab domain: (running, NIC link up in the running guest)."""
    import libvirt

    conn = libvirt.open(L.URI)
    try:
        out = {}
        for dom in conn.listAllDomains(0):
            running = bool(dom.isActive())
            xml = dom.XMLDesc(0)
            out[dom.name()] = (running, running and "<link state='down'/>" not in xml)
        return out
    finally:
        conn.close()


UPGRADED: dict = {}  # what the upgrade test did, for the rollback test


def _serving() -> str:
    """The one lab domain that runs with its link up."""
    (name,) = [n for n, (_, up) in _domains().items() if up]
    return name


class LinkWatch:
    """Samples the lab's domains five times a second: at no moment may two have a link up."""

    def __init__(self):
        import threading

        self.most, self.seen, self._stop = 0, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            doms = _domains()
            self.seen |= set(doms)
            self.most = max(self.most, sum(up for _, up in doms.values()))
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.most


@pytest.fixture(scope="module")
def changed_image(tmp_path_factory):
    """The image of a test copy of images/ with one file changed: another recipe digest."""
    from tests.conftest import ROOT

    recipe = tmp_path_factory.mktemp("recipe") / "images"
    shutil.copytree(ROOT / "images", recipe)
    (recipe / "rootfs" / "etc" / "wg-appliance-test-build").write_text("a changed recipe\n")
    r = subprocess.run(
        [sys.executable, "-m", "builder", "image", "--recipe", str(recipe), "--json"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _image_digest(net, site) -> str:
    r = cli(net, "status", "--site", str(site), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["appliance"]["image"]


def test_upgrade_to_a_new_image_keeps_the_tunnels(net, site, clients, changed_image):
    """A road warrior pinging five times a second and a branch holding a TCP stream both
    live through the upgrade; the new appliance serves with the new image."""
    assert ping(net, RW_NS, LAN_HOST) and ping(net, BLAN_NS, LAN_HOST), diagnostics(net, site)
    before, serving = _image_digest(net, site), _serving()
    pinger = Pinger(net, RW_NS, LAN_HOST, seconds=900)
    stream = TcpStream(net, BLAN_NS, L.LAN_NS, LAN_HOST, seconds=900)
    watch = LinkWatch()
    try:
        r = cli(net, "upgrade", "--site", str(site), "--image", changed_image["path"], "--json")
    finally:
        most = watch.stop()
        outage, replies = pinger.stop()
        stream.stop()
        streamed = stream.result(timeout=30)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stderr[-3000:])
    done = json.loads(r.stdout)
    print(done)
    assert (done["outcome"], done["previous"]) == ("upgraded", serving), done
    assert done["domain"] != serving and done["kicked"] >= 2, done
    assert _serving() == done["domain"]
    UPGRADED.update(done)
    assert most == 1, "two appliances had their link up at once"
    assert replies > 0 and outage <= OUTAGE_LIMIT_S, (outage, replies)
    assert isinstance(streamed, tuple), f"the TCP stream broke: {streamed}"
    assert streamed[0] <= OUTAGE_LIMIT_S, streamed
    after = _image_digest(net, site)
    assert after == changed_image["digest"] and after != before
    assert _domains()[serving] == (False, False), "the old appliance is stopped and kept"
    v = cli(net, "verify", "--site", str(site), "--require-handshake", "laptop", "branch")
    assert v.returncode == 0, v.stdout
    again = cli(net, "upgrade", "--site", str(site), "--image", changed_image["path"])
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr


def test_rollback_returns_to_the_previous_image_locally(net, site, appliance_image):
    """Over the host's libvirt socket this time (qemu:///system, as on the host itself)."""
    pinger = Pinger(net, RW_NS, LAN_HOST, seconds=900)
    try:
        r = net.exec(
            L.LAN_NS,
            [
                sys.executable,
                "-m",
                "builder",
                "rollback",
                "--site",
                str(site),
                "--json",
                "--host-uri",
                L.URI,
            ],
            check=False,
            timeout=900,
        )
    finally:
        outage, replies = pinger.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout)
    assert (done["outcome"], done["domain"]) == ("rolled back", UPGRADED["previous"]), done
    assert done["previous"] == UPGRADED["domain"] and _serving() == done["domain"], done
    assert replies > 0 and outage <= OUTAGE_LIMIT_S, (outage, replies)
    assert _image_digest(net, site) == appliance_image.digest
    assert cli(net, "verify", "--site", str(site)).returncode == 0


def test_a_new_appliance_that_fails_rolls_back(net, site, appliance_image, tmp_path):
    """The new image's wg0 cannot come up (a drop-in makes its unit fail before it starts):
    the upgrade stops before the takeover and nothing changes."""
    broken = image_with_files(
        appliance_image,
        tmp_path,
        {"/etc/systemd/system/wg-quick@wg0.service.d/zz-broken.conf": BROKEN_WG0},
    )
    before = _domains()
    r = cli(net, "upgrade", "--site", str(site), "--image", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed before the takeover, the old one still serves" in r.stderr, r.stderr
    assert "wg0" in r.stderr, r.stderr
    assert _domains() == before, "a failed upgrade leaves the domains as they were"
    assert ping(net, RW_NS, LAN_HOST)
    assert cli(net, "verify", "--site", str(site)).returncode == 0


def test_a_killed_memory_upgrade_converges(net, site, appliance_image):
    """Memory only; the first run is killed while the new appliance boots, the second
    finishes the same handover with it, and with --prune removes the one it replaced."""
    serving = _serving()
    site.write_text(site.read_text().replace("memory_mib = 512", "memory_mib = 640"))
    argv = [
        sys.executable,
        "-m",
        "builder",
        "upgrade",
        "--site",
        str(site),
        "--image",
        str(appliance_image.path),
    ]
    watch = LinkWatch()
    first = subprocess.Popen(
        ["ip", "netns", "exec", L.LAN_NS, *workstation(argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            running = [n for n, (on, _) in _domains().items() if on]
            if len(running) == 2:
                break
            time.sleep(0.5)
        assert len(running) == 2, "the new appliance never started"
        time.sleep(5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert ping(net, RW_NS, LAN_HOST), "the old appliance serves while nothing runs"
    r = cli(net, *argv[3:], "--prune", "--json")
    most = watch.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout)
    assert done["outcome"] == "upgraded" and most == 1, (done, most)
    assert "<memory unit='KiB'>655360</memory>" in _xml_of(done["domain"])
    assert done["previous"] is None and f"domain {serving}" in done["removed"], done
    mine = [n for n in _domains() if n.startswith("wg-gw")]
    assert mine == [done["domain"]], "the replaced appliance is gone"
    pool_dir = L.Lab.host_path("/var/lib/libvirt/images/wg-appliance")
    left = [p.name for p in pool_dir.iterdir() if not p.name.startswith("wg-appliance-base-")]
    assert all(n.startswith(done["domain"] + "-") for n in left), left
    assert cli(net, "verify", "--site", str(site)).returncode == 0


def _xml_of(name: str) -> str:
    return subprocess.run(
        ["virsh", "-c", L.URI, "dumpxml", name], capture_output=True, text=True, check=True
    ).stdout


def test_destroy_leaves_nothing(net, site):
    serving = _serving()
    r = cli(net, "destroy", "--site", str(site), "--all", "--json")
    assert r.returncode == 0, r.stderr
    removed = json.loads(r.stdout)["removed"]
    # One domain: the last upgrade ran with --prune.
    assert [r for r in removed if r.startswith("domain ")] == [f"domain {serving}"], removed
    listed = subprocess.run(
        ["virsh", "-c", L.URI, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not [n for n in listed if n.startswith("wg-gw")], listed
    pool_dir = L.Lab.host_path("/var/lib/libvirt/images/wg-appliance")
    assert sorted(p.name for p in pool_dir.iterdir()) == []
    again = cli(net, "destroy", "--site", str(site))
    assert again.returncode == 0 and "nothing to remove" in again.stdout
