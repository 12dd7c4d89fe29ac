"""SSH with paramiko: one backend, two ways in.

- `connect(target)`: the tool's own login to the appliance, with the key from the state dir
  and the appliance's host key pinned from the state dir.
- `connect_host(login, ...)`: the admin's login to a host such as IPFire, with the admin's
  key or agent and the host key pinned by a SHA256 fingerprint or a known_hosts file.

Both never learn a host key, and both end every failure in one ConnectError that says what
failed and what to do; only the words differ, so they share `_open`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from builder.errors import ConnectError, InputError
from builder.model.login import HostLogin

# paramiko logs transport-thread failures with tracebacks; ConnectError says it in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class HostKeyMismatch(ConnectError):
    """The peer offered another host key than the pinned one: never retried."""


@dataclass(frozen=True)
class Target:
    host: str
    user: str
    private_key: str  # OpenSSH-format ed25519, the tool's own key from the state dir
    host_public: str  # "ssh-ed25519 AAAA...": the only host key accepted
    port: int = 22


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class _Words:
    """What a failure means for this kind of login, in the user's terms."""

    pinned: str  # where the expected key came from
    mismatch: str  # what to do about a mismatch
    auth: str  # what to do when authentication fails
    unreachable: str  # what to check when nothing answers
    unknown: str = ""  # what to do when the key is not pinned at all


APPLIANCE = _Words(
    pinned="but the state dir pins another key",
    mismatch="if the appliance was rebuilt with another state dir, use that state dir "
    "(--state); otherwise treat this as an attack",
    auth="with the tool's key (was the appliance deployed from this state dir?)",
    unreachable="is the appliance running and reachable from here?",
)
HOST = _Words(
    pinned="known_hosts has another",
    mismatch="treat it as an attack unless IPFire was reinstalled (then fix the known_hosts line)",
    auth="(enable SSH key authentication in the web UI under System > SSH Access and add your "
    "public key to /root/.ssh/authorized_keys)",
    unreachable="is SSH enabled in the web UI, System > SSH Access, on port 222?",
    unknown="the host key is not in known_hosts. Not connecting: compare the fingerprint with "
    "the IPFire console, then pass it with --host-key SHA256:... or add the key to known_hosts",
)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256:base64-without-padding."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _open(
    client: paramiko.SSHClient,
    host: str,
    port: int,
    user: str,
    words: _Words,
    timeout: float,
    **auth,
) -> paramiko.SSHClient:
    """Connect `client`, or close it and raise the ConnectError that says what to do."""
    where = f"{user}@{host}:{port}"
    try:
        client.connect(
            host,
            port=port,
            username=user,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            **auth,
        )
        return client
    except ConnectError:
        client.close()
        raise
    except paramiko.BadHostKeyException as e:
        client.close()
        raise HostKeyMismatch(
            f"{where}: host key mismatch: it offered {e.key.get_name()} {fingerprint(e.key)}, "
            f"{words.pinned}. Not connecting: {words.mismatch}"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise ConnectError(f"{where}: authentication failed {words.auth}") from None
    except paramiko.SSHException as e:
        client.close()
        if words.unknown and "not found in known_hosts" in str(e):
            raise ConnectError(f"{where}: {words.unknown}") from None
        raise ConnectError(f"{where}: cannot connect: {e}") from None
    except (OSError, EOFError) as e:
        client.close()
        raise ConnectError(
            f"{where}: cannot connect: {e or type(e).__name__} ({words.unreachable})"
        ) from None


def connect(target: Target, timeout: float = 10.0) -> paramiko.SSHClient:
    """The tool's login to the appliance: its own key, the state dir's host key only."""
    client = paramiko.SSHClient()
    kind, blob = target.host_public.split()[:2]
    host_key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    client.get_host_keys().add(name, kind, host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(target.private_key))
    return _open(
        client,
        target.host,
        target.port,
        target.user,
        APPLIANCE,
        timeout,
        pkey=pkey,
        allow_agent=False,
        look_for_keys=False,
    )


class _PinnedFingerprint(paramiko.MissingHostKeyPolicy):
    def __init__(self, expected: str):
        self.expected = expected

    def missing_host_key(self, client, hostname, key) -> None:
        offered = fingerprint(key)
        if offered != self.expected:
            raise HostKeyMismatch(
                f"{hostname}: host key mismatch: the host offered {key.get_name()} {offered}, "
                f"not {self.expected}. Not connecting: check the fingerprint on the IPFire "
                "console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)"
            )


def connect_host(
    login: HostLogin,
    known_hosts: Path | None = None,
    host_key: str | None = None,
    identity: Path | None = None,
    timeout: float = 15.0,
) -> paramiko.SSHClient:
    """The admin's login to a host: own key or agent, host key pinned by a fingerprint or
    known_hosts (default ~/.ssh/known_hosts, read only)."""
    client = paramiko.SSHClient()
    if host_key:
        if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", host_key):
            raise InputError(host_key, "--host-key", "expected SHA256:... as ssh-keygen -lf shows")
        client.set_missing_host_key_policy(_PinnedFingerprint(host_key))
    else:
        path = (known_hosts or Path("~/.ssh/known_hosts")).expanduser()
        try:
            client.get_host_keys().load(str(path))
        except FileNotFoundError:
            if known_hosts is not None:
                raise InputError(str(path), "--known-hosts", "no such file") from None
        except (OSError, paramiko.SSHException) as e:
            raise InputError(str(path), "--known-hosts", f"cannot read: {e}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return _open(
        client,
        login.host,
        login.port,
        login.user,
        HOST,
        timeout,
        key_filename=str(identity.expanduser()) if identity else None,
        allow_agent=True,
        look_for_keys=identity is None,
    )


def execute(
    client: paramiko.SSHClient, command: str, input: str = "", timeout: float = 60
) -> Result:
    """One command; stdin is sent whole, then closed."""
    stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    if input:
        stdin.write(input)
    stdin.channel.shutdown_write()
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return Result(stdout.channel.recv_exit_status(), out, err)


def wait_for_ssh(target: Target, deadline: float, interval: float = 2.0) -> paramiko.SSHClient:
    """Poll until the appliance answers SSH with the pinned key, or the deadline passes.

    A host-key mismatch is final: it is raised at once, never retried into acceptance.
    """
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return connect(target, timeout=min(10.0, max(1.0, deadline - time.monotonic())))
        except HostKeyMismatch:
            raise
        except ConnectError as e:
            last = e
        time.sleep(interval)
    raise ConnectError(f"no SSH answer from {target.host} in time: {last}")
