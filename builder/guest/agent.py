"""The program the tool runs inside the appliance over SSH, as `sudo -n python3 -S -c
PROGRAM MODE [ARG]` (PROGRAM imports the copy kept by its digest; builder/remote/appliance.py
sends it whole only when there is none). Standard library only; secrets never leave the guest
(preshared keys are sent as hashes, private keys not at all).

`probe ARG` (verify): gathers every fact in one round trip and prints one JSON document.
ARG is JSON: {"gateway": "192.168.1.1", "gateway6": "fd01::1" or null,
"metrics": "http://192.168.1.50:9586/metrics"}
(metrics only when the site enables them: the probe then scrapes the exporter once).

`status` (status): only what an admin looks at, one `wg show` and a few /proc reads, as one
JSON document: time, uptime, kernel, os (PRETTY_NAME of /etc/os-release), the image's recipe
digest and wg0's dump.

`peers` (the appliance's own timer, every 10 s, and once at boot before wg0): removes the
peers whose expiry in wg0.peers.json has come from wg0.conf, that file and the live wg0,
and re-resolves the endpoint names of peers whose handshake is older than 135 s through the
site's DNS servers. It needs no workstation; its one JSON line goes to the journal.

`takeover ARG` (upgrade): started in the new appliance just before its link comes up: sets
each peer's endpoint as the old appliance saw it, waits for the carrier, then starts every
handshake at once and announces the LAN address with gratuitous ARP; prints {"kicked",
"garp", "carrier_after_s"?, "error"?}.

`sync` (sync): prints the light facts (peers, file digests, addresses, default routes,
whether the metrics exporter is enabled) as one JSON line, then reads one line from stdin:
empty means nothing to do; otherwise one text per FILES key, "mtu": int and "metrics": bool
(the exporter's socket enabled and listening, or both disabled and stopped), applied without
restarting the tunnel or rolled back as a whole, and the outcome printed as one JSON line:
{"ok", "rolled_back", "untouched", "error", "not_restored", "routes_added", "routes_removed"}.

`serve` (its own unit, started by wg-appliance-agent.socket): the agent kept loaded as root
behind a Unix socket that only the admin user (and root) may open. The tool reaches it over
its SSH login with a direct-streamlocal channel and sends one line, {"agent": NAME, "argv":
[MODE, ARG...]}; the server answers RUN and runs main() in a fork of itself, the socket as
stdin and stdout, then a line starting with NUL: {"rc", "stderr"}. Asked for another digest
than its own it answers MISSING (the tool then goes through sudo), and exits when its file
was replaced, so systemd starts the new one on the next call.

`wg syncconf` changes only what differs, so unchanged peers keep their sessions; `nft -f`
applies the whole ruleset file (it starts with `flush ruleset`) as one transaction.

Before anything changes, everything apply() may change is recorded: each file with its mode
and owner (or its absence), the live values of the sysctl keys the new file sets, wg0's MTU
and routes, and, where no old file holds them, the live ruleset and peers. Any exception
puts all of it back, step by step, and names each step that could not be undone.
"""

import contextlib
import json
import os
import stat
import struct
import subprocess
import sys
import time

# Under TCG every module a start imports costs: hashlib would load OpenSSL's libcrypto for
# one digest (the interpreter's own sha256 does), and socket and ipaddress are imported by
# the few functions that need them.
try:
    from _sha2 import sha256
except ImportError:
    from hashlib import sha256

# The appliance's own files: written by cloud-init at first boot (user-data), compared by
# the probe, replaced by sync. name: (path, owner, mode).
FILES = {
    "wg0.conf": ("/etc/wireguard/wg0.conf", "root:root", 0o600),
    "nftables.conf": ("/etc/nftables.conf", "root:root", 0o644),
    "sysctl": ("/etc/sysctl.d/90-wg-appliance.conf", "root:root", 0o644),
    "metrics.py": ("/usr/local/lib/wg-appliance/metrics.py", "root:root", 0o644),
    "metrics.service": ("/etc/systemd/system/wg-appliance-metrics.service", "root:root", 0o644),
    "metrics.socket": ("/etc/systemd/system/wg-appliance-metrics.socket", "root:root", 0o644),
    "names.json": ("/etc/wg-appliance/peers.json", "root:root", 0o644),
    "peers.json": ("/etc/wireguard/wg0.peers.json", "root:root", 0o600),
    "agent": ("/usr/local/sbin/wg-appliance-agent", "root:root", 0o755),
    "peers.service": ("/etc/systemd/system/wg-appliance-peers.service", "root:root", 0o644),
    "peers.timer": ("/etc/systemd/system/wg-appliance-peers.timer", "root:root", 0o644),
    "agent.service": ("/etc/systemd/system/wg-appliance-agent.service", "root:root", 0o644),
    "agent.socket": ("/etc/systemd/system/wg-appliance-agent.socket", "root:root", 0o644),
    # lan.dns: no resolver daemon runs, glibc reads this.
    "resolv.conf": ("/etc/resolv.conf", "root:root", 0o644),
}
# The exporter's socket, which systemd holds from early boot and which starts the exporter
# at the first scrape; enabled means its link in sockets.target.wants exists.
METRICS_UNIT = "wg-appliance-metrics.socket"
METRICS_SERVICE = "wg-appliance-metrics.service"
METRICS_WANTS = "/etc/systemd/system/sockets.target.wants/" + METRICS_UNIT
# Written by the image build: the recipe digest the image was made from.
IMAGE_FILE = "/etc/wg-appliance/image"
UNITS = ("peers.service", "peers.timer", "agent.service", "agent.socket")
TIMER = "wg-appliance-peers.timer"
PEERS_UNIT = FILES["peers.service"][0].rsplit("/", 1)[1]
SERVE_UNIT = "wg-appliance-agent.socket"
# wireguard-tools' reresolve-dns: a handshake older than this is stale (REKEY_AFTER_TIME
# 120 s plus a margin).
STALE_HANDSHAKE_S = 135


# --- probe ------------------------------------------------------------------------------


def sh(*argv):
    return sh_all(argv)[0]


def sh_all(*argvs, meanwhile=None):
    """Each command's {"rc", "out", "err"}, the commands run side by side (each one's start
    costs more than its work under TCG); `meanwhile()` runs while they do, and its result
    comes last. A command given as (argv, text) reads that text on stdin."""
    procs = []
    for argv in argvs:
        argv, text = argv if isinstance(argv[0], tuple) else (argv, None)
        stdin = None
        if text is not None:  # a few lines: the pipe holds them before the command starts
            stdin, w = os.pipe()
            os.write(w, text.encode())
            os.close(w)
        try:
            procs.append(
                subprocess.Popen(
                    argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        except OSError as e:
            procs.append(e)
        finally:
            if stdin is not None:
                os.close(stdin)
    extra = meanwhile() if meanwhile else None
    out = []
    for p in procs:
        if isinstance(p, OSError):
            out.append({"rc": 127, "out": "", "err": str(p)})
            continue
        try:
            stdout, stderr = p.communicate(timeout=20)
        except subprocess.TimeoutExpired as e:
            p.kill()
            p.communicate()
            out.append({"rc": 127, "out": "", "err": str(e)})
            continue
        out.append({"rc": p.returncode, "out": stdout, "err": stderr[-2000:]})
    return out + [extra] if meanwhile else out


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


WG_DUMP = ("wg", "show", "wg0", "dump")
# The routes of the main table in both families and every interface with its addresses, from
# one `ip` instead of four: `table all` is the only route dump of both families, and it names
# the table of every route outside main. `addr show` carries each link's flags and MTU too.
IP_BATCH = (("ip", "-j", "-batch", "-"), "route show table all\naddr show\n")
# sync's share of it: the default routes of both families (lan.gateway, which only a new VM
# changes, as lan.address) and the addresses, without the peer networks' routes.
IP_SYNC = (("ip", "-j", "-batch", "-"), "route show table all default\naddr show\n")


def ip_batch(r):
    """(main-table routes, interfaces with addresses) from IP_BATCH's result; what a failed
    command did not print is empty."""
    docs = [d if isinstance(d, list) else [] for d in json_values(r["out"])]
    routes, addrs = (docs + [[], []])[:2]
    return [x for x in routes if "table" not in x], addrs


def json_values(text):
    """The JSON documents printed one after another (as `ip -batch` does), up to the first
    that does not parse."""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return docs
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return docs
        docs.append(doc)


def wg_dump(r=None):
    """wg0's interface and peers, from `wg show wg0 dump` (run here unless `r` is its result)."""
    r = sh(*WG_DUMP) if r is None else r
    if r["rc"] != 0:
        return {"error": r["err"].strip() or "wg show failed"}
    lines = [ln.split("\t") for ln in r["out"].splitlines() if ln]
    iface = lines[0]
    peers = []
    for f in lines[1:]:
        psk = f[1]
        peers.append(
            {
                "public_key": f[0],
                "psk_sha256": None if psk == "(none)" else sha256(psk.encode()).hexdigest(),
                "endpoint": None if f[2] == "(none)" else f[2],
                "allowed_ips": sorted(x for x in f[3].split(",") if x and x != "(none)"),
                "latest_handshake": int(f[4]),
                "rx": int(f[5]),
                "tx": int(f[6]),
                "keepalive": 0 if f[7] == "off" else int(f[7]),
            }
        )
    return {"public_key": iface[1], "listen_port": int(iface[2]), "peers": peers}


def ping(host, timeout=1.0, tries=3):
    """ICMP echo through a raw socket (root): no ping binary needed in the image. For IPv6
    the kernel fills in the checksum and strips the IP header."""
    import ipaddress
    import socket

    v6 = ":" in host
    try:
        if v6:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as e:
        return {"ok": False, "detail": str(e)}
    s.settimeout(timeout)
    ident = os.getpid() & 0xFFFF
    request, answer = (128, 129) if v6 else (8, 0)
    for seq in range(tries):
        header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
        payload = b"wg-appliance"
        data = header + payload
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        checksum = 0 if v6 else ~(total + (total >> 16)) & 0xFFFF
        packet = struct.pack("!BBHHH", request, 0, checksum, ident, seq) + payload
        t0 = time.monotonic()
        try:
            s.sendto(packet, (host, 0))
            while True:
                reply, addr = s.recvfrom(1024)
                ihl = 0 if v6 else (reply[0] & 0xF) * 4
                rtype, _, _, rid, rseq = struct.unpack("!BBHHH", reply[ihl : ihl + 8])
                same = ipaddress.ip_address(addr[0]) == ipaddress.ip_address(host)
                if same and rtype == answer and rid == ident and rseq == seq:
                    return {"ok": True, "detail": "%.1f ms" % ((time.monotonic() - t0) * 1000)}
        except OSError:
            continue
    return {"ok": False, "detail": f"no echo reply in {tries} tries"}


def file_sha256(path):
    text = read(path, None)
    return None if text is None else sha256(text.encode()).hexdigest()


def files():
    return {key: file_sha256(path) for key, (path, _, _) in FILES.items()}


def interface_addresses(interfaces):
    """Global addresses by interface, of `ip -j addr show`'s interfaces."""
    return {
        i["ifname"]: [
            f"{a['local']}/{a['prefixlen']}"
            for a in i.get("addr_info", [])
            if a.get("scope") == "global"
        ]
        for i in interfaces
    }


# Where deploy keeps the first boot's cloud-init result when it switches cloud-init off.
FIRST_BOOT = "/var/lib/wg-appliance"


# The timer's agent touches this file at every run. The probe takes a fresh one as the timer
# working (`systemctl is-active` costs a fifth of a second under TCG) and asks systemctl only
# when it is missing or older than three runs: the first seconds after boot, a timer that
# stopped, an agent from before the file.
TICKED = "/run/wg-appliance-peers.tick"
TICK_FRESH_S = 30


def ticked(now=None):
    """Whether the timer's agent ran within TICK_FRESH_S."""
    try:
        age = (time.time() if now is None else now) - os.stat(TICKED).st_mtime
    except OSError:
        return False
    return -5 <= age <= TICK_FRESH_S


def tick():
    with open(TICKED, "a"):
        os.utime(TICKED)


def facts(args):
    """Everything verify judges, in one document. The commands run side by side, and the ping
    and the scrape while they do."""
    fresh = ticked()
    commands = [IP_BATCH, ("nft", "list", "ruleset"), WG_DUMP]
    if not fresh:
        commands.append(("systemctl", "is-active", TIMER))
    *done, (gateway, gateway6, metrics) = sh_all(
        *commands,
        meanwhile=lambda: (
            ping(args["gateway"]) if args.get("gateway") else None,
            ping(args["gateway6"]) if args.get("gateway6") else None,
            metrics_facts(args.get("metrics")),
        ),
    )
    ip, nft, dump = done[:3]
    timer = "active" if fresh else done[3]["out"].strip()
    routes, addrs = ip_batch(ip)
    st = os.statvfs("/")
    meminfo = dict(
        (ln.split(":")[0], int(ln.split()[1]) * 1024)
        for ln in read("/proc/meminfo").splitlines()
        if ln.split()[1:2]
    )
    return {
        "time": time.time(),
        # The files `cloud-init status` reads (the command itself costs seconds under TCG);
        # once cloud-init is off after the first boot, the copies deploy kept of them.
        "cloud_init_status": read("/run/cloud-init/status.json", "")
        or read(FIRST_BOOT + "/cloud-init-status.json", ""),
        "cloud_init_result": read("/run/cloud-init/result.json", "")
        or read(FIRST_BOOT + "/cloud-init-result.json", ""),
        "cloud_init_off": os.path.exists("/etc/cloud/cloud-init.disabled"),
        "cloud_init_log_tail": read("/var/log/cloud-init.log")[-3000:],
        "wg": wg_dump(dump),
        "wg_link": [
            {k: v for k, v in i.items() if k != "addr_info"}
            for i in addrs
            if i.get("ifname") == "wg0"
        ],
        "ip_forward": read("/proc/sys/net/ipv4/ip_forward").strip(),
        "ip6_forward": read("/proc/sys/net/ipv6/conf/all/forwarding").strip(),
        "nft": nft,
        "routes": routes,
        "gateway": gateway,
        "gateway6": gateway6,
        "files": files(),
        "addresses": interface_addresses(addrs),
        "peers_timer": timer,
        "disk_free": st.f_bavail * st.f_frsize,
        "disk_total": st.f_blocks * st.f_frsize,
        "mem_available": meminfo.get("MemAvailable", 0),
        "mem_total": meminfo.get("MemTotal", 0),
        "uptime": float(read("/proc/uptime", "0 0").split()[0]),
        "image": read(IMAGE_FILE).strip(),
        "metrics": metrics,
    }


def metrics_facts(url):
    """Whether the exporter is enabled, and with a URL, what a scrape of it answers (from
    inside the guest: the ruleset admits loopback, so this judges the exporter, not `allow`).
    systemd holds its port from early boot (the first scrape starts it), so a refusal is the
    answer."""
    out = {"enabled": os.path.lexists(METRICS_WANTS)}
    if url:
        t0 = time.monotonic()
        try:
            status, body = http_get(url)
            body = body.decode("utf-8", "replace")
            out["scrape"] = {"status": status, "lines": body.count("\n")}
        except Exception as e:
            out["scrape"] = {"status": None, "error": f"{type(e).__name__}: {e}"[:300]}
        out["scrape"]["seconds"] = time.monotonic() - t0
        out["scrape"]["peers"] = (
            sum(ln.startswith("wireguard_sent_bytes_total{") for ln in body.splitlines())
            if out["scrape"]["status"] == 200
            else 0
        )
    return out


def http_get(url, timeout=10, limit=16 * 1024 * 1024):
    """(status, body) of one HTTP/1.0 GET of an `http://HOST:PORT/PATH` URL. urllib would do,
    but importing it costs a third of a second under TCG."""
    import socket

    where, _, path = url.split("://", 1)[1].partition("/")
    host, colon, port = where.rpartition(":")
    if not colon or host.endswith(":") or "]" in port:
        host, port = where, "80"
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
        s.sendall(f"GET /{path} HTTP/1.0\r\nHost: {where}\r\n\r\n".encode())
        data = bytearray()
        while len(data) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    words = head.split(None, 2)
    if not sep or len(words) < 2 or not words[0].startswith(b"HTTP/") or not words[1].isdigit():
        raise OSError(f"not an HTTP answer: {head[:60]!r}")
    return int(words[1]), body[:limit]


def os_name():
    for line in read("/etc/os-release").splitlines():
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME":
            return value.strip().strip('"')
    return ""


def status():
    """What `wg-appliance status` shows; lighter than facts(): no ruleset, routes or ping."""
    return {
        "time": time.time(),
        "uptime": float(read("/proc/uptime", "0 0").split()[0]),
        "kernel": os.uname().release,
        "os": os_name(),
        "image": read(IMAGE_FILE).strip(),
        "wg": wg_dump(),
    }


# --- peers: expiry and endpoint names, run by the appliance's timer ---------------------


def peers_text(doc):
    """wg0.peers.json as rendered and as rewritten here: the same bytes for the same peers,
    so an appliance that removed an expired peer matches a render made after the expiry."""
    return json.dumps(doc, indent=1) + "\n"


def drop_peers(conf, public_keys):
    """wg0.conf without the [Peer] blocks of these keys. Each block is rendered on its own
    (a blank line, `[Peer]`, its keys), so the rest stays byte for byte."""
    head, *blocks = conf.split("\n[Peer]\n")
    kept = [b for b in blocks if not any(f"PublicKey = {k}\n" in b + "\n" for k in public_keys)]
    return "\n[Peer]\n".join([head, *kept])


def _skip_name(data, pos):
    while True:
        n = data[pos]
        if n & 0xC0 == 0xC0:
            return pos + 2
        if n == 0:
            return pos + 1
        pos += n + 1


def dns_query(host, server, qtype, timeout=2.0, port=53):
    """One A (1) or AAAA (28) query over UDP to `server`: the site's own DNS servers, not a
    resolver cache that may still hold the old address. The first answer, or None."""
    import socket

    ident = struct.unpack("!H", os.urandom(2))[0]
    qname = b"".join(bytes([len(x)]) + x.encode() for x in host.rstrip(".").split("."))
    query = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + b"\0"
    query += struct.pack("!HH", qtype, 1)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(query, (server, port))
            data = s.recv(4096)
        except OSError:
            return None
    try:
        rid, flags, qd, an = struct.unpack("!HHHH", data[:8])
        if rid != ident or not flags & 0x8000 or flags & 0xF:
            return None
        pos = 12
        for _ in range(qd):
            pos = _skip_name(data, pos) + 4
        for _ in range(an):
            pos = _skip_name(data, pos)
            rtype, rclass, _, size = struct.unpack("!HHIH", data[pos : pos + 10])
            pos += 10
            if rtype == qtype and rclass == 1 and size in (4, 16):
                af = socket.AF_INET if size == 4 else socket.AF_INET6
                return socket.inet_ntop(af, data[pos : pos + size])
            pos += size
    except (struct.error, IndexError):
        return None
    return None


def resolve(host, servers):
    """An address for `host` from the site's DNS servers (A first, then AAAA), or from the
    system resolver when the site names none."""
    import socket

    for server in servers:
        for qtype in (1, 28):
            addr = dns_query(host, server, qtype)
            if addr:
                return addr
    if not servers:
        try:
            return socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0]
        except (OSError, IndexError):
            return None
    return None


def live_table(system, what):
    """`wg show wg0 WHAT` as {public key: value}; {} when wg0 is not up (at boot)."""
    try:
        out = system.run("wg", "show", "wg0", what)
    except Failed:
        return None
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def expire(doc, now, system):
    """Remove the peers whose time has come: wg0.conf first, then wg0.peers.json, then the
    live interface, so a crash in between leaves the next run the same work to finish."""
    gone = [p for p in doc["peers"] if p.get("expires") is not None and p["expires"] <= now]
    if not gone:
        return []
    keys = {p["public_key"] for p in gone}
    path, _, mode = FILES["wg0.conf"]
    have = system.read(path)
    if have is not None:
        conf = have["data"].decode("utf-8", "surrogateescape")
        system.write(path, drop_peers(conf, keys).encode("utf-8", "surrogateescape"), mode)
    rest = {**doc, "peers": [p for p in doc["peers"] if p["public_key"] not in keys]}
    path, _, mode = FILES["peers.json"]
    system.write(path, peers_text(rest).encode(), mode)
    live = live_table(system, "allowed-ips")
    if live is not None:
        for key in sorted(keys & live.keys()):
            system.run("wg", "set", "wg0", "peer", key, "remove")
        have, own = wg0_routes(system)
        for net in sorted(have - wanted_routes(system, own)):
            del_route(system, net)
    return sorted(p["name"] for p in gone)


def reresolve(doc, now, system):
    """Peers with a name for an endpoint and a stale handshake get that name's address now."""
    named = [p for p in doc["peers"] if p.get("endpoint")]
    shakes = live_table(system, "latest-handshakes") if named else None
    if not shakes:
        return []
    endpoints = live_table(system, "endpoints") or {}
    moved = []
    for p in named:
        key = p["public_key"]
        if key not in shakes or now - int(shakes[key]) <= STALE_HANDSHAKE_S:
            continue
        host, _, port = p["endpoint"].rpartition(":")
        addr = resolve(host, doc.get("dns", []))
        if addr is None:
            continue
        endpoint = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        if endpoints.get(key) != endpoint:
            system.run("wg", "set", "wg0", "peer", key, "endpoint", endpoint)
            if p.get("address"):
                system.poke(p["address"])
            moved.append(f"{p['name']} {endpoint}")
    return moved


def peers_tick(system, now=None):
    """What the timer runs: expiry, then stale endpoints."""
    have = system.read(FILES["peers.json"][0])
    if have is None:
        return {"expired": [], "reresolved": []}
    doc = json.loads(have["data"])
    now = time.time() if now is None else now
    expired = expire(doc, now, system)
    if expired:
        doc = json.loads(system.read(FILES["peers.json"][0])["data"])
    return {"expired": expired, "reresolved": reresolve(doc, now, system)}


# --- sync -------------------------------------------------------------------------------


MTU_PATH = "/sys/class/net/wg0/mtu"


class Failed(Exception):
    """A command in the guest exited non-zero."""


def failed(argv, stderr):
    """A command's failure, named by its first words, with the end of what it said."""
    return Failed(f"{' '.join(argv[:3])}: {stderr.decode('utf-8', 'replace').strip()[-300:]}")


class System:
    """The guest's files and commands; tests stand in a fake with the same four methods."""

    def run(self, *argv, input=None):
        data = None if input is None else input.encode("utf-8", "surrogateescape")
        p = subprocess.run(argv, capture_output=True, input=data, timeout=120)
        if p.returncode != 0:
            raise failed(argv, p.stderr)
        return p.stdout.decode("utf-8", "replace")

    def run_both(self, first, second, input=None):
        """`first` started, `second` run to its end beside it, then `first` waited for: two
        commands on different parts of the kernel, whose starts cost more than their work
        under TCG. `second` reads `input`; a failure of either raises Failed once both ended."""
        try:
            p = subprocess.Popen(
                first, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as e:
            raise Failed(f"{' '.join(first[:3])}: {e}") from e
        try:
            self.run(*second, input=input)
        finally:
            _, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise failed(first, err)

    def read(self, path):
        """{"data": bytes, "mode", "uid", "gid"}, or None when there is no such file."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        return {"data": data, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}

    def write(self, path, data, mode, owner=(0, 0)):
        """Atomic replace; identical content, mode and owner are left alone, so a rollback
        rewrites only what moved (and an immutable file that never moved is no failure)."""
        have = self.read(path)
        if have and (have["data"], have["mode"], (have["uid"], have["gid"])) == (data, mode, owner):
            return
        tmp = path + ".wga-new"
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.lexists(tmp):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chown(tmp, *owner)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    def remove(self, path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def set_sysctl(self, path, value):
        """One kernel setting under /proc/sys, as sysctl(8) writes it."""
        with open(path, "w") as f:
            f.write(value + "\n")

    def enabled(self, unit):
        """A unit of ours is enabled when its link in its target's wants folder exists
        (sockets.target for a socket, multi-user.target for the rest)."""
        target = "sockets.target" if unit.endswith(".socket") else "multi-user.target"
        return os.path.lexists(f"/etc/systemd/system/{target}.wants/{unit}")

    def poke(self, address):
        """One empty UDP datagram into the tunnel to `address` (the discard port): wg0 then
        starts a handshake at once instead of at the next keepalive or retry."""
        import socket

        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.sendto(b"", (address, 9))


WG_QUICK_KEYS = {
    "address",
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
}


# strip()'s one-pass form, for text whose lines end only in "\n" and whose only blanks are
# spaces and tabs (every config the tool renders).
_PLAIN_CONTROLS = frozenset("\r\v\f\x1c\x1d\x1e\x1f")


def strip(conf):
    """What `wg-quick strip` does, without a bash loop over every line (slow with 1000 peers);
    plain ASCII text in one regular-expression pass (a tenth of the loop's time under TCG)."""
    if conf.isascii() and _PLAIN_CONTROLS.isdisjoint(conf):
        import re

        keys = "|".join(sorted(WG_QUICK_KEYS))
        return re.sub(rf"(?mi)^[ \t]*(?:{keys})[ \t]*=.*\n?", "", conf, flags=re.ASCII)
    return strip_lines(conf)


def strip_lines(conf):
    """strip() line by line, as str.splitlines() and str.strip() see lines and blanks."""
    keep = []
    for line in conf.splitlines(keepends=True):
        key = line.split("=", 1)[0].strip().lower()
        if "=" in line and key in WG_QUICK_KEYS:
            continue
        keep.append(line)
    return "".join(keep)


def sysctl_settings(text):
    """(key, value, quiet) of each setting in a sysctl.d file, in its order; a leading '-'
    (quiet) only mutes errors."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            key, value = (x.strip() for x in line.split("=", 1))
            out.append((key.lstrip("-"), value, key.startswith("-")))
    return out


def sysctl_keys(text):
    """The keys a sysctl.d file sets, in its order."""
    return [key for key, _, _ in sysctl_settings(text)]


def load_sysctl(system, text):
    """What `sysctl --load` does with the file's text, without a process for it: each value
    written where its key lives, a failure fatal unless the key is quiet."""
    for key, value, quiet in sysctl_settings(text):
        try:
            system.set_sysctl(sysctl_path(key), value)
        except OSError as e:
            if not quiet:
                raise Failed(f"sysctl {key}: {type(e).__name__}: {e.strerror or e}") from None


def sysctl_path(key):
    """sysctl.d(5): the first separator decides; with a dot first, '/' stands for a '.'."""
    if "/" in key and ("." not in key or key.index("/") < key.index(".")):
        return "/proc/sys/" + key
    return "/proc/sys/" + key.replace("/", "\0").replace(".", "/").replace("\0", ".")


def wanted_routes(system, own):
    """AllowedIPs outside wg0's own subnets (`own`: its addresses) need routes via wg0 (what
    wg-quick adds at up)."""
    nets = set()
    for line in system.run("wg", "show", "wg0", "allowed-ips").splitlines():
        for net in line.split()[1:]:
            if net != "(none)":
                nets.add(net)
    own_nets = [prefix(a) for a in own]
    # A thousand peers: ipaddress objects for each would cost a tenth of a second under TCG.
    return {n for n in nets if not any(inside(prefix(n), o) for o in own_nets)}


def prefix(text):
    """(bits, value, length) of an address or network such as `wg` prints; ValueError when
    it is neither."""
    import socket

    addr, _, length = text.partition("/")
    v6 = ":" in addr
    try:
        value = int.from_bytes(
            socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr), "big"
        )
    except OSError:
        raise ValueError(f"not an address: {text!r}") from None
    bits = 128 if v6 else 32
    n = int(length) if length else bits
    if not 0 <= n <= bits:
        raise ValueError(f"bad prefix length: {text!r}")
    return bits, value, n


def inside(net, outer):
    """Whether network `net` lies within network `outer` (both from prefix())."""
    bits, value, n = net
    obits, ovalue, on = outer
    return bits == obits and n >= on and value >> (bits - on) == ovalue >> (bits - on)


def wg0_addresses(interfaces):
    """wg0's addresses, from `ip -j addr show dev wg0`'s interfaces."""
    return [f"{a['local']}/{a['prefixlen']}" for i in interfaces for a in i["addr_info"]]


# wg0's routes of the main table in both families (`table all` is the one dump of both; it
# names the table of each route outside main).
WG0_ROUTES = ("ip", "-j", "route", "show", "table", "all", "dev", "wg0", "proto", "boot")


def current_routes(system):
    return main_routes(json.loads(system.run(*WG0_ROUTES) or "[]"))


def main_routes(listed):
    out = set()
    for r in listed:
        if "table" in r:
            continue
        dst = r["dst"]
        if "/" not in dst and dst != "default":
            dst += "/128" if ":" in dst else "/32"
        out.add(dst)
    return out


def wg0_routes(system):
    """(wg0's routes, wg0's addresses), both from one `ip`."""
    text = " ".join(WG0_ROUTES[2:]) + "\naddr show dev wg0\n"
    docs = json_values(system.run("ip", "-j", "-batch", "-", input=text))
    if len(docs) != 2:
        raise Failed(f"ip -batch: expected routes and addresses, got {len(docs)} document(s)")
    return main_routes(docs[0]), wg0_addresses(docs[1])


def add_route(system, net):
    system.run("ip", "route", "replace", net, "dev", "wg0", "proto", "boot")


def del_route(system, net):
    system.run("ip", "route", "del", net, "dev", "wg0")


def parse(line):
    """The request, checked before anything is recorded or changed."""
    new = json.loads(line)
    if not isinstance(new, dict):
        raise ValueError("the request is not a JSON object")
    for key in FILES:
        if not isinstance(new.get(key), str):
            raise ValueError(f"the request has no text for {key}")
    mtu = new.get("mtu")
    if mtu is not None and (type(mtu) is not int or not 68 <= mtu <= 65535):
        raise ValueError(f"bad MTU {mtu!r}")
    if type(new.get("metrics")) is not bool:
        raise ValueError("the request does not say whether metrics are on")
    return new


def capture(new, system):
    """Everything apply(new) may change, as it is now."""
    files = {key: system.read(path) for key, (path, _, _) in FILES.items()}
    sysctl = {}
    for key in sysctl_keys(new["sysctl"]):
        have = system.read(sysctl_path(key))
        if have is not None:
            sysctl[key] = have["data"].decode().strip()
    mtu = system.read(MTU_PATH)
    if mtu is None:
        raise Failed("wg0 does not exist")
    routes, own = wg0_routes(system)
    old = {
        "files": files,
        "sysctl": sysctl,
        "mtu": int(mtu["data"]),
        "routes": sorted(routes),
        "own": own,
        "metrics": system.enabled(METRICS_UNIT),
        "units": units_changed(new, system),
    }
    if files["nftables.conf"] is None:
        old["ruleset"] = system.run("nft", "list", "ruleset")
    if files["wg0.conf"] is None:
        old["wg"] = system.run("wg", "showconf", "wg0")
    return old


def units_changed(new, system):
    """Whether the timer's units differ from what is installed (then systemd reloads)."""
    for key in UNITS:
        have = system.read(FILES[key][0])
        if have is None or have["data"] != new[key].encode():
            return True
    return False


def apply(new, system, old):
    units, exporter = units_changed(new, system), exporter_changed(old, new)
    for key, (path, _, mode) in FILES.items():
        system.write(path, new[key].encode(), mode)
    # One reload for every changed unit: each costs seconds under TCG, and `systemctl enable`
    # would make one more of its own (hence --no-reload).
    if units or exporter:
        system.run("systemctl", "daemon-reload")
    if units:
        system.run("systemctl", "enable", "--no-reload", "--quiet", PEERS_UNIT, TIMER, SERVE_UNIT)
        system.run("systemctl", "start", TIMER, SERVE_UNIT)
    load_sysctl(system, new["sysctl"])
    system.run_both(
        ("nft", "--file", FILES["nftables.conf"][0]),
        ("wg", "syncconf", "wg0", "/dev/stdin"),
        input=strip(new["wg0.conf"]),
    )
    if new.get("mtu") and new["mtu"] != old["mtu"]:  # capture read it
        system.run("ip", "link", "set", "wg0", "mtu", str(new["mtu"]))
    # Nothing above touches routes (wg0.conf says Table = off): capture's reading holds.
    want, have = wanted_routes(system, old["own"]), set(old["routes"])
    added, removed = sorted(want - have), sorted(have - want)
    for net in added:
        add_route(system, net)
    for net in removed:
        del_route(system, net)
    set_metrics(system, new["metrics"], exporter)
    return {"routes_added": added, "routes_removed": removed}


def exporter_changed(old, new):
    """True when the exporter's program or one of its units differs from what was on disk."""
    for key in ("metrics.py", "metrics.service", "metrics.socket"):
        was = old["files"][key]
        if was is None or was["data"] != new[key].encode():
            return True
    return False


def set_metrics(system, on, changed):
    """The exporter's socket enabled and listening with the files on disk (the exporter
    starts at the next scrape), or both disabled and stopped; wg0 is not touched. `changed`:
    their files changed, and apply() has had systemd load them. A running exporter is
    stopped first: it holds the old program, and one from before the socket holds the port
    itself and was enabled on its own (the link that started it at every boot goes too)."""
    enabled = system.enabled(METRICS_UNIT)  # one systemctl less when a peer changes
    if on:
        if changed:
            system.run("systemctl", "disable", "--no-reload", "--quiet", "--now", METRICS_SERVICE)
            system.run("systemctl", "restart", METRICS_UNIT)
        elif not enabled:
            system.run("systemctl", "start", METRICS_UNIT)
        # Enabled last: an enabled socket is one this function has started.
        if not enabled:
            system.run("systemctl", "enable", "--no-reload", "--quiet", METRICS_UNIT)
    else:
        units = [
            unit
            for unit, key in (
                (METRICS_UNIT, "metrics.socket"),
                (METRICS_SERVICE, "metrics.service"),
            )
            if system.read(FILES[key][0]) is not None
        ]
        if units:
            system.run("systemctl", "disable", "--no-reload", "--quiet", "--now", *units)


def restore_file(system, path, old):
    if old is None:
        system.remove(path)
    else:
        system.write(path, old["data"], old["mode"], (old["uid"], old["gid"]))


def restore_ruleset(system, old):
    if old["files"]["nftables.conf"] is None:
        system.run("nft", "--file", "/dev/stdin", input="flush ruleset\n" + old["ruleset"])
    else:
        system.run("nft", "--file", FILES["nftables.conf"][0])


def restore_peers(system, old):
    was = old["files"]["wg0.conf"]
    conf = old["wg"] if was is None else strip(was["data"].decode("utf-8", "surrogateescape"))
    system.run("wg", "syncconf", "wg0", "/dev/stdin", input=conf)


def rollback(old, system):
    """Every step is tried, whatever failed before it; returns what could not be put back."""
    left = []

    def attempt(what, step, *args):
        try:
            step(*args)
        except Exception as e:
            left.append(f"{what}: {describe(e)}")

    if not old["metrics"]:
        attempt("metrics exporter off", set_metrics, system, False, False)
    for key, (path, _, _) in FILES.items():
        attempt(path, restore_file, system, path, old["files"][key])
    if old["metrics"] or old.get("units"):
        attempt("systemd units", system.run, "systemctl", "daemon-reload")
    if old["metrics"]:
        attempt("metrics exporter", set_metrics, system, True, True)
    for key, value in old["sysctl"].items():
        attempt(f"sysctl {key}", system.set_sysctl, sysctl_path(key), value)
    attempt("nftables ruleset", restore_ruleset, system, old)
    attempt("wg0 peers", restore_peers, system, old)
    attempt(f"wg0 MTU {old['mtu']}", system.run, "ip", "link", "set", "wg0", "mtu", str(old["mtu"]))
    want = set(old["routes"])
    try:
        have = current_routes(system)
    except Exception as e:
        return left + [f"wg0 routes: {describe(e)}"]
    for net in sorted(want - have):
        attempt(f"route {net}", add_route, system, net)
    for net in sorted(have - want):
        attempt(f"route {net} (added by the sync)", del_route, system, net)
    return left


def describe(e):
    return str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"


def outcome(line, system):
    """The one JSON object main() prints, whatever happens in apply()."""
    untouched = {"ok": False, "rolled_back": True, "untouched": True, "not_restored": []}
    try:
        new = parse(line)
    except Exception as e:
        return {**untouched, "error": f"bad request: {describe(e)}"}
    try:
        old = capture(new, system)
    except Exception as e:
        return {**untouched, "error": f"cannot record the current state: {describe(e)}"}
    try:
        result = apply(new, system, old)
    except Exception as e:
        left = rollback(old, system)
        return {
            "ok": False,
            "rolled_back": not left,
            "untouched": False,
            "error": describe(e),
            "not_restored": left,
        }
    return {"ok": True, "rolled_back": False, "untouched": False, "error": "", **result}


def sync():
    dump, ip, names = sh_all(WG_DUMP, IP_SYNC, meanwhile=files)
    routes, addrs = ip_batch(ip)
    light = {
        "wg": wg_dump(dump),
        "files": names,
        "addresses": interface_addresses(addrs),
        "routes": routes,
        "metrics": metrics_facts(None),
    }
    print(json.dumps(light), flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return
    print(json.dumps(outcome(line, System())), flush=True)


# --- takeover: an upgrade's new appliance just got the LAN link ---------------------------


def garp(ifname, address):
    """A gratuitous ARP request for `address` from `ifname`: the bridge learns the port the
    MAC is on now, and every neighbour refreshes its entry."""
    import socket

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        mac = s.getsockname()[4]
        ip = socket.inet_aton(address)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\0" * 6 + ip
        s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)


KEEPALIVES = "/run/wg-appliance-takeover-keepalives.json"
CARRIER_POLL_S = 0.02


def has_carrier(ifname):
    try:
        with open(f"/sys/class/net/{ifname}/carrier") as f:
            return f.read().strip() == "1"
    except OSError:  # EINVAL while the interface is down
        return False


def configured_keepalives():
    """Each peer's keepalive as configured: the live values, or those an earlier takeover
    recorded before it set them to 0 (when it did not live to put them back)."""
    with contextlib.suppress(OSError, ValueError), open(KEEPALIVES) as f:
        return json.load(f)
    keepalive = {}
    for line in sh("wg", "show", "wg0", "persistent-keepalive")["out"].splitlines():
        key, _, value = line.partition("\t")
        keepalive[key] = "0" if value.strip() in ("off", "") else value.strip()
    System().write(KEEPALIVES, json.dumps(keepalive).encode(), 0o600)
    return keepalive


def peer_sections(conf):
    """The [Peer] sections of `wg showconf` by public key, each as its lines."""
    out, lines = {}, None
    for line in conf.splitlines():
        if line.strip().startswith("["):
            lines = [] if line.strip() == "[Peer]" else None
            continue
        if lines is None:
            continue
        key, _, value = line.partition("=")
        if key.strip() == "PublicKey":
            out[value.strip()] = lines
        lines.append(line)
    return out


def renew_peers(peers, system):
    """Each peer removed from wg0 and added again as it was, with the endpoint the old
    appliance saw and no keepalive. The kernel sends no handshake initiation within 5 s of
    its last one (REKEY_TIMEOUT), and a peer with a keepalive but no endpoint tries every
    5 s for 90 s after wg0 comes up: kicked as it is, such a peer (a branch) waits for its
    next retry. A peer made now may start one at once. "" or what failed (wg0 as it was)."""
    conf = system.run("wg", "showconf", "wg0")
    sections = peer_sections(conf)
    text = ""
    for key, endpoint in peers:
        lines = [ln for ln in sections[key] if ln.partition("=")[0].strip() not in RENEWED]
        text += "[Peer]\n" + "\n".join(lines) + f"\nEndpoint = {endpoint}\n"
    try:
        system.run("wg", "set", "wg0", *[w for k, _ in peers for w in ("peer", k, "remove")])
        system.run("wg", "addconf", "wg0", "/dev/stdin", input=text)
    except Failed as e:
        system.run("wg", "syncconf", "wg0", "/dev/stdin", input=conf)
        return str(e)
    return ""


RENEWED = ("", "Endpoint", "PersistentKeepalive")  # "": the blank line ending a section


def takeover(args, clock=time.monotonic, system=None):
    """Tunnels back at once: every peer's endpoint as the old appliance last saw it, and a
    handshake started the moment the LAN link comes up (a keepalive switched on sends one at
    once when none was set), instead of waiting for each client's retry. Started before the
    switch: the peers are renewed with their endpoints while the link is down (no frame
    passes), then the file `armed` says it is ready, and it polls the carrier, so nothing is
    left to start after it.
    Keepalives are then put back as configured.
    ARG: {"lan": IFNAME, "address": IPV4, "peers": [[PUBLIC_KEY, ENDPOINT], ...],
    "armed": PATH or absent, "carrier_s": seconds to wait for the link}."""
    system = system or System()
    keepalive = configured_keepalives()
    peers = [(k, e) for k, e in args.get("peers", []) if k in keepalive and e]
    out = {"garp": 0, "kicked": len(peers)}

    def wg_set(argv):
        if argv:
            r = sh("wg", "set", "wg0", *argv)
            if r["rc"] != 0:
                out["error"] = r["err"].strip()[:300]

    def announce():
        if args.get("address"):
            try:
                garp(args["lan"], args["address"])
                out["garp"] += 1
            except OSError as e:
                out["error"] = f"gratuitous ARP: {e}"

    try:
        failed = renew_peers(peers, system) if peers else ""
    except (Failed, KeyError) as e:
        failed = f"wg showconf: {describe(e)}"
    if failed:  # the peers as they are: their handshakes may wait for a retry
        out["error"] = f"peers not renewed: {failed}"[:300]
        wg_set(
            [w for k, e in peers for w in ("peer", k, "endpoint", e, "persistent-keepalive", "0")]
        )
    if args.get("armed"):
        system.write(args["armed"], b"", 0o600)
    t0 = clock()
    while not has_carrier(args["lan"]):
        if clock() - t0 > args.get("carrier_s", 0):
            out["error"] = f"{args['lan']} got no carrier within {args.get('carrier_s', 0)}s"
            break
        time.sleep(CARRIER_POLL_S)
    else:
        out["carrier_after_s"] = round(clock() - t0, 3)
        announce()
        wg_set([w for k, _ in peers for w in ("peer", k, "persistent-keepalive", "25")])
        for _ in range(2):
            time.sleep(0.05)
            announce()
    wg_set([w for k, _ in peers for w in ("peer", k, "persistent-keepalive", keepalive[k])])
    for path in (KEEPALIVES, args.get("armed")):
        if path:
            system.remove(path)
    return out


# --- serve: the agent kept running for the admin's SSH login ---------------------------------

# systemd's socket unit listens here (mode 0600, owned by the admin user); the tool reaches it
# with SSH's direct-streamlocal channel, so a call pays neither sudo nor a Python start nor
# the agent's imports (most of a second under TCG).
SERVE_SOCKET = "/run/wg-appliance-agent.sock"
SERVE_REQUEST_MAX = 1024 * 1024
SERVE_REQUEST_S = 10.0
# The server's first line: it runs the request, or it is not the agent of the digest asked
# for (the tool then runs that one through sudo, which keeps it).
SERVE_RUN, SERVE_MISSING = b"RUN\n", b"MISSING\n"
# After the agent's output, this byte (never in its JSON) starts the line with the exit code
# and stderr: {"rc": int, "stderr": str}.
SERVE_END = "\0"


def agent_name(source):
    """The module name the tool gives the agent whose source is the bytes `source`: agent_
    and its digest, so two versions never share a kept copy."""
    return "agent_" + sha256(source).hexdigest()[:16]


def source_name(path):
    """The module name of the agent in the file at `path`."""
    with open(path, "rb") as f:
        return agent_name(f.read())


def peer_uid(conn):
    import socket

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def serve(listener, program):
    """Accept calls on `listener` (systemd's socket) and run each in a fork of this process,
    which has the agent loaded already. Only root and the socket's owner may call: the
    file's mode says so, the caller's credentials say it again. `program`: this agent's
    file, whose digest a call must ask for."""
    name = source_name(program)
    socket_path = listener.getsockname()
    server = os.getpid()
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # a caller gone before it was taken
            continue
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        try:
            if peer_uid(conn) in (0, os.stat(socket_path).st_uid) and os.fork() == 0:
                listener.close()
                code = 1
                try:
                    code = serve_one(conn, name, program, server)
                finally:
                    os._exit(code)
        except OSError:  # no fork now: the caller sees the socket close, and uses sudo
            pass
        conn.close()


def serve_one(conn, name, program, server):
    """One call in a forked child: the request line {"agent": name, "argv": [...]}, then the
    agent's main() with the socket as its stdin and stdout, then the end line. A request for
    another agent than this one is answered MISSING; when this one's file was replaced
    meanwhile, the server is told to exit (systemd starts the new file on the next call)."""
    import io
    import traceback

    conn.settimeout(SERVE_REQUEST_S)
    reader = conn.makefile("rb")
    try:
        request = json.loads(reader.readline(SERVE_REQUEST_MAX))
        argv, asked = request["argv"], request["agent"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        return 0
    conn.settimeout(None)
    if asked != name:
        conn.sendall(SERVE_MISSING)
        if source_name(program) != name and os.getppid() == server:
            os.kill(server, 15)
        return 0
    conn.sendall(SERVE_RUN)
    out = conn.makefile("w", encoding="utf-8", errors="surrogateescape", newline="\n")
    err = io.StringIO()
    sys.stdin = io.TextIOWrapper(reader, encoding="utf-8", errors="surrogateescape")
    sys.stdout, sys.stderr, sys.argv = out, err, ["agent", *argv]
    rc = 0
    try:
        main()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    except BaseException:
        rc = 1
        err.write(traceback.format_exc())
    out.write("\n" + SERVE_END + json.dumps({"rc": rc, "stderr": err.getvalue()[-4000:]}) + "\n")
    out.flush()
    return 0


def serve_systemd():
    """`serve`: the listening socket systemd passed (LISTEN_FDS), this file as the program."""
    import socket

    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.exit("serve: start me from wg-appliance-agent.socket (no socket was passed)")
    serve(socket.socket(fileno=3), os.path.abspath(sys.argv[0]))


def answer(doc):
    """One JSON document on stdout, encoded whole: json.dump() writes through the pure-Python
    encoder, which under TCG takes half a second for a 1000-peer dump; dumps() uses C."""
    sys.stdout.write(json.dumps(doc))
    sys.stdout.flush()


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "probe":
        answer(facts(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}))
    elif mode == "status":
        answer(status())
    elif mode == "sync":
        sync()
    elif mode == "peers":
        print(json.dumps(peers_tick(System())), flush=True)
        tick()
    elif mode == "takeover":
        answer(takeover(json.loads(sys.argv[2])))
    elif mode == "serve":
        serve_systemd()
    else:
        sys.exit(
            "usage: agent probe ARG | agent status | agent sync | agent peers | agent takeover"
            f" ARG | agent serve (not {mode!r})"
        )


if __name__ == "__main__":
    main()
