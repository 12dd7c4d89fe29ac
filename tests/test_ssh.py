"""SSH with a pinned host key, against a real OpenSSH server on loopback."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from builder.errors import ConnectError, InputError
from builder.model.keys import ssh_genkey, ssh_pubkey
from builder.model.login import HostAccess, HostLogin, host_access
from builder.model.site import Host
from builder.remote.ssh import (
    HostKeyMismatch,
    HostKeyUnknown,
    HostUnreachable,
    Target,
    connect,
    connect_host,
    execute,
    fingerprint,
    wait_for_ssh,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A throwaway sshd on 127.0.0.1 that trusts one generated client key."""
    d: Path = tmp_path_factory.mktemp("sshd")
    host_key, client_key = ssh_genkey(), ssh_genkey()
    (d / "host").write_text(host_key)
    (d / "host").chmod(0o600)
    (d / "authorized_keys").write_text(ssh_pubkey(client_key) + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            "/dev/null",
            "-p",
            str(port),
            "-o",
            "ListenAddress=127.0.0.1",
            "-h",
            str(d / "host"),
            "-o",
            f"AuthorizedKeysFile={d / 'authorized_keys'}",
            "-o",
            "StrictModes=no",
            "-o",
            "PermitRootLogin=prohibit-password",
            "-o",
            "UsePAM=no",
            "-o",
            "PidFile=none",
        ],
        stderr=subprocess.PIPE,
    )
    user = os.environ.get("USER", "root")
    target = Target("127.0.0.1", user, client_key, ssh_pubkey(host_key), port=port)
    try:
        wait_for_ssh(target, time.monotonic() + 20, interval=0.2).close()
        yield target
    finally:
        proc.kill()
        proc.wait()


def test_pinned_key_connects_and_runs(sshd):
    client = connect(sshd)
    try:
        r = execute(client, "cat; echo done; exit 3", input="hello\n")
    finally:
        client.close()
    assert (r.rc, r.stdout) == (3, "hello\ndone\n")


def test_other_host_key_is_refused(sshd):
    wrong = Target(sshd.host, sshd.user, sshd.private_key, ssh_pubkey(ssh_genkey()), sshd.port)
    with pytest.raises(HostKeyMismatch, match="host key mismatch") as e:
        connect(wrong)
    assert e.value.exit_code == 3
    start = time.monotonic()
    with pytest.raises(HostKeyMismatch):
        wait_for_ssh(wrong, time.monotonic() + 30)
    assert time.monotonic() - start < 10, "a mismatch must fail at once, not be retried"


def test_unknown_client_key_fails_auth(sshd):
    stranger = Target(sshd.host, sshd.user, ssh_genkey(), sshd.host_public, sshd.port)
    with pytest.raises(ConnectError, match="authentication failed"):
        connect(stranger)


def test_closed_port_is_connect_error():
    t = Target("127.0.0.1", "root", ssh_genkey(), ssh_pubkey(ssh_genkey()), port=free_port())
    with pytest.raises(ConnectError, match="cannot connect"):
        connect(t, timeout=2)


# --- the admin's login to a host: pinned by fingerprint or known_hosts -------------------


def _access(sshd, tmp_path: Path, **pins) -> HostAccess:
    identity = tmp_path / "id"
    identity.write_text(sshd.private_key)
    identity.chmod(0o600)
    login = HostLogin(sshd.user, sshd.host, sshd.port)
    return host_access(Host(), "site.toml", login, identity=identity, **pins)


def _host_fingerprint(sshd) -> str:
    kind, blob = sshd.host_public.split()[:2]
    return fingerprint(paramiko.PKey.from_type_string(kind, base64.b64decode(blob)))


def test_host_pinned_by_fingerprint_connects(sshd, tmp_path):
    client = connect_host(_access(sshd, tmp_path, host_key=_host_fingerprint(sshd)))
    try:
        assert execute(client, "echo pinned").stdout == "pinned\n"
    finally:
        client.close()


def test_host_pinned_by_known_hosts_file_connects(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public}\n")
    client = connect_host(_access(sshd, tmp_path, known_hosts=known))
    client.close()
    assert known.read_text() == f"[{sshd.host}]:{sshd.port} {sshd.host_public}\n"


def test_wrong_fingerprint_names_what_was_seen_and_the_pin(sshd, tmp_path):
    wrong = "SHA256:" + "B" * 43
    with pytest.raises(HostKeyMismatch) as e:
        connect_host(_access(sshd, tmp_path, host_key=wrong))
    assert e.value.exit_code == 3
    text = str(e.value)
    assert _host_fingerprint(sshd) in text and wrong in text and "--host-key" in text
    assert "\n" not in text


def test_unknown_host_key_is_never_learned(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostKeyUnknown) as e:
        connect_host(_access(sshd, tmp_path, known_hosts=known))
    assert e.value.exit_code == 3
    assert _host_fingerprint(sshd) in str(e.value) and str(known) in str(e.value)
    assert known.read_text() == ""


def test_other_key_in_known_hosts_is_a_mismatch(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} {ssh_pubkey(ssh_genkey())}\n")
    with pytest.raises(HostKeyMismatch, match="host key mismatch") as e:
        connect_host(_access(sshd, tmp_path, known_hosts=known))
    assert _host_fingerprint(sshd) in str(e.value)


def test_refused_login_is_exit_1_with_the_fix(sshd, tmp_path):
    access = _access(sshd, tmp_path, host_key=_host_fingerprint(sshd))
    (tmp_path / "id").write_text(ssh_genkey())
    with pytest.raises(HostUnreachable, match="authentication failed") as e:
        connect_host(access)
    assert e.value.exit_code == 1 and "authorized_keys" in e.value.fix


def test_missing_identity_is_bad_input(sshd, tmp_path):
    access = _access(sshd, tmp_path, host_key=_host_fingerprint(sshd))
    (tmp_path / "id").unlink()
    with pytest.raises(InputError, match="--identity: no such file"):
        connect_host(access)
