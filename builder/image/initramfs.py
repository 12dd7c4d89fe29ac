"""The appliance's initrd: a gzip'd cpio (newc) archive made in memory, no initramfs-tools.

initramfs-tools' initrd is about 6 MB (udev, kmod, libcrypto); this one is about 0.2 MB:
klibc and a few of its programs, the disk modules in load order, and a shell script as /init.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from builder.errors import HostError
from builder.image.kmod import module_bytes, module_load_order, uncompressed


class Cpio:
    """A cpio archive in the kernel's initramfs format (newc), built in memory."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 0

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        self.ino += 1
        fields = (self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, *rdev, len(name) + 1, 0)
        self.data += b"070701" + "".join(f"{f:08x}" for f in fields).encode()
        self.data += name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, body)

    def device(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def klibc_interpreter(program: Path, library: str) -> str:
    """Where klibc's programs look for its library (their ELF interpreter), relative to the
    initrd's root: /lib on bookworm, /usr/lib on trixie."""
    found = re.search(rb"(/usr)?/lib/" + re.escape(library.encode()), program.read_bytes())
    if not found:
        raise HostError(f"{program} does not name {library} as its interpreter")
    return found.group(0).decode().lstrip("/")


def initrd(
    root: Path, kernel: str, modules: list[str], programs: list[str], init: bytes
) -> tuple[bytes, list[str]]:
    """(the compressed initrd, the module paths it loads) from the image tree at `root`:
    klibc's `programs` in /bin, `modules` and their dependencies in /lib/modules with a
    load-order file, and `init` as /init."""
    base = root / "usr/lib/modules" / kernel
    order = module_load_order(base, modules)
    klibc = sorted((root / "usr/lib").glob("klibc-*.so"))
    if len(klibc) != 1:
        raise HostError(f"expected one klibc library, found {klibc}")
    interp = klibc_interpreter(root / "usr/lib/klibc/bin/sh", klibc[0].name)
    archive = Cpio()
    for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "root", "usr", "usr/lib"):
        archive.directory(d)
    archive.device("dev/console", 0o600, 5, 1)
    archive.file(interp, klibc[0].read_bytes(), 0o755)
    for name in programs:
        archive.file(f"bin/{name}", (root / "usr/lib/klibc/bin" / name).read_bytes(), 0o755)
    for mod in order:
        plain = module_bytes(base / mod)
        if plain is None:
            raise HostError(f"{mod}: zstd-compressed modules are not supported in the initrd")
        archive.file(f"lib/modules/{Path(uncompressed(mod)).name}", plain, 0o644)
    load_order = "".join(Path(uncompressed(mod)).name + "\n" for mod in order)
    archive.file("lib/modules/load-order", load_order.encode(), 0o644)
    archive.file("init", init, 0o755)
    return gzip.compress(archive.finish(), compresslevel=9, mtime=0), order
