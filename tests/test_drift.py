"""sync's decisions on facts shaped like the probe's (the apply itself runs in the lab)."""

from __future__ import annotations

import copy
import hashlib
import re
from types import SimpleNamespace

import pytest

from builder.checks.drift import changes as plan
from builder.checks.drift import vm_changes
from builder.errors import GuestError
from builder.local.state import State
from builder.model.site import load_site
from builder.remote.appliance import SyncChannel
from builder.render.appliance import appliance_files
from builder.sync import failure


@pytest.fixture
def facts(facts, site_keys):
    site, keys = site_keys
    f = copy.deepcopy(facts)
    f["files"] = {
        k: hashlib.sha256(v.encode()).hexdigest() for k, v in appliance_files(site, keys).items()
    }
    lan = [str(a) for a in site.lan.addresses]
    f["addresses"] = {"lan0": lan, "wg0": ["10.77.0.1/24", "fd77::1/64"]}
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


def test_a_changed_lan_dns_is_a_sync_not_a_new_vm(site_dir, facts):
    path = site_dir / "site.toml"
    path.write_text(path.read_text().replace('dns = ["192.168.77.1"]', 'dns = ["192.168.77.2"]'))
    site = load_site(path)
    keys = State.for_site(site).keys_for(site)
    assert "DNS servers (lan.dns)" in plan(site, keys, facts)
    assert vm_changes(site, facts, None) == []
    assert appliance_files(site, keys)["resolv.conf"].endswith("nameserver 192.168.77.2\n")


def test_a_changed_lan_gateway_needs_a_new_vm(site_dir, facts):
    """The gateway is in the seed's network-config, which only a first boot applies: sync
    refuses it instead of recording the new seed as applied."""
    path = site_dir / "site.toml"
    path.write_text(path.read_text().replace('"192.168.77.1", "fd77', '"192.168.77.2", "fd77'))
    site = load_site(path)
    refused = vm_changes(site, facts, None)
    assert refused == [
        "lan.gateway: appliance routes via 192.168.77.1, fd77:77::1, "
        "site says 192.168.77.2, fd77:77::1"
    ], refused
    # A router's link-local default route (an advertisement) is not a gateway change.
    ra = {"dst": "default", "gateway": "fe80::1", "dev": "lan0"}
    moved = [r if r.get("gateway") != "192.168.77.1" else {**r, "gateway": "192.168.77.2"}
             for r in facts["routes"]]  # fmt: skip
    assert vm_changes(site, {**facts, "routes": [*moved, ra]}, None) == []
    gone = [r for r in facts["routes"] if r.get("dst") != "default"]
    assert vm_changes(site, {**facts, "routes": gone}, None) == [
        "lan.gateway: appliance routes via none, site says 192.168.77.2, fd77:77::1"
    ]


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

    from builder.guest.agent import strip
    from tests.plugins.samples import GOLDEN

    conf = tmp_path / "wg0.conf"
    conf.write_text((GOLDEN / "wg0.conf").read_text())
    conf.chmod(0o600)
    real = subprocess.run(
        ["wg-quick", "strip", str(conf)], capture_output=True, text=True, check=True
    ).stdout
    assert strip(conf.read_text()).rstrip() == real.rstrip()  # wg-quick adds a blank line


CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def test_plan_lines_escape_what_the_guest_reported(site_dir, facts):
    path = site_dir / "site.toml"
    text = path.read_text().replace(
        'networks = ["192.168.88.0/24"]',
        'networks = ["192.168.88.0/24"]\nendpoint = "198.51.100.7:51820"',
    )
    path.write_text(text)
    site = load_site(path)
    keys = State.for_site(site).keys_for(site)
    hostile = copy.deepcopy(facts)
    branch = next(
        p for p in hostile["wg"]["peers"] if p["public_key"] == keys.peers["branch"].public
    )
    branch["endpoint"] = "203.0.113.9:1\x1b[2J\r\nlaptop: fine"
    hostile["wg"]["peers"].append({**branch, "public_key": "\x1b]0;x\x07" + "A" * 40})
    changes = plan(site, keys, hostile)
    assert len(changes) == 2 and not any(CONTROLS.search(c) for c in changes), changes
    assert changes[0] == (
        "branch: endpoint 203.0.113.9:1\\x1b[2J\\x0d\\nlaptop: fine != 198.51.100.7:51820"
    )
    assert changes[1].startswith("unknown peer \\x1b]0;x\\x07AAA")


def test_vm_changes_escape_guest_addresses(site_keys, facts):  # noqa: F811
    site, _ = site_keys
    hostile = copy.deepcopy(facts)
    hostile["addresses"] = {"lan0": ["10.1.1.1/24\x1b[2J"], "wg0": ["10.9.9.9/24\r"]}
    refused = vm_changes(site, hostile, {"memory-mib": "1\x1b[A"})
    assert len(refused) == 3 and not any(CONTROLS.search(r) for r in refused), refused
    assert "10.1.1.1/24\\x1b[2J" in refused[0] and "10.9.9.9/24\\x0d" in refused[1]


@pytest.mark.parametrize(
    "result,fragment",
    [
        ({"ok": False, "rolled_back": True, "error": "nft\x1b[2J"}, "nft\\x1b[2J; rolled back"),
        (
            {"ok": False, "untouched": True, "rolled_back": True, "error": "bad request"},
            "bad request; nothing was changed",
        ),
        (
            {
                "ok": False,
                "rolled_back": False,
                "error": "ip route replace: x",
                "not_restored": ["wg0 MTU 1420: \x1b[1Aoops\n", "route 10.0.0.0/8: y"],
            },
            "NOT fully rolled back, could not restore: "
            "wg0 MTU 1420: \\x1b[1Aoops\\n; route 10.0.0.0/8: y",
        ),
    ],
)
def test_failure_says_where_the_appliance_was_left(result, fragment):
    said = failure(result)
    assert fragment in said and not CONTROLS.search(said), said


def test_a_garbled_answer_is_escaped(site_keys):  # noqa: F811
    site, _ = site_keys
    stdout = SimpleNamespace(readline=lambda: "\x1b[2Jnot json\r\n")
    stderr = SimpleNamespace(channel=SimpleNamespace(recv_stderr=lambda n: b"Trace\x1b[31m\n"))
    with pytest.raises(GuestError) as e:
        SyncChannel(None, stdout, stderr).answer()
    assert "Trace\\x1b[31m" in str(e.value) and not CONTROLS.search(str(e.value))
    quiet = SimpleNamespace(channel=SimpleNamespace(recv_stderr=lambda n: b""))
    for line in ("[1, 2]\n", '"text"\n', ""):
        with pytest.raises(GuestError):
            SyncChannel(None, SimpleNamespace(readline=lambda line=line: line), quiet).answer()
