"""Peer lifecycle in the lab, all real: one appliance under qemu with a disabled road warrior,
one that expires a minute after it is set, one restricted to a LAN host's HTTP, and a branch
whose endpoint is a name served by dnsmasq on the LAN host.

One boot for the module plus one reboot. The waits overlap: the expiring peer's ping and
the moved branch's stale handshake run while the disabled and restricted peers are tried.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from tests import test_e2e as e2e
from tests.lab import lab as L
from tests.lab.clients import PeerAddressServer, WgClient, ping, tcp_source_seen
from tests.lab.host_sshd import URI as HOST_URI
from tests.lab.internet import BLAN_HOST, BRANCH_NS, RW_NS
from tests.test_e2e import APPLIANCE, _client, _deploy_args, _ssh, cli

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.vm]
# The lab's RED side and the client bookkeeping, as test_e2e sets them up and tears them down.
net, clients = e2e.net, e2e.clients
# The host's sshd on GREEN: the tool reaches libvirtd only through it, as in test_e2e.
host_sshd = e2e.host_sshd

OFF_NS, TEMP_NS = "wgl-rw3", "wgl-rw4"
BRANCH_NAME = "branch.lab.test"
OLD_BRANCH, NEW_BRANCH = "198.51.100.20", "198.51.100.21"
DNS_PID = L.STATE_DIR / "lifecycle-dnsmasq.pid"
SITE = f"""\
[appliance]
name = "wg-gw"

[lan]
address = "{APPLIANCE}/24"
gateway = "192.168.77.1"
dns = ["192.168.77.10"]

[wireguard]
address = "10.78.0.1/24"
endpoint = "203.0.113.1:51820"

[[peers]]
name = "off"
address = "10.78.0.2/32"
enabled = false

[[peers]]
name = "temp"
address = "10.78.0.3/32"

[[peers]]
name = "web"
address = "10.78.0.4/32"
allow = ["192.168.77.10/32 tcp/80"]

[[peers]]
name = "branch"
address = "10.78.0.10/32"
networks = ["192.168.88.0/24"]
endpoint = "{BRANCH_NAME}:51820"
keepalive = 25
"""


class Dns:
    """dnsmasq on the LAN host, answering only for the branch's name; stopped by its pid."""

    def __init__(self, lab: L.Lab):
        self.lab = lab
        self.proc: subprocess.Popen | None = None

    def serve(self, address: str) -> None:
        self.stop()
        argv = ["ip", "netns", "exec", L.LAN_NS, "dnsmasq", "--keep-in-foreground"]
        argv += ["--no-resolv", "--no-hosts", "--conf-file=/dev/null", f"--pid-file={DNS_PID}"]
        argv += ["--listen-address=192.168.77.10", "--bind-interfaces", "--local-ttl=0"]
        argv += [f"--address=/{BRANCH_NAME}/{address}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not DNS_PID.exists() or not DNS_PID.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {self.proc.stderr.read()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        DNS_PID.unlink(missing_ok=True)


def _far(lab: L.Lab, ns: str, address: str) -> None:
    lab.add_namespace(ns)
    lab.add_veth(ns, "eth0", L.INET_NS, f"i-{ns[4:]}", address=IPv4Interface(address),
                 bridge="inet0")  # fmt: skip
    lab.add_route(ns, "default", "198.51.100.1")


MASQ = ["POSTROUTING", "-o", "red0", "-j", "MASQUERADE"]


@pytest.fixture(scope="module")
def life(net, host_sshd, tmp_path_factory):
    """The lab as this module needs it: GREEN leaves RED masqueraded (as IPFire does), so
    the appliance can dial the branch; dnsmasq names it; two more road-warrior hosts."""
    d = tmp_path_factory.mktemp("lifecycle")
    host = (
        f'\n[host]\nuri = "{HOST_URI}"\nhost_key = "{host_sshd.fingerprint()}"\n'
        f'ssh_key = "{host_sshd.identity}"\n'
    )
    (d / "site.toml").write_text(SITE + host)
    net.exec(L.HOST_NS, ["iptables", "-t", "nat", "-A", *MASQ])
    dns = Dns(net)
    dns.serve(OLD_BRANCH)
    _far(net, OFF_NS, "198.51.100.13/24")
    _far(net, TEMP_NS, "198.51.100.14/24")
    net.exec(L.LAN_NS, ["ip", "route", "replace", "192.168.88.0/24", "via", APPLIANCE])
    state: dict = {"site": d / "site.toml", "dns": dns}
    yield state
    if state.get("pinger"):
        state["pinger"].kill()
        state["pinger"].wait()
    cli(net, "destroy", "--site", str(d / "site.toml"), "--all")
    dns.stop()
    for ns in (OFF_NS, TEMP_NS):
        net.remove_namespace(ns)
    net.exec(L.LAN_NS, ["ip", "route", "del", "192.168.88.0/24"], check=False)
    net.exec(L.HOST_NS, ["iptables", "-t", "nat", "-D", *MASQ], check=False)


def _keys(site: Path) -> dict:
    return json.loads((site.parent / ".wg-appliance" / "wg-gw" / "keys.json").read_text())


def _wg(net, site: Path, what: str) -> str:
    return _ssh(net, site, f"sudo wg show wg0 {what}").stdout


def _verify(net, site: Path) -> dict:
    r = cli(net, "verify", "--site", str(site), "--json")
    return json.loads(r.stdout)


def test_deploy_leaves_the_disabled_peer_off_wg0(net, appliance_image, life):
    site = life["site"]
    r = cli(net, *_deploy_args(site, appliance_image), "--replace")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = _keys(site)
    peers = _wg(net, site, "peers").split()
    assert keys["peers"]["off"]["public"] not in peers
    assert keys["peers"]["web"]["public"] in peers
    assert (
        _ssh(net, site, "systemctl is-active wg-appliance-peers.timer").stdout.strip() == "active"
    )
    doc = _verify(net, site)
    failing = {c["name"]: c["detail"] for c in doc["checks"] if not c["ok"]}
    assert set(failing) <= {"handshake branch"}, failing  # the branch is not up yet
    check = next(c for c in doc["checks"] if c["name"] == "peers")
    assert check["detail"] == "3 peers as in the site file, 1 disabled or expired and absent"


def test_an_expiry_set_by_sync_and_the_peer_works_until_then(net, life, clients):
    """`temp` gets an expiry a minute ahead; its client pings the LAN host once a second
    from now on, with timestamps, in the background."""
    site = life["site"]
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=75)
    text = site.read_text().replace(
        'address = "10.78.0.3/32"\n',
        f'address = "10.78.0.3/32"\nexpires = {expires.isoformat().replace("+00:00", "Z")}\n',
    )
    site.write_text(text)
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0 and "peer expiry and endpoint names" in r.stdout, r.stdout + r.stderr
    _client(net, clients, site, "temp", TEMP_NS, "wgltmp")
    assert ping(net, TEMP_NS, "192.168.77.10", count=2, within=30)
    assert datetime.now(UTC) < expires - timedelta(seconds=20), "too slow to see it work first"
    life["expires"] = expires.timestamp()
    life["pinger"] = subprocess.Popen(
        ["ip", "netns", "exec", TEMP_NS, "ping", "-D", "-i", "1", "-W", "1", "-w", "400",
         "192.168.77.10"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_branch_by_name_then_it_moves(net, life, clients):
    """The appliance dials the branch by its name; the branch only answers (no endpoint
    or keepalive of its own), so nothing but the appliance can find it after the move."""
    site = life["site"]
    conf = cli(net, "peer-config", "--site", str(site), "branch", check=True).stdout
    passive = "".join(
        ln for ln in conf.splitlines(keepends=True)
        if not ln.startswith(("Endpoint", "PersistentKeepalive"))
    )  # fmt: skip
    c = WgClient(net, BRANCH_NS, "wglbr")
    clients[0].append(c)
    c.up(passive)
    assert ping(net, L.LAN_NS, BLAN_HOST, count=2, within=60), "the appliance did not dial"
    endpoint = _wg(net, site, "endpoints")
    assert f"{OLD_BRANCH}:51820" in endpoint, endpoint
    life["dns"].serve(NEW_BRANCH)
    net.exec(BRANCH_NS, ["ip", "addr", "del", f"{OLD_BRANCH}/24", "dev", "eth0"])
    net.exec(BRANCH_NS, ["ip", "addr", "add", f"{NEW_BRANCH}/24", "dev", "eth0"])
    net.add_route(BRANCH_NS, "default", "198.51.100.1")
    life["moved"] = time.monotonic()


def test_a_disabled_peer_cannot_handshake(net, life, clients):
    rw = _client(net, clients, life["site"], "off", OFF_NS, "wgloff")
    assert not ping(net, OFF_NS, "192.168.77.10", count=2, within=8)
    assert rw.latest_handshake() == 0
    life["off_config"] = cli(net, "peer-config", "--site", str(life["site"]), "off").stdout


def test_allow_lets_through_only_the_lan_hosts_http(net, life, clients):
    for ns, port in ((L.LAN_NS, 80), (L.LAN_NS, 7777), (L.HOST_NS, 80)):
        server = PeerAddressServer(net, ns, port=port)
        server.start()
        clients[1].append(server)
    _client(net, clients, life["site"], "web", RW_NS, "wglweb")
    deadline = time.monotonic() + 30
    while (seen := tcp_source_seen(net, RW_NS, "192.168.77.10", 80, 5)) != APPLIANCE:
        assert time.monotonic() < deadline, seen
    assert tcp_source_seen(net, RW_NS, "192.168.77.10", 7777, 3).startswith("failed")
    assert tcp_source_seen(net, RW_NS, "192.168.77.1", 80, 3).startswith("failed")
    assert not ping(net, RW_NS, "192.168.77.10", count=1, within=1)
    assert not ping(net, RW_NS, "192.168.77.1", count=1, within=1)


def test_the_appliance_cuts_the_peer_off_at_its_expiry(net, appliance_image, life):
    """No tool command between the sync that set the expiry and now: the appliance's timer
    removed the peer. The last echo reply came before the expiry plus the timer's period."""
    expires = life["expires"]
    time.sleep(max(0.0, expires + 25 - time.time()))
    assert not ping(net, TEMP_NS, "192.168.77.10", count=2, within=4)
    pinger = life.pop("pinger")
    pinger.terminate()
    out = pinger.communicate(timeout=10)[0]
    replies = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]
    assert replies, out
    assert expires - 15 < replies[-1] < expires + 15, (replies[-1] - expires, out[-600:])
    site = life["site"]
    temp = _keys(site)["peers"]["temp"]["public"]
    assert temp not in _wg(net, site, "peers")
    assert temp not in _ssh(net, site, "sudo cat /etc/wireguard/wg0.conf").stdout
    peers = next(c for c in _verify(net, site)["checks"] if c["name"] == "peers")
    assert peers["ok"], peers

    again = cli(net, "sync", "--site", str(site))
    assert "in sync, nothing to change" in again.stdout, again.stdout + again.stderr
    deploy = cli(net, *_deploy_args(site, appliance_image))
    assert "up to date" in deploy.stdout, deploy.stdout + deploy.stderr


def test_the_moved_branch_is_found_again_by_its_name(net, life):
    """Its handshake goes stale (135 s), the appliance asks dnsmasq again and dials the new
    address."""
    assert "moved" in life, "the branch never moved"
    deadline = life["moved"] + 300
    while not ping(net, L.LAN_NS, BLAN_HOST, count=1, within=1):
        assert time.monotonic() < deadline, _wg(net, life["site"], "endpoints")
        time.sleep(5)
    endpoint = _wg(net, life["site"], "endpoints")
    assert f"{NEW_BRANCH}:51820" in endpoint, endpoint
    doc = _verify(net, life["site"])
    assert doc["ok"], [c for c in doc["checks"] if not c["ok"]]


def test_enabling_again_restores_the_same_config(net, life):
    site = life["site"]
    site.write_text(site.read_text().replace("enabled = false\n", ""))
    r = cli(net, "sync", "--site", str(site))
    assert r.returncode == 0 and "off: missing on the appliance" in r.stdout, r.stdout
    assert cli(net, "peer-config", "--site", str(site), "off").stdout == life["off_config"]
    assert ping(net, OFF_NS, "192.168.77.10", count=2, within=60)


def test_the_expired_peer_stays_off_after_a_reboot(net, life):
    site = life["site"]
    e2e.reboot(net, site)
    temp = _keys(site)["peers"]["temp"]["public"]
    assert temp not in _wg(net, site, "peers")
    assert not ping(net, TEMP_NS, "192.168.77.10", count=2, within=10)
    assert ping(net, OFF_NS, "192.168.77.10", count=2, within=60)
