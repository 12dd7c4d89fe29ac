"""Runs inside the appliance for `sync`, as `sudo python3 -S -c PROGRAM` where PROGRAM is
`PROBE = '<guest_probe.py source>'` followed by this file: one process, one SSH channel.

It prints the light probe's facts as one JSON line, then reads one line from stdin: empty
means nothing to do; otherwise {"wg0.conf": str, "nftables.conf": str, "sysctl": str,
"mtu": int}, applied without restarting the tunnel or rolled back as a whole, and the
outcome printed as one JSON line: {"ok", "rolled_back", "untouched", "error",
"not_restored", "routes_added", "routes_removed"}.

`wg syncconf` changes only what differs, so unchanged peers keep their sessions; `nft -f`
applies the whole ruleset file (it starts with `flush ruleset`) as one transaction.

Before anything changes, everything apply() may change is recorded: each file with its mode
and owner (or its absence), the live values of the sysctl keys the new file sets, wg0's MTU
and routes, and, where no old file holds them, the live ruleset and peers. Any exception
puts all of it back, step by step, and names each step that could not be undone.
"""

import contextlib
import ipaddress
import json
import os
import stat
import subprocess
import sys

FILES = {
    "wg0.conf": ("/etc/wireguard/wg0.conf", 0o600),
    "nftables.conf": ("/etc/nftables.conf", 0o644),
    "sysctl": ("/etc/sysctl.d/90-wg-appliance.conf", 0o644),
}
MTU_PATH = "/sys/class/net/wg0/mtu"


class Failed(Exception):
    """A command in the guest exited non-zero."""


class System:
    """The guest's files and commands; tests stand in a fake with the same four methods."""

    def run(self, *argv, input=None):
        data = None if input is None else input.encode("utf-8", "surrogateescape")
        p = subprocess.run(argv, capture_output=True, input=data, timeout=120)
        if p.returncode != 0:
            err = p.stderr.decode("utf-8", "replace").strip()[-300:]
            raise Failed(f"{' '.join(argv[:3])}: {err}")
        return p.stdout.decode("utf-8", "replace")

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


def sysctl_keys(text):
    """The keys a sysctl.d file sets, in its order (a leading '-' only mutes errors)."""
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            keys.append(line.split("=", 1)[0].strip().lstrip("-"))
    return keys


def sysctl_path(key):
    """sysctl.d(5): the first separator decides; with a dot first, '/' stands for a '.'."""
    if "/" in key and ("." not in key or key.index("/") < key.index(".")):
        return "/proc/sys/" + key
    return "/proc/sys/" + key.replace("/", "\0").replace(".", "/").replace("\0", ".")


def wanted_routes(system):
    """AllowedIPs outside wg0's own subnets need routes via wg0 (what wg-quick adds at up)."""
    own = system.run("ip", "-j", "addr", "show", "dev", "wg0")
    own = [f"{a['local']}/{a['prefixlen']}" for i in json.loads(own) for a in i["addr_info"]]
    nets = set()
    for line in system.run("wg", "show", "wg0", "allowed-ips").splitlines():
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


def current_routes(system):
    out = set()
    for family in ("-4", "-6"):
        listed = system.run("ip", "-j", family, "route", "show", "dev", "wg0", "proto", "boot")
        for r in json.loads(listed or "[]"):
            dst = r["dst"]
            if "/" not in dst and dst != "default":
                dst += "/32" if family == "-4" else "/128"
            out.add(dst)
    return out


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
    return new


def capture(new, system):
    """Everything apply(new) may change, as it is now."""
    files = {key: system.read(path) for key, (path, _) in FILES.items()}
    sysctl = {}
    for key in sysctl_keys(new["sysctl"]):
        have = system.read(sysctl_path(key))
        if have is not None:
            sysctl[key] = have["data"].decode().strip()
    mtu = system.read(MTU_PATH)
    if mtu is None:
        raise Failed("wg0 does not exist")
    old = {
        "files": files,
        "sysctl": sysctl,
        "mtu": int(mtu["data"]),
        "routes": sorted(current_routes(system)),
    }
    if files["nftables.conf"] is None:
        old["ruleset"] = system.run("nft", "list", "ruleset")
    if files["wg0.conf"] is None:
        old["wg"] = system.run("wg", "showconf", "wg0")
    return old


def apply(new, system):
    for key, (path, mode) in FILES.items():
        system.write(path, new[key].encode(), mode)
    system.run("sysctl", "--load", FILES["sysctl"][0])
    system.run("nft", "--file", FILES["nftables.conf"][0])
    system.run("wg", "syncconf", "wg0", "/dev/stdin", input=strip(new["wg0.conf"]))
    if new.get("mtu"):
        system.run("ip", "link", "set", "wg0", "mtu", str(new["mtu"]))
    want, have = wanted_routes(system), current_routes(system)
    added, removed = sorted(want - have), sorted(have - want)
    for net in added:
        add_route(system, net)
    for net in removed:
        del_route(system, net)
    return {"routes_added": added, "routes_removed": removed}


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

    for key, (path, _) in FILES.items():
        attempt(path, restore_file, system, path, old["files"][key])
    for key, value in old["sysctl"].items():
        attempt(f"sysctl {key}", system.run, "sysctl", "-q", "-w", f"{key}={value}")
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
        result = apply(new, system)
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


def main():
    probe = {}
    exec(globals()["PROBE"], probe)
    facts = {"wg": probe["wg_dump"](), "files": probe["files"](), "addresses": probe["addresses"]()}
    print(json.dumps(facts), flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return
    print(json.dumps(outcome(line, System())), flush=True)


if __name__ == "__main__":
    main()
