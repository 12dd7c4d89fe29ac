"""The image's kernel modules: an allowlist closed over dependencies, and a load order.

Both read the kernel's own modules.dep (and modules.softdep), so what the image keeps and
what the initrd loads follow the kernel that was installed, not a hand-kept list.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
from pathlib import Path

from builder.errors import HostError

COMPRESSED = (".xz", ".zst", ".gz")


def uncompressed(path: str) -> str:
    """A module path without the compression suffix some kernels' packages give it."""
    for suffix in COMPRESSED:
        if path.endswith(suffix):
            return path.removesuffix(suffix)
    return path


def module_bytes(path: Path) -> bytes | None:
    """A module's plain ELF bytes, from an xz- or gzip-compressed file or a plain one; None
    for zstd, which Python's standard library cannot read."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return None if path.suffix == ".zst" else data


def store_plain(base: Path, modules: set[str]) -> int:
    """Write `modules` (paths relative to `base`) uncompressed in place of their .xz or .gz
    files: every boot loads some thirty of them, the kernel's decompression of each is slow
    under TCG, and the qcow2's own compression takes back most of the space. depmod must run
    afterwards, since the paths change. Returns how many were rewritten."""
    rewritten = [base / mod for mod in sorted(modules) if Path(mod).suffix in (".xz", ".gz")]
    for path in rewritten:
        path.with_suffix("").write_bytes(module_bytes(path))
        path.unlink()
    return len(rewritten)


def module_name(path: str) -> str:
    return Path(uncompressed(path)).name.removesuffix(".ko").replace("-", "_")


def _dependencies(base: Path) -> dict[str, list[str]]:
    """modules.dep as {module path: [paths it needs]}, paths relative to `base`."""
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    return deps


def _soft_dependencies(base: Path, by_name: dict[str, str]) -> dict[str, list[str]]:
    """modules.softdep as {module path: [paths it may load]}, for the modules the kernel has."""
    softdeps: dict[str, list[str]] = {}
    softdep_file = base / "modules.softdep"
    if not softdep_file.exists():
        return softdeps
    for line in softdep_file.read_text().splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "softdep":
            names = [w.replace("-", "_") for w in words[2:] if not w.endswith(":")]
            softdeps[by_name.get(words[1].replace("-", "_"), "")] = [
                by_name[n] for n in names if n in by_name
            ]
    return softdeps


def trim_modules(root: Path, kernel: str, patterns: list[str]) -> tuple[set[str], int]:
    """Keep modules whose path below kernel/ matches a pattern, plus their dependencies and
    soft dependencies (from modules.dep and modules.softdep); delete the rest."""
    base = root / "usr/lib/modules" / kernel
    deps = _dependencies(base)
    softdeps = _soft_dependencies(base, {module_name(m): m for m in deps})
    regexes = [re.compile(p) for p in patterns]
    todo = [
        m for m in deps if any(r.search(uncompressed(m).removeprefix("kernel/")) for r in regexes)
    ]
    kept: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod not in kept:
            kept.add(mod)
            todo += deps.get(mod, []) + softdeps.get(mod, [])
    dropped = 0
    for mod in deps:
        if mod not in kept:
            (base / mod).unlink()
            dropped += 1
    for dirpath, _, _ in sorted(os.walk(base / "kernel"), reverse=True):
        if not os.listdir(dirpath):
            os.rmdir(dirpath)
    return kept, dropped


def _builtin(base: Path) -> set[str]:
    """Names of the modules compiled into the kernel (modules.builtin): nothing to load."""
    path = base / "modules.builtin"
    return {module_name(line) for line in path.read_text().split()} if path.exists() else set()


def module_load_order(base: Path, names: list[str]) -> list[str]:
    """Module paths (relative to `base`) for `names` and their dependencies, dependencies first;
    a name built into the kernel needs nothing."""
    deps = _dependencies(base)
    by_name = {module_name(m): m for m in deps}
    builtin = _builtin(base)
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod not in order:
            for dep in deps[mod]:
                visit(dep)
            order.append(mod)

    for name in names:
        if name.replace("-", "_") in builtin:
            continue
        if name.replace("-", "_") not in by_name:
            raise HostError(f"initrd module {name} is not in the image's kernel")
        visit(by_name[name.replace("-", "_")])
    return order
