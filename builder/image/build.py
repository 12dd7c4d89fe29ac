"""The appliance disk image: Debian built from the recipe in images/, cached by its digest.

The build is a straight pipeline of stages (bootstrap, configure, trim, edit, initrd, bytecode,
scrub, filesystem, bootloader, compress), each a plain function over one BuildContext, each
announced through `Progress.stage`; what the stages share beyond the tree (the kernel module
closure, the initrd archive) lives in kmod.py and initramfs.py. Every subprocess goes through
`builder.local.run.run`. The build needs root: mmdebstrap runs in root mode and extlinux
installs onto a loop mount.

The disk is MBR with one ext4 partition at 1 MiB, booted by extlinux (no grub, no udev needed
at build time). The filesystem is `^64bit` because extlinux cannot read 64-bit ext4. Nothing
unique is baked in: no SSH host keys, an empty machine-id, no random seed, no passwords.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from builder.errors import HostError
from builder.image.edits import apply_edits, read_edits
from builder.image.initramfs import initrd
from builder.image.kmod import store_plain, trim_modules
from builder.local.run import run
from builder.progress import Progress
from builder.resources import checkout, data_dir

RECIPE = data_dir("images")
NAME = "wg-appliance"
# Bump when a stage changes what it produces, so cached images built by older code go stale.
BUILD_FORMAT = "9"
# Files in images/ that do not change the image, so they stay out of the digest.
NOT_RECIPE = {"README-section.md", "host-packages.txt"}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIB = 1024**2
PART_OFFSET = MIB
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
KEEP_CACHED = 3
CLOUD_CFG = "rootfs/etc/cloud/cloud.cfg.d/90-wg-appliance.cfg"


@dataclass(frozen=True)
class Image:
    path: Path
    manifest_path: Path
    digest: str
    sha256: str
    size: int

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())


@dataclass
class BuildContext:
    """What every stage reads; `kernel` and `packages` are filled in as the build learns them.
    `units` is units.txt, read before the bootstrap so that a bad line costs no build."""

    recipe: Path
    work: Path
    digest: str
    mirror: str | None
    progress: Progress
    units: dict[str, list]
    kernel: str = ""
    packages: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def raw(self) -> Path:
        return self.work / "disk.raw"

    @property
    def root_uuid(self) -> str:
        """Derived from the digest: the same recipe gives the same fstab and boot config."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{NAME}:{self.digest}"))


def default_cache_dir() -> Path:
    """$WG_APPLIANCE_CACHE, else .cache/images in a checkout, else ~/.cache/wg-appliance/images."""
    env = os.environ.get("WG_APPLIANCE_CACHE")
    if env:
        return Path(env)
    root = checkout()
    if root is not None and (root / ".git").exists():
        return root / ".cache" / "images"
    return Path.home() / ".cache" / NAME / "images"


def read_list(path: Path) -> list[str]:
    """A recipe list: one entry a line, blank lines and `#` comments ignored."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def recipe_digest(mirror: str | None = None, recipe: Path = RECIPE) -> str:
    """sha256 over every recipe file (path, mode, content), the build format and the mirror."""
    h = hashlib.sha256(f"format={BUILD_FORMAT}\nmirror={mirror or ''}\n".encode())
    for path in sorted(recipe.rglob("*")):
        rel = path.relative_to(recipe).as_posix()
        if rel in NOT_RECIPE or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink():
            h.update(f"link {rel} {os.readlink(path)}\n".encode())
        else:
            mode = "x" if os.access(path, os.X_OK) else "-"
            data = path.read_bytes()
            h.update(f"file {rel} {mode} {len(data)}\n".encode())
            h.update(data)
    return h.hexdigest()


def suite(recipe: Path = RECIPE) -> str:
    """The Debian release the recipe builds, the one line of images/suite (a codename)."""
    names = read_list(recipe / "suite")
    if len(names) != 1 or not re.fullmatch(r"[a-z]+", names[0]):
        raise HostError(f"{recipe / 'suite'}: expected one Debian codename, found {names}")
    return names[0]


def sources(recipe: Path, mirror: str | None) -> list[str]:
    """sources.list with `{suite}` filled in from images/suite."""
    name = suite(recipe)
    lines = [line.replace("{suite}", name) for line in read_list(recipe / "sources.list")]
    if mirror:
        lines = [
            line.replace(DEFAULT_MIRROR + " ", mirror.rstrip("/") + " ")
            for line in lines
            if DEFAULT_MIRROR + "-security" not in line
        ]
    return lines


# Stages -----------------------------------------------------------------------------------


def bootstrap(ctx: BuildContext) -> None:
    """Install the packages with dpkg path filters. The rootfs tree goes in once the essential
    packages are in (for the apt pin and the initramfs config the kernel's postinst reads;
    earlier would upset the merged-/usr setup) and again at the end, over what packages and
    mmdebstrap wrote."""
    tree = ctx.recipe / "rootfs"
    if re.search(r"\s", str(tree)):
        raise HostError(f"recipe path has whitespace: {tree}", "move the checkout")
    packages = read_list(ctx.recipe / "packages.txt")
    argv: list[str] = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        '--aptopt=APT::Install-Recommends "false"',
        "--include=" + ",".join(packages),
        *(f"--dpkgopt={rule}" for rule in read_list(ctx.recipe / "dpkg-excludes.txt")),
        f"--essential-hook=sync-in {tree} /",
        f"--customize-hook=sync-in {tree} /",
        suite(ctx.recipe),
        str(ctx.root),
        *sources(ctx.recipe, ctx.mirror),
    ]
    run(argv, timeout=1800)
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (ctx.root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise HostError(f"expected one kernel in /boot, found {kernels}")
    ctx.kernel = kernels[0]


def configure(ctx: BuildContext) -> None:
    """Purge what purge.txt names; units, fstab, resolv.conf, the extlinux menu, and the
    recipe digest where the guest reads it (status and the metrics exporter show it)."""
    purge = read_list(ctx.recipe / "purge.txt")
    if purge:
        run(["chroot", ctx.root, "dpkg", "--purge", *purge])
    out = run(["chroot", ctx.root, "dpkg-query", "-W", "-f=${Package}\t${Version}\n"]).stdout
    ctx.packages = dict(sorted(line.split("\t", 1) for line in out.splitlines() if line))
    for name in ctx.units["mask-generator"]:
        mask_generator(ctx.root, name)
    for target, unit in ctx.units["add-wants"]:
        run(["chroot", ctx.root, "systemctl", "add-wants", "--quiet", target, unit])
    for verb in ("enable", "disable", "mask"):
        if names := ctx.units[verb]:
            run(["chroot", ctx.root, "systemctl", verb, "--quiet", *names])
    # sudo ignores (and complains about) a sudoers file that is not root's, whoever owns the
    # checkout the recipe came from; a file it cannot parse would lock the tool out.
    for rules in (ctx.root / "etc/sudoers.d").iterdir():
        os.chown(rules, 0, 0)
        rules.chmod(0o440)
    run(["chroot", ctx.root, "visudo", "--check", "--quiet"])
    drop_pam_modules(ctx.root / "etc/pam.d/sshd", PAM_SSHD_UNUSED)
    # fsck pass 0: a root to check would hold boot until udev's coldplug, slow under TCG, has
    # announced its device; ext4's journal makes the filesystem consistent on mount.
    (ctx.root / "etc/fstab").write_text(
        f"UUID={ctx.root_uuid} / ext4 defaults,errors=remount-ro 0 0\n"
    )
    (ctx.root / "etc/wg-appliance").mkdir(mode=0o755, exist_ok=True)
    (ctx.root / "etc/wg-appliance/image").write_text(ctx.digest + "\n")
    # No resolver daemon: each appliance's seed writes its servers (lan.dns) here.
    resolv = ctx.root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("# No DNS servers: the seed writes the site's lan.dns here.\n")
    template = (ctx.recipe / "extlinux.conf").read_text()
    conf = ctx.root / "boot/extlinux/extlinux.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        template.format(
            kernel=f"vmlinuz-{ctx.kernel}",
            initrd=f"initrd.img-{ctx.kernel}",
            root_uuid=ctx.root_uuid,
        )
    )


UNIT_VERBS = {"enable": 1, "disable": 1, "mask": 1, "mask-generator": 1, "add-wants": 2}


def read_units(path: Path) -> dict[str, list]:
    """units.txt by verb: unit names, or (target, unit) pairs for add-wants. A line of any
    other shape is a recipe error that names the line, raised before the build starts."""
    units: dict[str, list] = {verb: [] for verb in UNIT_VERBS}
    for line in read_list(path):
        verb, *args = line.split()
        if UNIT_VERBS.get(verb) != len(args):
            raise HostError(f"{path.name}: cannot read {line!r}")
        units[verb].append(args[0] if len(args) == 1 else tuple(args))
    return units


def mask_generator(root: Path, name: str) -> None:
    """Switch a systemd generator off the way systemd.generator(7) documents: a link to
    /dev/null of its name in /etc/systemd/system-generators. A name no generator has is a
    recipe error, not something to mask silently."""
    if not (root / "usr/lib/systemd/system-generators" / name).exists():
        raise HostError(f"units.txt: no generator named {name} in the image")
    link = root / "etc/systemd/system-generators" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to("/dev/null")


# Session modules of Debian's /etc/pam.d/sshd that every SSH login pays for (a library each,
# pam_motd a run-parts process under TCG) and the appliance has no use for: no SELinux, no
# message of the day (sshd prints none: PrintMotd no), no mail. The file is the package's
# conffile, so it is edited here rather than shipped in rootfs/.
PAM_SSHD_UNUSED = ("pam_motd.so", "pam_mail.so", "pam_selinux.so")


def drop_pam_modules(path: Path, modules: tuple[str, ...]) -> None:
    """`path` without the lines that use these modules (comments stay)."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.lstrip().startswith("#") or not set(ln.split()) & set(modules)]
    path.write_text("".join(kept))


def trim(ctx: BuildContext) -> None:
    """Delete what drop.txt names and every kernel module the allowlist does not need; store
    the kept modules uncompressed."""
    for pattern in read_list(ctx.recipe / "drop.txt"):
        for path in ctx.root.glob(pattern):
            remove(path)
    kept, dropped = trim_modules(ctx.root, ctx.kernel, read_list(ctx.recipe / "modules.txt"))
    plain = store_plain(ctx.root / "usr/lib/modules" / ctx.kernel, kept)
    ctx.progress.say(f"kernel modules: kept {len(kept)} ({plain} uncompressed), deleted {dropped}")
    run(["depmod", "--basedir", ctx.root, ctx.kernel])


def edit(ctx: BuildContext) -> None:
    """The exact-text edits of images/edits.toml (before the bytecode stage compiles them)."""
    apply_edits(ctx.root, read_edits(ctx.recipe / "edits.toml"))


# Bytecode is written even where the build's environment says not to: the edited modules'
# caches are stale, and compiling them would otherwise fall to every first boot.
BOOT_IMPORTS = """
import importlib, sys
sys.dont_write_bytecode = False
for name in sys.argv[1:]:
    importlib.import_module(name)
for module in list(sys.modules.values()):
    cached = getattr(module, "__cached__", None)
    if cached:
        print(cached)
"""


def prune_bytecode(ctx: BuildContext) -> None:
    """Keep compiled Python only for what cloud-init imports at boot (its entry point, the
    datasources and the config modules the image enables): that is where TCG boots spend
    their time. Anything else compiles on first use; this saves about 18 MB."""
    cfg = yaml.safe_load((ctx.recipe / CLOUD_CFG).read_text())
    modules = [f"cloudinit.config.cc_{m}" for key, mods in cfg.items()
               if key.endswith("_modules") for m in mods]  # fmt: skip
    modules += read_list(ctx.recipe / "python-boot.txt")
    out = run(["chroot", ctx.root, "python3", "-c", BOOT_IMPORTS, *modules]).stdout
    keep = {line.strip() for line in out.splitlines()}
    dropped = 0
    for pyc in (ctx.root / "usr/lib").glob("python3*/**/__pycache__/*.pyc"):
        if "/" + str(pyc.relative_to(ctx.root)) not in keep:
            pyc.unlink()
            dropped += 1
    ctx.progress.say(f"python bytecode: kept {len(keep)} modules' caches, deleted {dropped}")


def make_initrd(ctx: BuildContext) -> None:
    """Replace initramfs-tools' initrd with the small one initrd.txt lists, initrd-init.sh
    as /init."""
    spec: dict[str, list[str]] = {"module": [], "program": []}
    for line in read_list(ctx.recipe / "initrd.txt"):
        kind, name = line.split()
        spec[kind].append(name)
    init = (ctx.recipe / "initrd-init.sh").read_bytes()
    data, order = initrd(ctx.root, ctx.kernel, spec["module"], spec["program"], init)
    (ctx.root / "boot" / f"initrd.img-{ctx.kernel}").write_bytes(data)
    ctx.progress.say(f"initrd: {len(order)} modules, {len(data) / 1024:.0f} KiB")


def scrub(ctx: BuildContext) -> None:
    """Remove everything that must be unique per machine or that records the build host."""
    for pattern in (
        "etc/ssh/ssh_host_*",
        "var/lib/systemd/random-seed",
        "var/lib/dbus/machine-id",
        "var/lib/cloud/*",
        "var/log/journal/*",
        "tmp/*",
        "var/tmp/*",
        "root/.*history",
    ):
        for path in ctx.root.glob(pattern):
            remove(path)
    # Empty, not absent: systemd then makes one at first boot and treats the boot as the first.
    (ctx.root / "etc/machine-id").write_text("")
    mark_updated(ctx.root)


def mark_updated(root: Path) -> None:
    """Stamp /etc and /var as up to date with /usr, as systemd-update-done would: the units
    with ConditionNeedsUpdate (ldconfig, the hwdb and journal catalog rebuilds, sysusers)
    then skip the first boot, where under TCG they cost seconds for what the build did."""
    usr = (root / "usr").stat().st_mtime_ns
    for stamp in (root / "etc/.updated", root / "var/.updated"):
        stamp.write_text(
            f"# This file was created by wg-appliance's image build.\nTIMESTAMP_NSEC={usr}\n"
        )
        os.utime(stamp, ns=(usr, usr))


def make_filesystem(ctx: BuildContext) -> None:
    """A sparse disk file: MBR, one bootable partition at 1 MiB, ext4 filled from the tree."""
    used = tree_size(ctx.root)
    fs_bytes = round_up(int(used * 1.15) + 96 * MIB, MIB)
    run(["truncate", "--size", str(PART_OFFSET + fs_bytes), ctx.raw])
    label_id = "0x" + ctx.digest[:8]
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", ctx.raw],
        input=f"label: dos\nlabel-id: {label_id}\nstart={PART_OFFSET // 512}, type=83, bootable\n",
    )
    run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^64bit", "-b", "4096", "-i", "8192",
            "-L", "root", "-U", ctx.root_uuid, "-e", "remount-ro", "-E", f"offset={PART_OFFSET}",
            "-d", ctx.root, ctx.raw, f"{fs_bytes // 1024}k",
        ]
    )  # fmt: skip


def install_bootloader(ctx: BuildContext) -> None:
    """extlinux into /boot/extlinux on a loop mount of the partition, syslinux's MBR code."""
    mnt = ctx.work / "mnt"
    mnt.mkdir()
    run(["mount", "-o", f"loop,offset={PART_OFFSET}", ctx.raw, mnt])
    try:
        run(["extlinux", "--install", mnt / "boot/extlinux"])
    finally:
        run(["umount", mnt])
    code = MBR_BIN.read_bytes()
    if len(code) != 440:
        raise HostError(
            f"{MBR_BIN} is {len(code)} bytes, expected 440", "reinstall syslinux-common"
        )
    with open(ctx.raw, "r+b") as disk:
        disk.write(code)


def compress(ctx: BuildContext, qcow: Path) -> None:
    """zlib-compressed qcow2: every qemu and libvirt reads it, zstd would gain little."""
    run(["qemu-img", "convert", "-c", "-m", "4", "-W", "-O", "qcow2", ctx.raw, qcow])


# Helpers ----------------------------------------------------------------------------------


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _unescaped(field: str) -> str:
    """A mountinfo path field as the path: the kernel writes space, tab, newline and
    backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    top = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [_unescaped(line.split()[4]) for line in f]
    inside = [p for p in points if p == top or p.startswith(top + "/")]
    return sorted(set(inside), key=lambda p: p.count("/"), reverse=True)


def clear(work: Path) -> None:
    """Remove a build folder, first unmounting what a killed build left mounted in it
    (mmdebstrap's /proc, /sys and /dev in the chroot, the bootloader's loop mount): a
    removal through a live mount would delete what it shows, the host's own files."""
    for point in mounts_under(work):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "--lazy", point], check=False)
    left = mounts_under(work)
    if left:
        raise HostError(
            f"cannot unmount {left[0]} in the build folder {work}",
            f"unmount it by hand (`umount {left[0]}`), then run the build again",
        )
    shutil.rmtree(work, ignore_errors=True)


def clear_stale(cache: Path) -> None:
    """The build folders of earlier builds that were killed; called with the cache's lock
    held, so no build is using them."""
    for stale in sorted(cache.glob("build-*")):
        clear(stale)


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def tree_size(root: Path) -> int:
    """Bytes the tree takes on disk, counted in 4 KiB blocks as ext4 will store it."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += round_up(st.st_size, 4096)
    return total


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One build per cache at a time; a second caller waits, then finds its image cached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def qcow_virtual_size(path: Path) -> int:
    info = json.loads(run(["qemu-img", "info", "--output=json", path]).stdout)
    return int(info["virtual-size"])


def manifest_of(qcow: Path) -> Path:
    """Where an image's manifest lives: beside it, `<stem>.json`."""
    return qcow.with_suffix(".json")


def load_cached(entry: Path) -> Image | None:
    qcow = entry / f"{NAME}.qcow2"
    manifest_path = manifest_of(qcow)
    if not (qcow.is_file() and manifest_path.is_file()):
        return None
    manifest = json.loads(manifest_path.read_text())
    if qcow.stat().st_size != manifest["size"]:
        return None
    return Image(qcow, manifest_path, manifest["digest"], manifest["sha256"], manifest["size"])


def prune(cache: Path, keep: Path) -> None:
    """Keep the newest few images: a cache, not an archive."""
    entries = sorted(
        (p for p in cache.iterdir() if p.is_dir() and (p / f"{NAME}.json").exists()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[KEEP_CACHED:]:
        if old != keep:
            shutil.rmtree(old)


def check_host() -> None:
    if os.geteuid() != 0:
        raise HostError("building the image needs root (mmdebstrap, loop mount)", "run as root")
    missing = [
        tool
        for tool in ("mmdebstrap", "mke2fs", "sfdisk", "extlinux", "qemu-img", "depmod")
        if not shutil.which(tool)
    ]
    if missing or not MBR_BIN.exists():
        raise HostError(
            f"missing build tools: {', '.join(missing) or MBR_BIN}",
            "run `make setup` (installs images/host-packages.txt)",
        )


# Public entry points ----------------------------------------------------------------------


def build_image(
    *,
    out: Path | None = None,
    cache: Path,
    mirror: str | None = None,
    progress: Progress,
    force: bool = False,
    recipe: Path = RECIPE,
) -> Image:
    """The image for the recipe (the project's images/ unless another folder is given): from
    the cache when the digest matches, else built. With `out`, the qcow2 is also copied
    there, its manifest beside it as `<stem>.json`."""
    digest = recipe_digest(mirror, recipe)
    entry = cache / digest[:16]
    with locked(cache / ".lock"):
        image = None if force else load_cached(entry)
        if image:
            progress.say(f"image cached: {image.path} (recipe {digest[:12]})")
        else:
            check_host()
            image = _build(cache, entry, digest, mirror, progress, recipe)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest_out = manifest_of(out)
        shutil.copyfile(image.path, out)
        shutil.copyfile(image.manifest_path, manifest_out)
        image = Image(out, manifest_out, image.digest, image.sha256, image.size)
    return image


def image_file(path: Path) -> tuple[Path, str]:
    """(path, content sha256) of an image the user names: the sha256 from its manifest when
    one is beside it (as `build --out` leaves it), else hashed."""
    manifest = manifest_of(path)
    if manifest.is_file():
        return path, json.loads(manifest.read_text())["sha256"]
    return path, sha256_file(path)


def _build(
    cache: Path, entry: Path, digest: str, mirror: str | None, progress: Progress, recipe: Path
) -> Image:
    t0 = time.monotonic()
    units = read_units(recipe / "units.txt")
    cache.mkdir(parents=True, exist_ok=True)
    clear_stale(cache)
    work = Path(tempfile.mkdtemp(prefix=f"build-{digest[:16]}-", dir=cache))
    try:
        ctx = BuildContext(recipe, work, digest, mirror, progress, units)
        result = work / "result"
        result.mkdir()
        qcow = result / f"{NAME}.qcow2"
        for name, stage in (
            ("bootstrap", bootstrap),
            ("configure", configure),
            ("trim", trim),
            ("edit", edit),
            ("initrd", make_initrd),
            ("bytecode", prune_bytecode),
            ("scrub", scrub),
            ("filesystem", make_filesystem),
            ("bootloader", install_bootloader),
        ):
            with progress.stage(name):
                stage(ctx)
        with progress.stage("compress"):
            compress(ctx, qcow)
        manifest = {
            "name": NAME,
            "format": "qcow2",
            "digest": digest,
            "build_format": BUILD_FORMAT,
            "suite": suite(ctx.recipe),
            "mirror": mirror or DEFAULT_MIRROR,
            "sha256": sha256_file(qcow),
            "size": qcow.stat().st_size,
            "virtual_size": qcow_virtual_size(qcow),
            "tree_size": tree_size(ctx.root),
            "kernel": ctx.kernel,
            "root_uuid": ctx.root_uuid,
            "packages": ctx.packages,
            "build_seconds": round(time.monotonic() - t0, 1),
            "built_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (result / f"{NAME}.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if entry.exists():
            shutil.rmtree(entry)
        result.rename(entry)
    finally:
        clear(work)
    prune(cache, entry)
    image = load_cached(entry)
    assert image is not None
    progress.say(
        f"image built: {image.path} ({image.size / MIB:.1f} MiB) "
        f"in {manifest['build_seconds']:.0f}s"
    )
    return image
