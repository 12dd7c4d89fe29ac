"""Every validation rule of the site file, with the key path and message a user sees."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.errors import InputError
from builder.model.site import default_mac, load_site, parse_site
from tests.plugins.samples import BASE, GOOD_KEY, write


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(InputError) as e:
        load_site(write(tmp_path, text))
    return str(e.value)


def test_base_site_parses_with_defaults(tmp_path):
    site = load_site(write(tmp_path, BASE))
    assert site.name == "gw"
    assert site.appliance.memory_mib == 512 and site.appliance.vcpus == 1
    assert site.appliance.disk_gib == 2
    assert site.host.uri == "qemu:///system" and site.host.bridge == "green0"
    assert site.host.pool == "wg-appliance"
    assert site.ssh.user == "wgadmin"
    assert site.wireguard.listen_port == 51820 and site.wireguard.mode == "masquerade"
    assert site.wireguard.mtu == 1420
    assert [str(a) for a in site.wireguard.addresses] == ["10.9.0.1/24", "fd09::1/64"]
    assert site.peers[1].is_site and not site.peers[0].is_site
    assert [str(n) for n in site.peers[1].allowed_ips] == ["10.9.0.3/32", "192.168.2.0/24"]
    assert site.lan.mac == default_mac("gw")
    assert site.default_state_dir() == tmp_path / ".wg-appliance" / "gw"


def test_default_mac_is_stable_unicast_and_local():
    mac = default_mac("gw")
    assert mac == default_mac("gw") != default_mac("gw2")
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2


def test_ssh_key_from_pub_file_relative_to_site(tmp_path):
    (tmp_path / "keys").mkdir()
    line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd41cylJeb1D/0kBJPiXsOVcFYMbhJsNd7RYxiUYOeM x"
    (tmp_path / "keys" / "me.pub").write_text(line + "\n")
    site = load_site(
        write(tmp_path, BASE.replace('["ssh-ed25519 AAAA', '["keys/me.pub", "ssh-ed25519 AAAA'))
    )
    assert site.ssh.authorized_keys[0] == line


CASES = [
    # (what, old, new, expected key path, expected message fragment)
    ("syntax", 'name = "gw"', 'name = "gw', "site.toml:2", "TOML syntax error"),
    ("unknown section", "[ssh]", "[shh]", "shh", "did you mean 'ssh'"),
    ("misspelt key", 'gateway = "192', 'gatway = "192', "lan.gatway", "did you mean 'gateway'"),
    ("missing required", 'name = "gw"', "", "appliance.name", "is required"),
    ("missing section", "[lan]", "[host]", "lan", "section [lan] is required"),
    (
        "wrong type",
        'name = "gw"',
        "name = 5",
        "appliance.name",
        "expected a string, got an integer",
    ),
    (
        "wrong type int",
        'name = "gw"',
        'name = "gw"\nvcpus = "2"',
        "appliance.vcpus",
        "expected an integer",
    ),
    (
        "bool is not int",
        'name = "gw"',
        'name = "gw"\nmemory_mib = true',
        "appliance.memory_mib",
        "got a boolean",
    ),
    ("bad name", 'name = "gw"', 'name = "GW_1"', "appliance.name", "not a valid host name"),
    (
        "name too long",
        'name = "gw"',
        f'name = "{"a" * 64}"',
        "appliance.name",
        "not a valid host name",
    ),
    (
        "invalid address",
        '"192.168.1.50/24"',
        '"192.168.1.500/24"',
        "lan.address",
        "not a valid address",
    ),
    (
        "address without prefix",
        '"192.168.1.50/24"',
        '"192.168.1.50"',
        "lan.address",
        "has no prefix",
    ),
    (
        "lan network address",
        '"192.168.1.50/24"',
        '"192.168.1.0/24"',
        "lan.address",
        "network or broadcast",
    ),
    (
        "gateway outside lan",
        'gateway = "192.168.1.1"',
        'gateway = "192.168.5.1"',
        "lan.gateway",
        "outside the LAN subnet",
    ),
    (
        "bad dns",
        'dns = ["192.168.1.1"]',
        'dns = ["dns.example"]',
        "lan.dns[0]",
        "not a valid IP address",
    ),
    (
        "bad mac",
        'dns = ["192.168.1.1"]',
        'mac = "zz:00:00:00:00:00"',
        "lan.mac",
        "not a MAC address",
    ),
    ("multicast mac", 'dns = ["192.168.1.1"]', 'mac = "01:00:00:00:00:00"', "lan.mac", "multicast"),
    (
        "wg cidr invalid",
        '"10.9.0.1/24", "fd09::1/64"',
        '"10.9.0.1/33"',
        "wireguard.address[0]",
        "not a valid address",
    ),
    (
        "wg single address",
        '"10.9.0.1/24", "fd09::1/64"',
        '"10.9.0.1/32"',
        "wireguard.address",
        "single address",
    ),
    (
        "wg overlaps lan",
        '"10.9.0.1/24", "fd09::1/64"',
        '"192.168.1.200/25"',
        "wireguard.address",
        "overlaps the LAN",
    ),
    (
        "port out of range",
        'endpoint = "vpn',
        'listen_port = 70000\nendpoint = "vpn',
        "wireguard.listen_port",
        "out of range (1..65535)",
    ),
    (
        "unknown mode",
        'endpoint = "vpn',
        'mode = "bridge"\nendpoint = "vpn',
        "wireguard.mode",
        "unknown mode 'bridge'",
    ),
    (
        "bad endpoint",
        '"vpn.example.org:51820"',
        '"vpn.example.org"',
        "wireguard.endpoint",
        "not host:port",
    ),
    (
        "bad endpoint port",
        '"vpn.example.org:51820"',
        '"vpn.example.org:0"',
        "wireguard.endpoint",
        "port 0 is out of range",
    ),
    (
        "bad endpoint v6",
        '"vpn.example.org:51820"',
        '"[fd::zz]:51820"',
        "wireguard.endpoint",
        "not host:port",
    ),
    (
        "bad endpoint host",
        '"vpn.example.org:51820"',
        '"vpn_x.example.org:51820"',
        "wireguard.endpoint",
        "not host:port",
    ),
    (
        "peer outside wg subnet",
        'address = "10.9.0.3/32"',
        'address = "10.8.0.3/32"',
        "peers[1].address",
        "outside the wireguard subnets",
    ),
    (
        "peer address subnet",
        'address = "10.9.0.3/32"',
        'address = "10.9.0.3/24"',
        "peers[1].address[0]",
        "must be a single address",
    ),
    (
        "peer address no prefix",
        'address = "10.9.0.3/32"',
        'address = "10.9.0.3"',
        "peers[1].address[0]",
        "has no prefix",
    ),
    (
        "peer is appliance",
        'address = "10.9.0.3/32"',
        'address = "10.9.0.1/32"',
        "peers[1].address",
        "appliance's own tunnel address",
    ),
    (
        "duplicate peer name",
        'name = "branch"',
        'name = "laptop"',
        "peers[1].name",
        "duplicate peer name 'laptop'",
    ),
    (
        "duplicate peer address",
        'address = "10.9.0.3/32"',
        'address = "10.9.0.2/32"',
        "peers[1].address",
        "duplicate address 10.9.0.2",
    ),
    (
        "bad peer name",
        'name = "branch"',
        'name = "br anch"',
        "peers[1].name",
        "not a valid peer name",
    ),
    (
        "network overlaps wg",
        '["192.168.2.0/24"]',
        '["10.9.0.128/25"]',
        "peers[1].networks[0]",
        "overlaps the wireguard subnet",
    ),
    (
        "network overlaps lan",
        '["192.168.2.0/24"]',
        '["192.168.0.0/16"]',
        "peers[1].networks[0]",
        "overlaps the LAN subnet",
    ),
    (
        "networks overlap",
        '["192.168.2.0/24"]',
        '["192.168.2.0/24", "192.168.2.128/25"]',
        "peers[1].networks[1]",
        "overlaps 192.168.2.0/24",
    ),
    (
        "network host bits",
        '["192.168.2.0/24"]',
        '["192.168.2.1/24"]',
        "peers[1].networks[0]",
        "host bits set",
    ),
    (
        "network not a list",
        '["192.168.2.0/24"]',
        '"192.168.2.0/24"',
        "peers[1].networks",
        "expected a list",
    ),
    (
        "keepalive range",
        'name = "branch"',
        'name = "branch"\nkeepalive = 70000',
        "peers[1].keepalive",
        "out of range (0..65535)",
    ),
    (
        "public key short",
        'name = "branch"',
        'name = "branch"\npublic_key = "abcd"',
        "peers[1].public_key",
        "32 bytes in base64",
    ),
    (
        "public key not b64",
        'name = "branch"',
        f'name = "branch"\npublic_key = "{"!" * 44}"',
        "peers[1].public_key",
        "32 bytes in base64",
    ),
    (
        "public key duplicate",
        'name = "branch"',
        f'name = "branch"\npublic_key = "{GOOD_KEY}"',
        "peers[1].public_key",
        "same key as peers[0]",
    ),
    (
        "peer unknown key",
        'name = "branch"',
        'name = "branch"\nallowed_ips = []',
        "peers[1].allowed_ips",
        "unknown key",
    ),
    (
        "ssh key malformed",
        '["ssh-ed25519 AAAAC3',
        '["ssh-rsa AAAAC3',
        "ssh.authorized_keys[0]",
        "does not match its type",
    ),
    (
        "ssh key bad base64",
        "AAAAC3NzaC1lZDI1NTE5AAAAIHd41",
        "!!!",
        "ssh.authorized_keys[0]",
        "base64 part is malformed",
    ),
    (
        "ssh key missing file",
        '["ssh-ed25519 AAAA',
        '["nothere/id.pub", "ssh-ed25519 AAAA',
        "ssh.authorized_keys[0]",
        "cannot read",
    ),
    (
        "ssh key garbage",
        '["ssh-ed25519 AAAA',
        '["hello", "ssh-ed25519 AAAA',
        "ssh.authorized_keys[0]",
        "neither an SSH public key",
    ),
    (
        "ssh keys not list",
        '["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd41cylJeb1D/0kBJPiXsOVcFYMbhJsNd7RYxiUYOeM me"]',
        '"x"',
        "ssh.authorized_keys",
        "expected a list",
    ),
    (
        "two IPv4 LAN addresses",
        'address = "192.168.1.50/24"',
        'address = ["192.168.1.50/24", "192.168.3.50/24"]',
        "lan.address[1]",
        "more than one IPv4 address",
    ),
    (
        "link-local LAN address",
        'address = "192.168.1.50/24"',
        'address = ["192.168.1.50/24", "fe80::50/64"]',
        "lan.address[1]",
        "not a global or unique-local",
    ),
    (
        "LAN IPv6 gateway without LAN IPv6",
        'gateway = "192.168.1.1"',
        'gateway = ["192.168.1.1", "fd01:1::1"]',
        "lan.gateway[1]",
        "lan.address has no IPv6",
    ),
    (
        "LAN IPv6 gateway outside its subnet",
        'address = "192.168.1.50/24"\ngateway = "192.168.1.1"',
        'address = ["192.168.1.50/24", "fd01:1::50/64"]\ngateway = ["192.168.1.1", "fd01:2::1"]',
        "lan.gateway[1]",
        "outside the LAN subnet fd01:1::/64",
    ),
    (
        "LAN IPv6 overlaps the tunnel",
        'address = "192.168.1.50/24"',
        'address = ["192.168.1.50/24", "fd09::50/48"]',
        "wireguard.address[1]",
        "overlaps the LAN subnet fd09::/48",
    ),
    (
        "peer IPv6 address without a tunnel IPv6 subnet",
        '"10.9.0.1/24", "fd09::1/64"',
        '"10.9.0.1/24"',
        "peers[0].address[1]",
        "the tunnel has no IPv6 subnet",
    ),
    (
        "LAN list too long",
        'address = "192.168.1.50/24"',
        'address = ["192.168.1.50/24", "fd01:1::50/64", "fd01:2::50/64"]',
        "lan.address",
        "needs 1 to 2 items",
    ),
    (
        "second v4 tunnel address",
        '"10.9.0.1/24", "fd09::1/64"',
        '"10.9.0.1/24", "10.10.0.1/24"',
        "wireguard.address[1]",
        "more than one IPv4",
    ),
]


@pytest.mark.parametrize("what,old,new,key,fragment", CASES, ids=[c[0] for c in CASES])
def test_validation_rule(tmp_path, what, old, new, key, fragment):
    assert old in BASE or old in BASE.replace(f'public_key = "{GOOD_KEY}"', "")
    text = BASE.replace(old, new, 1)
    if what == "public key duplicate":
        text = text.replace('name = "laptop"', f'name = "laptop"\npublic_key = "{GOOD_KEY}"')
    message = error_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "site.toml")), message
    assert f": {key}: " in message or message.startswith(str(tmp_path / key)), message
    assert fragment in message, message


def test_validation_peer_ipv6_network(tmp_path):
    """The case above needs an IPv6 network behind the branch to overlap the LAN."""
    text = BASE.replace(
        'address = "192.168.1.50/24"', 'address = ["192.168.1.50/24", "fd01::5/32"]'
    )
    text = text.replace(
        'networks = ["192.168.2.0/24"]', 'networks = ["192.168.2.0/24", "fd01:0:7::/64"]'
    )
    message = error_of(tmp_path, text)
    assert ": peers[1].networks[1]: fd01:0:7::/64 overlaps the LAN subnet fd01::/32" in message


def test_dual_stack_lan_accessors(tmp_path):
    text = BASE.replace(
        'address = "192.168.1.50/24"\ngateway = "192.168.1.1"\ndns = ["192.168.1.1"]',
        'address = ["fd01:1::50/64", "192.168.1.50/24"]\n'
        'gateway = ["fd01:1::1", "192.168.1.1"]\ndns = ["fd01:1::1"]',
    )
    site = load_site(write(tmp_path, text))
    assert str(site.lan.address) == "192.168.1.50/24" and str(site.lan.gateway) == "192.168.1.1"
    assert str(site.lan.ipv6) == "fd01:1::50/64" and str(site.lan.gateway_for(6)) == "fd01:1::1"
    assert [str(n) for n in site.lan.networks] == ["fd01:1::/64", "192.168.1.0/24"]
    assert site.uses_ipv6


def test_ipv6_only_lan(tmp_path):
    text = BASE.replace(
        'address = "192.168.1.50/24"\ngateway = "192.168.1.1"\ndns = ["192.168.1.1"]',
        'address = "fd01:1::50/64"\ngateway = "fd01:1::1"',
    ).replace('"vpn.example.org:51820"', '"[2001:db8::7]:51820"')
    site = load_site(write(tmp_path, text))
    assert site.lan.ipv4 is None and str(site.lan.address.ip) == "fd01:1::50"
    assert (
        str(site.lan.gateway) == "fd01:1::1"
        and str(site.wireguard.endpoint) == "[2001:db8::7]:51820"
    )
    assert [str(n) for n in site.metrics.allow] == ["fd01:1::/64"]
    text = text.replace("[ssh]", '[metrics]\nallow = ["192.168.1.0/24"]\n\n[ssh]')
    assert ": metrics.allow[0]: 192.168.1.0/24 is IPv4" in error_of(tmp_path, text)


def test_syntax_error_names_line(tmp_path):
    message = error_of(tmp_path, BASE.replace('name = "gw"', 'name = "gw'))
    assert message.startswith(f"{tmp_path / 'site.toml'}:2: ")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_site(tmp_path / "nope.toml")


def _cidr(version: int, prefixes: tuple[int, int]) -> st.SearchStrategy[str]:
    """An address with prefix of one family, near the sample site's nets so overlaps come up."""
    bases = ("192.168.1.0", "10.9.0.0", "192.168.2.0") if version == 4 else ("fd01:1::", "fd09::")
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return st.builds(
        lambda base, offset, prefix: f"{make(int(make(base)) + offset)}/{prefix}",
        st.sampled_from(bases),
        st.integers(0, 2**20),
        st.integers(*prefixes),
    )


@settings(max_examples=300, deadline=None, database=None)
@given(
    data=st.data(),
    addresses=st.lists(st.one_of(_cidr(4, (8, 30)), _cidr(6, (16, 126))), min_size=1, max_size=3),
)
def test_lan_addresses_are_refused_by_key_or_consistent(data, addresses):
    """Any LAN address list with gateways inside or outside its subnets: either one error
    under a lan/wireguard/peers/metrics key, or a LAN whose rules all hold."""
    gateways = []
    for text in addresses:
        net = ipaddress.ip_interface(text).network
        offset = data.draw(st.integers(-2, 5))
        gateways.append(str(net.network_address + offset % net.num_addresses))
    doc = tomllib.loads(BASE)
    doc["lan"].update(address=addresses, gateway=gateways, dns=[])
    try:
        site = parse_site(doc, Path("/site/site.toml"))
    except InputError as e:
        assert e.key.split(".")[0].split("[")[0] in ("lan", "wireguard", "peers", "metrics"), e
        assert "\n" not in str(e)
        return
    versions = [a.version for a in site.lan.addresses]
    assert len(set(versions)) == len(versions)
    for g in site.lan.gateways:
        own = site.lan.ipv4 if g.version == 4 else site.lan.ipv6
        assert own is not None and g in own.network and g != own.ip
    others = list(site.wireguard.networks) + [n for p in site.peers for n in p.networks]
    for ln in site.lan.networks:
        assert not any(ln.version == o.version and ln.overlaps(o) for o in others)
