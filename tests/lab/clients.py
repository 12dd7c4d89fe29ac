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


class Pinger:
    """`ping -i 0.2` from `ns` in the background, five echoes a second: the outage is the
    longest run of unanswered echoes, in seconds, as a road warrior would feel it."""

    INTERVAL = 0.2

    def __init__(self, lab: Lab, ns: str, host: str, seconds: float):
        count = str(int(seconds / self.INTERVAL))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "ping", "-n", "-i", "0.2", "-W", "1", "-c", count, host],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def stop(self) -> tuple[float, int]:
        """(outage in seconds, replies): the ping is stopped and its output read."""
        self.proc.send_signal(signal.SIGINT)
        out = self.proc.communicate(timeout=30)[0]
        seqs = sorted(
            int(w.split("=")[1])
            for line in out.splitlines()
            if "bytes from" in line
            for w in line.split()
            if w.startswith("icmp_seq=")
        )
        gaps = [b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False)]
        return max(gaps, default=0) * self.INTERVAL, len(seqs)


STREAM_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
c, _ = s.accept()
while True:
    data = c.recv(4096)
    if not data:
        break
    c.sendall(data)
"""

STREAM_CLIENT = """
import signal, socket, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
end = time.monotonic() + float(sys.argv[3])
last, gap, sent = time.monotonic(), 0.0, 0
while time.monotonic() < end and not stop:
    c.sendall(b"x" * 100)
    got = 0
    while got < 100:
        got += len(c.recv(100 - got) or b"") or sys.exit("closed")
    now = time.monotonic()
    gap, last, sent = max(gap, now - last), now, sent + 1
    time.sleep(0.1)
print(gap, sent)
"""


class TcpStream:
    """One TCP connection from `ns` to an echo server in `server_ns`, a small write every
    0.1 s for `seconds`: the outage is the longest wait for an echo; a reset fails it."""

    def __init__(self, lab: Lab, ns: str, server_ns: str, host: str, seconds: float):
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", server_ns, "python3", "-c", STREAM_SERVER, "7778"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        self.client = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", "-c", STREAM_CLIENT, host, "7778", str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        """The client ends after its current echo and prints what it measured."""
        if self.client.poll() is None:
            self.client.send_signal(signal.SIGTERM)

    def result(self, timeout: float) -> tuple[float, int] | str:
        """(longest gap in seconds, echoes) when the connection lived; else what ended it."""
        try:
            out, err = self.client.communicate(timeout=timeout)
        finally:
            for p in (self.client, self.server):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if self.client.returncode != 0:
            return (err.strip() or out.strip() or "no output")[-300:]
        gap, sent = out.split()
        return float(gap), int(sent)
