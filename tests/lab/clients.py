"""Real WireGuard clients and small servers for the lab, each inside a lab namespace.

The host kernel has no WireGuard module, so clients are wireguard-go (userspace) configured
with `wg setconf` from the config `wg-appliance peer-config` prints. wireguard-go's control
socket lives in /var/run/wireguard, shared by all namespaces: every interface name is unique.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.lab.lab import Lab


@dataclass
class WgClient:
    """A wireguard-go interface in `ns`, made from a wg-quick config."""

    lab: Lab
    ns: str
    ifname: str
    proc: subprocess.Popen | None = None

    def up(self, config: str, extra_routes: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "wireguard-go", "-f", self.ifname],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sock = Path(f"/var/run/wireguard/{self.ifname}.sock")
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"wireguard-go {self.ifname} did not start")
            time.sleep(0.05)
        parser = configparser.ConfigParser(strict=False)
        parser.optionxform = str  # keep key case
        iface_lines = config.split("[Peer]")[0]
        parser.read_string(iface_lines)
        iface = parser["Interface"]
        with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
            f.write(config)
            conf_path = f.name
        try:
            os.chmod(conf_path, 0o600)
            stripped = subprocess.run(
                ["wg-quick", "strip", conf_path], capture_output=True, text=True, check=True
            ).stdout
        finally:
            os.unlink(conf_path)
        self.lab.exec(self.ns, ["wg", "setconf", self.ifname, "/dev/stdin"], input=stripped)
        for addr in iface["Address"].split(","):
            self.lab.exec(self.ns, ["ip", "address", "add", addr.strip(), "dev", self.ifname])
        self.lab.exec(
            self.ns, ["ip", "link", "set", self.ifname, "mtu", iface.get("MTU", "1420"), "up"]
        )
        peer = config.split("[Peer]")[1]
        allowed = peer.split("AllowedIPs =")[1].splitlines()[0]
        nets = [n.strip() for n in allowed.split(",")] + list(extra_routes)
        if {"0.0.0.0/0", "::/0"} & set(nets):
            self._keep_endpoint_outside(peer.split("Endpoint =")[1].splitlines()[0].strip())
        for net in nets:
            self.lab.exec(self.ns, ["ip", "route", "replace", net, "dev", self.ifname])

    def _keep_endpoint_outside(self, endpoint: str) -> None:
        """A full tunnel's default routes would carry the tunnel's own packets into it: the
        endpoint keeps a host route the way it went before (wg-quick uses a rule instead)."""
        host = endpoint.rsplit(":", 1)[0].strip("[]")
        got = json.loads(self.lab.exec(self.ns, ["ip", "-j", "route", "get", host]).stdout)[0]
        via = ["via", got["gateway"]] if got.get("gateway") else []
        self.lab.exec(self.ns, ["ip", "route", "replace", host, *via, "dev", got["dev"]])

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(f"/var/run/wireguard/{self.ifname}.sock").unlink(missing_ok=True)

    def latest_handshake(self) -> int:
        out = self.lab.exec(self.ns, ["wg", "show", self.ifname, "latest-handshakes"]).stdout
        return max((int(line.split()[1]) for line in out.splitlines() if line.split()), default=0)


PEER_ADDRESS_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(8)
while True:
    c, addr = s.accept()
    c.sendall(addr[0].removeprefix("::ffff:").encode() + b"\\n")
    c.close()
"""


@dataclass
class PeerAddressServer:
    """A TCP server in `ns` that answers each connection with the address it came from, so a
    test sees which source address reached the LAN host (masqueraded or the tunnel's); it
    listens on both families and shows an IPv4 peer as plain IPv4."""

    lab: Lab
    ns: str
    port: int = 7777
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "python3", "-c", PEER_ADDRESS_SERVER, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


CONNECT_CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode().strip())
except OSError as e:
    print("failed:", e)
"""


def tcp_source_seen(lab: Lab, ns: str, host: str, port: int = 7777, timeout: float = 10) -> str:
    """Open a TCP connection from `ns` to host:port; return the source address the server saw,
    or 'failed: ...'."""
    r = lab.exec(
        ns, ["python3", "-c", CONNECT_CLIENT, host, str(port), str(timeout)], timeout=timeout + 5
    )
    return r.stdout.strip()


def ping(lab: Lab, ns: str, host: str, count: int = 3, within: float = 45) -> bool:
    """True once a round of `count` echoes gets replies, trying for up to `within` seconds: a
    WireGuard client whose server was replaced re-handshakes only after its rekey timeout."""
    deadline = time.monotonic() + within
    while True:
        r = lab.exec(
            ns, ["ping", "-c", str(count), "-W", "2", "-i", "0.5", host], check=False, timeout=60
        )
        if r.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
