"""Booting the appliance image under qemu directly (no libvirt): for the image tests and for
`make bench`, which both need the same command line and the same markers in the serial log."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import GuestError
from builder.image.build import PART_OFFSET, Image
from builder.local.run import run
from builder.render.seed import make_iso

INIT_LINE = re.compile(r"\[\s*(\d+\.\d+)\] Run (\S+) as init process")
CLOUD_INIT_DONE = re.compile(r"Cloud-init v\. \S+ finished at .* Up (\d+(?:\.\d+)?) seconds")


@dataclass(frozen=True)
class BootTiming:
    """Seconds: kernel start to the initramfs' init, guest uptime when cloud-init finished,
    wall time from starting qemu until SSH answered, until cloud-init's final message was on
    the console and until the guest powered off; and the top of `systemd-analyze blame` and
    `cloud-init analyze blame` from inside the guest."""

    kernel_to_init: float
    cloud_init_done: float
    ssh_wall: float
    done_wall: float
    wall: float
    systemd_blame: list[str] = field(default_factory=list)
    cloud_init_blame: list[str] = field(default_factory=list)


def qemu_command(serial: Path, *boot: str, memory_mib: int = 512, vcpus: int = 1) -> list[str]:
    """qemu as libvirt runs the appliance here: `pc` machine with no default devices (no VGA,
    whose console would cost the guest what the appliance never pays), TCG (nested KVM does
    not work in the lab), serial console to a file; `boot` says what to boot (a disk or a
    kernel)."""
    return [
        "qemu-system-x86_64", "-nodefaults", "-machine", "pc", "-accel", "tcg",
        "-m", str(memory_mib),
        "-smp", str(vcpus), "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{serial}", *boot,
    ]  # fmt: skip


def disk_args(disk: Path) -> list[str]:
    return ["-drive", f"file={disk},if=virtio,format=qcow2"]


def extract_boot_files(image: Image, workdir: Path) -> tuple[Path, Path, str]:
    """The image's kernel, initrd and kernel command line (its extlinux menu's APPEND), read
    with debugfs from a raw copy of the partition."""
    kernel = image.manifest()["kernel"]
    part = workdir / "root.raw"
    run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"bs={PART_OFFSET}", "skip=1",
         f"if={image.path}", f"of={part}"])  # fmt: skip
    files = []
    for name in (f"vmlinuz-{kernel}", f"initrd.img-{kernel}", "extlinux/extlinux.conf"):
        out = workdir / name.rsplit("/", 1)[-1]
        run(["debugfs", "-R", f"dump /boot/{name} {out}", part])
        files.append(out)
    part.unlink()
    appends = [ln.split(None, 1)[1] for ln in files[2].read_text().splitlines()
               if ln.split()[:1] == ["APPEND"]]  # fmt: skip
    if len(appends) != 1:
        raise GuestError(f"the image's extlinux.conf has {len(appends)} APPEND lines, not one")
    return files[0], files[1], appends[0].strip()


def image_with_files(image: Image, workdir: Path, files: dict[str, str]) -> Path:
    """A copy of the image with `files` (guest path -> text, mode 0644, folders made as
    needed) written into its root filesystem by debugfs: an image that differs from the
    built one in a known way, without a build."""
    raw, out = workdir / "edit.raw", workdir / f"edited-{image.path.name}"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image.path, raw])
    cmds = []
    for i, (guest, text) in enumerate(files.items()):
        local = workdir / f"edit-{i}"
        local.write_text(text)
        local.chmod(0o644)
        parts = Path(guest).parent.parts
        cmds += [f"mkdir {Path(*parts[: j + 1])}" for j in range(1, len(parts))]
        cmds += [f"rm {guest}", f"write {local} {guest}"]
    (workdir / "edit.cmds").write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", workdir / "edit.cmds", f"{raw}?offset={PART_OFFSET}"])
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out])
    raw.unlink()
    return out


def measure_kernel_to_init(image: Image, workdir: Path, vcpus: int = 1) -> float:
    """Guest seconds from kernel start until it runs the initramfs' init, with `/bin/true` as
    that init so the guest stops right there (panic, then qemu exits on -no-reboot)."""
    kernel, initrd, _ = extract_boot_files(image, workdir)
    serial = workdir / "kernel-to-init.log"
    boot = ["-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 rdinit=/bin/true panic=-1"]  # fmt: skip
    run(qemu_command(serial, *boot, vcpus=vcpus), timeout=300)
    found = INIT_LINE.search(serial.read_text(errors="replace"))
    if not found:
        raise GuestError(f"the kernel never ran init; see {serial}")
    return float(found.group(1))


def measure_bare(image: Image, workdir: Path, vcpus: int = 1) -> float:
    """Wall seconds from starting qemu until it exits for the bare boot the first-boot goal is
    set against: the image's kernel, initramfs, disk and command line with `init=/bin/true`,
    so the initramfs finds and mounts the root filesystem, runs that init, and the kernel
    panics and qemu stops (-no-reboot)."""
    kernel, initrd, append = extract_boot_files(image, workdir)
    disk = workdir / "bare.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image.path, "-F", "qcow2", disk])
    serial = workdir / "bare.log"
    boot = ["-kernel", str(kernel), "-initrd", str(initrd), *disk_args(disk),
            "-append", f"{append} init=/bin/true panic=-1"]  # fmt: skip
    t0 = time.monotonic()
    run(qemu_command(serial, *boot, vcpus=vcpus), timeout=300)
    wall = time.monotonic() - t0
    if "Attempted to kill init" not in serial.read_text(errors="replace"):
        raise GuestError(f"the bare boot never ran /bin/true from its root; see {serial}")
    return wall


# Once boot has settled, the guest prints both blame lists to its console and powers off.
REPORT = (
    "exec >/dev/console 2>&1; systemctl is-system-running --wait >/dev/null; echo BLAME-SYSTEMD;"
    " systemd-analyze blame --no-pager | head -5; echo BLAME-CLOUD-INIT;"
    " cloud-init analyze blame | grep -v Boot | head -5; echo BLAME-END; systemctl poweroff"
)


# Entries of the two blame lists, found by shape: the serial console interleaves getty's
# prompt and terminal queries with what the report prints.
SYSTEMD_BLAME = re.compile(r"((?:\d+min )?\d+(?:\.\d+)?(?:ms|us|s|min)) (\S+\.[a-z]+)\s*$")
CLOUD_INIT_BLAME = re.compile(r"(\d+\.\d+s) \((\S+)\)")


def _between(log: str, start: str, end: str, entry: re.Pattern[str]) -> list[str]:
    """The first five entries after the last `start` (systemd's console names the command
    line first), as "time name"."""
    part = log.rsplit(start, 1)[-1].split(end, 1)[0] if start in log else ""
    found = (entry.search(" ".join(line.split())) for line in part.splitlines())
    return [f"{m.group(1)} {m.group(2)}" for m in found if m][:5]


def _wait_for_ssh(port: int, qemu: subprocess.Popen, t0: float, timeout: float) -> float:
    """Wall seconds since `t0` until the guest's sshd sent its banner through the forward."""
    while time.monotonic() - t0 < timeout and qemu.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(4).startswith(b"SSH-"):
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise GuestError("sshd never answered during the first boot")


def _wait_for_done(serial: Path, qemu: subprocess.Popen, t0: float, timeout: float) -> float:
    """Wall seconds since `t0` until cloud-init's final message is on the serial console."""
    while time.monotonic() - t0 < timeout and qemu.poll() is None:
        if CLOUD_INIT_DONE.search(serial.read_text(errors="replace")):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise GuestError(f"cloud-init did not finish; see {serial}")


# qemu's user-mode network as the appliance's LAN: the guest's NIC, address and gateway.
GUEST_MAC = "52:54:00:12:34:56"
GUEST_ADDRESS, GUEST_GATEWAY, GUEST_DNS = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"


def minimal_seed() -> dict[str, str]:
    """A seed that sets only a host name, the SSH host key type and the LAN as every appliance
    has it (static, matched by MAC: no DHCP, which the appliance never does and whose wait
    for a lease and IPv6 link-local address would be timed with it)."""
    return {
        "user-data": "#cloud-config\nhostname: measure\nmanage_etc_hosts: true\n"
        "ssh_genkeytypes: [ed25519]\n",
        "meta-data": "instance-id: measure\n",
        "network-config": (
            "version: 2\nethernets:\n  lan0:\n"
            f'    match: {{macaddress: "{GUEST_MAC}"}}\n    set-name: lan0\n'
            f'    addresses: ["{GUEST_ADDRESS}"]\n'
            f'    routes: [{{to: "0.0.0.0/0", via: "{GUEST_GATEWAY}"}}]\n'
        ),
    }


def measure_boot(
    image: Image,
    workdir: Path,
    timeout: float = 900,
    vcpus: int = 1,
    seed: dict[str, str] | None = None,
) -> BootTiming:
    """A first boot from `seed` (NoCloud files; minimal_seed() when None); a vendor-data script
    has the guest report its blame lists and power off once boot is done. The NIC is
    user-mode with restrict=on: the guest reaches nothing outside, only a loopback forward
    reaches its sshd."""
    run_report = "systemd-run --no-block --unit=boot-report sh -c " + shlex.quote(REPORT)
    report = f"#!/bin/sh\nexec {run_report}\n"
    files = {**(minimal_seed() if seed is None else seed), "vendor-data": report}
    seed_iso = workdir / "seed.iso"
    seed_iso.write_bytes(make_iso(files))
    disk = workdir / "boot.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image.path, "-F", "qcow2", disk, "2G"])
    serial = workdir / "boot.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = qemu_command(
        serial, *disk_args(disk), "-cdrom", str(seed_iso),
        "-nic", f"user,restrict=on,model=virtio-net-pci,mac={GUEST_MAC},"
        f"hostfwd=tcp:127.0.0.1:{port}-:22",
        vcpus=vcpus,
    )  # fmt: skip
    t0 = time.monotonic()
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ssh_wall = _wait_for_ssh(port, qemu, t0, timeout)
        done_wall = _wait_for_done(serial, qemu, t0, timeout)
        qemu.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    wall = time.monotonic() - t0
    log = serial.read_text(errors="replace")
    init, done = INIT_LINE.search(log), CLOUD_INIT_DONE.search(log)
    if not (init and done):
        raise GuestError(f"cloud-init did not finish; see {serial}")
    return BootTiming(
        float(init.group(1)), float(done.group(1)), round(ssh_wall, 1), round(done_wall, 1),
        round(wall, 1),
        _between(log, "BLAME-SYSTEMD", "BLAME-CLOUD-INIT", SYSTEMD_BLAME),
        _between(log, "BLAME-CLOUD-INIT", "BLAME-END", CLOUD_INIT_BLAME),
    )  # fmt: skip
