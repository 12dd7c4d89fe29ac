"""Runs inside the appliance for `sync`, as `sudo python3 -S -c PROGRAM` where PROGRAM is
`PROBE = '<guest_probe.py source>'` followed by this file: one process, one SSH channel.

It prints the light probe's facts as one JSON line, then reads one line from stdin: empty
means nothing to do; otherwise {"wg0.conf": str, "nftables.conf": str, "sysctl": str,
"mtu": int}, applied without restarting the tunnel or rolled back as a whole, and the
outcome printed as one JSON line: {"ok", "rolled_back", "error", "routes_added", ...}.

`wg syncconf` changes only what differs, so unchanged peers keep their sessions; `nft -f`
applies the whole ruleset file (it starts with `flush ruleset`) as one transaction.
"""

import ipaddress
import json
import os
import subprocess
import sys

FILES = {
    "wg0.conf": ("/etc/wireguard/wg0.conf", 0o600),
    "nftables.conf": ("/etc/nftables.conf", 0o644),
    "sysctl": ("/etc/sysctl.d/90-wg-appliance.conf", 0o644),
}


class Failed(Exception):
    pass


def sh(*argv, input=None):
    p = subprocess.run(argv, capture_output=True, text=True, input=input)
    if p.returncode != 0:
        raise Failed(f"{' '.join(argv[:3])}: {p.stderr.strip()[-300:]}")
    return p.stdout


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def write(path, text, mode):
    """Atomic replace; identical content is left alone (a rollback rewrites only what moved)."""
    if read(path) == text:
        return
    tmp = path + ".wga-new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


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


def strip(conf):
    """What `wg-quick strip` does, without a bash loop over every line (slow with 1000 peers)."""
    keep = []
    for line in conf.splitlines(keepends=True):
        key = line.split("=", 1)[0].strip().lower()
        if "=" in line and key in WG_QUICK_KEYS:
            continue
        keep.append(line)
    return "".join(keep)


def wanted_routes():
    """AllowedIPs outside wg0's own subnets need routes via wg0 (what wg-quick adds at up)."""
    own = sh("ip", "-j", "addr", "show", "dev", "wg0")
    own = [f"{a['local']}/{a['prefixlen']}" for i in json.loads(own) for a in i["addr_info"]]
    nets = set()
    for line in sh("wg", "show", "wg0", "allowed-ips").splitlines():
        for net in line.split()[1:]:
            if net != "(none)":
                nets.add(net)
    own_nets = [ipaddress.ip_interface(a).network for a in own]
    return {
        n
        for n in nets
        if not any(
            ipaddress.ip_network(n).subnet_of(o)
            for o in own_nets
            if o.version == ipaddress.ip_network(n).version
        )
    }


def current_routes():
    out = set()
    for family in ("-4", "-6"):
        for r in json.loads(
            sh("ip", "-j", family, "route", "show", "dev", "wg0", "proto", "boot") or "[]"
        ):
            dst = r["dst"]
            if "/" not in dst and dst != "default":
                dst += "/32" if family == "-4" else "/128"
            out.add(dst)
    return out


def apply(new):
    for key, (path, mode) in FILES.items():
        write(path, new[key], mode)
    sh("sysctl", "--load", FILES["sysctl"][0])
    sh("nft", "--file", FILES["nftables.conf"][0])
    sh("wg", "syncconf", "wg0", "/dev/stdin", input=strip(new["wg0.conf"]))
    if new.get("mtu"):
        sh("ip", "link", "set", "wg0", "mtu", str(new["mtu"]))
    want, have = wanted_routes(), current_routes()
    for net in sorted(want - have):
        sh("ip", "route", "replace", net, "dev", "wg0", "proto", "boot")
    for net in sorted(have - want):
        sh("ip", "route", "del", net, "dev", "wg0")
    return {"routes_added": sorted(want - have), "routes_removed": sorted(have - want)}


def main():
    probe = {}
    exec(globals()["PROBE"], probe)
    facts = {"wg": probe["wg_dump"](), "files": probe["files"](), "addresses": probe["addresses"]()}
    print(json.dumps(facts), flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return
    new = json.loads(line)
    old = {key: read(path) for key, (path, _) in FILES.items()}
    try:
        result = apply(new)
        print(json.dumps({"ok": True, "rolled_back": False, "error": "", **result}))
    except (Failed, OSError) as e:
        restored = all(old.values())
        if restored:
            try:
                apply(old)
            except (Failed, OSError) as e2:
                restored = False
                e = Failed(f"{e}; rollback failed too: {e2}")
        print(json.dumps({"ok": False, "rolled_back": restored, "error": str(e)}))


if __name__ == "__main__":
    main()
