"""The appliance image: recipe digest and module trimming (fast), then the built image itself
(slow: built once per session, cached), and a first boot under qemu/TCG with a NoCloud seed,
checked over SSH with a pinned host key. Guest networking is user-mode with restrict=on, and
the only way in is a forward from a loopback port."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import lzma
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from builder.errors import HostError
from builder.image.build import (
    MBR_BIN,
    PART_OFFSET,
    RECIPE,
    Image,
    build_image,
    clear,
    clear_stale,
    default_cache_dir,
    mounts_under,
    read_list,
    read_units,
    recipe_digest,
    sources,
    suite,
)
from builder.image.edits import Edit, apply_edits, read_edits
from builder.image.initramfs import klibc_interpreter
from builder.image.kmod import module_bytes, module_load_order, store_plain, trim_modules
from builder.progress import Progress
from builder.provision import CLOUD_INIT_RESULT, NEVER_RAN, WAIT_BOOT
from builder.render.seed import make_iso
from tests.lab.boot import (
    CLOUD_INIT_DONE,
    GUEST_ADDRESS,
    GUEST_GATEWAY,
    GUEST_MAC,
    disk_args,
    qemu_command,
)

USER = "netadmin"
HOSTNAME = "wg-test"
SIZE_GOAL = 64_000_000


# Fast: the recipe as data ---------------------------------------------------------------


def test_recipe_lists_parse() -> None:
    packages = read_list(RECIPE / "packages.txt")
    for name in ("linux-image-cloud-amd64", "cloud-init", "openssh-server", "sudo",
                 "wireguard-tools", "nftables", "usr-is-merged"):  # fmt: skip
        assert name in packages
    assert all(" " not in p and not p.startswith("#") for p in packages)
    for pattern in read_list(RECIPE / "modules.txt"):
        re.compile(pattern)


def test_units_list_parses_and_a_bad_line_names_itself(tmp_path: Path) -> None:
    units = read_units(RECIPE / "units.txt")
    assert ("multi-user.target", "cloud-init.target") in units["add-wants"]
    assert "cloud-init-generator" in units["mask-generator"]
    assert all(isinstance(u, str) for v in ("enable", "disable", "mask") for u in units[v])
    for bad in ("add-wants cloud-init.target", "enable a b", "start ssh.service"):
        (tmp_path / "units.txt").write_text(f"mask tmp.mount\n{bad}\n")
        with pytest.raises(HostError, match=re.escape(f"units.txt: cannot read {bad!r}")):
            read_units(tmp_path / "units.txt")


def test_a_bad_units_line_fails_the_build_before_the_bootstrap(tmp_path: Path) -> None:
    """The recipe error comes before minutes of mmdebstrap, and leaves no work folder or
    cache entry behind for the next build to trip over."""
    recipe = tmp_path / "images"
    shutil.copytree(RECIPE, recipe, symlinks=True)
    with open(recipe / "units.txt", "a") as f:
        f.write("start ssh.service\n")
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    with pytest.raises(HostError, match=re.escape("units.txt: cannot read 'start ssh.service'")):
        build_image(cache=cache, recipe=recipe, progress=Progress(quiet=True), force=True)
    assert time.monotonic() - t0 < 30, "failed only after a bootstrap"
    left = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert left in ([], [".lock"]), f"left behind: {left}"


def test_the_recipe_holds_no_symlink() -> None:
    """A copy of the recipe or the installed package turns a link into a plain file, which
    systemd ignores in a .wants folder: links are made by units.txt at build time."""
    assert [p for p in RECIPE.rglob("*") if p.is_symlink()] == []


def test_digest_covers_recipe_and_mirror(tmp_path: Path) -> None:
    recipe = tmp_path / "images"
    shutil.copytree(RECIPE, recipe, symlinks=True)
    base = recipe_digest(recipe=recipe)
    assert base == recipe_digest(recipe=recipe)
    assert recipe_digest("http://mirror.example/debian", recipe=recipe) != base
    (recipe / "README-section.md").write_text("docs do not change the image\n")
    assert recipe_digest(recipe=recipe) == base
    with open(recipe / "packages.txt", "a") as f:
        f.write("htop\n")
    assert recipe_digest(recipe=recipe) != base


def test_suite_is_one_recipe_value(tmp_path: Path) -> None:
    recipe = tmp_path / "images"
    shutil.copytree(RECIPE, recipe, symlinks=True)
    assert suite(recipe) == "trixie"
    assert all("trixie" in line and "{" not in line for line in sources(recipe, None))
    base = recipe_digest(recipe=recipe)
    (recipe / "suite").write_text("bookworm\n")
    assert recipe_digest(recipe=recipe) != base
    assert all("bookworm" in line for line in sources(recipe, None))
    assert not any("security" in line for line in sources(recipe, "http://m.example/debian"))


def test_edits_match_once_or_fail_the_build(tmp_path: Path) -> None:
    edits = read_edits(RECIPE / "edits.toml")
    assert edits and all(e.old and e.old != e.new for e in edits)
    (tmp_path / "a.py").write_text("import x\nx.y()\n")
    apply_edits(tmp_path, [Edit("a.py", "import x\n", "x = 1\n"), Edit("a.py", "x.y()", "x")])
    assert (tmp_path / "a.py").read_text() == "x = 1\nx\n"
    for old in ("missing", "x"):  # none, and twice
        with pytest.raises(HostError, match="edits.toml: a.py"):
            apply_edits(tmp_path, [Edit("a.py", old, "z")])
    assert (tmp_path / "a.py").read_text() == "x = 1\nx\n", "a failed edit writes nothing"


def test_compressed_and_builtin_modules(tmp_path: Path) -> None:
    """trixie's kernel ships .ko.xz and builds virtio_pci in; klibc's insmod wants plain .ko."""
    base = tmp_path / "usr/lib/modules/6.12.0-test"
    (base / "kernel/drivers/block").mkdir(parents=True)
    (base / "kernel/drivers/block/virtio_blk.ko.xz").write_bytes(lzma.compress(b"ELF-ish"))
    (base / "modules.dep").write_text("kernel/drivers/block/virtio_blk.ko.xz:\n")
    (base / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    order = module_load_order(base, ["virtio_pci", "virtio_blk"])
    assert order == ["kernel/drivers/block/virtio_blk.ko.xz"]
    assert module_bytes(base / order[0]) == b"ELF-ish"
    kept, dropped = trim_modules(tmp_path, "6.12.0-test", [r"^drivers/block/virtio_blk\.ko$"])
    assert kept == set(order) and dropped == 0


def test_kept_modules_are_stored_plain(tmp_path: Path) -> None:
    """xz and gzip modules become plain .ko files with the same ELF bytes; a zstd one (no
    reader in the standard library) and one that is plain already stay as they are."""
    elf = {"a.ko.xz": lzma.compress(b"A"), "b.ko.gz": gzip.compress(b"B"), "c.ko": b"C",
           "d.ko.zst": b"zstd", "e.ko.xz": lzma.compress(b"E")}  # fmt: skip
    for name, data in elf.items():
        (tmp_path / name).write_bytes(data)
    assert store_plain(tmp_path, {"a.ko.xz", "b.ko.gz", "c.ko", "d.ko.zst"}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.ko", "b.ko", "c.ko", "d.ko.zst", "e.ko.xz"]  # fmt: skip
    assert [(tmp_path / n).read_bytes() for n in ("a.ko", "b.ko", "c.ko")] == [b"A", b"B", b"C"]
    assert module_bytes(tmp_path / "d.ko.zst") is None


def test_klibc_interpreter_follows_the_programs(tmp_path: Path) -> None:
    lib = "klibc-abc.so"
    for prefix, expected in ((b"/usr/lib/", "usr/lib/" + lib), (b"/lib/", "lib/" + lib)):
        (tmp_path / "sh").write_bytes(b"\x7fELF\0" + prefix + lib.encode() + b"\0rest")
        assert klibc_interpreter(tmp_path / "sh", lib) == expected


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A build folder as a killed mmdebstrap leaves it: a tmpfs and a bind of a folder
    outside (the host's /dev, say, here a folder with a file) still mounted in its chroot.
    Whatever the test leaves mounted is unmounted after it."""
    host = tmp_path / "host files"
    host.mkdir()
    (host / "keep").write_text("the host's\n")
    work = tmp_path / "cache" / "build-0123456789abcdef-x"
    (work / "root/dev/shm").mkdir(parents=True)
    (work / "root/run").mkdir()
    subprocess.run(["mount", "--bind", host, work / "root/dev"], check=True)
    (work / "root/dev/shm").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", work / "root/dev/shm"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", work / "root/run"], check=True)
    (work / "root/run/in-tmpfs").write_text("x")
    try:
        yield work, host
    finally:
        for point in mounts_under(tmp_path):
            subprocess.run(["umount", "--lazy", point], check=False)


def test_mounts_under_reads_escaped_paths_deepest_first(mounted) -> None:
    work, host = mounted
    points = mounts_under(work)
    assert points[0] == str(work / "root/dev/shm")  # inside the bind: goes first
    assert sorted(points[1:]) == [str(work / "root/dev"), str(work / "root/run")]
    spaced = host.parent / "a b\\c"
    spaced.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", spaced], check=True)
    assert mounts_under(spaced) == [str(spaced)]


def test_a_killed_builds_folder_is_unmounted_before_it_goes(mounted) -> None:
    work, host = mounted
    clear_stale(work.parent)
    assert not work.exists()
    assert mounts_under(work.parent) == []
    assert (host / "keep").read_text() == "the host's\n"  # not removed through the bind


def test_a_mount_that_stays_stops_the_removal(mounted, monkeypatch) -> None:
    work, host = mounted
    monkeypatch.setattr(
        "builder.image.build.run",
        lambda argv, **kw: subprocess.CompletedProcess(argv, 32, "", "busy"),
    )
    with pytest.raises(HostError, match="cannot unmount .*root/dev"):
        clear(work)
    assert (work / "root/run/in-tmpfs").exists() and (host / "keep").exists()


def test_trim_modules_keeps_dependency_closure(tmp_path: Path) -> None:
    base = tmp_path / "usr/lib/modules/6.1.0-test"
    mods = {
        "kernel/drivers/block/virtio_blk.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/virtio/virtio_ring.ko": [],
        "kernel/fs/ext4/ext4.ko": ["kernel/lib/crc16.ko"],
        "kernel/lib/crc16.ko": [],
        "kernel/lib/libcrc32c.ko": [],
        "kernel/sound/core/snd.ko": [],
    }
    lines = []
    for mod, deps in mods.items():
        (base / mod).parent.mkdir(parents=True, exist_ok=True)
        (base / mod).write_bytes(b"\0")
        lines.append(f"{mod}: {' '.join(deps)}")
    (base / "modules.dep").write_text("\n".join(lines) + "\n")
    (base / "modules.softdep").write_text("softdep ext4 pre: libcrc32c\n")
    kept, dropped = trim_modules(tmp_path, "6.1.0-test", [r"^drivers/block/", r"^fs/ext4/"])
    assert kept == set(mods) - {"kernel/sound/core/snd.ko"}
    assert dropped == 1
    assert not (base / "kernel/sound").exists()


# Slow: the built image ------------------------------------------------------------------


class Disk:
    """Read-only look into the image's root filesystem through debugfs: no mount, no root."""

    def __init__(self, raw: Path):
        self.raw = raw
        self.fs = f"{raw}?offset={PART_OFFSET}"

    def _debugfs(self, request: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["debugfs", "-R", request, self.fs], capture_output=True, text=True, check=True
        )

    def exists(self, path: str) -> bool:
        return "File not found" not in self._debugfs(f"stat {path}").stderr

    def read(self, path: str) -> str:
        proc = self._debugfs(f"cat {path}")
        assert "File not found" not in proc.stderr, path
        return proc.stdout

    def ls(self, path: str) -> list[str]:
        """Names in a directory; `ls -p` prints /inode/mode/uid/gid/name/size/ lines."""
        names = (line.split("/")[5] for line in self._debugfs(f"ls -p {path}").stdout.splitlines()
                 if line.count("/") >= 6)  # fmt: skip
        return [n for n in names if n not in (".", "..")]

    def mode_owner(self, path: str) -> tuple[int, int]:
        """(permission bits, uid) from debugfs's stat."""
        out = self._debugfs(f"stat {path}").stdout
        mode, uid = re.search(r"Mode: +(\d+)", out), re.search(r"User: +(\d+)", out)
        assert mode and uid, path
        return int(mode.group(1), 8) & 0o7777, int(uid.group(1))

    def link(self, path: str) -> str | None:
        """Where a symlink points; None when the path is no symlink."""
        out = self._debugfs(f"stat {path}").stdout
        found = re.search(r"Fast link dest: \"(.*)\"", out)
        return found.group(1) if "Type: symlink" in out and found else None

    def size(self, path: str) -> int:
        found = re.search(r"Size: (\d+)", self._debugfs(f"stat {path}").stdout)
        assert found, path
        return int(found.group(1))


@pytest.fixture(scope="module")
def disk(appliance_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Disk:
    raw = tmp_path_factory.mktemp("image") / "disk.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", appliance_image.path, raw], check=True, timeout=120
    )
    return Disk(raw)


@pytest.mark.slow
@pytest.mark.root
def test_qcow2_is_sound(appliance_image: Image) -> None:
    subprocess.run(["qemu-img", "check", appliance_image.path], check=True, capture_output=True)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", appliance_image.path],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2"
    assert info["virtual-size"] >= 256 * 1024**2
    assert appliance_image.size == appliance_image.path.stat().st_size


@pytest.mark.slow
@pytest.mark.root
def test_image_meets_size_goal(appliance_image: Image) -> None:
    assert appliance_image.size <= SIZE_GOAL, f"{appliance_image.size / 1e6:.1f} MB"


@pytest.mark.slow
@pytest.mark.root
def test_manifest_describes_image(appliance_image: Image) -> None:
    m = appliance_image.manifest()
    assert m["digest"] == appliance_image.digest == recipe_digest(None)
    assert m["sha256"] == appliance_image.sha256
    with open(appliance_image.path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == appliance_image.sha256
    assert m["size"] == appliance_image.size
    assert m["virtual_size"] > m["size"]
    assert m["build_seconds"] > 0
    assert m["kernel"].endswith("-cloud-amd64")
    for name in ("cloud-init", "openssh-server", "wireguard-tools", "nftables", "sudo",
                 "iproute2", "systemd", "fdisk", "dbus", "usr-is-merged"):  # fmt: skip
        assert m["packages"].get(name), name
    for name in ("usrmerge", "perl", "ifupdown", "locales-all", "gcc", "man-db",
                 "systemd-resolved", "cloud-guest-utils"):  # fmt: skip
        assert name not in m["packages"], name


@pytest.mark.slow
@pytest.mark.root
def test_bootloader_in_mbr(appliance_image: Image, disk: Disk) -> None:
    with open(disk.raw, "rb") as f:
        mbr = f.read(512)
    assert mbr[:440] == MBR_BIN.read_bytes()
    assert mbr[510:512] == b"\x55\xaa"
    assert mbr[446] == 0x80, "first partition is not marked bootable"
    assert int.from_bytes(mbr[454:458], "little") * 512 == PART_OFFSET
    assert disk.exists("/boot/extlinux/ldlinux.sys")
    conf = disk.read("/boot/extlinux/extlinux.conf")
    m = appliance_image.manifest()
    assert f"root=UUID={m['root_uuid']}" in conf and "console=ttyS0" in conf
    for line in conf.splitlines():
        if line.strip().startswith(("LINUX", "INITRD")):
            assert disk.exists(line.split()[1]), line


@pytest.mark.slow
@pytest.mark.root
def test_required_programs_present(disk: Disk) -> None:
    for path in ("/usr/bin/wg", "/usr/bin/wg-quick", "/usr/sbin/nft", "/usr/sbin/sshd",
                 "/usr/bin/cloud-init", "/usr/bin/sudo", "/usr/sbin/ip", "/usr/sbin/sfdisk",
                 "/usr/sbin/resize2fs", "/usr/local/sbin/wg-appliance-growroot",
                 "/usr/lib/systemd/systemd-networkd"):  # fmt: skip
        assert disk.exists(path), path
    kernel = [n for n in disk.ls("/usr/lib/modules") if n.endswith("-cloud-amd64")][0]
    for mod in ("drivers/net/wireguard/wireguard.ko", "drivers/net/virtio_net.ko",
                "net/netfilter/nf_tables.ko", "drivers/block/virtio_blk.ko"):  # fmt: skip
        path = f"/usr/lib/modules/{kernel}/kernel/{mod}"
        assert disk.exists(path) and not disk.exists(path + ".xz"), mod
    assert not disk.exists(f"/usr/lib/modules/{kernel}/kernel/sound")


@pytest.mark.slow
@pytest.mark.root
def test_the_guest_knows_its_recipe_digest(appliance_image: Image, disk: Disk) -> None:
    """status and the metrics exporter show it: the same digest the manifest and cache use."""
    assert disk.read("/etc/wg-appliance/image") == appliance_image.digest + "\n"


@pytest.mark.slow
@pytest.mark.root
def test_cloud_init_is_wanted_by_a_link(disk: Disk) -> None:
    """Its generator is masked, so this link alone starts cloud-init at boot."""
    wants = "/etc/systemd/system/multi-user.target.wants/cloud-init.target"
    assert disk.link(wants) == "/usr/lib/systemd/system/cloud-init.target"
    assert disk.link("/etc/systemd/system-generators/cloud-init-generator") == "/dev/null"


@pytest.mark.slow
@pytest.mark.root
def test_root_goes_read_only_on_errors(disk: Disk) -> None:
    """The initramfs mounts the root read-write with no options: the superblock's default
    keeps a damaged filesystem from being written on."""
    out = subprocess.run(["dumpe2fs", "-h", disk.fs], capture_output=True, text=True, check=True)
    assert re.search(r"^Errors behavior: +Remount read-only$", out.stdout, re.M), out.stdout


@pytest.mark.slow
@pytest.mark.root
def test_nothing_unique_baked_in(disk: Disk) -> None:
    assert not [n for n in disk.ls("/etc/ssh") if n.startswith("ssh_host_")]
    assert disk.size("/etc/machine-id") == 0
    assert not disk.exists("/var/lib/dbus/machine-id")
    assert not disk.exists("/var/lib/systemd/random-seed")
    assert disk.ls("/var/lib/cloud") == []
    for line in disk.read("/etc/shadow").splitlines():
        user, password = line.split(":")[:2]
        assert password in ("*", "!", "!*") or password.startswith("!"), user
    assert disk.read("/etc/hostname").strip() == "wg-appliance"


@pytest.mark.slow
@pytest.mark.root
def test_a_login_and_sudo_start_no_more_than_they_need(disk: Disk) -> None:
    """sudo without a PAM session (it execs the command), from a file sudo accepts; sshd's
    PAM without pam_motd's run-parts and modules the appliance has no use for."""
    rules = "/etc/sudoers.d/wg-appliance"
    assert disk.mode_owner(rules) == (0o440, 0)
    assert "Defaults !pam_session" in disk.read(rules).splitlines()
    pam = [ln.split("#")[0] for ln in disk.read("/etc/pam.d/sshd").splitlines()]
    modules = " ".join(pam)
    assert "@include common-session" in pam and "@include common-account" in pam
    for gone in ("pam_motd", "pam_mail", "pam_selinux"):
        assert gone not in modules, gone


@pytest.mark.slow
@pytest.mark.root
def test_trimmed(disk: Disk) -> None:
    for path in ("/usr/share/man", "/usr/share/perl", "/usr/lib/x86_64-linux-gnu/perl",
                 "/usr/share/locale", "/usr/bin/gcc", "/usr/lib/udev/hwdb.bin"):  # fmt: skip
        assert not disk.exists(path) or disk.ls(path) == [], path
    assert [n for n in disk.ls("/var/lib/apt/lists") if n not in ("lock", "partial")] == []
    assert [n for n in disk.ls("/var/cache/apt") if n.endswith(".bin")] == []
    cfg = disk.read("/etc/cloud/cloud.cfg.d/90-wg-appliance.cfg")
    assert "datasource_list: [NoCloud, None]" in cfg
    # cloud-init's boot imports no longer include requests (edits.toml): the bytecode stage
    # keeps compiled Python only for what boot imports.
    assert "_OnFirstUse" in disk.read("/usr/lib/python3/dist-packages/cloudinit/url_helper.py")
    assert not disk.exists("/usr/lib/python3/dist-packages/requests/__pycache__") or not [
        n
        for n in disk.ls("/usr/lib/python3/dist-packages/requests/__pycache__")
        if n.endswith(".pyc")
    ]


@pytest.mark.slow
@pytest.mark.root
def test_second_build_is_cache_hit(appliance_image: Image, tmp_path: Path) -> None:
    t0 = time.monotonic()
    again = build_image(cache=default_cache_dir(), progress=Progress(quiet=True))
    assert time.monotonic() - t0 < 1.0
    assert again == appliance_image
    out = tmp_path / "out" / "appliance.qcow2"
    copy = build_image(out=out, cache=default_cache_dir(), progress=Progress(quiet=True))
    assert copy.path == out and copy.sha256 == appliance_image.sha256
    assert json.loads(copy.manifest_path.read_text())["sha256"] == appliance_image.sha256
    assert copy.manifest_path == tmp_path / "out" / "appliance.json"


# Slow: a first boot under qemu ----------------------------------------------------------


@dataclass
class Guest:
    port: int
    host_key: paramiko.Ed25519Key
    user_key: paramiko.Ed25519Key
    serial: Path
    boot_seconds: float

    def ssh(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{self.port}", "ssh-ed25519", self.host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            "127.0.0.1", port=self.port, username=USER, pkey=self.user_key,
            allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=60,
        )  # fmt: skip
        return client

    def run(self, command: str) -> tuple[int, str]:
        with self.ssh() as client:
            _, stdout, stderr = client.exec_command(command, timeout=120)
            out = stdout.read().decode() + stderr.read().decode()
            return stdout.channel.recv_exit_status(), out


def openssh_private(key: ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def openssh_public(key: ed25519.Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def seed_files(host: ed25519.Ed25519PrivateKey, user: ed25519.Ed25519PrivateKey) -> dict:
    """The same modules the appliance's real user-data uses, with values made up here."""
    wg_key = base64.b64encode(
        x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    ).decode()  # fmt: skip
    user_data = {
        "hostname": HOSTNAME,
        "manage_etc_hosts": True,
        "preserve_hostname": False,
        "disable_root": True,
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        # `[]` fails cloud-init 22.4's schema (minItems 1) and logs a warning; the key from
        # ssh_keys is what sshd uses either way.
        "ssh_genkeytypes": ["ed25519"],
        "ssh_keys": {
            "ed25519_private": openssh_private(host),
            "ed25519_public": openssh_public(host),
        },
        "users": [
            {
                "name": USER,
                "shell": "/bin/bash",
                "lock_passwd": True,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "ssh_authorized_keys": [openssh_public(user)],
            }
        ],
        "write_files": [
            {
                "path": "/etc/wireguard/wg0.conf",
                "permissions": "0600",
                "content": f"[Interface]\nAddress = 10.99.0.1/24\nListenPort = 51820\n"
                f"PrivateKey = {wg_key}\n",
            },
            {
                "path": "/etc/nftables.conf",
                "content": "flush ruleset\ntable inet filter {\n chain input {\n"
                "  type filter hook input priority 0; policy accept;\n"
                "  udp dport 51820 accept\n }\n}\n"
                "table ip nat {\n chain postrouting {\n"
                "  type nat hook postrouting priority 100;\n"
                "  ip saddr 10.99.0.0/24 oifname lan0 masquerade\n }\n}\n",
            },
            {"path": "/etc/sysctl.d/90-test.conf", "content": "net.ipv4.ip_forward = 1\n"},
        ],
        "runcmd": [
            ["sysctl", "--load", "/etc/sysctl.d/90-test.conf"],
            # As the appliance's seed does: the unit's drop-in loads the modules first (this
            # ruleset does not use nft_ct, so /proc/modules shows the drop-in ran).
            ["systemctl", "start", "nftables.service"],
            ["systemctl", "enable", "--now", "wg-quick@wg0.service"],
        ],
    }
    network_config = {
        "version": 2,
        "ethernets": {
            "lan0": {
                "match": {"macaddress": GUEST_MAC},
                "set-name": "lan0",
                "addresses": [GUEST_ADDRESS],
                "routes": [{"to": "0.0.0.0/0", "via": GUEST_GATEWAY}],
            }
        },
    }
    return {
        # JSON is YAML; no YAML writer needed.
        "user-data": "#cloud-config\n" + json.dumps(user_data, indent=1) + "\n",
        "meta-data": f"instance-id: test-{int(time.time())}\nlocal-hostname: {HOSTNAME}\n",
        "network-config": json.dumps(network_config, indent=1) + "\n",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def guest(appliance_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """The image booted once under TCG from a 2 GiB overlay, until cloud-init finished."""
    work = tmp_path_factory.mktemp("boot")
    host, user = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    (work / "seed.iso").write_bytes(make_iso(seed_files(host, user)))
    disk = work / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", appliance_image.path, "-F", "qcow2",
         disk, "2G"], check=True,
    )  # fmt: skip
    serial, port = work / "serial.log", free_port()
    argv = qemu_command(serial, *disk_args(disk)) + [
        "-cdrom", str(work / "seed.iso"),
        "-nic", f"user,restrict=on,model=virtio-net-pci,mac={GUEST_MAC},"
        f"hostfwd=tcp:127.0.0.1:{port}-:22",
    ]  # fmt: skip
    t0 = time.monotonic()
    with open(work / "qemu.err", "w") as err:
        qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = t0 + 420
        while True:
            log = serial.read_text(errors="replace") if serial.exists() else ""
            if CLOUD_INIT_DONE.search(log):
                break
            assert qemu.poll() is None, f"qemu exited: {(work / 'qemu.err').read_text()}"
            assert time.monotonic() < deadline, f"cloud-init did not finish; see {serial}"
            time.sleep(1)
        yield Guest(
            port=port,
            host_key=paramiko.Ed25519Key.from_private_key(io.StringIO(openssh_private(host))),
            user_key=paramiko.Ed25519Key.from_private_key(io.StringIO(openssh_private(user))),
            serial=serial,
            boot_seconds=time.monotonic() - t0,
        )
    finally:
        qemu.kill()
        qemu.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.vm
def test_first_boot_cloud_init_clean(guest: Guest) -> None:
    log = guest.serial.read_text(errors="replace")
    assert "DataSourceNoCloud" in CLOUD_INIT_DONE.search(log).group(0)
    problems = [line for line in log.splitlines()
                if re.search(r"\[(WARNING|ERROR|CRITICAL)\]|Traceback", line)]  # fmt: skip
    assert problems == []


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.vm
def test_ssh_with_pinned_host_key(guest: Guest) -> None:
    rc, out = guest.run("hostname; id -un")
    assert rc == 0 and out.split() == [HOSTNAME, USER]


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.vm
def test_wrong_host_key_is_rejected(guest: Guest) -> None:
    other = paramiko.Ed25519Key.from_private_key(
        io.StringIO(openssh_private(ed25519.Ed25519PrivateKey.generate()))
    )
    impostor = Guest(guest.port, other, guest.user_key, guest.serial, 0)
    with pytest.raises(paramiko.SSHException):
        impostor.ssh()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.vm
def test_cloud_init_status_done(guest: Guest) -> None:
    rc, out = guest.run("cloud-init status --long")
    assert rc == 0, out
    assert re.search(r"^status: done$", out, re.M), out
    assert "errors: []" in out or "errors" not in out, out


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.vm
def test_guest_is_configured(guest: Guest) -> None:
    checks = {
        "sudo -n true": "",
        "systemctl --failed --no-legend --plain": "",
        "test -s /etc/machine-id && echo ok": "ok",
        "sudo -n wg show wg0 listen-port": "51820",
        "sudo -n nft list table ip nat | grep -c masquerade": "1",
        "cat /proc/sys/net/ipv4/ip_forward": "1",
        "ls /etc/ssh | grep -c ssh_host_": "2",
        "ip -br addr show lan0 | awk '{print $3}'": GUEST_ADDRESS,
        # udev's rule for the block module turns on media polling, or an eject of the seed's
        # cdrom is never seen (the coldplug is cut down to what the appliance uses)
        "cat /sys/module/block/parameters/events_dfl_poll_msecs": "2000",
        # The initramfs mounted the root read-write (errors=remount-ro is the filesystem's
        # own default: test_root_goes_read_only_on_errors), so systemd remounted nothing and
        # wrote the machine ID to /etc, not a bind mount.
        "findmnt -no OPTIONS / | cut -d, -f1": "rw",
        "findmnt -n /etc/machine-id || echo none": "none",
        # cloud-init enabled by the image itself: its generator (ds-identify) did not run.
        "cloud-init status --long | grep -x 'boot_status_code: enabled-by-generator'": (
            "boot_status_code: enabled-by-generator"
        ),
        "test -e /run/cloud-init/ds-identify.log || echo skipped": "skipped",
        "test -e /run/nologin || echo none": "none",
        # No resolver daemon. The ruleset's modules and WireGuard's came from nftables.service's
        # one modprobe (a module it could not load would have failed the unit: --failed above),
        # not from systemd-modules-load before sysinit.target.
        "test -e /usr/lib/systemd/systemd-resolved || echo none": "none",
        "systemctl show -p ExecStartPre nftables | grep -c 'modprobe -a'": "1",
        "systemctl show -p ActiveEnterTimestampMonotonic systemd-modules-load": (
            "ActiveEnterTimestampMonotonic=0"
        ),
        "grep -c '^nft_ct \\|^nft_masq \\|^nft_chain_nat \\|^wireguard ' /proc/modules": "4",
        # No memory or task accounting by default, but a unit with a limit (as the metrics
        # exporter's MemoryMax=) still gets the memory controller and its limit.
        "systemctl show -p DefaultMemoryAccounting --value": "no",
        "systemctl show -p DefaultTasksAccounting --value": "no",
        "sudo -n systemd-run --wait --pipe --quiet -p MemoryMax=64M sh -c"
        " 'cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max'": "67108864",
        # The kept modules are stored plain (and loaded from there: the grep above).
        "find /usr/lib/modules -name '*.ko.*' | wc -l": "0",
        # The edited entry-point script still runs cloud-init's command.
        "cloud-init --version 2>&1 | cut -d' ' -f1": "/usr/bin/cloud-init",
    }
    for command, expected in checks.items():
        rc, out = guest.run(command)
        assert (rc, out.strip()) == (0, expected), command
    rc, out = guest.run("df --output=size -B1M / | tail -1")
    assert rc == 0 and int(out) > 1500, f"root not grown: {out}"


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.vm
def test_the_boot_wait_tells_a_boot_without_cloud_init(guest: Guest) -> None:
    """The wait an upgrade runs through the guest agent: done once the boot has ended with
    cloud-init's result; NEVER_RAN, not a wait to the timeout, when there is none."""
    wait = f"sudo -n timeout 300 sh -c {shlex.quote(WAIT_BOOT)}"
    assert guest.run(wait) == (0, "")
    aside = f"{CLOUD_INIT_RESULT}.aside"
    rc, out = guest.run(
        f"sudo -n mv {CLOUD_INIT_RESULT} {aside} && {{ {wait}; rc=$?; "
        f"sudo -n mv {aside} {CLOUD_INIT_RESULT}; exit $rc; }}"
    )
    assert rc == NEVER_RAN, out
    assert guest.run(f"test -e {CLOUD_INIT_RESULT} && echo back") == (0, "back\n")
