"""SSH logins to a host: as the admin gives them (`root@ipfire:222`), or as a site's
`[host]` names them (the libvirt URI, the identity file, the host key pin). Parsed, not used.

Pure, so the commands that only write files (`ipfire --out`) never load an SSH library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from builder.errors import InputError
from builder.model.site import FINGERPRINT_RE, URI_RE, Host

DEFAULT_PORT = 222  # IPFire's sshd
SSH_RE = re.compile(r"(?:([A-Za-z0-9._-]+)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?")
USER_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


@dataclass(frozen=True)
class HostLogin:
    user: str
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The host as OpenSSH writes it in known_hosts."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class HostAccess:
    """Everything needed to log in to a host without ever trusting an unknown key.

    `host_key` (a fingerprint) or `known_hosts` pins the key; `pinned_by` says where that pin
    came from, for the one line a mismatch prints. `identity` is the admin's key file, or
    None for ssh-agent and the usual ~/.ssh keys.
    """

    login: HostLogin
    host_key: str | None
    known_hosts: Path | None
    identity: Path | None
    pinned_by: str
    identity_from: str = "host.ssh_key"


def parse_login(value: str) -> HostLogin:
    m = SSH_RE.fullmatch(value.strip())
    if not m:
        raise InputError(value, "--ssh", "expected root@HOST or root@HOST:PORT")
    user, host, port = m.group(1) or "root", m.group(2).strip("[]"), m.group(3)
    if port is not None and not 1 <= int(port) <= 65535:
        raise InputError(value, "--ssh", f"port {port} is out of range (1..65535)")
    return HostLogin(user, host, int(port) if port else DEFAULT_PORT)


def login_of_uri(uri: str) -> HostLogin | None:
    """The SSH login a libvirt URI names (user root and port 22 when it says none, as
    libvirt's own default port is ssh's), or None for the local socket."""
    m = URI_RE.fullmatch(uri)
    if not m:
        return None
    port = int(m.group(4)) if m.group(4) else 22
    return HostLogin(m.group(2) or "root", m.group(3).strip("[]"), port)


def host_access(
    host: Host,
    site_file: str,
    login: HostLogin,
    *,
    host_key: str | None = None,
    known_hosts: Path | None = None,
    identity: Path | None = None,
) -> HostAccess:
    """The login with its pin: command-line flags first, then the site's [host], then the
    user's ~/.ssh/known_hosts (read only, and named in every message about the key)."""
    if host_key is not None and not FINGERPRINT_RE.fullmatch(host_key):
        raise InputError(host_key, "--host-key", "expected SHA256:... as ssh-keygen -lf shows")
    name = Path(site_file).name
    if host_key:
        pin = (host_key, None, "--host-key")
    elif known_hosts:
        pin = (None, known_hosts, f"--known-hosts {known_hosts}")
    elif host.host_key:
        pin = (host.host_key, None, f"host.host_key in {name}")
    elif host.known_hosts:
        pin = (None, host.known_hosts, f"host.known_hosts {host.known_hosts} in {name}")
    else:
        pin = (None, USER_KNOWN_HOSTS, f"{USER_KNOWN_HOSTS} (no pin in {name})")
    key, origin = (identity, "--identity") if identity else (host.ssh_key, "host.ssh_key")
    return HostAccess(login, pin[0], pin[1], key, pin[2], origin)


def access_of(
    site_host: Host,
    site_file: str,
    *,
    host_key: str | None = None,
    known_hosts: Path | None = None,
    identity: Path | None = None,
) -> HostAccess | None:
    """The login to the libvirt host the site's URI names, or None for the local socket."""
    login = login_of_uri(site_host.uri)
    if login is None:
        return None
    return host_access(
        site_host,
        site_file,
        login,
        host_key=host_key,
        known_hosts=known_hosts,
        identity=identity,
    )


HOST_KEY_LINE = re.compile(
    r"(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa) ([A-Za-z0-9+/]+={0,2})(?: .*)?"
)


def known_hosts_lines(login: HostLogin, verified: str, listed: str) -> str:
    """known_hosts for libvirt: the key just checked against the pin, then the host's other
    public keys as it listed them over that checked connection. libssh2 prefers ECDSA where
    paramiko prefers ed25519, so without the others it would not find the key it is shown;
    lines that are not a plain public key are left out."""
    keys = [verified]
    for line in listed.split("\n"):
        m = HOST_KEY_LINE.fullmatch(line.strip())
        if m and f"{m.group(1)} {m.group(2)}" not in keys:
            keys.append(f"{m.group(1)} {m.group(2)}")
    return "".join(f"{login.known_hosts_name} {key}\n" for key in keys)


def libvirt_uri(login: HostLogin, known_hosts: Path, keyfile: Path | None) -> str:
    """The libssh2 URI that checks the host against `known_hosts` alone: libvirt then never
    prompts, never learns a key and never reads the user's own known_hosts."""
    host = f"[{login.host}]" if ":" in login.host else login.host
    params = [f"known_hosts={quote(str(known_hosts), safe='/')}", "known_hosts_verify=normal"]
    if keyfile is not None:
        params += [f"keyfile={quote(str(keyfile), safe='/')}", "sshauth=agent,privkey"]
    else:
        params.append("sshauth=agent")
    return f"qemu+libssh2://{login.user}@{host}:{login.port}/system?" + "&".join(params)
