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
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from builder.errors import ConnectError, HostError, InputError
from builder.model.login import USER_KNOWN_HOSTS, HostAccess

# paramiko imports invoke (and with it unittest.mock and asyncio), a third of its import
# time, only for ssh_config's `Match exec`, which no login here reads. A process that has
# loaded invoke itself keeps it.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
import paramiko  # noqa: E402
from paramiko.common import cMSG_CHANNEL_OPEN  # noqa: E402
from paramiko.message import Message  # noqa: E402

# paramiko logs transport-thread failures with tracebacks; ConnectError says it in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class HostKeyMismatch(ConnectError):
    """The peer offered another host key than the pinned one: never retried."""


class HostKeyUnknown(ConnectError):
    """Nothing pins the key the host offered: never learned, never retried."""


class HostUnreachable(HostError):
    """A host (not the appliance) could not be reached or refused the login: exit 1, with
    what to do, since nothing was sent and the admin's side needs the fix."""


DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")


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
    host: bool = False  # a host login: reach and auth failures are exit 1 (HostUnreachable)


APPLIANCE = _Words(
    pinned="but the state dir pins another key",
    mismatch="if the appliance was rebuilt with another state dir, use that state dir "
    "(--state); otherwise treat this as an attack",
    auth="with the tool's key (was the appliance deployed from this state dir?)",
    unreachable="is the appliance running and reachable from here?",
)
HOST = _Words(
    pinned="known_hosts has another",
    mismatch="treat it as an attack unless the host was reinstalled (then update host.host_key "
    "or the known_hosts line)",
    auth="(enable SSH key authentication in the web UI under System > SSH Access and add your "
    "public key to /root/.ssh/authorized_keys)",
    unreachable="is SSH enabled in the web UI, System > SSH Access, on port 222?",
    unknown="compare it with the IPFire console (ssh-keygen -lf "
    '/etc/ssh/ssh_host_ed25519_key.pub), then set host.host_key = "SHA256:..." in the site '
    "file or pass --host-key",
    host=True,
)


STREAMLOCAL = "direct-streamlocal@openssh.com"
_STREAMLOCAL_OPEN = cMSG_CHANNEL_OPEN + len(STREAMLOCAL).to_bytes(4, "big") + STREAMLOCAL.encode()


class _Transport(paramiko.Transport):
    """paramiko's transport with OpenSSH's direct-streamlocal channel (a Unix socket on the
    server; OpenSSH's PROTOCOL file, section 2.4), which paramiko does not offer: its open
    message is paramiko's own with the socket path and two reserved fields after it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unix_lock = threading.Lock()
        self._unix_path: str | None = None

    def open_unix(self, path: str, timeout: float) -> paramiko.Channel:
        with self._unix_lock:
            self._unix_path = path
            try:
                return self.open_channel(STREAMLOCAL, timeout=timeout)
            finally:
                self._unix_path = None

    def _send_user_message(self, data) -> None:
        path = self._unix_path  # set only while open_unix() waits: no copy of other messages
        if (
            path is not None
            and isinstance(data, Message)
            and data.asbytes().startswith(_STREAMLOCAL_OPEN)
        ):
            data.add_string(path)
            data.add_string("")
            data.add_int(0)
        super()._send_user_message(data)


def open_unix(client: paramiko.SSHClient, path: str, timeout: float) -> paramiko.Channel | None:
    """A channel to the Unix socket `path` on the server, or None when sshd refuses it (no
    such socket, or streamlocal forwarding turned off)."""
    transport = client.get_transport()
    if not isinstance(transport, _Transport):
        return None
    try:
        return transport.open_unix(path, timeout)
    except paramiko.ChannelException:
        return None


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
        if words.host:
            fix = words.auth.strip("()")
            raise HostUnreachable(f"{where}: authentication failed", fix) from None
        raise ConnectError(f"{where}: authentication failed {words.auth}") from None
    except (paramiko.SSHException, OSError, EOFError) as e:
        client.close()
        reason = _reason(e)
        if words.host:
            raise HostUnreachable(f"{where}: cannot connect: {reason}", words.unreachable) from None
        raise ConnectError(f"{where}: cannot connect: {reason} ({words.unreachable})") from None


def _reason(e: BaseException) -> str:
    """What went wrong, in the words of the socket errors behind it (paramiko wraps
    "connection refused" and "no route to host" alike)."""
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        found = {os.strerror(x.errno).lower() for x in e.errors.values() if x.errno}
        return "; ".join(sorted(found)) or "no connection"
    return f"{e or type(e).__name__}"


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
        transport_factory=_Transport,
    )


class _Pin(paramiko.MissingHostKeyPolicy):
    """Called for a key that no known_hosts line names: accepted only when its fingerprint is
    the pinned one; otherwise the one line says what was offered and where the pin is."""

    def __init__(self, access: HostAccess):
        self.access = access

    def missing_host_key(self, client, hostname, key) -> None:
        offered = f"{key.get_name()} {fingerprint(key)}"
        where = str(self.access.login)
        if self.access.host_key is None:
            raise HostKeyUnknown(
                f"{where}: unknown host key: it offered {offered}, and "
                f"{self.access.pinned_by} does not name the host. Not connecting: {HOST.unknown}"
            )
        if fingerprint(key) != self.access.host_key:
            raise HostKeyMismatch(
                f"{where}: host key mismatch: it offered {offered}, {self.access.pinned_by} pins "
                f"{self.access.host_key}. Not connecting: {HOST.mismatch}"
            )


def identity_file(access: HostAccess) -> Path | None:
    """The key file to offer: the one named (which must exist), else the first of the usual
    ~/.ssh keys, as ssh itself would try; None leaves only ssh-agent."""
    if access.identity is not None:
        if not access.identity.is_file():
            raise InputError(str(access.identity), access.identity_from, "no such file")
        return access.identity
    ssh = Path("~/.ssh").expanduser()
    return next((ssh / n for n in DEFAULT_IDENTITIES if (ssh / n).is_file()), None)


def connect_host(access: HostAccess, timeout: float = 15.0) -> paramiko.SSHClient:
    """The admin's login to a host: agent and key file, the host key pinned by a fingerprint
    or known_hosts (read only). A wrong or unknown key is exit 3 before anything is sent."""
    client = paramiko.SSHClient()
    if access.known_hosts is not None and access.host_key is None:
        path = access.known_hosts.expanduser()
        try:
            client.get_host_keys().load(str(path))
        except FileNotFoundError:
            if access.known_hosts != USER_KNOWN_HOSTS:
                raise InputError(str(path), access.pinned_by.split()[0], "no such file") from None
        except (OSError, paramiko.SSHException) as e:
            raise InputError(str(path), access.pinned_by.split()[0], f"cannot read: {e}") from None
    client.set_missing_host_key_policy(_Pin(access))
    key = identity_file(access)
    words = replace(HOST, pinned=f"{access.pinned_by} has another")
    return _open(
        client,
        access.login.host,
        access.login.port,
        access.login.user,
        words,
        timeout,
        key_filename=str(key) if key else None,
        allow_agent=True,
        look_for_keys=False,
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
