"""Routes via wg0 for the peer networks, run in the appliance each time wg-quick@wg0 starts
(the seed installs it with a systemd drop-in). Standard library only.

wg0.conf says `Table = off`: wg-quick's own route step runs `ip` once for every allowed IP,
which at 1000 peers under TCG takes most of a first boot. This reads the allowed IPs once and
adds a route for each network outside wg0's own subnets (what wg-quick would add, and what
the agent's sync keeps) in one `ip -batch`.
"""

import ipaddress
import json
import subprocess
import sys


def beyond(allowed, own):
    """The allowed networks that no subnet of wg0's own addresses contains."""
    out = []
    for text in allowed:
        net = ipaddress.ip_network(text, strict=False)
        if not any(net.version == o.version and net.subnet_of(o) for o in own):
            out.append(str(net))
    return sorted(set(out))


def batch(dev, nets):
    """`ip -batch` input: one `route replace` a network, so a restart changes nothing."""
    return "".join(f"route replace {net} dev {dev}\n" for net in nets)


def output(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def main(dev="wg0"):
    links = json.loads(output("ip", "-j", "addr", "show", "dev", dev) or "[]")
    own = [
        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
        for link in links
        for a in link.get("addr_info", [])
    ]
    allowed = [
        net
        for line in output("wg", "show", dev, "allowed-ips").splitlines()
        for net in line.split()[1:]
        if net != "(none)"
    ]
    nets = beyond(allowed, own)
    if nets:
        subprocess.run(["ip", "-batch", "-"], input=batch(dev, nets), text=True, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
