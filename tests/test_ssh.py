"""SSH with a pinned host key, against a real OpenSSH server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from builder.errors import ConnectError
from builder.model.keys import ssh_genkey, ssh_pubkey
from builder.remote.ssh import HostKeyMismatch, Target, connect, execute, wait_for_ssh


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
