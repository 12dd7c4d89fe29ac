"""The appliance's Prometheus exporter: WireGuard's peers in the text exposition format at
http://ADDRESS:PORT/metrics. Standard library only; cloud-init writes this file into the
guest and sync replaces it, like the rest of the appliance's own files.

Metric names follow prometheus_wireguard_exporter, so its dashboards work; the `name` label
is the peer's name in the site file, from a map the seed writes and sync updates (read again
when it changes, so a synced peer has its name without a restart). One `wg show all dump` per
scrape: the private key and preshared keys in it are dropped as each line is read.

Run by systemd as a dynamic user with CAP_NET_ADMIN only (what reading WireGuard takes),
started by its socket at the first scrape and handed the listening socket (without one, as
when run by hand, it binds --listen and --port itself):
    python3 -S metrics.py --listen 192.168.1.50 --port 9586 --names FILE --image FILE
"""

import argparse
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_dump(text):
    """`wg show all dump` as {interface: [peer, ...]}; each peer {public_key, latest_handshake,
    rx, tx}. Interface lines have 5 fields, peer lines 9; the secrets are not kept."""
    interfaces = {}
    for line in text.splitlines():
        f = line.split("\t")
        if len(f) == 5:
            interfaces.setdefault(f[0], [])
        elif len(f) == 9:
            interfaces.setdefault(f[0], []).append(
                {
                    "public_key": f[1],
                    "latest_handshake": int(f[5]),
                    "rx": int(f[6]),
                    "tx": int(f[7]),
                }
            )
    return interfaces


def label(value):
    """A label value as the exposition format quotes it."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


HELP = (
    ("wireguard_sent_bytes_total", "counter", "Bytes sent to the peer", "tx"),
    ("wireguard_received_bytes_total", "counter", "Bytes received from the peer", "rx"),
    (
        "wireguard_latest_handshake_seconds",
        "gauge",
        "UNIX timestamp seconds of the last handshake (0: never)",
        "latest_handshake",
    ),
)


def render(interfaces, names, image, scrape_seconds=None):
    """The exposition text: per peer the three metrics, per interface the peer count, one
    info gauge for the image."""
    out = []
    for metric, kind, text, field in HELP:
        out += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
        for iface, peers in sorted(interfaces.items()):
            for p in peers:
                labels = (
                    f"interface={label(iface)},public_key={label(p['public_key'])},"
                    f"name={label(names.get(p['public_key'], ''))}"
                )
                out.append(f"{metric}{{{labels}}} {p[field]}")
    out += ["# HELP wireguard_peers Peers on the interface", "# TYPE wireguard_peers gauge"]
    for iface, peers in sorted(interfaces.items()):
        out.append(f"wireguard_peers{{interface={label(iface)}}} {len(peers)}")
    out += [
        "# HELP wg_appliance_image_info The appliance's disk image, by its recipe digest",
        "# TYPE wg_appliance_image_info gauge",
        f"wg_appliance_image_info{{digest={label(image or 'unknown')}}} 1",
    ]
    if scrape_seconds is not None:
        out += [
            "# HELP wg_appliance_scrape_duration_seconds Time spent reading WireGuard",
            "# TYPE wg_appliance_scrape_duration_seconds gauge",
            f"wg_appliance_scrape_duration_seconds {scrape_seconds:.6f}",
        ]
    return "\n".join(out) + "\n"


class Names:
    """The public key -> site name map, read again only when its file changes."""

    def __init__(self, path):
        self.path, self.stamp, self.names = path, None, {}

    def get(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self.stamp:
            try:
                with open(self.path) as f:
                    names = json.load(f)
                self.names = {str(k): str(v) for k, v in names.items()}
            except (OSError, ValueError, AttributeError):
                self.names = {}
            self.stamp = stamp
        return self.names


def read_image(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def scrape(names, image):
    t0 = time.monotonic()
    p = subprocess.run(["wg", "show", "all", "dump"], capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip()[-200:] or "wg show failed")
    interfaces = parse_dump(p.stdout)
    return render(interfaces, names.get(), image, time.monotonic() - t0)


def handler(names, image):
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5
        server_version = "wg-appliance-metrics"
        sys_version = ""

        def do_GET(self):  # noqa: N802 (the name http.server calls)
            if self.path.split("?", 1)[0] != "/metrics":
                return self.answer(404, "not found; try /metrics\n")
            try:
                body = scrape(names, image)
            except Exception as e:
                return self.answer(500, f"cannot read WireGuard: {type(e).__name__}: {e}\n")
            self.answer(200, body, CONTENT_TYPE)

        def answer(self, code, body, kind="text/plain; charset=utf-8"):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            """Quiet: a scrape every 15 s would fill the journal."""

    return Handler


class Server(http.server.ThreadingHTTPServer):
    """Binds the LAN address even before the network has it (IP_FREEBIND), and without the
    reverse lookup HTTPServer.server_bind makes."""

    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Server6(Server):
    address_family = socket.AF_INET6


# sd_listen_fds(3): the first socket systemd passes is descriptor 3.
LISTEN_FDS_START = 3


def passed_socket():
    """The listening socket systemd passed (LISTEN_FDS, meant for this process), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    return socket.socket(fileno=LISTEN_FDS_START)


def server_for(listen, port, handle, sock=None):
    """A server on the LAN address of either family (an IPv6-only LAN listens on IPv6), on
    `sock` when systemd passed one, else bound here."""
    cls = Server6 if ":" in listen else Server
    if sock is None:
        return cls((listen, port), handle)
    server = cls(sock.getsockname()[:2], handle, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name, server.server_port = server.server_address[:2]
    return server


def main(argv=None):
    ap = argparse.ArgumentParser(prog="wg-appliance-metrics")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--names", required=True)
    ap.add_argument("--image", required=True)
    args = ap.parse_args(argv)
    handle = handler(Names(args.names), read_image(args.image))
    sock = passed_socket()
    server = server_for(args.listen, args.port, handle, sock)
    host = f"[{args.listen}]" if ":" in args.listen else args.listen
    how = "on the socket systemd passed" if sock else "bound here"
    print(f"serving http://{host}:{args.port}/metrics ({how})", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
