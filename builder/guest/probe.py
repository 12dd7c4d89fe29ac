"""Runs inside the appliance (sent over SSH to `sudo python3 -`): gathers all facts in one
round trip and prints them as one JSON document. Standard library only; secrets never
leave the guest (preshared keys are sent as hashes, private keys not at all).

Argument (JSON, first line of stdin is not used; argv[1]): {"gateway": "192.168.1.1"}.
"""

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time


def sh(*argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return {"rc": p.returncode, "out": p.stdout, "err": p.stderr[-2000:]}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"rc": 127, "out": "", "err": str(e)}


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def wg_dump():
    r = sh("wg", "show", "wg0", "dump")
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
                "psk_sha256": None if psk == "(none)" else hashlib.sha256(psk.encode()).hexdigest(),
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
    """ICMP echo through a raw socket (root): no ping binary needed in the image."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as e:
        return {"ok": False, "detail": str(e)}
    s.settimeout(timeout)
    ident = os.getpid() & 0xFFFF
    for seq in range(tries):
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        payload = b"wg-appliance"
        data = header + payload
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        checksum = ~(total + (total >> 16)) & 0xFFFF
        packet = struct.pack("!BBHHH", 8, 0, checksum, ident, seq) + payload
        t0 = time.monotonic()
        try:
            s.sendto(packet, (host, 0))
            while True:
                reply, addr = s.recvfrom(1024)
                ihl = (reply[0] & 0xF) * 4
                rtype, _, _, rid, rseq = struct.unpack("!BBHHH", reply[ihl : ihl + 8])
                if addr[0] == host and rtype == 0 and rid == ident and rseq == seq:
                    return {"ok": True, "detail": "%.1f ms" % ((time.monotonic() - t0) * 1000)}
        except OSError:
            continue
    return {"ok": False, "detail": f"no echo reply in {tries} tries"}


def file_sha256(path):
    text = read(path, None)
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def files():
    return {
        "wg0.conf": file_sha256("/etc/wireguard/wg0.conf"),
        "nftables.conf": file_sha256("/etc/nftables.conf"),
        "sysctl": file_sha256("/etc/sysctl.d/90-wg-appliance.conf"),
    }


def addresses():
    r = sh("ip", "-j", "addr", "show")
    if r["rc"] != 0:
        return {}
    return {
        i["ifname"]: [
            f"{a['local']}/{a['prefixlen']}"
            for a in i.get("addr_info", [])
            if a.get("scope") == "global"
        ]
        for i in json.loads(r["out"])
    }


def main():
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    link = sh("ip", "-j", "link", "show", "wg0")
    routes = sh("ip", "-j", "route", "show", "table", "main")
    routes6 = sh("ip", "-j", "-6", "route", "show", "table", "main")
    st = os.statvfs("/")
    meminfo = dict(
        (ln.split(":")[0], int(ln.split()[1]) * 1024)
        for ln in read("/proc/meminfo").splitlines()
        if ln.split()[1:2]
    )
    facts = {
        "time": time.time(),
        # The files `cloud-init status` reads; the command itself costs seconds under TCG.
        "cloud_init_status": read("/run/cloud-init/status.json", ""),
        "cloud_init_result": read("/run/cloud-init/result.json", ""),
        "cloud_init_log_tail": read("/var/log/cloud-init.log")[-3000:],
        "wg": wg_dump(),
        "wg_link": json.loads(link["out"] or "[]") if link["rc"] == 0 else [],
        "ip_forward": read("/proc/sys/net/ipv4/ip_forward").strip(),
        "ip6_forward": read("/proc/sys/net/ipv6/conf/all/forwarding").strip(),
        "nft": sh("nft", "list", "ruleset"),
        "routes": json.loads(routes["out"] or "[]") + json.loads(routes6["out"] or "[]"),
        "gateway": ping(args["gateway"]) if args.get("gateway") else None,
        "files": files(),
        "addresses": addresses(),
        "disk_free": st.f_bavail * st.f_frsize,
        "disk_total": st.f_blocks * st.f_frsize,
        "mem_available": meminfo.get("MemAvailable", 0),
        "mem_total": meminfo.get("MemTotal", 0),
        "uptime": float(read("/proc/uptime", "0 0").split()[0]),
    }
    json.dump(facts, sys.stdout)


if __name__ == "__main__":
    main()
