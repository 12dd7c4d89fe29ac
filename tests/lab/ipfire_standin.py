"""The lab's host namespace made to look like IPFire to `wg-appliance ipfire`.

Takes a running `Lab` and adds, inside `wgl-host`:
- IPFire's netfilter layout (a stand-in for /etc/rc.d/init.d/firewall: BADTCP, CUSTOM*,
  CONNTRACK, policy chains, raw CONNTRACK), with the forward policy "blocked" so only
  GREEN-to-RED and what firewall.local accepts passes; rp_filter=1 and
  nf_conntrack_tcp_loose=0 (both per network namespace);
- br_netfilter off in that namespace (as on IPFire; this kernel turns it on everywhere);
- a RED veth `red0` 203.0.113.1/24 to `wgl-inet` (203.0.113.2/24), the default route;
- per test, an sshd on port 222 in a private mount namespace whose /etc, /var and /opt
  are overlays with a per-test upper dir, so /etc/sysconfig, /etc/rc.d, /var/ipfire and
  /opt/pakfire are the test's own files and nothing lands on the machine.

iptables is Debian 12's default, iptables-nft: the firewall.local block only uses the
iptables command line, which IPFire's legacy iptables understands the same way.
Traffic stays between lab namespaces. down() restores what up() changed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

from tests.lab.host_sshd import HostSshd
from tests.lab.lab import (
    BRIDGE,
    HOST_NS,
    INET_NS,
    LAN_NS,
    Lab,
    _stop_pid,
)

RED = "red0"
HOST_RED = IPv4Interface("203.0.113.1/24")
INET_RED = IPv4Interface("203.0.113.2/24")
RELEASE = "IPFire 2.29 (x86_64) - core195"
OVERLAID = ("etc", "var", "opt")

# Stand-in for IPFire's /etc/rc.d/init.d/firewall `start` (iptables_init, then
# firewall-policy, then what rules.pl does last: firewall.local reload). Same chain names
# and order as IPFire for everything a forwarded or input packet meets.
FIREWALL_INIT = r"""#!/bin/sh
# Lab stand-in for IPFire's /etc/rc.d/init.d/firewall (chain layout of iptables_init).
ipt() { iptables -w "$@"; }
GREEN_DEV=green0
RED_DEV=$(cat /var/ipfire/red/iface 2>/dev/null)

init() {
	for t in filter nat mangle raw; do ipt -t $t -F; ipt -t $t -X; done
	ipt -P INPUT DROP
	ipt -P FORWARD DROP
	ipt -P OUTPUT ACCEPT
	ipt -N PSCAN
	ipt -A PSCAN -j DROP -m comment --comment "DROP_PScan"
	ipt -N NEWNOTSYN
	ipt -A NEWNOTSYN -j DROP -m comment --comment "DROP_NEWNOTSYN"
	ipt -N BADTCP
	ipt -A BADTCP -i lo -j RETURN
	ipt -A BADTCP -p tcp --tcp-flags ALL FIN,URG,PSH -j PSCAN
	ipt -A BADTCP -p tcp --tcp-flags ALL SYN,RST,ACK,FIN,URG -j PSCAN
	ipt -A BADTCP -p tcp --tcp-flags ALL ALL -j PSCAN
	ipt -A BADTCP -p tcp --tcp-flags ALL FIN -j PSCAN
	ipt -A BADTCP -p tcp --tcp-flags SYN,RST SYN,RST -j PSCAN
	ipt -A BADTCP -p tcp --tcp-flags SYN,FIN SYN,FIN -j PSCAN
	ipt -A BADTCP -p tcp --tcp-flags ALL NONE -j PSCAN
	ipt -A BADTCP -p tcp ! --syn -m conntrack --ctstate NEW -j NEWNOTSYN
	ipt -A INPUT -p tcp -j BADTCP
	ipt -A FORWARD -p tcp -j BADTCP
	ipt -N CONNTRACK
	ipt -A CONNTRACK -m conntrack --ctstate ESTABLISHED -j ACCEPT
	ipt -A CONNTRACK -m conntrack --ctstate INVALID -j DROP
	ipt -A CONNTRACK -p icmp -m conntrack --ctstate RELATED -j ACCEPT
	ipt -t raw -N CONNTRACK
	ipt -t raw -A PREROUTING -j CONNTRACK
	ipt -A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
	ipt -N CUSTOMINPUT
	ipt -A INPUT -j CUSTOMINPUT
	ipt -N CUSTOMFORWARD
	ipt -A FORWARD -j CUSTOMFORWARD
	ipt -N CUSTOMOUTPUT
	ipt -A OUTPUT -j CUSTOMOUTPUT
	ipt -t nat -N CUSTOMPREROUTING
	ipt -t nat -A PREROUTING -j CUSTOMPREROUTING
	ipt -t nat -N CUSTOMPOSTROUTING
	ipt -t nat -A POSTROUTING -j CUSTOMPOSTROUTING
	ipt -N ICMPINPUT
	ipt -A INPUT -j ICMPINPUT
	ipt -A ICMPINPUT -p icmp --icmp-type 8 -j ACCEPT
	ipt -N LOOPBACK
	ipt -A LOOPBACK -i lo -j ACCEPT
	ipt -A LOOPBACK -o lo -j ACCEPT
	ipt -A LOOPBACK -s 127.0.0.0/8 -j DROP
	ipt -A LOOPBACK -d 127.0.0.0/8 -j DROP
	for c in INPUT FORWARD OUTPUT; do ipt -A $c -j LOOPBACK; done
	for c in INPUT FORWARD OUTPUT; do ipt -A $c -j CONNTRACK; done
	ipt -N GUIINPUT
	ipt -A INPUT -j GUIINPUT
	ipt -A GUIINPUT -i $GREEN_DEV -p tcp --dport 444 -j ACCEPT
	ipt -N INPUTFW
	ipt -A INPUT -j INPUTFW
	ipt -N OUTGOINGFW
	ipt -A OUTPUT -j OUTGOINGFW
	ipt -N FORWARDFW
	ipt -A FORWARD -j FORWARDFW
	ipt -t nat -N NAT_DESTINATION
	ipt -t nat -A PREROUTING -j NAT_DESTINATION
	ipt -N REDINPUT
	ipt -A INPUT -j REDINPUT
	ipt -N REDFORWARD
	ipt -A FORWARD -j REDFORWARD
	ipt -t nat -N REDNAT
	ipt -t nat -A POSTROUTING -j REDNAT
	[ -n "$RED_DEV" ] && ipt -t nat -A REDNAT -o "$RED_DEV" -j MASQUERADE
	ipt -N POLICYIN
	ipt -A INPUT -j POLICYIN
	ipt -N POLICYFWD
	ipt -A FORWARD -j POLICYFWD
	ipt -N POLICYOUT
	ipt -A OUTPUT -j POLICYOUT
	# rules.pl from the web UI's rules: SSH access on GREEN, GREEN may go out to RED.
	ipt -A INPUTFW -i $GREEN_DEV -p tcp --dport 222 -j ACCEPT
	[ -n "$RED_DEV" ] && ipt -A FORWARDFW -i $GREEN_DEV -o "$RED_DEV" -j ACCEPT
	# firewall-policy with the forward policy "blocked" (MODE1).
	ipt -A POLICYIN -j DROP -m comment --comment "DROP_INPUT"
	ipt -A POLICYFWD -j DROP -m comment --comment "DROP_FORWARD"
	ipt -A POLICYOUT -j ACCEPT
}

case "$1" in
start|restart)
	init
	[ -x /etc/sysconfig/firewall.local ] && /etc/sysconfig/firewall.local reload
	exit 0
	;;
*)
	echo "Usage: $0 {start|restart}"
	exit 1
	;;
esac
"""

# Stand-in for IPFire's /etc/rc.d/init.d/static-routes: same file, same parsing, same table
# (200, named "static" in IPFire's rt_tables) and the same catch-all ip rule.
STATIC_ROUTES = r"""#!/bin/sh
# Lab stand-in for IPFire's /etc/rc.d/init.d/static-routes.
CONFIGFILE=/var/ipfire/main/routing

init_table() {
	ip rule | grep -q "lookup 200" || ip rule add table 200
}

create_all_routes() {
	ip route flush table 200 >/dev/null 2>&1
	while IFS=, read -r status network gateway remark; do
		[ "$status" = on ] || continue
		if [ -z "$network" ] || [ -z "$gateway" ]; then continue; fi
		ip route add "$network" via "$gateway" table 200 proto static
	done < "$1"
	return 0
}

case "$1" in
start|reload) init_table; create_all_routes "$CONFIGFILE" ;;
stop) ip route flush table 200 >/dev/null 2>&1; exit 0 ;;
*) echo "Usage: $0 {start|stop|reload}"; exit 1 ;;
esac
"""


@dataclass
class HostRoot:
    """One test's view of the IPFire host: `upper/etc`, `upper/var`, `upper/opt` lie over
    the machine's own, `home` is the admin's workstation home (keys, known_hosts)."""

    path: Path

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def home(self) -> Path:
        return self.path / "home"

    def file(self, host_path: str) -> Path:
        """Where the host's `host_path` lives in this root (it may not exist yet)."""
        return self.upper / host_path.lstrip("/")

    def write(self, host_path: str, data: str | bytes, mode: int = 0o644, owner: int = 0) -> Path:
        p = self.file(host_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        p.chmod(mode)
        shutil.chown(p, owner, owner)
        return p

    def read(self, host_path: str) -> str:
        return self.file(host_path).read_text()

    def read_bytes(self, host_path: str) -> bytes:
        return self.file(host_path).read_bytes()

    def remove(self, host_path: str) -> None:
        self.file(host_path).unlink()


class IpfireLab:
    """IPFire's firewall, RED and sshd in the lab's host namespace."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._saved_sysctls: list[tuple[str, str, str]] = []
        self._made_inet = False
        self._made_run_sshd = False

    # --- session parts ---------------------------------------------------------------

    def up(self) -> None:
        try:
            if INET_NS not in self.lab.namespaces():
                self.lab.add_namespace(INET_NS)
                self.lab.add_veth(
                    HOST_NS, RED, INET_NS, "eth0", address=HOST_RED, peer_address=INET_RED
                )
                self._made_inet = True
            self.lab.add_route(HOST_NS, "default", INET_RED.ip)
            for ns, key, value in (
                (HOST_NS, "net.ipv4.conf.all.rp_filter", "1"),
                (HOST_NS, "net.ipv4.conf.default.rp_filter", "1"),
                (HOST_NS, f"net.ipv4.conf.{BRIDGE}.rp_filter", "1"),
                (HOST_NS, "net.netfilter.nf_conntrack_tcp_loose", "0"),
                # This kernel has br_netfilter built in and on in every new namespace, so
                # frames bridged between two GREEN ports would meet iptables; IPFire has it
                # off, and GREEN-to-GREEN neighbours talk without the firewall.
                (HOST_NS, "net.bridge.bridge-nf-call-iptables", "0"),
                # LAN hosts that ignore ICMP redirects: the worst case for routed mode.
                (LAN_NS, "net.ipv4.conf.all.accept_redirects", "0"),
                (LAN_NS, "net.ipv4.conf.eth0.accept_redirects", "0"),
            ):
                self._set_sysctl(ns, key, value)
            if not Path("/run/sshd").is_dir():
                Path("/run/sshd").mkdir(mode=0o755)
                self._made_run_sshd = True
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Empty, accepting netfilter tables, no table 200, sysctls as they were."""
        self.reset_netfilter()
        for ns, key, value in reversed(self._saved_sysctls):
            self.lab.exec(ns, ["sysctl", "-q", "-w", f"{key}={value}"], check=False)
        self._saved_sysctls.clear()
        if self._made_inet:
            self.lab.remove_namespace(INET_NS)
            self._made_inet = False
        if self._made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
            self._made_run_sshd = False

    def reset_netfilter(self) -> None:
        script = (
            "for t in filter nat mangle raw; do iptables -w -t $t -F; iptables -w -t $t -X; done;"
            " for c in INPUT FORWARD OUTPUT; do iptables -w -P $c ACCEPT; done;"
            " while ip rule del table 200 2>/dev/null; do :; done;"
            " ip route flush table 200 2>/dev/null; true"
        )
        self.lab.exec(HOST_NS, ["sh", "-c", script], check=False)

    def _set_sysctl(self, ns: str, key: str, value: str) -> None:
        old = self.lab.exec(ns, ["sysctl", "-n", key]).stdout.strip()
        self._saved_sysctls.append((ns, key, old))
        self.lab.sysctl(ns, key, value)

    # --- per test ----------------------------------------------------------------------

    def make_root(self, path: Path) -> HostRoot:
        """A fresh IPFire: stock files, add-ons installed, WireGuard off, RED up."""
        from builder.render import ipfire

        root = HostRoot(path)
        for d in OVERLAID:
            (root.upper / d).mkdir(parents=True, exist_ok=True)
            (path / "work" / d).mkdir(parents=True, exist_ok=True)
        root.write("/etc/system-release", RELEASE + "\n")
        group = Path("/etc/group").read_text()
        if not any(line.startswith("nobody:") for line in group.splitlines()):
            group += "nobody:x:65534:\n"  # IPFire has a nobody group; Debian calls it nogroup
        root.write("/etc/group", group)
        root.write(ipfire.FIREWALL_LOCAL, ipfire.stock_firewall_local(), 0o755)
        root.write("/etc/rc.d/init.d/firewall", FIREWALL_INIT, 0o755)
        root.write(ipfire.STATIC_ROUTES, STATIC_ROUTES, 0o755)
        root.write(ipfire.ROUTING, ipfire.stock_routing(), 0o644, owner=65534)
        root.write(ipfire.RED_IFACE, RED + "\n")
        root.write("/var/ipfire/wireguard/settings", "ENABLED=off\nPORT=51820\n")
        root.write("/var/ipfire/wireguard/peers", "")
        for pak in ("libvirt", "qemu"):
            root.write(f"/opt/pakfire/db/installed/meta-{pak}", f"Name: {pak}\n")
        self._make_keys(root)
        return root

    @staticmethod
    def sshd(root: HostRoot) -> HostSshd:
        return HostSshd(root.path / "ssh", root.home)

    def _make_keys(self, root: HostRoot) -> None:
        self.sshd(root).make()

    def host_fingerprint(self, root: HostRoot) -> str:
        return self.sshd(root).fingerprint()

    def start_sshd(self, root: HostRoot, green_is_bridge: bool = True) -> subprocess.Popen:
        """sshd -D in a private mount namespace seeing `root`'s files over the machine's.

        `green_is_bridge=False` hides green0's bridge attributes in that namespace: GREEN as
        IPFire has it when the admin never set bridge mode."""
        hide = [] if green_is_bridge else [f"mount -t tmpfs none /sys/devices/virtual/net/{BRIDGE}"]
        return self.sshd(root).start(wrap=lambda command: _host_view(root, command, hide))

    @staticmethod
    def stop_sshd(proc: subprocess.Popen) -> None:
        _stop_pid(proc.pid, timeout=5)
        proc.wait(timeout=5)

    def firewall_start(self, root: HostRoot) -> None:
        """IPFire's firewall start as the host runs it, seeing `root`'s files."""
        self.host_shell(root, "/etc/rc.d/init.d/firewall start")

    def host_shell(self, root: HostRoot, command: str) -> subprocess.CompletedProcess[str]:
        """A command in wgl-host that sees `root`'s files, as an admin's shell on IPFire."""
        return self.lab.exec(HOST_NS, _host_view(root, command), timeout=60)


def _host_view(root: HostRoot, command: str, extra_mounts: Sequence[str] = ()) -> list[str]:
    """argv running `command` in a private mount namespace where /etc/sysconfig,
    /var/ipfire and /etc/rc.d show `root`'s files over the machine's."""
    mounts = [
        f"mount -t overlay overlay -o lowerdir=/{d},upperdir={root.upper / d},"
        f"workdir={root.path / 'work' / d} /{d}"
        for d in OVERLAID
    ]
    script = " && ".join([*mounts, *extra_mounts, command])
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]


def ipfire_cli_argv() -> list[str]:
    """The argv prefix that runs `wg-appliance ipfire` in a fresh process."""
    return [sys.executable, "-m", "builder", "ipfire"]
