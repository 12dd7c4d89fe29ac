"""Hostile site files: each attack the security review found, as a regression test.

A site file is written by someone else (a pull request, a shared folder). Each case must end
in exit 2 with one line naming the file and the key, and nothing written.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import InputError
from builder.model.site import is_low_order, load_site
from tests.plugins.samples import BASE, GOOD_KEY, write

INJECT = "\\n[Interface]\\nPreUp = touch /tmp/wga-pwned"


def check_fails(tmp_path: Path, text: str, key: str, capsys) -> str:
    """Run `check` on `text`: exit 2, one stderr line naming site.toml and `key`."""
    site = write(tmp_path, text)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["check", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {site}: {key}: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return err


SCOPE_CASES = [
    (
        "peer address with scope",
        '"fd09::2/128"]',
        f'"fd09::2%x{INJECT}/128"]',
        "peers[0].address[1]",
    ),
    (
        "client_dns with scope",
        'endpoint = "vpn',
        f'client_dns = ["fd09::53%x{INJECT}"]\nendpoint = "vpn',
        "wireguard.client_dns[0]",
    ),
    (
        "peer network with scope",
        '["192.168.2.0/24"]',
        f'["fd10::%x{INJECT}/64"]',
        "peers[1].networks[0]",
    ),
    ("tunnel address with scope", '"fd09::1/64"', '"fd09::1%eth0/64"', "wireguard.address[1]"),
    ("plain scope", '"fd09::2/128"]', '"fd09::2%1/128"]', "peers[0].address[1]"),
]


@pytest.mark.parametrize("what,old,new,key", SCOPE_CASES, ids=[c[0] for c in SCOPE_CASES])
def test_scoped_addresses_are_refused(tmp_path, capsys, what, old, new, key):
    assert old in BASE
    err = check_fails(tmp_path, BASE.replace(old, new, 1), key, capsys)
    assert "PreUp" not in err.split(": ", 2)[2] or "%" in err


LINE_CASES = [
    (
        "bridge runs a command",
        "[ssh]",
        '[host]\nbridge = "green0 -j ACCEPT; touch /tmp/x; #"\n\n[ssh]',
        "host.bridge",
    ),
    ("bridge too long", "[ssh]", '[host]\nbridge = "abcdefghijklmnop"\n\n[ssh]', "host.bridge"),
    ("pool with quote", "[ssh]", '[host]\npool = "p\'; rm -rf /"\n\n[ssh]', "host.pool"),
    ("pool_path relative", "[ssh]", '[host]\npool_path = "../x"\n\n[ssh]', "host.pool_path"),
    ("pool_path with space", "[ssh]", '[host]\npool_path = "/var/a b"\n\n[ssh]', "host.pool_path"),
    ("name with newline", 'name = "gw"', 'name = "wg-gw\\n"', "appliance.name"),
    ("peer name with newline", 'name = "laptop"', 'name = "laptop\\n"', "peers[0].name"),
    ("user with newline", "[ssh]", '[ssh]\nuser = "admin\\n"', "ssh.user"),
    ("user root", "[ssh]", '[ssh]\nuser = "root"', "ssh.user"),
    ("yaml line separator", 'name = "laptop"', 'name = "lap\\u2028top"', "peers[0].name"),
    (
        "endpoint with newline",
        '"vpn.example.org:51820"',
        '"vpn.example.org:51820\\nPostUp = x"',
        "wireguard.endpoint",
    ),
    ("endpoint numeric name", '"vpn.example.org:51820"', '"1.2.3.4.5:51820"', "wireguard.endpoint"),
    (
        "mode with newline",
        'endpoint = "vpn',
        'mode = "routed\\n"\nendpoint = "vpn',
        "wireguard.mode",
    ),
    (
        "huge integer",
        'name = "gw"',
        f'name = "gw"\nmemory_mib = {"9" * 30}',
        "appliance.memory_mib",
    ),
    ("mac with newline", 'dns = ["192.168.1.1"]', 'mac = "02:00:00:00:00:01\\n"', "lan.mac"),
]


@pytest.mark.parametrize("what,old,new,key", LINE_CASES, ids=[c[0] for c in LINE_CASES])
def test_values_that_would_break_their_file_are_refused(tmp_path, capsys, what, old, new, key):
    assert old in BASE
    check_fails(tmp_path, BASE.replace(old, new, 1), key, capsys)


URI_CASES = [
    ("ext runs a program", "qemu+ext:///system?command=/tmp/evil"),
    ("tcp in clear", "qemu+tcp://ipfire/system"),
    ("tls without pin", "qemu+tls://ipfire/system"),
    ("ssh without host key check", "qemu+ssh://root@ipfire:222/system?no_verify=1"),
    ("libssh accepting any key", "qemu+libssh://root@ipfire/system?known_hosts_verify=ignore"),
    ("libssh learning keys", "qemu+libssh2://root@ipfire/system?known_hosts_verify=auto"),
    ("netcat command", "qemu+ssh://root@ipfire/system?netcat=/tmp/evil"),
    ("own known_hosts", "qemu+libssh2://root@ipfire/system?known_hosts=/home/a/kh"),
    ("own keyfile", "qemu+libssh://root@192.168.1.1:222/system?keyfile=/home/a/.ssh/id"),
    ("session daemon", "qemu:///session"),
    ("user with shell", "qemu+ssh://root;id@ipfire/system"),
    ("host with space", "qemu+ssh://root@ip fire/system"),
    ("port too big", "qemu+ssh://root@ipfire:99999/system"),
]


@pytest.mark.parametrize("what,uri", URI_CASES, ids=[c[0] for c in URI_CASES])
def test_host_uris_that_cannot_be_pinned_are_refused(tmp_path, capsys, what, uri):
    text = BASE.replace("[ssh]", f'[host]\nuri = "{uri}"\n\n[ssh]', 1)
    check_fails(tmp_path, text, "host.uri", capsys)


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu+ssh://root@ipfire:222/system",
        "qemu+ssh://ipfire.lan/system",
        "qemu+libssh2://root@[fd00::1]:222/system",
        "qemu+libssh://root@192.168.1.1:222/system",
    ],
)
def test_pinnable_host_uris_are_accepted(tmp_path, uri):
    site = load_site(write(tmp_path, BASE.replace("[ssh]", f'[host]\nuri = "{uri}"\n\n[ssh]', 1)))
    assert site.host.uri == uri


def test_libvirt_connect_refuses_what_the_site_refuses():
    from builder.errors import HostError
    from builder.remote.libvirtd import connect

    with pytest.raises(HostError, match="takes no URI parameters"):
        connect("qemu+ssh://root@ipfire/system?no_verify=1")
    with pytest.raises(HostError):
        connect("qemu+ext:///system?command=/bin/true")


ED = "AAAAC3NzaC1lZDI1NTE5AAAAIHd41cylJeb1D/0kBJPiXsOVcFYMbhJsNd7RYxiUYOeM"
KEY_CASES = [
    ("options before the key", f'command=\\"/bin/sh\\" ssh-ed25519 {ED} me'),
    ("two keys on one line", f"ssh-ed25519 {ED} me\\nssh-ed25519 {ED} you"),
    ("unknown type", f"ssh-dss {ED} me"),
    ("truncated blob", "ssh-ed25519 AAAAC3Nz"),
    ("oversized", "ssh-rsa " + "A" * 9000),
]


@pytest.mark.parametrize("what,line", KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_authorized_key_must_be_one_plain_key(tmp_path, capsys, what, line):
    text = BASE.replace(f'["ssh-ed25519 {ED} me"]', f'["{line}"]')
    check_fails(tmp_path, text, "ssh.authorized_keys[0]", capsys)


def _key_path_site(tmp_path: Path, target: str) -> str:
    return BASE.replace(f'["ssh-ed25519 {ED} me"]', f'["{target}"]')


def test_key_file_that_is_a_fifo_is_refused_without_hanging(tmp_path, capsys):
    os.mkfifo(tmp_path / "me.pub")
    t0 = time.monotonic()
    err = check_fails(
        tmp_path, _key_path_site(tmp_path, "me.pub"), "ssh.authorized_keys[0]", capsys
    )
    assert "not a regular file" in err and time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    "what,make,fragment",
    [
        ("folder", lambda p: p.mkdir(), "not a regular file"),
        ("binary", lambda p: p.write_bytes(b"ssh-ed25519 \0\0\0"), "binary"),
        ("not utf-8", lambda p: p.write_bytes(b"ssh-ed25519 \xff\xfe"), "not UTF-8"),
        ("huge", lambda p: p.write_bytes(b"#" * (1024 * 1024)), "larger than"),
        (
            "two keys",
            lambda p: p.write_text(f"ssh-ed25519 {ED} a\nssh-ed25519 {ED} b\n"),
            "exactly one",
        ),
    ],
)
def test_key_file_must_be_a_small_text_file(tmp_path, capsys, what, make, fragment):
    make(tmp_path / "me.pub")
    err = check_fails(
        tmp_path, _key_path_site(tmp_path, "me.pub"), "ssh.authorized_keys[0]", capsys
    )
    assert fragment in err


def test_key_file_that_is_a_device_is_refused(tmp_path, capsys):
    err = check_fails(
        tmp_path, _key_path_site(tmp_path, "/dev/zero"), "ssh.authorized_keys[0]", capsys
    )
    assert "not a regular file" in err


def _b64(n: int) -> str:
    return base64.b64encode(n.to_bytes(32, "little")).decode()


P = 2**255 - 19
LOW_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_public_keys_are_refused(tmp_path, capsys, point):
    assert is_low_order(point.to_bytes(32, "little"))
    text = BASE.replace('name = "laptop"', f'name = "laptop"\npublic_key = "{_b64(point)}"')
    err = check_fails(tmp_path, text, "peers[0].public_key", capsys)
    assert "weak key" in err


def test_ordinary_public_key_is_not_low_order():
    assert not is_low_order(base64.b64decode(GOOD_KEY))


NET_CASES = [
    ("loopback", "127.0.0.0/8", "loopback"),
    ("loopback inside", "64.0.0.0/2", "loopback"),
    ("link-local", "169.254.0.0/16", "link-local"),
    ("v6 link-local", "fe80::/64", "link-local"),
    ("multicast", "239.0.0.0/8", "multicast"),
    ("v6 multicast", "ff02::/16", "multicast"),
]


@pytest.mark.parametrize("what,net,fragment", NET_CASES, ids=[c[0] for c in NET_CASES])
def test_unroutable_peer_networks_are_refused(tmp_path, capsys, what, net, fragment):
    text = BASE.replace('["192.168.2.0/24"]', f'["{net}"]')
    assert fragment in check_fails(tmp_path, text, "peers[1].networks[0]", capsys)


def test_peer_network_needs_a_tunnel_of_its_family(tmp_path, capsys):
    text = BASE.replace('"10.9.0.1/24", "fd09::1/64"', '"10.9.0.1/24"')
    text = text.replace('"10.9.0.2/32", "fd09::2/128"', '"10.9.0.2/32"')
    text = text.replace('["192.168.2.0/24"]', '["fd10::/64"]')
    err = check_fails(tmp_path, text, "peers[1].networks[0]", capsys)
    assert "no IPv6 subnet" in err


def test_deeply_nested_toml_is_one_line(tmp_path, capsys):
    site = write(tmp_path, "x = " + "[" * 100_000)
    assert main(["check", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(site) in err


def test_site_file_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "site.toml")
    with pytest.raises(InputError, match="not a regular file"):
        load_site(tmp_path / "site.toml")


def test_unknown_key_with_control_characters_stays_one_line(tmp_path, capsys):
    text = BASE.replace('name = "gw"', 'name = "gw"\n"a\\u001b[2Jb\\nc" = 1')
    site = write(tmp_path, text)
    assert main(["check", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err


def _branches(n: int) -> str:
    peers = []
    for i in range(n):
        a, b = divmod(i + 2, 256)
        peers.append(
            f'[[peers]]\nname = "b{i}"\naddress = "10.20.{a}.{b}/32"\n'
            f'networks = ["172.{16 + i // 256}.{i % 256}.0/24"]\n'
        )
    return peers


def test_3000_branches_validate_in_under_a_second(tmp_path):
    head = BASE.split("[[peers]]")[0].replace('"10.9.0.1/24", "fd09::1/64"', '"10.20.0.1/16"')
    path = write(tmp_path, head + "\n".join(_branches(3000)))
    t0 = time.perf_counter()
    site = load_site(path)
    elapsed = time.perf_counter() - t0
    assert len(site.peers) == 3000
    assert elapsed < 1.0, f"{elapsed:.2f}s"


def test_overlap_found_among_3000_branches_names_the_later_key(tmp_path):
    head = BASE.split("[[peers]]")[0].replace('"10.9.0.1/24", "fd09::1/64"', '"10.20.0.1/16"')
    peers = _branches(3000)
    peers[2500] = peers[2500].replace(
        'networks = ["172.25.196.0/24"]', 'networks = ["172.16.7.128/25"]'
    )
    with pytest.raises(InputError) as e:
        load_site(write(tmp_path, head + "\n".join(peers)))
    assert e.value.key == "peers[2500].networks[0]"
    assert "overlaps 172.16.7.0/24 (peers[7].networks[0])" in e.value.message


def test_check_in_a_fresh_process_prints_no_traceback(tmp_path):
    site = write(tmp_path, BASE.replace('name = "gw"', 'name = "wg-gw\\n"'))
    r = subprocess.run(
        [sys.executable, "-m", "builder", "check", "--site", str(site)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "appliance.name" in r.stderr


def test_integer_too_long_to_convert_is_one_line(tmp_path, capsys):
    site = write(tmp_path, BASE.replace('name = "gw"', f'name = "gw"\nvcpus = {"9" * 5000}'))
    assert main(["check", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {site}: ") and err.count("\n") == 1, err
