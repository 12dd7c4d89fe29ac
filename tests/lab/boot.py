"""Booting the appliance image under qemu directly (no libvirt): for the image tests and for
`make bench`, which both need the same command line and the same markers in the serial log."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
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
    and wall time from starting qemu until the guest powered off."""

    kernel_to_init: float
    cloud_init_done: float
    wall: float


def qemu_command(serial: Path, *boot: str, memory_mib: int = 512, vcpus: int = 1) -> list[str]:
    """qemu as libvirt runs the appliance here: `pc` machine, TCG (nested KVM does not work in
    the lab), serial console to a file; `boot` says what to boot (a disk or a kernel)."""
    return [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", str(memory_mib),
        "-smp", str(vcpus), "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{serial}", *boot,
    ]  # fmt: skip


def disk_args(disk: Path) -> list[str]:
    return ["-drive", f"file={disk},if=virtio,format=qcow2"]


def extract_boot_files(image: Image, workdir: Path) -> tuple[Path, Path]:
    """The image's kernel and initrd, read with debugfs from a raw copy of the partition."""
    kernel = image.manifest()["kernel"]
    part = workdir / "root.raw"
    run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"bs={PART_OFFSET}", "skip=1",
         f"if={image.path}", f"of={part}"])  # fmt: skip
    files = []
    for name in (f"vmlinuz-{kernel}", f"initrd.img-{kernel}"):
        run(["debugfs", "-R", f"dump /boot/{name} {workdir / name}", part])
        files.append(workdir / name)
    part.unlink()
    return files[0], files[1]


def measure_kernel_to_init(image: Image, workdir: Path, vcpus: int = 1) -> float:
    """Guest seconds from kernel start until it runs the initramfs' init, with `/bin/true` as
    that init so the guest stops right there (panic, then qemu exits on -no-reboot)."""
    kernel, initrd = extract_boot_files(image, workdir)
    serial = workdir / "kernel-to-init.log"
    boot = ["-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 rdinit=/bin/true panic=-1"]  # fmt: skip
    run(qemu_command(serial, *boot, vcpus=vcpus), timeout=300)
    found = INIT_LINE.search(serial.read_text(errors="replace"))
    if not found:
        raise GuestError(f"the kernel never ran init; see {serial}")
    return float(found.group(1))


def measure_boot(image: Image, workdir: Path, timeout: float = 900, vcpus: int = 1) -> BootTiming:
    """A first boot from a minimal NoCloud seed that powers the guest off when cloud-init is
    done. The NIC is user-mode with restrict=on: the guest reaches nothing outside."""
    user_data = (
        "#cloud-config\nhostname: measure\nmanage_etc_hosts: true\nssh_genkeytypes: [ed25519]\n"
        "power_state: {mode: poweroff, delay: now, timeout: 60}\n"
    )
    seed = workdir / "seed.iso"
    seed.write_bytes(make_iso({"user-data": user_data, "meta-data": "instance-id: measure\n"}))
    disk = workdir / "boot.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image.path, "-F", "qcow2", disk, "2G"])
    serial = workdir / "boot.log"
    argv = qemu_command(
        serial, *disk_args(disk), "-cdrom", str(seed),
        "-nic", "user,restrict=on,model=virtio-net-pci", vcpus=vcpus,
    )  # fmt: skip
    t0 = time.monotonic()
    run(argv, timeout=timeout)
    wall = time.monotonic() - t0
    log = serial.read_text(errors="replace")
    init, done = INIT_LINE.search(log), CLOUD_INIT_DONE.search(log)
    if not (init and done):
        raise GuestError(f"cloud-init did not finish; see {serial}")
    return BootTiming(float(init.group(1)), float(done.group(1)), round(wall, 1))
