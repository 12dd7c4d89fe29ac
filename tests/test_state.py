"""Keys: formats cross-checked with `wg` and `ssh-keygen`; the state dir keeps them private."""

from __future__ import annotations

import json
import stat
import subprocess

import pytest

from builder.errors import HostError
from builder.local.state import State
from builder.model.keys import ssh_genkey, ssh_pubkey, wg_genkey, wg_genpsk, wg_pubkey
from builder.model.site import load_site
from tests.conftest import wg_cli


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


def _snapshot(path):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def test_looking_writes_nothing_even_for_a_new_peer(site_dir):
    """verify and dry runs derive keys as deploy does, but the state dir stays as it was."""
    site = load_site(site_dir / "site.toml")
    state = State.for_site(site)
    issued = state.keys_for(site)
    before = _snapshot(state.path)
    text = (site_dir / "site.toml").read_text()
    (site_dir / "site.toml").write_text(
        text + '\n[[peers]]\nname = "new"\naddress = "10.77.0.9/32"\n'
    )
    grown = load_site(site_dir / "site.toml")
    looked = State.for_site(grown).look(grown)
    assert _snapshot(state.path) == before
    assert (
        looked.wg_private == issued.wg_private and looked.peers["laptop"] == issued.peers["laptop"]
    )
    assert "new" in looked.peers and looked.peers["new"] != looked.peers["laptop"]


def test_looking_without_keys_makes_no_state_dir(site_dir):
    site = load_site(site_dir / "site.toml")
    state = State.for_site(site)
    with pytest.raises(HostError, match="no keys in"):
        state.look(site)
    assert not state.path.exists()


def test_verify_and_dry_run_leave_the_state_dir_alone(site_dir):
    """The real commands, against an appliance that is not there: they fail (exit 3 or 1)
    and have written nothing, though the site names a peer with no key yet."""
    site = load_site(site_dir / "site.toml")
    state = State.for_site(site)
    state.keys_for(site)
    text = (site_dir / "site.toml").read_text().replace("192.168.77.50/24", "127.0.0.2/8")
    text = text.replace("192.168.77.1", "127.0.0.1")
    (site_dir / "site.toml").write_text(
        text + '\n[[peers]]\nname = "new"\naddress = "10.77.0.9/32"\n'
    )
    before = _snapshot(state.path)
    for args in (["verify", "--timeout", "2"], ["sync", "--dry-run"]):
        r = wg_cli(*args, "--site", str(site_dir / "site.toml"), "--state", str(state.path))
        assert r.returncode in (1, 3) and "Traceback" not in r.stderr, r.stderr
        assert _snapshot(state.path) == before, args


def test_learned_virt_type_belongs_to_its_host_and_is_written_once(tmp_path):
    state = State(tmp_path / "state")
    assert state.learned_virt_type("qemu:///system gw") is None
    assert not state.path.exists(), "asking made the state dir"
    state.learn_virt_type("qemu:///system gw", "qemu")
    assert state.learned_virt_type("qemu:///system gw") == "qemu"
    assert state.learned_virt_type("qemu+ssh://root@ipfire:222/system ipfire") is None
    virt = state.path / "virt.json"
    mtime = virt.stat().st_mtime_ns
    state.learn_virt_type("qemu:///system gw", "qemu")
    assert virt.stat().st_mtime_ns == mtime, "the same outcome rewrote the file"
    state.learn_virt_type("qemu:///system gw", "kvm")
    assert state.learned_virt_type("qemu:///system gw") == "kvm"


@pytest.mark.parametrize(
    "text", ["", "not json", "[1]", '{"host": "h", "virt_type": "xen"}', '{"virt_type": "kvm"}']
)
def test_a_learned_virt_type_file_that_makes_no_sense_means_not_known(tmp_path, text):
    state = State(tmp_path / "state")
    state.ensure()
    (state.path / "virt.json").write_text(text)
    assert state.learned_virt_type("h") is None
