"""A lab that plays an IPFire host: network namespaces, a GREEN bridge and a private libvirtd.

IPFire cannot run here, so the lab builds its parts: namespace `wgl-host` holds the bridge
`green0` and a libvirtd + virtlogd of its own; namespace `wgl-lan` is an ordinary LAN host on
that bridge. `qemu:///system` from any namespace reaches the lab's libvirtd because /run is
shared. libvirtd runs in a private mount namespace where /etc/libvirt and /var/log/libvirt
are lab directories, so it sees no domains, pools or networks but the lab's (no `default`
network, like IPFire), and removing the lab directory removes every definition it made.

Everything is named `wgl-*` and torn down by name or recorded pid; nothing touches the
machine's own interfaces or routes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

from builder.errors import HostError
from builder.local.run import run

NS_PREFIX = "wgl-"
HOST_NS = "wgl-host"
LAN_NS = "wgl-lan"
INET_NS = "wgl-inet"

BRIDGE = "green0"
GREEN_NET = IPv4Network("192.168.77.0/24")
HOST_GREEN = IPv4Interface("192.168.77.1/24")
LAN_GREEN = IPv4Interface("192.168.77.10/24")
# GREEN is dual-stack: a unique-local prefix beside the IPv4 one (the example site's).
GREEN_NET6 = IPv6Network("fd77:77::/64")
HOST_GREEN6 = IPv6Interface("fd77:77::1/64")
LAN_GREEN6 = IPv6Interface("fd77:77::10/64")
RED_NET = IPv4Network("203.0.113.0/24")

URI = "qemu:///system"
STATE_DIR = Path("/run/wgl-lab")
DATA_DIR = Path("/var/lib/wgl-lab")
ETC_DIR = DATA_DIR / "etc-libvirt"
LOG_DIR = DATA_DIR / "log"
POOL_NAME = "wgl-images"
POOL_PATH = DATA_DIR / "images"
# libvirtd sees this as /var/lib/libvirt/images, so a site's default pool_path lives in the lab.
IMAGES_DIR = DATA_DIR / "libvirt-images"
LOCK_FILE = Path("/run/wgl-lab.lock")
KVM_DEVICE = Path("/dev/kvm")
# The lab's own /dev/kvm node: root:kvm 0660, as udev makes it on a Debian host.
LAB_KVM = DATA_DIR / "dev-kvm"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")

DAEMONS = ("virtlogd", "libvirtd")


def _lab_kvm_node() -> Path | None:
    """A copy of /dev/kvm that the qemu user may open, for the lab's mount namespace only.

    In a container /dev/kvm can be root's alone (no udev gave it to group kvm). libvirt
    then probes qemu as root and finds KVM, but judges it unusable for the qemu user, so
    it throws its capability cache away and probes again on every call: 40 s for each
    domain definition. With the node a host would have, the cache holds, and the tool's
    own KVM-then-TCG fallback is what a nested host shows.
    """
    try:
        real = KVM_DEVICE.stat()
    except OSError:
        return None
    LAB_KVM.unlink(missing_ok=True)
    os.mknod(LAB_KVM, 0o600 | stat.S_IFCHR, real.st_rdev)
    try:
        shutil.chown(LAB_KVM, "root", "kvm")
        os.chmod(LAB_KVM, 0o660)
    except LookupError:
        os.chmod(LAB_KVM, 0o666)
    return LAB_KVM


def _alive(pid: int, comm: str) -> bool:
    """True when `pid` runs and is the program `comm`: a pid file can outlive its process."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm and not _zombie(pid)
    except OSError:
        return False


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def ip(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`ip` inside namespace `ns`."""
    return run(["ip", "-n", ns, *args])


def _socket_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Lab:
    """The lab's namespaces, links and daemons. Methods that add parts are small on purpose,
    so a RED link to an "internet" namespace is three lines in up():

        self.add_namespace(INET_NS)
        self.add_veth(HOST_NS, "red0", INET_NS, "eth0", address=IPv4Interface("203.0.113.1/24"),
                      peer_address=IPv4Interface("203.0.113.2/24"))

    Name new namespaces `wgl-*`: down() removes every namespace with that prefix.
    """

    def __init__(self, lock_wait: float = 900.0) -> None:
        self.lock_wait = lock_wait
        self._lock_fd: int | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def up(self) -> None:
        """Clean leftovers of an earlier run, then build the IPFire-like host and a LAN host."""
        self.lock()
        self._teardown()
        try:
            self.add_namespace(HOST_NS)
            self.sysctl(HOST_NS, "net.ipv4.ip_forward", "1")
            self.sysctl(HOST_NS, "net.ipv6.conf.all.forwarding", "1")
            self.add_bridge(HOST_NS, BRIDGE, HOST_GREEN)
            self.add_address(HOST_NS, BRIDGE, HOST_GREEN6)
            self.add_namespace(LAN_NS)
            self.add_veth(LAN_NS, "eth0", HOST_NS, "green-lan", address=LAN_GREEN, bridge=BRIDGE)
            self.add_address(LAN_NS, "eth0", LAN_GREEN6)
            self.add_route(LAN_NS, "default", HOST_GREEN.ip)
            self.add_route(LAN_NS, "default", HOST_GREEN6.ip)
            self.start_libvirt()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove everything the lab (or a crashed earlier lab) made; safe to call twice."""
        self.lock()
        try:
            self._teardown()
        finally:
            self.unlock()

    def _teardown(self) -> None:
        sshd = self.daemon_pid("sshd")  # the host's sshd that `python -m tests.lab up` left
        if sshd is not None:
            _stop_pid(sshd)
        self.stop_libvirt()
        for ns in self.namespaces():
            self.remove_namespace(ns)
        self.remove_stale_runtime_state()
        shutil.rmtree(DATA_DIR, ignore_errors=True)
        shutil.rmtree(STATE_DIR, ignore_errors=True)

    def lock(self) -> None:
        """Hold an exclusive lock so two test sessions on one machine take turns.

        The kernel drops a flock when its process dies, so a crashed run never blocks the next.
        """
        if self._lock_fd is not None:
            return
        fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    os.close(fd)
                    raise HostError(
                        f"another process holds the lab lock {LOCK_FILE}",
                        "wait for the other test session to end",
                    ) from e
                time.sleep(1)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- running things --------------------------------------------------------------------

    def exec(
        self,
        ns: str,
        argv: Sequence[str | Path],
        check: bool = True,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside namespace `ns`; raises CommandError on failure when `check`."""
        return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout, input=input)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.exec(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    # --- building blocks -------------------------------------------------------------------

    @staticmethod
    def namespaces() -> list[str]:
        """The lab's namespaces that exist now, including those of a crashed earlier run."""
        out = run(["ip", "-o", "netns", "list"]).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(NS_PREFIX)]

    def add_namespace(self, ns: str) -> None:
        if not ns.startswith(NS_PREFIX):
            raise ValueError(f"lab namespaces are named {NS_PREFIX}*, so down() finds them: {ns}")
        run(["ip", "netns", "add", ns])
        ip(ns, "link", "set", "lo", "up")

    def remove_namespace(self, ns: str) -> None:
        """Stop what still runs inside (wireguard-go, iperf3, qemu...), then delete it."""
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            _stop_pid(int(pid), timeout=5.0)
        # The kernel tears a deleted namespace down later, in the background, and its veth
        # peers elsewhere go only then; deleted here, they are gone before the next add.
        veths = run(["ip", "-n", ns, "-o", "link", "show", "type", "veth"], check=False).stdout
        for line in veths.splitlines():
            run(["ip", "-n", ns, "link", "del", line.split(":")[1].strip().split("@")[0]],
                check=False)  # fmt: skip
        run(["ip", "netns", "del", ns], check=False)

    def add_bridge(self, ns: str, name: str, address: IPv4Interface | None = None) -> None:
        """A bridge with a fixed MAC: by default a bridge takes the lowest MAC of its ports, so
        a port added later would change it under its neighbours' ARP caches."""
        mac = "02:00:5e:" + ":".join(f"{b:02x}" for b in hashlib.sha256(name.encode()).digest()[:3])
        ip(ns, "link", "add", name, "address", mac, "type", "bridge")
        if address is not None:
            ip(ns, "addr", "add", str(address), "dev", name)
        ip(ns, "link", "set", name, "up")

    def add_veth(
        self,
        ns: str,
        ifname: str,
        peer_ns: str,
        peer_ifname: str,
        address: IPv4Interface | None = None,
        peer_address: IPv4Interface | None = None,
        bridge: str | None = None,
    ) -> None:
        """A cable from `ns`/`ifname` to `peer_ns`/`peer_ifname`; the peer end may join
        `bridge` in `peer_ns` instead of getting an address."""
        ip(ns, "link", "add", ifname, "type", "veth", "peer", "name", peer_ifname, "netns", peer_ns)
        if address is not None:
            ip(ns, "addr", "add", str(address), "dev", ifname)
        if peer_address is not None:
            ip(peer_ns, "addr", "add", str(peer_address), "dev", peer_ifname)
        if bridge is not None:
            ip(peer_ns, "link", "set", peer_ifname, "master", bridge)
        ip(ns, "link", "set", ifname, "up")
        ip(peer_ns, "link", "set", peer_ifname, "up")

    def add_address(self, ns: str, dev: str, address: IPv4Interface | IPv6Interface) -> None:
        """One more address on `dev`; IPv6 without duplicate address detection, so it is
        usable at once rather than after a second or two of "tentative"."""
        extra = ("nodad",) if address.version == 6 else ()
        ip(ns, "addr", "add", str(address), "dev", dev, *extra)

    def add_route(self, ns: str, dest: str, via: object) -> None:
        """A route; `default` means the default of `via`'s family."""
        family = "-6" if ":" in str(via) else "-4"
        ip(ns, family, "route", "replace", dest, "via", str(via))

    # --- libvirt ---------------------------------------------------------------------------

    def start_libvirt(self) -> None:
        """Start virtlogd and libvirtd inside HOST_NS with private config and log dirs."""
        if _socket_answers(LIBVIRT_SOCK):
            raise HostError(
                f"a libvirtd the lab did not start answers on {LIBVIRT_SOCK}",
                "stop it first; the lab needs its own libvirtd inside the host namespace",
            )
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        for d in (
            ETC_DIR,
            LOG_DIR / "qemu",
            POOL_PATH,
            IMAGES_DIR,
            Path("/var/lib/libvirt/images"),
        ):
            d.mkdir(parents=True, exist_ok=True)
        # Only the daemons' settings: no domains, pools, networks or autostart links.
        for conf in Path("/etc/libvirt").glob("*.conf"):
            shutil.copy(conf, ETC_DIR / conf.name)
        with (ETC_DIR / "libvirtd.conf").open("a") as f:
            f.write(f'\nlog_outputs = "3:file:{LOG_DIR}/libvirtd.log"\n')
        Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
        kvm = _lab_kvm_node()
        script = (
            'mount --bind "$1" /etc/libvirt && mount --bind "$2" /var/log/libvirt'
            ' && mount --bind "$3" /var/lib/libvirt/images'
            ' && { [ -z "$6" ] || mount --bind "$6" /dev/kvm; }'
            ' && virtlogd -d -p "$4" && exec libvirtd -d -p "$5"'
        )
        unshare = ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script, "sh"]
        pid_files = [self.pid_file(name) for name in DAEMONS]
        args = [ETC_DIR, LOG_DIR, IMAGES_DIR, *pid_files, kvm or ""]
        self.exec(HOST_NS, [*unshare, *args], timeout=60)
        deadline = time.monotonic() + 30
        while not _socket_answers(LIBVIRT_SOCK):
            if time.monotonic() > deadline:
                raise HostError(
                    "the lab's libvirtd did not open its socket within 30 s",
                    f"see {LOG_DIR}/libvirtd.log",
                )
            time.sleep(0.2)

    def stop_libvirt(self) -> None:
        """Stop running domains through libvirt (so qemu exits cleanly), then our daemons."""
        if self.daemon_pid("libvirtd") is not None:
            self._destroy_domains()
        for name in reversed(DAEMONS):
            pid = self.daemon_pid(name)
            if pid is not None:
                _stop_pid(pid)
            self.pid_file(name).unlink(missing_ok=True)

    @staticmethod
    def remove_stale_runtime_state() -> None:
        """Remove /run/libvirt when no libvirt daemon answers there: it is then the state of a
        dead daemon, and a new libvirtd would revive its pools and domains from it."""
        run_dir = LIBVIRT_SOCK.parent
        if run_dir.is_dir() and not any(_socket_answers(s) for s in run_dir.glob("*-sock")):
            shutil.rmtree(run_dir, ignore_errors=True)

    def _destroy_domains(self) -> None:
        import libvirt

        try:
            conn = libvirt.open(URI)
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
        finally:
            conn.close()

    @staticmethod
    def pid_file(name: str) -> Path:
        return STATE_DIR / f"{name}.pid"

    def daemon_pid(self, name: str) -> int | None:
        """The pid of the lab's daemon `name` if it still runs; a stale pid file gives None."""
        try:
            pid = int(self.pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, name) else None

    @staticmethod
    def host_path(path: str | Path) -> Path:
        """Where a file the lab's libvirtd or virtlogd writes is seen from outside its private
        mount namespace (a serial log under /var/log/libvirt lands in LOG_DIR)."""
        p = Path(path)
        for inside, outside in (
            (Path("/var/log/libvirt"), LOG_DIR),
            (Path("/etc/libvirt"), ETC_DIR),
            (Path("/var/lib/libvirt/images"), IMAGES_DIR),
        ):
            if p.is_relative_to(inside):
                return outside / p.relative_to(inside)
        return p

    # --- reporting -------------------------------------------------------------------------

    def status(self) -> str:
        """What is up, one line per part, for `python -m tests.lab up`."""
        lines = []
        for ns in self.namespaces():
            addrs = ip(ns, "-br", "addr").stdout.strip().splitlines()
            lines.append(f"netns {ns}: " + "; ".join(" ".join(a.split()) for a in addrs))
        for name in DAEMONS:
            pid = self.daemon_pid(name)
            lines.append(f"{name}: " + (f"pid {pid} in {HOST_NS}" if pid else "not running"))
        lines.append(f"libvirt URI: {URI} (pool dir {POOL_PATH}, logs {LOG_DIR})")
        return "\n".join(lines)
