"""The command line as a user meets it: exit codes, one-line errors, nothing leaked."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, wg_cli


def test_help_on_every_command():
    r = wg_cli("--help")
    assert r.returncode == 0
    commands = [
        "check",
        "render",
        "peer-config",
        "image",
        "deploy",
        "up",
        "destroy",
        "sync",
        "verify",
        "ipfire",
    ]
    for c in commands:
        assert c in r.stdout
        h = wg_cli(c, "--help")
        assert h.returncode == 0 and "example: wg-appliance " + c in h.stdout, c


def test_check_ok(site_dir):
    r = wg_cli("check", "--site", str(site_dir / "site.toml"))
    assert r.returncode == 0, r.stderr
    assert "3 peers" in r.stdout
    assert not (site_dir / ".wg-appliance").exists(), "check must not write anything"


@pytest.mark.parametrize("command", ["check", "render", "peer-config"])
def test_bad_input_is_exit_2_one_line_nothing_written(site_dir, command):
    site = site_dir / "site.toml"
    site.write_text(
        site.read_text().replace('address = "10.77.0.3/32"', 'address = "10.78.0.3/32"')
    )
    args = [command, "--site", str(site)] + (["phone"] if command == "peer-config" else [])
    if command == "render":
        args += ["--out", str(site_dir / "out")]
    r = wg_cli(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {site}: peers[1].address: 10.78.0.3 is outside")
    assert sorted(p.name for p in site_dir.iterdir()) == ["site.toml"]


def test_render_writes_private_files_and_is_idempotent(site_dir):
    out = site_dir / "out"
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert sorted(result["changed"]) == ["meta-data", "network-config", "seed.iso", "user-data"]
    assert stat.S_IMODE((out / "user-data").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "seed.iso").stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(out), "--json")
    assert json.loads(r.stdout)["changed"] == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_no_secret_is_printed(site_dir):
    site = str(site_dir / "site.toml")
    outputs = [
        wg_cli("render", "--site", site, "--out", str(site_dir / "o")),
        wg_cli("check", "--site", site),
    ]
    keys = json.loads((site_dir / ".wg-appliance" / "wg-gw" / "keys.json").read_text())
    secrets = [keys["wg_private"]] + [p["private"] for p in keys["peers"].values() if p["private"]]
    secrets += [p["psk"] for p in keys["peers"].values() if p["psk"]]
    for r in outputs:
        for s in secrets:
            assert s not in r.stdout + r.stderr


def test_peer_config_and_qr(site_dir):
    site = str(site_dir / "site.toml")
    r = wg_cli("peer-config", "--site", site, "laptop", "--qr", str(site_dir / "laptop.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# laptop: road warrior")
    png = site_dir / "laptop.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    r = wg_cli("peer-config", "--site", site, "laptop", "--qr", "-")
    assert "█" in r.stdout or "▀" in r.stdout
    r = wg_cli("peer-config", "--site", site, "nobody")
    assert r.returncode == 2 and "no peer named 'nobody'" in r.stderr


def test_upgrade_with_missing_image_is_bad_input_before_any_connection(site_dir):
    r = wg_cli("upgrade", "--site", str(site_dir / "site.toml"), "--image", "/nonexistent.qcow2")
    assert r.returncode == 2
    assert r.stderr == "error: /nonexistent.qcow2: --image: no such file\n"
    assert not (site_dir / ".wg-appliance").exists()


def test_image_from_a_folder_that_is_no_recipe_is_bad_input(tmp_path):
    r = wg_cli("image", "--recipe", str(tmp_path), "--cache", str(tmp_path / "cache"))
    assert r.returncode == 2
    assert r.stderr == f"error: {tmp_path}: --recipe: not an image recipe (no packages.txt)\n"
    assert not (tmp_path / "cache").exists()


def test_deploy_with_missing_image_is_bad_input(site_dir):
    r = wg_cli("deploy", "--site", str(site_dir / "site.toml"), "--image", "/nonexistent.qcow2")
    assert r.returncode == 2
    assert r.stderr == "error: /nonexistent.qcow2: --image: no such file\n"


@pytest.mark.parametrize("command", ["verify", "sync", "status"])
def test_commands_on_the_appliance_need_its_state(site_dir, command):
    r = wg_cli(command, "--site", str(site_dir / "site.toml"))
    assert r.returncode == 1
    assert "no keys in" in r.stderr and "deploy first" in r.stderr
    assert r.stderr.count("\n") == 1
    assert not (site_dir / ".wg-appliance").exists()


def test_require_handshake_of_unknown_peer_is_bad_input(site_dir):
    r = wg_cli("verify", "--site", str(site_dir / "site.toml"), "--require-handshake", "nobody")
    assert r.returncode == 2 and "--require-handshake: no peer named 'nobody'" in r.stderr


@pytest.mark.parametrize(
    "where, message",
    [
        ("{d}/sub/..", "names a folder, not a file"),
        ("{d}/sub", "is a folder, not a file"),
        ("{d}/missing/laptop.png", "no such folder"),
        ("{d}/site.toml/laptop.png", "not a folder"),
        ("/dev/null", "is a FIFO, device or socket, not a file"),
        ("{d}/fifo", "is a FIFO, device or socket, not a file"),
        ("/proc/laptop.png", "cannot make a file in this folder"),
    ],
    ids=["dotdot", "folder", "missing", "under-a-file", "device", "fifo", "unwritable"],
)
def test_qr_that_cannot_be_written_is_exit_2_one_line(site_dir, where, message):
    (site_dir / "sub").mkdir()
    os.mkfifo(site_dir / "fifo")
    qr = where.format(d=site_dir)
    before = sorted(p.name for p in site_dir.iterdir())
    r = wg_cli("peer-config", "--site", str(site_dir / "site.toml"), "laptop", "--qr", qr)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and f"--qr: {message}" in r.stderr
    assert r.stdout == "", "the config was printed although the QR code failed"
    if not qr.startswith("/proc"):
        assert sorted(p.name for p in site_dir.iterdir()) == before, "keys made before the check"
    assert stat.S_ISFIFO((site_dir / "fifo").lstat().st_mode)


@pytest.mark.parametrize(
    "where, message",
    [
        ("{d}/site.toml", "not a folder"),
        ("{d}/site.toml/out", "is under a file, not a folder"),
        ("/proc/wga-out", "cannot make this folder"),
        ("/dev/null", "not a folder"),
    ],
    ids=["a-file", "under-a-file", "unwritable", "device"],
)
@pytest.mark.parametrize("command", ["render", "ipfire"])
def test_out_that_cannot_be_used_is_exit_2_one_line(site_dir, command, where, message):
    out = where.format(d=site_dir)
    r = wg_cli(command, "--site", str(site_dir / "site.toml"), "--out", out)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: {Path(out)}: --out: {message}\n" or (
        r.stderr.startswith(f"error: {Path(out)}: --out: {message}: ") and r.stderr.count("\n") == 1
    ), r.stderr
    assert sorted(p.name for p in site_dir.iterdir()) == ["site.toml"]


def test_fifo_in_the_out_folder_is_refused_and_kept(site_dir):
    out = site_dir / "out"
    out.mkdir()
    os.mkfifo(out / "seed.iso")
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--out", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{out / 'seed.iso'}: --out: is a FIFO" in r.stderr
    assert stat.S_ISFIFO((out / "seed.iso").lstat().st_mode)


def test_state_path_that_is_a_file_is_exit_1_one_line(site_dir):
    state = site_dir / "state"
    state.write_text("not a folder")
    r = wg_cli("render", "--site", str(site_dir / "site.toml"), "--state", str(state))
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {state}: not a folder (pass --state DIR")
    assert r.stderr.count("\n") == 1
    assert state.read_text() == "not a folder"


def test_broken_pipe_other_than_stdout_is_exit_1_one_line(site_dir, monkeypatch, capsys):
    """Only a closed stdout ends quietly; a pipe to another program breaking is an error."""
    from builder import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(
        cli.COMMANDS, "check", dataclasses.replace(cli.COMMANDS["check"], handler=broken)
    )
    assert cli.main(["check", "--site", str(site_dir / "site.toml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Broken pipe: ") and err.count("\n") == 1


def test_ipfire_out_without_a_host_does_not_load_paramiko(site_dir):
    """Writing the host files by hand needs no SSH library, so none is imported."""
    run = (
        "import sys; from builder.cli import main; code = main(sys.argv[1:]); "
        "print('paramiko' in sys.modules, file=sys.stderr); sys.exit(code)"
    )
    r = subprocess.run(
        [sys.executable, "-c", run, "ipfire", "--site", str(site_dir / "site.toml")]
        + ["--out", str(site_dir / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert (site_dir / "out" / "routing").is_file()
    assert r.stderr.splitlines()[-1] == "False", r.stderr
