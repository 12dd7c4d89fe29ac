"""sync's decisions on facts shaped like the probe's (the apply itself runs in the lab)."""

from __future__ import annotations

import copy
import hashlib

import pytest

from builder.keys import State
from builder.site import load_site
from builder.sync import plan, vm_changes, wanted_files
from tests.test_verify_checks import facts as healthy_facts  # noqa: F401  (fixture)
from tests.test_verify_checks import site_keys  # noqa: F401  (fixture)


@pytest.fixture
def facts(healthy_facts, site_keys):  # noqa: F811
    site, keys = site_keys
    f = copy.deepcopy(healthy_facts)
    f["files"] = {
        k: hashlib.sha256(v.encode()).hexdigest() for k, v in wanted_files(site, keys).items()
    }
    f["addresses"] = {"lan0": ["192.168.77.50/24"], "wg0": ["10.77.0.1/24", "fd77::1/64"]}
    return f


def test_in_sync_plans_nothing(site_keys, facts):  # noqa: F811
    site, keys = site_keys
    assert plan(site, keys, facts) == []
    assert vm_changes(site, facts, {"memory-mib": "512", "vcpus": "1", "disk-gib": "2"}) == []


def test_added_and_changed_peers_and_mode(site_dir, facts):
    path = site_dir / "site.toml"
    text = path.read_text().replace('mode = "masquerade"', 'mode = "routed"')
    text = text.replace(
        'networks = ["192.168.88.0/24"]', 'networks = ["192.168.88.0/24", "192.168.89.0/24"]'
    )
    text += '\n[[peers]]\nname = "tablet"\naddress = "10.77.0.4/32"\n'
    path.write_text(text)
    site = load_site(path)
    keys = State.for_site(site).keys_for(site)
    changes = plan(site, keys, facts)
    assert "tablet: missing on the appliance" in changes
    assert any(c.startswith("branch: AllowedIPs") for c in changes)
    assert "firewall: ruleset for routed mode" in changes


def test_vm_changes_are_named(site_dir, facts):
    path = site_dir / "site.toml"
    text = path.read_text().replace("192.168.77.50/24", "192.168.77.51/24")
    text = text.replace('"10.77.0.1/24", "fd77', '"10.77.0.5/24", "fd77')
    path.write_text(text)
    site = load_site(path)
    refused = vm_changes(site, facts, {"memory-mib": "1024", "vcpus": "1", "disk-gib": "2"})
    assert any(r.startswith("lan.address:") for r in refused)
    assert any(r.startswith("wireguard.address:") for r in refused)
    assert "appliance.memory_mib: 1024 -> 512" in refused


def test_guest_strip_equals_wg_quick_strip(tmp_path):
    """The appliance strips wg-quick keys in Python; it must match `wg-quick strip`."""
    import subprocess

    from builder.guest_apply import strip
    from tests.test_render import GOLDEN

    conf = tmp_path / "wg0.conf"
    conf.write_text((GOLDEN / "wg0.conf").read_text())
    conf.chmod(0o600)
    real = subprocess.run(
        ["wg-quick", "strip", str(conf)], capture_output=True, text=True, check=True
    ).stdout
    assert strip(conf.read_text()).rstrip() == real.rstrip()  # wg-quick adds a blank line
