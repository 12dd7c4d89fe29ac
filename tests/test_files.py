"""Output files: never written through a link, never into a folder others can write, and a
keys.json that is not what the tool wrote is refused, never replaced by new keys."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

import builder.local.files
from builder.errors import HostError, InputError
from builder.local.files import OutDir
from builder.local.state import State
from builder.model.site import load_site
from tests.conftest import ROOT, wg_cli

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="handing a file to another user needs root")

SEED_MODES = {"user-data": 0o600, "seed.iso": 0o600, "meta-data": 0o644, "network-config": 0o644}


def _links(folder: Path, names: list[str], elsewhere: Path) -> dict[str, Path]:
    """A link at each name, every other one dangling; the live ones point at a file
    holding b"precious" that must stay as it is."""
    elsewhere.mkdir(exist_ok=True)
    targets = {}
    for i, name in enumerate(names):
        target = elsewhere / name
        if i % 2 == 0:
            target.write_bytes(b"precious")
        (folder / name).symlink_to(target)
        targets[name] = target
    return targets


def _assert_replaced(folder: Path, targets: dict[str, Path], modes: dict[str, int]) -> None:
    for i, (name, target) in enumerate(targets.items()):
        if i % 2 == 0:
            assert target.read_bytes() == b"precious", f"{name}: wrote through the link"
        else:
            assert not target.exists(), f"{name}: created the dangling link's target"
        st = (folder / name).lstat()
        assert stat.S_ISREG(st.st_mode), f"{name} is still a link"
        assert stat.S_IMODE(st.st_mode) == modes[name], name


def _state(site_dir: Path) -> Path:
    return site_dir / ".wg-appliance" / "wg-gw"


def _one_line_error(r: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in r.stderr, r.stderr


def test_render_out_replaces_links_and_never_follows_them(site_dir):
    out = site_dir / "out"
    out.mkdir()
    targets = _links(out, list(SEED_MODES), site_dir / "elsewhere")
    temps = _links(out, [f".{n}.tmp" for n in SEED_MODES], site_dir / "elsewhere-tmp")
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    _assert_replaced(out, targets, SEED_MODES)
    for name, target in temps.items():
        assert (out / name).is_symlink(), "a temp file name was guessable"
        assert not target.exists() or target.read_bytes() == b"precious", name


def test_state_dir_files_replace_links(site_dir):
    state = _state(site_dir)
    (state / "seed").mkdir(parents=True)
    state.chmod(0o700)
    (site_dir / ".wg-appliance").chmod(0o700)
    targets = _links(state, ["admin_ed25519", "known_hosts"], site_dir / "elsewhere")
    seed_targets = _links(state / "seed", ["seed.iso", "user-data"], site_dir / "elsewhere2")
    r = wg_cli("render", "--site", str(site_dir / "site.toml"))
    assert r.returncode == 0, r.stderr
    _assert_replaced(state, targets, {"admin_ed25519": 0o600, "known_hosts": 0o644})
    _assert_replaced(state / "seed", seed_targets, SEED_MODES)
    assert stat.S_IMODE((state / "keys.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("dangling", [False, True])
def test_keys_json_link_is_refused_not_followed(site_dir, dangling):
    state = _state(site_dir)
    state.mkdir(parents=True, mode=0o700)
    target = site_dir / "elsewhere.json"
    if not dangling:
        target.write_text("{}")
    (state / "keys.json").symlink_to(target)
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(site_dir / "o"))
    _one_line_error(r, 1, f"{state / 'keys.json'}: cannot read: it is a link", "backup")
    assert (state / "keys.json").is_symlink()
    assert target.exists() != dangling and (dangling or target.read_text() == "{}")
    assert sorted(p.name for p in state.iterdir()) == ["keys.json"]


@pytest.mark.parametrize("dangling", [False, True])
def test_qr_png_replaces_a_link(site_dir, dangling):
    png = site_dir / "laptop.png"
    target = site_dir / "elsewhere.png"
    if not dangling:
        target.write_bytes(b"precious")
    png.symlink_to(target)
    r = wg_cli("peer-config", "--site", str(site_dir / "site.toml"), "laptop", "--qr", str(png))
    assert r.returncode == 0, r.stderr
    assert target.exists() != dangling and (dangling or target.read_bytes() == b"precious")
    st = png.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ipfire_out_replaces_links(site_dir):
    out = site_dir / "ipf"
    out.mkdir()
    targets = _links(out, ["firewall.local", "routing"], site_dir / "elsewhere")
    r = wg_cli("ipfire", "--site", str(site_dir / "site.toml"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    _assert_replaced(out, targets, {"firewall.local": 0o755, "routing": 0o644})
    assert "wg-appliance" in (out / "firewall.local").read_text()


@pytest.mark.parametrize(
    "command, mode",
    [("render", 0o777), ("render", 0o775), ("ipfire", 0o757), ("peer-config", 0o777)],
)
def test_output_folder_others_can_write_is_refused(site_dir, command, mode):
    out = site_dir / "shared"
    out.mkdir()
    out.chmod(mode)
    if command == "peer-config":
        args, option = ["laptop", "--qr", str(out / "laptop.png")], "--qr"
    else:
        args, option = ["--out", str(out)], "--out"
    r = wg_cli(command, "--site", str(site_dir / "site.toml"), *args)
    _one_line_error(r, 2, f"error: {out}: {option}: others can write to it", "chmod go-w")
    assert list(out.iterdir()) == []
    assert stat.S_IMODE(out.stat().st_mode) == mode, "the folder's mode was changed"
    assert not (site_dir / ".wg-appliance").exists(), "keys were made before the check"


@as_root
def test_output_folder_of_another_user_is_refused(site_dir):
    out = site_dir / "theirs"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(out))
    _one_line_error(r, 2, f"{out}: --out: owned by another user")
    assert list(out.iterdir()) == []


@as_root
def test_output_folder_link_made_by_another_user_is_refused(site_dir):
    real = site_dir / "mine"
    real.mkdir()
    link = site_dir / "link"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(link))
    _one_line_error(r, 2, f"{link}: --out: is a link made by another user")
    assert list(real.iterdir()) == []


def test_output_folder_link_of_ones_own_is_used(site_dir):
    real = site_dir / "mine"
    real.mkdir()
    (site_dir / "link").symlink_to(real)
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(site_dir / "link"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in real.iterdir()) == sorted(SEED_MODES)


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o750])
def test_state_dir_others_can_use_is_refused_not_chmoded(site_dir, mode):
    state = _state(site_dir)
    state.mkdir(parents=True)
    state.chmod(mode)
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(site_dir / "o"))
    _one_line_error(r, 1, f"error: {state}: others can read or write it", f"chmod 700 {state}")
    assert stat.S_IMODE(state.stat().st_mode) == mode
    assert list(state.iterdir()) == []


@as_root
def test_state_dir_of_another_user_is_refused(site_dir):
    state = _state(site_dir)
    state.mkdir(parents=True, mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    r = wg_cli("peer-config", "--site", str(site_dir / "site.toml"), "laptop")
    _one_line_error(r, 1, f"{state}: owned by another user")
    assert list(state.iterdir()) == []


def test_new_state_dir_and_its_parent_are_private(site_dir):
    r = wg_cli("peer-config", "--site", str(site_dir / "site.toml"), "laptop")
    assert r.returncode == 0, r.stderr
    for folder in (site_dir / ".wg-appliance", _state(site_dir)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def _ed25519_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _rsa_openssh() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def _set(path: list, value):
    def change(data: dict):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return data

    return change


def _drop(key: str):
    def change(data: dict):
        del data[key]
        return data

    return change


TAMPERED = {
    "not JSON": (b"{wg_private = 1", "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "an array": (b"[]", "not a JSON object"),
    "nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "no host_key": (_drop("host_key"), "host_key: missing"),
    "no peers": (_drop("peers"), "peers: missing"),
    "short wg key": (
        _set(["wg_private"], base64.b64encode(b"x" * 31).decode()),
        "wg_private: not a 32-byte base64 key",
    ),
    "wg key not base64": (_set(["wg_private"], "!" * 44), "wg_private: not a 32-byte base64"),
    "wg key a number": (_set(["wg_private"], 7), "wg_private: not a 32-byte base64"),
    "host key RSA": (_set(["host_key"], _rsa_openssh()), "host_key: not an OpenSSH ed25519"),
    "admin key PEM": (_set(["admin_key"], _ed25519_pem()), "admin_key: not an OpenSSH ed25519"),
    "admin key junk": (
        _set(["admin_key"], "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n"),
        "admin_key: not an OpenSSH ed25519",
    ),
    "peers a list": (_set(["peers"], []), "peers: not an object"),
    "peer a string": (_set(["peers", "laptop"], "x"), "peers.laptop: is not an object"),
    "peer public mismatch": (
        _set(["peers", "laptop", "public"], base64.b64encode(b"\1" * 32).decode()),
        "peers.laptop: public does not match private",
    ),
    "peer psk short": (_set(["peers", "laptop", "psk"], "abc="), "peers.laptop: psk: not a 32"),
    "peer unknown field": (_set(["peers", "laptop", "x"], 1), "peers.laptop: has unknown field"),
}


@pytest.fixture
def made_state(site_dir) -> Path:
    """A state dir with the keys a first render made."""
    site = load_site(site_dir / "site.toml")
    State.for_site(site).keys_for(site)
    return _state(site_dir)


@pytest.mark.parametrize("case", list(TAMPERED))
@pytest.mark.parametrize("command", ["render", "peer-config"])
def test_tampered_keys_json_is_refused_and_left_alone(site_dir, made_state, case, command):
    keys_json = made_state / "keys.json"
    stored = json.loads(keys_json.read_text())
    change, message = TAMPERED[case]
    raw = (
        change
        if isinstance(change, bytes)
        else json.dumps(change(json.loads(json.dumps(stored)))).encode()
    )
    keys_json.write_bytes(raw)
    before = {p.name: p.read_bytes() for p in made_state.iterdir()}
    args = ["--out", str(site_dir / "o")] if command == "render" else ["laptop"]
    r = wg_cli(command, "--site", str(site_dir / "site.toml"), *args)
    _one_line_error(r, 1, f"error: {keys_json}: {message}", "restore it from a backup")
    assert {p.name: p.read_bytes() for p in made_state.iterdir()} == before
    for secret in (stored.get("wg_private"), stored["peers"]["laptop"]["private"]):
        assert str(secret) not in r.stderr


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_keys_json_that_is_no_file_is_refused(made_state, kind):
    keys_json = made_state / "keys.json"
    keys_json.unlink()
    keys_json.mkdir() if kind == "folder" else os.mkfifo(keys_json)
    with pytest.raises(HostError, match=r"keys\.json: (cannot read|not a regular file)"):
        State(made_state).load()
    assert keys_json.is_dir() if kind == "folder" else stat.S_ISFIFO(keys_json.lstat().st_mode)


@pytest.mark.parametrize(
    "args",
    [["peer-config", "laptop", "--qr", "-"], ["render", "--json"], ["check"]],
    ids=lambda a: a[0],
)
def test_output_into_a_closed_pipe_ends_quietly(site_dir, args):
    """`| head` that has already gone: no traceback, and the status of a SIGPIPE'd `cat`."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "builder", args[0], "--site", str(site_dir / "site.toml")]
            + args[1:],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode == 141


def test_written_file_is_private_from_its_creation(tmp_path, monkeypatch):
    """The temp file is made O_EXCL|O_NOFOLLOW with no group or world bits, before any byte."""
    made = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *, dir_fd=None):
        if flags & os.O_CREAT:
            made.append((flags, mode))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(builder.local.files.os, "open", spy)
    with OutDir(tmp_path / "out") as d:
        assert d.write("secret", b"k", 0o600)
        assert d.write("script", b"#!/bin/sh\n", 0o755)
    assert len(made) == 2
    for flags, mode in made:
        assert flags & os.O_EXCL and flags & os.O_NOFOLLOW
        assert mode & 0o077 == 0
    assert stat.S_IMODE((tmp_path / "out" / "script").stat().st_mode) == 0o755


def test_unchanged_file_is_not_rewritten_and_wrong_mode_is(tmp_path):
    with OutDir(tmp_path) as d:
        assert d.write("f", b"data", 0o600)
        mtime = (tmp_path / "f").stat().st_mtime_ns
        assert not d.write("f", b"data", 0o600)
        assert (tmp_path / "f").stat().st_mtime_ns == mtime
        (tmp_path / "f").chmod(0o644)
        assert d.write("f", b"data", 0o600)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(builder.local.files.os, "replace", fail)
    with OutDir(tmp_path, option="--out") as d, pytest.raises(InputError, match="No space left"):
        d.write("f", b"data")
    assert list(tmp_path.iterdir()) == []


def test_fifo_at_a_target_is_refused(tmp_path):
    os.mkfifo(tmp_path / "user-data")
    with OutDir(tmp_path, option="--out") as d, pytest.raises(InputError, match="FIFO"):
        d.write("user-data", b"x", 0o600)
    assert stat.S_ISFIFO((tmp_path / "user-data").lstat().st_mode)


def test_new_key_is_not_made_over_a_refused_state(made_state):
    """A state dir refused once stays refused: the tool never falls back to fresh keys."""
    before = (made_state / "keys.json").read_bytes()
    made_state.chmod(0o770)
    site = load_site(made_state.parent.parent / "site.toml")
    with pytest.raises(HostError, match="chmod 700"):
        State.for_site(site).keys_for(site)
    made_state.chmod(0o700)
    assert State.for_site(site).keys_for(site).wg_private == json.loads(before)["wg_private"]
    assert (made_state / "keys.json").read_bytes() == before


@pytest.mark.parametrize("folder", ["state", "seed"])
def test_link_at_a_folder_the_tool_makes_is_refused(site_dir, folder):
    state = _state(site_dir)
    real = site_dir / "real"
    real.mkdir(mode=0o700)
    if folder == "state":
        state.parent.mkdir(mode=0o700)
        state.symlink_to(real)
    else:
        state.mkdir(parents=True, mode=0o700)
        (state / "seed").symlink_to(real)
    r = wg_cli("render", "--site", str(site_dir / "site.toml"))
    link = state if folder == "state" else state / "seed"
    _one_line_error(r, 1, f"error: {link}: is a link, not a folder")
    assert list(real.iterdir()) == []


def test_state_dir_chosen_by_a_link_of_ones_own_is_used(site_dir):
    real = site_dir / "real"
    real.mkdir(mode=0o700)
    (site_dir / "link").symlink_to(real)
    r = wg_cli(
        "peer-config",
        "--site",
        str(site_dir / "site.toml"),
        "laptop",
        "--state",
        str(site_dir / "link"),
    )
    assert r.returncode == 0, r.stderr
    assert (real / "keys.json").is_file()
