"""wg0 up without wg-quick, run in the appliance by the `wg-quick@wg0` unit (the seed replaces
its commands with a systemd drop-in). Standard library only.

wg-quick parses wg0.conf line by line in bash: with 1000 peers (5000 lines) that takes about
9 s of a first boot under TCG, and its route step runs `ip` once per allowed IP. This reads
wg0.conf once and brings wg0 up as wg-quick would, in three commands: `ip link add`, `wg
setconf` on the config without wg-quick's own keys, and one `ip -batch` for the addresses,
MTU, link state and a route for each allowed network outside wg0's own subnets (the routes
wg-quick would add with its default table, and what the agent's sync keeps).

`up DEV` brings DEV up from /etc/wireguard/DEV.conf; run again, it changes nothing.
`reload DEV` applies a changed config to the running DEV with `wg syncconf` (sessions stay).
"""

import ipaddress
import os
import subprocess
import sys

CONF = "/etc/wireguard/{}.conf"
SYS = "/sys/class/net/{}"
# Keys of [Interface] that are wg-quick's, not wg(8)'s: taken out before `wg setconf`.
QUICK_KEYS = frozenset(
    ("address", "dns", "mtu", "table", "preup", "postup", "predown", "postdown", "saveconfig")
)


def parse(conf):
    """(wg(8) config, {wg-quick key: [values]}, allowed IPs): one pass over the lines."""
    wg, quick, allowed = [], {}, []
    section = ""
    for line in conf.splitlines(keepends=True):
        text = line.split("#", 1)[0].strip()
        if text.startswith("["):
            section = text.lower()
        key, eq, value = text.partition("=")
        key = key.strip().lower()
        if eq and section == "[interface]" and key in QUICK_KEYS:
            quick.setdefault(key, []).extend(v.strip() for v in value.split(",") if v.strip())
            continue
        if eq and key == "allowedips":
            allowed.extend(v.strip() for v in value.split(",") if v.strip())
        wg.append(line)
    return "".join(wg), quick, allowed


def beyond(allowed, own):
    """The allowed networks that no subnet of wg0's own addresses contains."""
    out = []
    for text in allowed:
        net = ipaddress.ip_network(text, strict=False)
        if not any(net.version == o.version and net.subnet_of(o) for o in own):
            out.append(str(net))
    return sorted(set(out))


def batch(dev, quick, allowed):
    """`ip -batch` input: addresses, MTU and link up, then the routes; every line a replace,
    so a second run changes nothing."""
    addrs = quick.get("address", [])
    own = [ipaddress.ip_interface(a).network for a in addrs]
    lines = [f"address replace {a} dev {dev}\n" for a in addrs]
    mtu = quick.get("mtu", [])
    lines.append(f"link set dev {dev}" + (f" mtu {int(mtu[-1])}" if mtu else "") + " up\n")
    lines += [f"route replace {net} dev {dev}\n" for net in beyond(allowed, own)]
    return "".join(lines)


def run(*argv, input=None):
    subprocess.run(argv, input=input, text=True, check=True)


def up(dev):
    with open(CONF.format(dev)) as f:
        wg, quick, allowed = parse(f.read())
    made = not os.path.exists(SYS.format(dev))
    if made:
        run("ip", "link", "add", "dev", dev, "type", "wireguard")
    try:
        run("wg", "setconf", dev, "/dev/stdin", input=wg)
        run("ip", "-batch", "-", input=batch(dev, quick, allowed))
    except (subprocess.CalledProcessError, ValueError):
        if made:  # as wg-quick does: a half-made interface does not stay
            subprocess.run(["ip", "link", "delete", "dev", dev], check=False)
        raise


def reload(dev):
    with open(CONF.format(dev)) as f:
        wg, quick, allowed = parse(f.read())
    run("wg", "syncconf", dev, "/dev/stdin", input=wg)
    run("ip", "-batch", "-", input=batch(dev, quick, allowed))


def main(mode="up", dev="wg0"):
    {"up": up, "reload": reload}[mode](dev)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
