"""`wg-appliance ipfire` against the lab's IPFire stand-in: real sshd, real iptables, real routes.

The command runs on the LAN host `wgl-lan` (the admin's workstation) and logs in to the
host namespace's sshd on 192.168.77.1:222, whose /etc/sysconfig, /etc/rc.d, /var/ipfire and
/opt/pakfire are each test's own files. Rules are read back with iptables inside `wgl-host`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.model.site import default_mac, load_site
from builder.render import ipfire
from tests.conftest import EXAMPLE, ROOT
from tests.lab import lab as L
from tests.lab.clients import PeerAddressServer, WgClient, tcp_source_seen
from tests.lab.internet import BLAN_HOST, BLAN_NS, BRANCH_NS, RW_NS, add_far_side, remove_far_side
from tests.lab.ipfire_standin import HostRoot, IpfireLab, ipfire_cli_argv

pytestmark = [pytest.mark.slow, pytest.mark.root]

APPLIANCE = "192.168.77.50"
FAKE_APP_NS = "wgl-ipf-app"  # a namespace standing in for the appliance VM
FAKE_RW_NS = "wgl-ipf-rw"  # a road warrior behind it, at its tunnel address
RW_ADDR = "10.77.0.2"

# What an admin's firewall.local in the lab may hold: rules into the shared chains and a
# stop branch that flushes them, as the IPFire wiki shows.
ADMIN_FIREWALL_LOCAL = """\
#!/bin/sh
# Used for private firewall rules

# See how we were called.
case "$1" in
  start)
        ## add your 'start' rules here
        /sbin/iptables -A CUSTOMINPUT -i green0 -p tcp --dport 8080 -j ACCEPT
        /sbin/iptables -t nat -A CUSTOMPREROUTING -i red0 -p tcp --dport 8443 \\
            -j DNAT --to-destination 192.168.77.20:443
        /sbin/iptables -A CUSTOMFORWARD -i red0 -p tcp -d 192.168.77.20 --dport 443 -j ACCEPT
        ;;
  stop)
        ## add your 'stop' rules here
        /sbin/iptables -F CUSTOMINPUT
        /sbin/iptables -F CUSTOMFORWARD
        /sbin/iptables -t nat -F CUSTOMPREROUTING
        ;;
  reload)
        $0 stop
        $0 start
        ## add your 'reload' rules here
        ;;
  *)
        echo "Usage: $0 {start|stop|reload}"
        ;;
esac
"""
ADMIN_ROUTING = "on,10.10.0.0/16,192.168.77.2,office VPN box\n"


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ipf(lab: L.Lab) -> Iterator[IpfireLab]:
    ipf = IpfireLab(lab)
    ipf.up()
    try:
        yield ipf
    finally:
        remove_fake_appliance(lab)
        ipf.down()


@pytest.fixture
def start_host(ipf: IpfireLab, tmp_path: Path) -> Iterator[Callable[..., HostRoot]]:
    """Start the IPFire stand-in for this test: its firewall, then its sshd."""
    procs = []

    def start(
        green_is_bridge: bool = True, prepare: Callable[[HostRoot], None] | None = None
    ) -> HostRoot:
        root = ipf.make_root(tmp_path / "ipfire")
        if prepare:
            prepare(root)
        ipf.firewall_start(root)
        procs.append(ipf.start_sshd(root, green_is_bridge=green_is_bridge))
        return root

    yield start
    for p in procs:
        ipf.stop_sshd(p)


@pytest.fixture
def host(start_host) -> HostRoot:
    return start_host()


def site_file(tmp_path: Path, subs: dict[str, str] | None = None) -> Path:
    """The example site in routed mode, dialled at the lab's RED address."""
    text = EXAMPLE.read_text().replace('"vpn.example.org:51820"', '"203.0.113.1:51820"')
    text = text.replace('mode = "masquerade"', 'mode = "routed"')
    for old, new in (subs or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def second_site_file(tmp_path: Path) -> Path:
    text = site_file(tmp_path).read_text()
    for old, new in (
        ('name = "wg-gw"', 'name = "wg-lab2"'),
        ("192.168.77.50/24", "192.168.77.51/24"),
        ("listen_port = 51820", "listen_port = 51821"),
        ("203.0.113.1:51820", "203.0.113.1:51821"),
        ("10.77.0.", "10.78.0."),
        ("fd77::", "fd78::"),
        ("192.168.88.0/24", "192.168.89.0/24"),
    ):
        text = text.replace(old, new)
    path = tmp_path / "second.toml"
    path.write_text(text)
    return path


def cli(lab: L.Lab, root: HostRoot, site: Path, *args: str) -> subprocess.CompletedProcess:
    """`wg-appliance ipfire` on the LAN host, as root@192.168.77.1:222 with the test's keys."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(root.home)
    return subprocess.run(
        ["ip", "netns", "exec", L.LAN_NS, *ipfire_cli_argv(), "--site", str(site), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ssh_args(*extra: str) -> list[str]:
    return ["--ssh", f"root@{L.HOST_GREEN.ip}:222", *extra]


def host_rules(lab: L.Lab) -> dict[str, list[str]]:
    """`iptables -S` per table inside the host namespace."""
    return {
        t: lab.exec(L.HOST_NS, ["iptables", "-w", "-t", t, "-S"]).stdout.splitlines()
        for t in ("filter", "nat", "mangle", "raw")
    }


def host_state(lab: L.Lab, root: HostRoot) -> dict:
    """Everything an apply may touch: the two files' bytes, the files beside them, the
    live rules of every table and table 200."""
    dirs = {ipfire.FIREWALL_LOCAL, ipfire.ROUTING}
    return {
        "files": {p: root.read_bytes(p) for p in dirs},
        "beside": {p: sorted(x.name for x in root.file(p).parent.iterdir()) for p in dirs},
        "rules": host_rules(lab),
        "table200": table200(lab),
    }


def table200(lab: L.Lab) -> list[str]:
    out = lab.exec(L.HOST_NS, ["ip", "route", "show", "table", "200"]).stdout
    return [line.strip() for line in out.splitlines()]


def rule_packets(lab: L.Lab, table: str, chain: str) -> list[int]:
    """Packet counters of a chain's rules, in order."""
    out = lab.exec(L.HOST_NS, ["iptables", "-w", "-t", table, "-L", chain, "-v", "-n", "-x"])
    return [int(line.split()[0]) for line in out.stdout.splitlines()[2:] if line.strip()]


def checks_of(stdout: str) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(stdout)["checks"]}


def add_fake_appliance(lab: L.Lab, mac: str) -> None:
    """A namespace at the appliance's LAN address on green0 that forwards to a 'road warrior'
    at 10.77.0.2 behind it: the routing of the real appliance without booting it."""
    remove_fake_appliance(lab)
    lab.add_namespace(FAKE_APP_NS)
    lab.add_veth(
        FAKE_APP_NS,
        "eth0",
        L.HOST_NS,
        "green-ipfapp",
        address=_if(f"{APPLIANCE}/24"),
        bridge=L.BRIDGE,
    )
    L.ip(FAKE_APP_NS, "link", "set", "eth0", "address", mac)
    lab.add_route(FAKE_APP_NS, "default", L.HOST_GREEN.ip)
    lab.sysctl(FAKE_APP_NS, "net.ipv4.ip_forward", "1")
    lab.add_namespace(FAKE_RW_NS)
    lab.add_veth(
        FAKE_RW_NS,
        "tun0",
        FAKE_APP_NS,
        "tun0",
        address=_if(f"{RW_ADDR}/24"),
        peer_address=_if("10.77.0.1/24"),
    )
    lab.add_route(FAKE_RW_NS, "default", "10.77.0.1")


def remove_fake_appliance(lab: L.Lab) -> None:
    for ns in (FAKE_RW_NS, FAKE_APP_NS):
        if ns in lab.namespaces():
            lab.remove_namespace(ns)


def _if(text: str):
    from ipaddress import IPv4Interface

    return IPv4Interface(text)


def tcp_seen(lab: L.Lab, server_ns: str, client_ns: str, address: str, port: int = 7781) -> str:
    """Connect from `client_ns` to a server in `server_ns`; the source address the server saw,
    or 'failed: ...'."""
    server = PeerAddressServer(lab, server_ns, port)
    server.start()
    try:
        return tcp_source_seen(lab, client_ns, address, port, timeout=4)
    finally:
        server.stop()


# --- preflight -------------------------------------------------------------------------


def test_preflight_ok_and_out_holds_the_hosts_files_merged(lab, host, tmp_path):
    host.write(ipfire.FIREWALL_LOCAL, ADMIN_FIREWALL_LOCAL, 0o755)
    host.write(ipfire.ROUTING, ADMIN_ROUTING, 0o644, owner=65534)
    site, out = site_file(tmp_path), tmp_path / "out"
    r = cli(lab, host, site, *ssh_args("--out", str(out)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all ok" in r.stdout and "FAIL" not in r.stdout
    s = load_site(site)
    assert (out / "firewall.local").read_text() == ipfire.merge_firewall_local(
        ADMIN_FIREWALL_LOCAL, s
    )
    assert (out / "routing").read_text() == ipfire.merge_routing(ADMIN_ROUTING, s)[0]
    assert f"scp -P 222 {out / 'firewall.local'} root@192.168.77.1:/etc/sysconfig" in r.stdout
    assert host.read(ipfire.FIREWALL_LOCAL) == ADMIN_FIREWALL_LOCAL, "--out changes nothing"


@pytest.mark.parametrize(
    "case",
    [
        "green-not-a-bridge",
        "ipfire-wireguard-same-port",
        "addons-missing",
        "lan-address-taken",
        "not-enough-memory",
        "red-down",
        "not-ipfire",
    ],
)
def test_preflight_failure_names_the_fix_and_changes_nothing(lab, start_host, tmp_path, case):
    site = site_file(tmp_path)
    expect: dict[str, str] = {}
    prepare = None
    bridge = True
    if case == "green-not-a-bridge":
        bridge = False
        expect["GREEN bridge"] = "set GREEN to bridge mode in the web UI"
    elif case == "ipfire-wireguard-same-port":

        def prepare(root):
            root.write("/var/ipfire/wireguard/settings", "ENABLED=on\nPORT=51820\n")

        expect["IPFire WireGuard"] = "another wireguard.endpoint port"
    elif case == "addons-missing":

        def prepare(root):
            root.remove("/opt/pakfire/db/installed/meta-libvirt")
            root.remove("/opt/pakfire/db/installed/meta-qemu")

        expect["libvirt add-on"] = "pakfire install libvirt qemu"
        expect["qemu add-on"] = "pakfire install libvirt qemu"
    elif case == "lan-address-taken":
        add_fake_appliance(lab, "02:00:00:00:00:99")
        expect["LAN address free"] = "pick a free lan.address"
    elif case == "not-enough-memory":
        site = site_file(tmp_path, {"memory_mib = 512": "memory_mib = 65536"})
        expect["free memory"] = "lower appliance.memory_mib"
    elif case == "red-down":

        def prepare(root):
            root.write(ipfire.RED_IFACE, "")

        expect["RED interface"] = "connect RED first"
    elif case == "not-ipfire":

        def prepare(root):
            root.remove("/etc/system-release")

        expect["IPFire version"] = "for IPFire 2.x hosts"
    try:
        root = start_host(green_is_bridge=bridge, prepare=prepare)
        before = host_rules(lab)
        r = cli(lab, root, site, *ssh_args("--apply", "--json"))
    finally:
        remove_fake_appliance(lab)
    assert r.returncode == 1, r.stdout + r.stderr
    checks = checks_of(r.stdout)
    failed = {n for n, c in checks.items() if not c["ok"]}
    assert failed == set(expect), checks
    for name, fix in expect.items():
        assert fix in checks[name]["fix"], checks[name]
    assert root.read(ipfire.FIREWALL_LOCAL) == ipfire.stock_firewall_local()
    assert host_rules(lab) == before


def test_preflight_knows_its_own_appliance_at_the_address(lab, host, tmp_path):
    try:
        add_fake_appliance(lab, default_mac("wg-gw"))
        r = cli(lab, host, site_file(tmp_path), *ssh_args("--json"))
    finally:
        remove_fake_appliance(lab)
    assert r.returncode == 0, r.stdout + r.stderr
    check = checks_of(r.stdout)["LAN address free"]
    assert check["ok"] and "this appliance's MAC" in check["detail"]


# --- host key ---------------------------------------------------------------------------


def test_host_key_is_checked_never_learned(lab, ipf, host, tmp_path):
    site = site_file(tmp_path)
    known = host.home / ".ssh/known_hosts"
    good = known.read_text()
    known.write_text("")
    r = cli(lab, host, site, *ssh_args())
    assert r.returncode == 3 and "unknown host key" in r.stderr, r.stderr
    assert known.read_text() == "", "the key must not be learned"
    fp = ipf.host_fingerprint(host)
    r = cli(lab, host, site, *ssh_args("--host-key", fp, "--json"))
    assert r.returncode == 0, r.stderr
    wrong = "SHA256:" + "A" * 43
    r = cli(lab, host, site, *ssh_args("--host-key", wrong))
    assert r.returncode == 3 and "host key mismatch" in r.stderr and fp in r.stderr
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    known.write_text(f"{good.split()[0]} {other}\n")
    r = cli(lab, host, site, *ssh_args())
    assert r.returncode == 3 and "host key mismatch" in r.stderr
    assert r.stderr.count("\n") == 1


# --- apply ------------------------------------------------------------------------------


def test_apply_installs_live_rules_and_routes_and_is_idempotent(lab, host, tmp_path):
    site = site_file(tmp_path)
    r = cli(lab, host, site, *ssh_args("--apply"))
    assert r.returncode == 0, r.stdout + r.stderr
    rules = host_rules(lab)
    assert "-A CUSTOMFORWARD -j WGA_WG_GW_FWD" in rules["filter"]
    assert (
        "-A WGA_WG_GW_NAT -i red0 -p udp -m udp --dport 51820 "
        "-j DNAT --to-destination 192.168.77.50:51820"
    ) in rules["nat"]
    assert "-A CUSTOMPREROUTING -j WGA_WG_GW_NAT" in rules["nat"]
    assert rules["raw"].index("-A PREROUTING -j WGA_WG_GW_RAW") < rules["raw"].index(
        "-A PREROUTING -j CONNTRACK"
    )
    assert (
        "-A WGA_WG_GW_RAW -s 192.168.77.0/24 -d 10.77.0.0/24 -i green0 -j CT --notrack"
        in rules["raw"]
    )
    assert (
        "-A WGA_WG_GW_FWD -s 192.168.77.0/24 -d 192.168.88.0/24 -i green0 -o green0 -j ACCEPT"
        in rules["filter"]
    )
    routes = table200(lab)
    assert any(r.startswith("10.77.0.0/24 via 192.168.77.50 dev green0") for r in routes)
    assert any(r.startswith("192.168.88.0/24 via 192.168.77.50 dev green0") for r in routes)
    assert "lookup 200" in lab.exec(L.HOST_NS, ["ip", "rule"]).stdout
    routing = host.file(ipfire.ROUTING)
    assert routing.stat().st_uid == 65534 and routing.stat().st_gid == 65534
    assert routing.read_text().count("wg-appliance wg-gw") == 2
    backups = sorted(p.name for p in host.file("/etc/sysconfig").iterdir())
    assert len(backups) == 2 and backups[0] == "firewall.local", backups

    files = {p: host.file(p).read_bytes() for p in (ipfire.FIREWALL_LOCAL, ipfire.ROUTING)}
    # Again, as the site's [host] names the host: no --ssh, the pin and key from the file.
    (tmp_path / "remote").mkdir()
    pinned = IpfireLab.sshd(host)
    remote = site_file(
        tmp_path / "remote",
        {
            'uri = "qemu:///system"': f'uri = "qemu+ssh://root@{L.HOST_GREEN.ip}:222/system"\n'
            f'host_key = "{pinned.fingerprint()}"\nssh_key = "{pinned.identity}"'
        },
    )
    pinned.known_hosts.write_text("")  # the file's pin is what counts, not known_hosts
    r = cli(lab, host, remote, "--apply", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    applied = json.loads(r.stdout)["applied"]
    assert not applied["firewall_local_changed"] and not applied["routing_changed"]
    assert applied["backups"] == []
    assert {p: host.file(p).read_bytes() for p in files} == files
    assert host_rules(lab) == rules, "a second apply adds or loses no rule"
    assert table200(lab) == routes


# A stand-in for IPFire's static-routes that fails once the routing file holds a line of
# the appliance's, as `ip route add` does for a gateway it cannot reach.
STATIC_ROUTES_FAILING = """#!/bin/sh
if grep -q wg-appliance /var/ipfire/main/routing; then
	echo "RTNETLINK answers: No route to host" >&2
	exit 2
fi
exec /bin/sh /etc/rc.d/init.d/static-routes.lab "$@"
"""


def _static_routes_fail(root: HostRoot) -> None:
    real = root.file(ipfire.STATIC_ROUTES)
    real.rename(real.with_name("static-routes.lab"))
    root.write(ipfire.STATIC_ROUTES, STATIC_ROUTES_FAILING, 0o755)


@pytest.mark.parametrize("failure", ["routing-immutable", "static-routes-fails"])
def test_apply_whose_routing_step_fails_leaves_the_host_as_it_was(
    lab, ipf, start_host, tmp_path, failure
):
    """The new firewall.local was installed and the old hooks stopped when the routing step
    fails: the same script puts back the old files and starts the old rules."""

    def prepare(root: HostRoot) -> None:
        root.write(ipfire.FIREWALL_LOCAL, ADMIN_FIREWALL_LOCAL, 0o755)
        root.write(ipfire.ROUTING, ADMIN_ROUTING, 0o644, owner=65534)
        if failure == "static-routes-fails":
            _static_routes_fail(root)

    root = start_host(prepare=prepare)
    ipf.host_shell(root, "/etc/rc.d/init.d/static-routes start")
    routing = root.file(ipfire.ROUTING)
    before = host_state(lab, root)
    assert before["table200"] and any("CUSTOMINPUT" in r for r in before["rules"]["filter"])
    if failure == "routing-immutable":
        subprocess.run(["chattr", "+i", str(routing)], check=True)
    try:
        r = cli(lab, root, site_file(tmp_path), *ssh_args("--apply"))
    finally:
        subprocess.run(["chattr", "-i", str(routing)], check=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "restored the previous files and rules" in r.stderr, r.stderr
    what = (
        "installing /var/ipfire/main/routing"
        if failure == "routing-immutable"
        else ("static-routes start exited 2")
    )
    assert what in r.stderr, r.stderr
    assert host_state(lab, root) == before


def test_non_utf8_firewall_local_applies_cleanly(lab, ipf, host, tmp_path):
    latin1 = ADMIN_FIREWALL_LOCAL.encode().replace(
        b"# Used for private firewall rules", b"# Regeln f\xfcr M\xfcller \xa7 3"
    )
    host.write(ipfire.FIREWALL_LOCAL, latin1, 0o755)
    ipf.firewall_start(host)
    site = site_file(tmp_path)
    r = cli(lab, host, site, *ssh_args("--apply"))
    assert r.returncode == 0, r.stdout + r.stderr
    applied = host.read_bytes(ipfire.FIREWALL_LOCAL)
    merged = ipfire.merge_firewall_local(ipfire.host_text(latin1), load_site(site))
    assert applied == ipfire.host_bytes(merged)
    assert applied.startswith(b"#!/bin/sh\n# Regeln f\xfcr M\xfcller \xa7 3\n")
    assert "-A CUSTOMFORWARD -j WGA_WG_GW_FWD" in host_rules(lab)["filter"]
    r = cli(lab, host, site, *ssh_args("--apply", "--json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not json.loads(r.stdout)["applied"]["firewall_local_changed"]
    r = cli(lab, host, site, *ssh_args("--apply", "--remove"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert host.read_bytes(ipfire.FIREWALL_LOCAL) == latin1


def test_admin_rules_survive_ipfire_reload_and_removal_is_exact(lab, ipf, host, tmp_path):
    host.write(ipfire.FIREWALL_LOCAL, ADMIN_FIREWALL_LOCAL, 0o755)
    host.write(ipfire.ROUTING, ADMIN_ROUTING, 0o644, owner=65534)
    ipf.firewall_start(host)
    admin_rules = host_rules(lab)
    site = site_file(tmp_path)
    assert cli(lab, host, site, *ssh_args("--apply")).returncode == 0
    applied_rules = host_rules(lab)
    for table, lines in admin_rules.items():
        assert set(lines) <= set(applied_rules[table]), table

    # IPFire rebuilds its firewall (boot, web UI change): everything flushed, then
    # firewall.local reload. The block comes back exactly once.
    ipf.firewall_start(host)
    assert host_rules(lab) == applied_rules

    r = cli(lab, host, site, *ssh_args("--apply", "--remove"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert host.read(ipfire.FIREWALL_LOCAL) == ADMIN_FIREWALL_LOCAL
    assert host.read(ipfire.ROUTING) == ADMIN_ROUTING
    assert host_rules(lab) == admin_rules
    assert table200(lab) == ["10.10.0.0/16 via 192.168.77.2 dev green0 proto static"], (
        "the admin's route stays, ours go"
    )


def test_two_appliances_live_side_by_side(lab, host, tmp_path):
    one, two = site_file(tmp_path), second_site_file(tmp_path)
    assert cli(lab, host, one, *ssh_args("--apply")).returncode == 0
    only_one = host_rules(lab)
    r = cli(lab, host, two, *ssh_args("--apply"))
    assert r.returncode == 0, r.stdout + r.stderr
    rules = host_rules(lab)
    assert "-A CUSTOMFORWARD -j WGA_WG_GW_FWD" in rules["filter"]
    assert "-A CUSTOMFORWARD -j WGA_WG_LAB2_FWD" in rules["filter"]
    assert any(
        "--dport 51821 -j DNAT --to-destination 192.168.77.51:51821" in x for x in rules["nat"]
    )
    assert len(table200(lab)) == 4
    assert cli(lab, host, two, *ssh_args("--apply", "--remove")).returncode == 0
    assert host_rules(lab) == only_one
    assert len(table200(lab)) == 2


# --- routed mode: the asymmetric path, proven with a stand-in appliance ------------------


def _lan_routes_via_ipfire(lab: L.Lab) -> None:
    """The LAN host knows no route to the tunnel: it goes to its default gateway, IPFire."""
    for net in ("10.77.0.0/24", "192.168.88.0/24"):
        lab.exec(L.LAN_NS, ["ip", "route", "del", net], check=False)
    lab.exec(L.LAN_NS, ["ip", "route", "flush", "cache"])
    got = lab.exec(L.LAN_NS, ["ip", "route", "get", RW_ADDR]).stdout
    assert f"via {L.HOST_GREEN.ip}" in got, got


@pytest.mark.parametrize("tcp_loose", ["0", "1"])
def test_routed_mode_tcp_both_ways_through_ipfire(lab, ipf, host, tmp_path, tcp_loose):
    """Before: the static route alone (IPFire's forward policy drops GREEN to GREEN). After the
    block: TCP works both ways, and the LAN host sees the tunnel address."""
    lab.sysctl(L.HOST_NS, "net.netfilter.nf_conntrack_tcp_loose", tcp_loose)
    try:
        add_fake_appliance(lab, default_mac("wg-gw"))
        _lan_routes_via_ipfire(lab)
        host.write(ipfire.ROUTING, f"on,10.77.0.0/24,{APPLIANCE},by hand\n", owner=65534)
        ipf.host_shell(host, f"{ipfire.STATIC_ROUTES} start")
        assert tcp_seen(lab, L.LAN_NS, FAKE_RW_NS, str(L.LAN_GREEN.ip)).startswith("failed")
        assert tcp_seen(lab, FAKE_RW_NS, L.LAN_NS, RW_ADDR).startswith("failed")

        host.write(ipfire.ROUTING, "", owner=65534)
        r = cli(lab, host, site_file(tmp_path), *ssh_args("--apply"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert tcp_seen(lab, L.LAN_NS, FAKE_RW_NS, str(L.LAN_GREEN.ip)) == RW_ADDR
        assert tcp_seen(lab, FAKE_RW_NS, L.LAN_NS, RW_ADDR) == str(L.LAN_GREEN.ip)
    finally:
        lab.sysctl(L.HOST_NS, "net.netfilter.nf_conntrack_tcp_loose", "0")
        remove_fake_appliance(lab)


def test_a_plain_forward_accept_is_not_enough_with_loose_pickup(lab, ipf, start_host, tmp_path):
    """Why NOTRACK: an accept in CUSTOMFORWARD alone lets the half-seen flow through only
    while conntrack calls its packets INVALID (tcp_loose=0); with pickup on, the reply half
    is NEW without SYN and BADTCP drops it before CUSTOMFORWARD is reached."""
    naive = ADMIN_FIREWALL_LOCAL.replace(
        "## add your 'start' rules here",
        "## add your 'start' rules here\n"
        "        /sbin/iptables -A CUSTOMFORWARD -i green0 -o green0 -j ACCEPT",
    )

    def prepare(root):
        root.write(ipfire.FIREWALL_LOCAL, naive, 0o755)
        root.write(ipfire.ROUTING, f"on,10.77.0.0/24,{APPLIANCE},by hand\n", owner=65534)

    root = start_host(prepare=prepare)
    ipf.host_shell(root, f"{ipfire.STATIC_ROUTES} start")
    seen = {}
    try:
        add_fake_appliance(lab, default_mac("wg-gw"))
        _lan_routes_via_ipfire(lab)
        for loose in ("0", "1"):
            lab.sysctl(L.HOST_NS, "net.netfilter.nf_conntrack_tcp_loose", loose)
            lab.exec(L.HOST_NS, ["conntrack", "-F"], check=False)
            seen[loose] = tcp_seen(lab, L.LAN_NS, FAKE_RW_NS, str(L.LAN_GREEN.ip))
    finally:
        lab.sysctl(L.HOST_NS, "net.netfilter.nf_conntrack_tcp_loose", "0")
        remove_fake_appliance(lab)
    assert seen["0"] == RW_ADDR, seen
    assert seen["1"].startswith("failed"), seen


# --- end to end: a real appliance VM, a real WireGuard road warrior ----------------------


def builder_cli(lab: L.Lab, ns: str, *args: str, timeout: float = 900):
    return lab.exec(ns, [sys.executable, "-m", "builder", *args], check=False, timeout=timeout)


def eventually_seen(lab: L.Lab, server_ns: str, client_ns: str, address: str) -> str:
    """tcp_seen, retried while the first WireGuard handshake settles."""
    deadline = time.monotonic() + 60
    while True:
        seen = tcp_seen(lab, server_ns, client_ns, address)
        if not seen.startswith("failed") or time.monotonic() > deadline:
            return seen
        time.sleep(2)


@pytest.mark.vm
@pytest.mark.parametrize("mode", ["routed", "masquerade"])
def test_road_warrior_and_branch_through_applied_rules(
    lab, ipf, start_host, tmp_path, appliance_image, mode
):
    """All real: the appliance VM on green0, the host side applied by the tool over SSH,
    wireguard-go clients beyond RED (a road warrior, and a branch gateway with its LAN behind
    it). The LAN host only knows its default gateway, IPFire. Routed: it sees tunnel and
    branch addresses, both ways, through the tool's routes and NOTRACK rules. Masquerade: it
    sees the appliance's address, and only the port forward is on the host."""
    site = site_file(tmp_path, {'name = "wg-gw"': 'name = "wg-ipf"'})
    if mode == "masquerade":
        site.write_text(site.read_text().replace('mode = "routed"', 'mode = "masquerade"'))
    host = start_host()
    _lan_routes_via_ipfire(lab)
    add_far_side(lab)
    clients = [WgClient(lab, RW_NS, "wgipf-rw0"), WgClient(lab, BRANCH_NS, "wgipf-br0")]
    try:
        r = builder_cli(
            lab,
            L.LAN_NS,
            "deploy",
            "--site",
            str(site),
            "--image",
            str(appliance_image.path),
            "--timeout",
            "600",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        r = cli(lab, host, site, *ssh_args("--apply"))
        assert r.returncode == 0, r.stdout + r.stderr
        for client, peer in zip(clients, ("laptop", "branch"), strict=True):
            conf = builder_cli(lab, L.LAN_NS, "peer-config", "--site", str(site), peer).stdout
            assert "Endpoint = 203.0.113.1:51820" in conf
            client.up(conf)
        lan_host = str(L.LAN_GREEN.ip)
        if mode == "routed":
            assert eventually_seen(lab, L.LAN_NS, RW_NS, lan_host) == RW_ADDR
            assert eventually_seen(lab, RW_NS, L.LAN_NS, RW_ADDR) == lan_host
            assert eventually_seen(lab, L.LAN_NS, BLAN_NS, lan_host) == BLAN_HOST
            assert eventually_seen(lab, BLAN_NS, L.LAN_NS, BLAN_HOST) == lan_host
            # The packets took the tool's rules: the port forward and the untracked LAN half.
            assert rule_packets(lab, "raw", "WGA_WG_IPF_RAW")[0] > 0
            assert rule_packets(lab, "filter", "WGA_WG_IPF_FWD")[1] > 0
            assert any("192.168.88.0/24" in line for line in table200(lab))
        else:
            assert eventually_seen(lab, L.LAN_NS, RW_NS, lan_host) == APPLIANCE
            assert eventually_seen(lab, L.LAN_NS, BLAN_NS, lan_host) == APPLIANCE
        assert rule_packets(lab, "nat", "WGA_WG_IPF_NAT")[0] > 0
        v = builder_cli(
            lab, L.LAN_NS, "verify", "--site", str(site), "--require-handshake", "laptop", "branch"
        )
        assert v.returncode == 0, v.stdout
    finally:
        for client in clients:
            client.down()
        remove_far_side(lab)
        cli(lab, host, site, *ssh_args("--remove"))
        builder_cli(lab, L.LAN_NS, "destroy", "--site", str(site))
