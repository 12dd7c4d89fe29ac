"""The admin's way into the lab's host: an sshd in `wgl-host` on GREEN, port 222, as IPFire has.

Keys are made per use: the host key (its fingerprint is what an admin reads off the IPFire
console), the admin's identity and a known_hosts line for it. The sshd runs as root with the
machine's /run, so the libvirt SSH transport's far side (virt-ssh-helper) reaches the lab's
libvirtd; `wrap` lets a caller run it in a mount namespace of its own (the IPFire stand-in's
overlays, or a host whose libvirtd socket is hidden).

`workstation(argv)` is the other end: argv as the admin's workstation on the LAN runs it, in a
mount namespace where the host's /run/libvirt is an empty tmpfs, so the tool can reach libvirt
only over SSH.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from builder.errors import HostError
from builder.local.run import run
from tests.lab.lab import DATA_DIR, HOST_GREEN, HOST_NS, Lab, _stop_pid

SSH_PORT = 222
URI = f"qemu+ssh://root@{HOST_GREEN.ip}:{SSH_PORT}/system"
HIDE_LIBVIRT = "mount -t tmpfs -o size=1m,mode=0755 wgl-hidden /run/libvirt"
NO_SOCKET = "test ! -e /run/libvirt/libvirt-sock"


def plain(command: str) -> list[str]:
    """`command` in a mount namespace of its own, so what it mounts stays there."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", command]


def hidden_libvirt(command: str) -> list[str]:
    """`command` in a mount namespace where /run/libvirt is empty: a host without libvirtd."""
    script = f"{HIDE_LIBVIRT} && {NO_SOCKET} && {command}"
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]


def workstation(argv: Sequence[str | Path]) -> list[str]:
    """argv (run with Lab.exec in the LAN namespace) where the host's libvirt socket is out
    of sight; the mount namespace check fails the command if it is not."""
    script = f'{HIDE_LIBVIRT} && {NO_SOCKET} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"] + [
        str(a) for a in argv
    ]


class HostSshd:
    """sshd -D for one host: config, host key, pid and log in `path`; the admin's key pair
    and known_hosts in `home`/.ssh."""

    def __init__(self, path: Path, home: Path, port: int = SSH_PORT) -> None:
        self.path = path
        self.port = port
        self.dot_ssh = home / ".ssh"
        self.proc: subprocess.Popen | None = None

    def make(self) -> HostSshd:
        """New keys, authorized_keys, known_hosts and config."""
        path = self.path
        path.mkdir(parents=True, exist_ok=True)
        self.dot_ssh.mkdir(parents=True, exist_ok=True)
        self.etc_ssh.mkdir(parents=True, exist_ok=True)
        for key, kind in (
            (self.host_key, "ed25519"),
            (self.etc_ssh / "ssh_host_ecdsa_key", "ecdsa"),
            (self.identity, "ed25519"),
        ):
            key.unlink(missing_ok=True)
            key.with_suffix(".pub").unlink(missing_ok=True)
            run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "", "-f", key])
        (path / "authorized_keys").write_text(self.identity.with_suffix(".pub").read_text())
        host_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[{HOST_GREEN.ip}]:{self.port} {host_pub}\n")
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {HOST_GREEN.ip}",
                    f"HostKey {self.host_key}",
                    f"HostKey {self.etc_ssh / 'ssh_host_ecdsa_key'}",
                    f"PidFile {path / 'sshd.pid'}",
                    f"AuthorizedKeysFile {path / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        return self

    @property
    def etc_ssh(self) -> Path:
        """The host's /etc/ssh as its sessions see it: its own host keys, ed25519 and ECDSA
        (IPFire has both; clients that prefer ECDSA meet that key first)."""
        return self.path / "etc-ssh"

    @property
    def host_key(self) -> Path:
        return self.etc_ssh / "ssh_host_ed25519_key"

    @property
    def config(self) -> Path:
        return self.path / "sshd_config"

    @property
    def log(self) -> Path:
        return self.path / "sshd.log"

    @property
    def identity(self) -> Path:
        return self.dot_ssh / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dot_ssh / "known_hosts"

    def fingerprint(self) -> str:
        out = run(["ssh-keygen", "-l", "-E", "sha256", "-f", self.host_key.with_suffix(".pub")])
        return out.stdout.split()[1]

    def start(self, wrap: Callable[[str], list[str]] = plain) -> subprocess.Popen:
        """Start sshd in HOST_NS and wait until it listens."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        argv = wrap(
            f"mount --bind {self.etc_ssh} /etc/ssh && exec /usr/sbin/sshd -D -e -f {self.config}"
        )
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", HOST_NS, *argv], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 15
        while "Server listening" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise HostError("the lab host's sshd did not start", self.log.read_text()[-500:])
            time.sleep(0.05)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc.pid, timeout=5)
            self.proc.wait(timeout=5)
            self.proc = None


def lab_sshd() -> HostSshd:
    """The lab host's own sshd, with its keys under the lab's data dir (gone with the lab)."""
    return HostSshd(DATA_DIR / "host-ssh", DATA_DIR / "admin")


def start_lab_sshd(lab: Lab) -> HostSshd:
    """Start the lab host's sshd and record its pid, so `Lab.down` stops it."""
    sshd = lab_sshd().make()
    proc = sshd.start()
    lab.pid_file("sshd").write_text(f"{proc.pid}\n")
    return sshd


def host_flags(sshd: HostSshd) -> list[str]:
    """The command-line flags that point the tool at the lab host over pinned SSH."""
    return ["--host-uri", URI, "--host-key", sshd.fingerprint(), "--identity", str(sshd.identity)]
