"""Property-based: hostile strings into every string-valued key of the site file.

For each key, hypothesis feeds strings made of the characters and fragments that break the
languages the tool writes (line breaks, `%scope`, `[Interface]`/`PreUp =`, quotes, `;`, `$()`,
YAML's own line separators, XML specials, terminal escapes), alone and around a valid value.
Either the site is refused with an InputError on one printable line, or every output passes
its real judge: `wg-quick strip` (and no PreUp/PostUp/PreDown/PostDown, exactly one
[Interface]) for wg0.conf and every peer config, YAML for the seed files, `nft --check` in a
throwaway network namespace for the ruleset, `sh -n` for IPFire's firewall.local and the host
probe, and `virt-xml-validate` for the domain XML.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import InputError
from builder.model.site import parse_site
from builder.provision import volume_names, wanted_metadata
from builder.remote.ipfire import probe_script
from builder.render import ipfire
from builder.render.appliance import (
    render_nftables,
    render_peer_config,
    render_peers_json,
    render_seed,
    render_wg_conf,
)
from builder.render.libvirt_xml import DomainSpec, domain_xml
from tests.plugins.samples import ADMIN_KEY, BASE, HOST_KEY, LAPTOP_PRIVATE, PSK, WG_PRIVATE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="nft --check needs a network namespace")

FRAGMENTS = [
    "\n",
    "\r",
    "\n[Interface]\nPreUp = touch /tmp/wga-pwned\n",
    "\nPostUp = id",
    "%x",
    "%",
    "'",
    '"',
    ";",
    "$(touch /tmp/wga-pwned)",
    "`id`",
    "#",
    " ",
    "\t",
    "\\",
    "\u2028",
    "\x85",
    "\x00",
    "\x1b[2J",
    "]]>",
    "<x>",
    "&amp;",
    "{{ 7*7 }}",
    ": ",
    "- ",
    "/",
    "..",
    ",",
    "=",
    "[",
    "}",
    "-j ACCEPT",
    "?no_verify=1",
    "&command=/bin/sh",
]

# Every key of the base site that holds a string, with its TOML location.
KEYS = {
    "appliance.name": ("appliance", "name"),
    "host.uri": ("host", "uri"),
    "host.bridge": ("host", "bridge"),
    "host.pool": ("host", "pool"),
    "host.pool_path": ("host", "pool_path"),
    "lan.address[0]": ("lan", "address", 0),
    "lan.address[1]": ("lan", "address", 1),
    "lan.gateway[0]": ("lan", "gateway", 0),
    "lan.gateway[1]": ("lan", "gateway", 1),
    "lan.dns[0]": ("lan", "dns", 0),
    "lan.dns[1]": ("lan", "dns", 1),
    "lan.mac": ("lan", "mac"),
    "ssh.user": ("ssh", "user"),
    "ssh.authorized_keys[0]": ("ssh", "authorized_keys", 0),
    "wireguard.address[0]": ("wireguard", "address", 0),
    "wireguard.address[1]": ("wireguard", "address", 1),
    "wireguard.mode": ("wireguard", "mode"),
    "wireguard.endpoint": ("wireguard", "endpoint"),
    "wireguard.client_dns[0]": ("wireguard", "client_dns", 0),
    "peers[0].name": ("peers", 0, "name"),
    "peers[0].address[1]": ("peers", 0, "address", 1),
    "peers[0].public_key": ("peers", 0, "public_key"),
    "peers[1].networks[0]": ("peers", 1, "networks", 0),
    "peers[1].endpoint": ("peers", 1, "endpoint"),
    "peers[0].allow[0]": ("peers", 0, "allow", 0),
}
VALID = {
    "host.uri": "qemu+ssh://root@ipfire:222/system",
    "host.bridge": "green0",
    "host.pool": "wg-appliance",
    "host.pool_path": "/var/lib/libvirt/images/wg-appliance",
    "lan.mac": "02:11:22:33:44:55",
    "ssh.user": "wgadmin",
    "wireguard.mode": "routed",
    "wireguard.client_dns[0]": "fd09::53",
    "peers[0].public_key": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
    "peers[1].endpoint": "branch.example.org:51820",
    "peers[0].allow[0]": "192.168.1.20/32 tcp/443",
}


def base_data() -> dict:
    data = tomllib.loads(BASE)
    data["host"] = {}
    data["lan"].update(
        address=["192.168.1.50/24", "fd01:1::50/64"],
        gateway=["192.168.1.1", "fd01:1::1"],
        dns=["192.168.1.1", "fd01:1::1"],
    )
    data["wireguard"]["client_dns"] = ["192.168.1.1"]
    data["peers"][1]["endpoint"] = "branch.example.org:51820"
    data["peers"][0]["allow"] = ["192.168.1.20/32 tcp/443"]
    return data


def put(data: dict, where: tuple, value: str) -> None:
    *parents, last = where
    node = data
    for p in parents:
        node = node[p]
    node[last] = value


def get(data: dict, where: tuple):
    node = data
    for p in where:
        node = node[p]
    return node


# Printable characters that mean something in shell, nftables, wg-quick, YAML or XML: the
# ones a validator may let through, so the quoting behind it gets exercised.
METACHARS = list(" '\"`;$(){}[]<>&|#=,:*?!~^%\\") + ["{{", "]]>", "-j ACCEPT", "::"]


def hostile(valid: str) -> st.SearchStrategy[str]:
    fragments = st.lists(st.sampled_from(FRAGMENTS), max_size=3).map("".join)
    metachars = st.lists(st.sampled_from(METACHARS), min_size=1, max_size=3).map("".join)
    return st.one_of(
        st.builds(lambda m: valid + m, metachars),
        st.builds(lambda m: m + valid, metachars),
        st.text(max_size=30),
        st.builds(lambda a, b: a + valid + b, fragments, fragments),
        st.builds(
            lambda a, b: valid[: len(valid) // 2] + a + valid[len(valid) // 2 :] + b,
            fragments,
            st.text(max_size=5),
        ),
    )


WG_QUICK_KEYS = {
    "address", "dns", "mtu", "table", "privatekey", "listenport", "fwmark", "publickey",
    "presharedkey", "allowedips", "endpoint", "persistentkeepalive", "saveconfig",
}  # fmt: skip


def judge_wg_quick(name: str, text: str, tmp: Path) -> None:
    sections = re.findall(r"(?m)^\s*\[(\w+)\]\s*$", text)
    assert sections.count("Interface") == 1, f"{name}: {sections}"
    for line in text.splitlines():
        body = line.split("#", 1)[0].strip()
        if not body or body in ("[Interface]", "[Peer]"):
            continue
        key = body.split("=", 1)[0].strip().lower()
        assert "=" in body and key in WG_QUICK_KEYS, f"{name}: unexpected line {line!r}"
        assert key not in ("preup", "postup", "predown", "postdown"), f"{name}: {line!r}"
    f = tmp / "wg0.conf"
    f.write_text(text)
    f.chmod(0o600)
    r = subprocess.run(["wg-quick", "strip", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, f"{name}: {r.stderr}"


def judge_all(site, tmp: Path) -> None:
    from builder.model.keys import Keys, PeerKeys, wg_pubkey

    peers = {}
    for p in site.peers:
        if p.public_key:
            peers[p.name] = PeerKeys(p.public_key, None, PSK)
        else:
            peers[p.name] = PeerKeys(wg_pubkey(LAPTOP_PRIVATE), LAPTOP_PRIVATE, PSK)
    keys = Keys(WG_PRIVATE, HOST_KEY, ADMIN_KEY, peers)
    judge_wg_quick("wg0.conf", render_wg_conf(site, keys), tmp)
    for p in site.peers:
        judge_wg_quick(f"peer {p.name}", render_peer_config(site, keys, p), tmp)
    seed = render_seed(site, keys)
    user_data = yaml.safe_load(seed["user-data"])
    assert user_data["hostname"] == site.name
    assert user_data["users"][0]["name"] == site.ssh.user
    assert yaml.safe_load(seed["network-config"])["ethernets"]["lan0"]["match"] == {
        "macaddress": site.lan.mac
    }
    assert yaml.safe_load(seed["meta-data"])["local-hostname"] == site.name
    doc = json.loads(render_peers_json(site, keys))
    assert [p["name"] for p in doc["peers"]] == [p.name for p in site.peers if p.dns_endpoint]
    nft = tmp / "nft.conf"
    nft.write_text(render_nftables(site))
    r = subprocess.run(["unshare", "--net", "nft", "--check", "-f", str(nft)], capture_output=True)
    assert r.returncode == 0, r.stderr
    for script in (ipfire.host_files(site).firewall_local, probe_script(site)):
        r = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    names = volume_names(site.name, "0" * 64)
    xml = tmp / "domain.xml"
    xml.write_text(
        domain_xml(
            DomainSpec(
                name=site.name,
                memory_mib=site.appliance.memory_mib,
                vcpus=site.appliance.vcpus,
                virt_type="qemu",
                disk_path=f"{site.host.pool_path}/{names['disk']}",
                seed_path=f"{site.host.pool_path}/{names['seed']}",
                bridge=site.host.bridge,
                mac=site.lan.mac,
                serial_log_path=f"{site.host.pool_path}/{names['serial']}",
                metadata=wanted_metadata(site, "1" * 64, "0" * 64),
            )
        )
    )
    r = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("key", list(KEYS))
def test_hostile_string_is_refused_or_every_output_is_sound(key, tmp_path):
    where = KEYS[key]
    data = base_data()
    valid = VALID.get(key) or get(data, where)

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(value=hostile(valid))
    def check(value: str) -> None:
        d = copy.deepcopy(data)
        put(d, where, value)
        try:
            site = parse_site(d, tmp_path / "site.toml")
        except InputError as e:
            line = str(e)
            assert "\n" not in line and "\x1b" not in line and "\r" not in line, line
            if any(c in value for c in "\n\r%\x00\u2028\x85"):
                assert e.key.startswith(key.split("[")[0].rstrip(".")) or e.key == "", (
                    f"{value!r} refused under {e.key}, expected {key}"
                )
            return
        judge_all(site, tmp_path)

    check()
    # The valid value itself must pass: a validator that refused everything would be useless.
    d = copy.deepcopy(data)
    put(d, where, valid)
    judge_all(parse_site(d, tmp_path / "site.toml"), tmp_path)
