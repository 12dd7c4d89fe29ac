"""The far side of RED: an 'internet' router namespace with a road warrior and a branch
office (gateway plus a branch LAN host) behind it. The RED link itself (host red0 to
`wgl-inet`) is made by whoever plays the host's firewall: the plain DNAT of test_e2e, or
the IPFire stand-in in tests/lab/ipfire_standin.py."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv6Interface

from tests.lab.lab import GREEN_NET6, HOST_NS, INET_NS, STATE_DIR, Lab

RW_NS, BRANCH_NS, BLAN_NS = "wgl-rw", "wgl-branch", "wgl-blan"
BLAN_HOST = "192.168.88.10"
# The internet is dual-stack too (documentation prefixes): RED, the far side, a branch LAN.
HOST_RED6 = "2001:db8:113::1"
INET_RED6 = "2001:db8:113::2"
INET_HOST6 = "2001:db8:100::1"
RW_ADDR6 = "2001:db8:100::10"
BLAN_NET6 = "fd88::/64"
BLAN_HOST6 = "fd88::10"
FAR_NAMESPACES = (BLAN_NS, BRANCH_NS, RW_NS)
PLAIN_RED_UP = STATE_DIR / "e2e-internet"
# The example site's LAN IPv6 address: RED's IPv6 port forward goes there.
APPLIANCE6 = "fd77:77::50"


def add_far_side(lab: Lab) -> None:
    """Road warrior 198.51.100.10 and branch gateway 198.51.100.20 on the internet bridge;
    the branch LAN 192.168.88.0/24 behind the gateway. `wgl-inet` must exist."""
    lab.sysctl(INET_NS, "net.ipv4.ip_forward", "1")
    lab.sysctl(INET_NS, "net.ipv6.conf.all.forwarding", "1")
    lab.add_bridge(INET_NS, "inet0", IPv4Interface("198.51.100.1/24"))
    lab.add_address(INET_NS, "inet0", IPv6Interface(f"{INET_HOST6}/64"))
    far = (
        (RW_NS, "198.51.100.10/24", RW_ADDR6),
        (BRANCH_NS, "198.51.100.20/24", "2001:db8:100::20"),
    )
    for ns, addr, addr6 in far:
        add_internet_host(lab, ns, IPv4Interface(addr), IPv6Interface(f"{addr6}/64"))
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        lab.sysctl(BRANCH_NS, key, "1")
    lab.add_namespace(BLAN_NS)
    lab.add_veth(
        BLAN_NS,
        "eth0",
        BRANCH_NS,
        "blan0",
        address=IPv4Interface(f"{BLAN_HOST}/24"),
        peer_address=IPv4Interface("192.168.88.1/24"),
    )
    lab.add_address(BLAN_NS, "eth0", IPv6Interface(f"{BLAN_HOST6}/64"))
    lab.add_address(BRANCH_NS, "blan0", IPv6Interface("fd88::1/64"))
    lab.add_route(BLAN_NS, "default", "192.168.88.1")
    lab.add_route(BLAN_NS, "default", "fd88::1")


def add_internet_host(lab: Lab, ns: str, addr: IPv4Interface, addr6: IPv6Interface) -> None:
    """A namespace on the internet bridge, dual-stack, its defaults via the internet router."""
    lab.add_namespace(ns)
    lab.add_veth(ns, "eth0", INET_NS, f"i-{ns[4:]}", address=addr, bridge="inet0")
    lab.add_address(ns, "eth0", addr6)
    lab.add_route(ns, "default", "198.51.100.1")
    lab.add_route(ns, "default", INET_HOST6)


def remove_far_side(lab: Lab) -> None:
    for ns in FAR_NAMESPACES:
        lab.remove_namespace(ns)
    lab.exec(INET_NS, ["ip", "link", "del", "inet0"], check=False)


def plain_red(lab: Lab, appliance: str) -> None:
    """RED side: the host's red0 to an 'internet' router with a road warrior and a branch
    office behind it. The host DNATs the listen port to the appliance, as IPFire's
    firewall.local block does (tests/test_ipfire_lab.py runs the same through the tool's)."""
    if PLAIN_RED_UP.exists():
        return
    lab.add_namespace(INET_NS)
    lab.add_veth(
        HOST_NS,
        "red0",
        INET_NS,
        "eth0",
        address=IPv4Interface("203.0.113.1/24"),
        peer_address=IPv4Interface("203.0.113.2/24"),
    )
    lab.add_route(HOST_NS, "default", "203.0.113.2")
    lab.add_address(HOST_NS, "red0", IPv6Interface(f"{HOST_RED6}/64"))
    lab.add_address(INET_NS, "eth0", IPv6Interface(f"{INET_RED6}/64"))
    lab.add_route(HOST_NS, "default", INET_RED6)
    # GREEN's IPv6 is routed, not translated: the internet knows its way back to it.
    lab.add_route(INET_NS, str(GREEN_NET6), HOST_RED6)
    add_far_side(lab)
    lab.exec(
        HOST_NS,
        ["ip6tables", "-t", "nat", "-A", "PREROUTING", "-i", "red0", "-p", "udp"]
        + ["--dport", "51820", "-j", "DNAT", "--to-destination", f"[{APPLIANCE6}]:51820"],
    )
    lab.exec(
        HOST_NS,
        [
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            "red0",
            "-p",
            "udp",
            "--dport",
            "51820",
            "-j",
            "DNAT",
            "--to-destination",
            appliance,
        ],
    )
    PLAIN_RED_UP.touch()
