"""Keys: formats cross-checked with `wg` and `ssh-keygen`; the state dir keeps them private."""

from __future__ import annotations

import json
import stat
import subprocess

from builder.local.state import State
from builder.model.keys import ssh_genkey, ssh_pubkey, wg_genkey, wg_genpsk, wg_pubkey
from builder.model.site import load_site


def test_wg_pubkey_matches_wg_tool():
    for _ in range(5):
        private = wg_genkey()
        r = subprocess.run(
            ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
        )
        assert r.stdout.strip() == wg_pubkey(private)
    assert len(wg_genpsk()) == 44


def test_ssh_host_key_matches_ssh_keygen(tmp_path):
    key = ssh_genkey()
    f = tmp_path / "k"
    f.write_text(key)
    f.chmod(0o600)
    r = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(f)], capture_output=True, text=True, check=True
    )
    assert r.stdout.split()[:2] == ssh_pubkey(key).split()[:2]
    assert ssh_pubkey(key).startswith("ssh-ed25519 ")


def test_state_dir_is_private_and_reused(site_dir):
    site = load_site(site_dir / "site.toml")
    state = State.for_site(site)
    first = state.keys_for(site)
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    for name in ("keys.json", "admin_ed25519"):
        assert stat.S_IMODE((state.path / name).stat().st_mode) == 0o600
    mtime = (state.path / "keys.json").stat().st_mtime_ns
    second = State.for_site(site).keys_for(site)
    assert first == second
    assert (state.path / "keys.json").stat().st_mtime_ns == mtime, "unchanged input rewrote keys"
    assert first.peers["phone"].private is None
    assert first.peers["phone"].public == site.peer("phone").public_key
    assert first.peers["laptop"].private and first.peers["laptop"].psk
    known = (state.path / "known_hosts").read_text()
    assert known == f"192.168.77.50 {first.host_public}\n"


def test_removed_peer_key_is_dropped(site_dir):
    path = site_dir / "site.toml"
    site = load_site(path)
    old = State.for_site(site).keys_for(site).peers["laptop"]
    text = path.read_text()
    path.write_text(text.replace('name = "laptop"', 'name = "laptop2"'))
    State.for_site(load_site(path)).keys_for(load_site(path))
    path.write_text(text)
    new = State.for_site(site).keys_for(site).peers["laptop"]
    assert new.private != old.private
    data = json.loads((site_dir / ".wg-appliance" / "wg-gw" / "keys.json").read_text())
    assert "laptop2" not in data["peers"]


def test_psk_optional(site_dir):
    path = site_dir / "site.toml"
    path.write_text(
        path.read_text().replace('name = "laptop"', 'name = "laptop"\npreshared_key = false')
    )
    site = load_site(path)
    assert State.for_site(site).keys_for(site).peers["laptop"].psk is None


def test_hand_formatted_keys_are_kept_and_loose_mode_is_mended(site_dir):
    site = load_site(site_dir / "site.toml")
    state = State.for_site(site)
    first = state.keys_for(site)
    keys_json = state.path / "keys.json"
    keys_json.write_text(json.dumps(json.loads(keys_json.read_text())))
    keys_json.chmod(0o644)
    assert state.load() == first
    assert state.keys_for(site) == first
    assert stat.S_IMODE(keys_json.stat().st_mode) == 0o600


def test_load_without_state_makes_nothing(site_dir):
    site = load_site(site_dir / "site.toml")
    state = State.for_site(site)
    assert state.load() is None
    assert not (site_dir / ".wg-appliance").exists()
    state.path.mkdir(parents=True, mode=0o700)
    assert state.load() is None
    assert list(state.path.iterdir()) == []
