"""The login to a host from a site's [host] and the command line: parsed, pinned, never
trusted by default."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.errors import InputError
from builder.model.login import (
    USER_KNOWN_HOSTS,
    HostLogin,
    access_of,
    host_access,
    known_hosts_lines,
    libvirt_uri,
    login_of_uri,
)
from builder.model.site import Host, load_site
from tests.plugins.samples import BASE, write

FP = "SHA256:" + "x" * 43
FP2 = "SHA256:" + "y" * 43
REMOTE = "qemu+ssh://root@ipfire:222/system"


def with_host(tmp_path: Path, lines: str) -> Path:
    return write(tmp_path, BASE.replace("[ssh]", f"[host]\n{lines}\n\n[ssh]", 1))


def test_host_keys_resolve_against_the_site_folder(tmp_path):
    site = load_site(
        with_host(
            tmp_path,
            f'uri = "{REMOTE}"\nssh_key = "keys/ipfire"\nhost_key = "{FP}"',
        )
    )
    assert site.host.ssh_key == tmp_path / "keys/ipfire"
    assert site.host.host_key == FP and site.host.known_hosts is None
    assert site.host.remote


def test_home_in_a_path_is_the_users(tmp_path):
    site = load_site(with_host(tmp_path, 'known_hosts = "~/kh"'))
    assert site.host.known_hosts == Path("~/kh").expanduser()


@pytest.mark.parametrize(
    "lines,key,words",
    [
        ('host_key = "SHA256:short"', "host.host_key", "not a SHA256 fingerprint"),
        ('host_key = "MD5:aa:bb"', "host.host_key", "ssh-keygen -lf"),
        (f'host_key = "{FP}"\nknown_hosts = "kh"', "host.known_hosts", "not both"),
        ('ssh_key = ""', "host.ssh_key", "must not be empty"),
        ('known_hosts = "a\\u2028b"', "host.known_hosts", "control character"),
    ],
)
def test_bad_host_keys_name_their_key(tmp_path, lines, key, words):
    with pytest.raises(InputError) as e:
        load_site(with_host(tmp_path, lines))
    assert f": {key}: " in str(e.value) and words in str(e.value)


def test_uri_login_defaults_are_libvirts():
    assert login_of_uri("qemu+ssh://ipfire/system") == HostLogin("root", "ipfire", 22)
    assert login_of_uri("qemu+libssh2://admin@[fd00::1]:2222/system") == HostLogin(
        "admin", "fd00::1", 2222
    )
    assert login_of_uri("qemu:///system") is None


def test_flags_win_over_the_file_and_the_file_over_the_default(tmp_path):
    login = HostLogin("root", "ipfire", 222)
    host = Host(uri=REMOTE, host_key=FP, ssh_key=tmp_path / "id")
    a = host_access(host, "/x/site.toml", login)
    assert (a.host_key, a.pinned_by) == (FP, "host.host_key in site.toml")
    assert (a.identity, a.identity_from) == (tmp_path / "id", "host.ssh_key")
    a = host_access(host, "site.toml", login, host_key=FP2, identity=tmp_path / "other")
    assert (a.host_key, a.pinned_by) == (FP2, "--host-key")
    assert (a.identity, a.identity_from) == (tmp_path / "other", "--identity")
    a = host_access(host, "site.toml", login, known_hosts=tmp_path / "kh")
    assert (a.host_key, a.known_hosts) == (None, tmp_path / "kh")
    assert a.pinned_by.startswith("--known-hosts")
    a = host_access(Host(uri=REMOTE), "site.toml", login)
    assert a.known_hosts == USER_KNOWN_HOSTS and "no pin in site.toml" in a.pinned_by


def test_a_bad_fingerprint_flag_is_bad_input():
    with pytest.raises(InputError, match="--host-key"):
        host_access(Host(uri=REMOTE), "site.toml", HostLogin("root", "h"), host_key="SHA256:x")


def test_local_uri_has_no_login():
    assert access_of(Host(), "site.toml") is None
    assert access_of(Host(uri=REMOTE), "site.toml").login == HostLogin("root", "ipfire", 222)


def test_libvirt_uri_pins_through_its_own_known_hosts():
    uri = libvirt_uri(HostLogin("root", "fd00::1", 222), Path("/t/kh"), Path("/k/id"))
    parts = urlsplit(uri)
    assert parts.scheme == "qemu+libssh2" and parts.netloc == "root@[fd00::1]:222"
    assert parse_qs(parts.query) == {
        "known_hosts": ["/t/kh"],
        "known_hosts_verify": ["normal"],
        "keyfile": ["/k/id"],
        "sshauth": ["agent,privkey"],
    }
    assert "keyfile" not in libvirt_uri(HostLogin("root", "h"), Path("/t/kh"), None)


@given(st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s))
def test_any_path_stays_one_uri_parameter(name):
    """A path with &, =, ?, # or spaces cannot add a parameter to the URI libvirt reads."""
    path = Path("/tmp") / name.replace("/", "_")
    uri = libvirt_uri(HostLogin("root", "h", 222), path, path)
    query = parse_qs(urlsplit(uri).query, keep_blank_values=True)
    assert set(query) == {"known_hosts", "known_hosts_verify", "keyfile", "sshauth"}
    assert query["known_hosts"] == [str(path)] and query["keyfile"] == [str(path)]


def test_known_hosts_holds_the_checked_key_first_and_only_plain_keys_after():
    login = HostLogin("root", "ipfire", 222)
    listed = "\n".join(
        [
            "ecdsa-sha2-nistp256 AAAAE2VjZHNh root@ipfire",
            "ssh-ed25519 AAAAC3Nz root@ipfire",
            'command="x" ssh-rsa AAAAB3',
            "ssh-rsa AAAA\u2028B3",
            "no-socket",
        ]
    )
    assert known_hosts_lines(login, "ssh-ed25519 AAAAC3Nz", listed) == (
        "[ipfire]:222 ssh-ed25519 AAAAC3Nz\n[ipfire]:222 ecdsa-sha2-nistp256 AAAAE2VjZHNh\n"
    )
