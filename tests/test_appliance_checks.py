"""verify's judgement on facts shaped like the guest probe's output (the probe itself
runs against the real appliance in the end-to-end tests)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from builder.checks.appliance import evaluate
from tests.plugins.samples import NOW


def failing(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if not c.ok}


def test_healthy_appliance_passes(site_keys, facts):
    site, keys = site_keys
    report = evaluate(site, keys, facts, NOW)
    assert report.ok, failing(report)
    doc = json.loads(report.to_json())
    assert doc["ok"] is True and doc["appliance"] == "wg-gw"
    assert {
        "ssh",
        "cloud-init",
        "wg0",
        "peers",
        "forwarding",
        "nftables",
        "routes",
        "LAN",
        "gateway",
        "gateway IPv6",
        "handshake laptop",
        "resources",
    } <= {c["name"] for c in doc["checks"]}
    assert "PASS" in report.table()


@pytest.mark.parametrize(
    "name,mutate,fragment",
    [
        ("cloud-init", lambda f: f.update(cloud_init_result=""), "still running"),
        ("cloud-init", lambda f: f.update(cloud_init_status=""), "has not run"),
        (
            "cloud-init",
            lambda f: f.update(cloud_init_result='{"v1": {"errors": ["locale failed"]}}'),
            "locale failed",
        ),
        (
            "cloud-init",
            lambda f: f.update(cloud_init_status='{"v1": {"stage": null, "a": {"errors": ["x"]}}}'),
            "a: x",
        ),
        (
            "wg0",
            lambda f: f.update(wg={"error": "Unable to access interface"}, wg_link=[]),
            "not up",
        ),
        ("wg0", lambda f: f["wg_link"][0].update(mtu=1500), "MTU 1500 != 1420"),
        ("wg0", lambda f: f["wg"].update(listen_port=51821), "listen port 51821"),
        ("peers", lambda f: f["wg"]["peers"].pop(0), "laptop: missing on the appliance"),
        (
            "peers",
            lambda f: f["wg"]["peers"][2].update(allowed_ips=["10.77.0.10/32"]),
            "branch: AllowedIPs",
        ),
        ("peers", lambda f: f["wg"]["peers"][0].update(psk_sha256="x"), "preshared key differs"),
        (
            "peers",
            lambda f: f["wg"]["peers"].append(
                {**f["wg"]["peers"][0], "public_key": "Z" * 43 + "="}
            ),
            "unknown peer",
        ),
        ("forwarding", lambda f: f.update(ip_forward="0"), "ip_forward=0"),
        (
            "nftables",
            lambda f: f["nft"].update(out=f["nft"]["out"].replace("masquerade", "")),
            "masquerade rule",
        ),
        ("nftables", lambda f: f["nft"].update(out=""), "table"),
        ("routes", lambda f: f.update(routes=[]), "192.168.88.0/24"),
        ("forwarding", lambda f: f.update(ip6_forward="0"), "ipv6 forwarding=0"),
        (
            "nftables",
            lambda f: f["nft"].update(out=f["nft"]["out"].replace("ip6 saddr fd77:77::/64", "")),
            "SSH from LAN fd77:77::/64",
        ),
        ("LAN", lambda f: f["addresses"].update(lan0=["192.168.77.50/24"]), "fd77:77::50/64"),
        (
            "LAN",
            lambda f: f.update(routes=[r for r in f["routes"] if r.get("gateway") != "fd77:77::1"]),
            "IPv6 default route via fd77:77::1; a new VM brings it: upgrade or deploy --replace",
        ),
        (
            "gateway IPv6",
            lambda f: f.update(gateway6={"ok": False, "detail": "no echo reply"}),
            "fd77:77::1: no echo reply",
        ),
        (
            "gateway",
            lambda f: f.update(gateway={"ok": False, "detail": "no echo reply"}),
            "no echo reply",
        ),
        ("resources", lambda f: f.update(disk_free=10e6), "disk nearly full"),
        ("resources", lambda f: f.update(time=NOW + 600), "clock off"),
    ],
)
def test_each_check_can_fail(site_keys, facts, name, mutate, fragment):
    site, keys = site_keys
    broken = copy.deepcopy(facts)
    mutate(broken)
    report = evaluate(site, keys, broken, NOW)
    assert not report.ok
    assert name in failing(report), failing(report)
    assert fragment in failing(report)[name]


def test_handshakes_required_only_when_asked(site_keys, facts):
    site, keys = site_keys
    stale = copy.deepcopy(facts)
    for p in stale["wg"]["peers"]:
        p["latest_handshake"] = 0
    assert evaluate(site, keys, stale, NOW).ok, "road warriors' handshakes are informational"
    report = evaluate(site, keys, stale, NOW, required={"laptop"})
    assert failing(report) == {"handshake laptop": "no handshake yet"}


CONTROLS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def test_guest_text_is_escaped_in_the_table_and_raw_in_json(site_keys, facts):
    site, keys = site_keys
    hostile = copy.deepcopy(facts)
    hostile["cloud_init_result"] = json.dumps({"v1": {"errors": ["boom\r\x1b[2J"]}})
    hostile["cloud_init_log_tail"] = "a WARNING \x1b[2J cleared\rPASS  cloud-init  fine\n"
    hostile["gateway"] = {"ok": False, "detail": "lost\nPASS  gateway  \x1b]0;title\x07ok"}
    hostile["nft"] = {"rc": 1, "out": "", "err": "\x1b[31mred\x9b1m"}
    hostile["wg"]["peers"][0]["allowed_ips"] = ["10.77.0.2/32\x1b[1A"]
    report = evaluate(site, keys, hostile, NOW)
    table = report.table()
    assert not CONTROLS.search(table), repr(table)
    assert len(table.splitlines()) == len(report.checks) + 1, "guest text added a line"
    shown = failing_lines(table)
    assert "boom\\x0d\\x1b[2J" in shown["cloud-init"] and "\\x1b[2J cleared" in shown["cloud-init"]
    assert "lost\\nPASS  gateway  \\x1b]0;title\\x07ok" in shown["gateway"]
    assert "\\x1b[31mred\\x9b1m" in shown["nftables"]
    assert "10.77.0.2/32\\x1b[1A" in shown["peers"]
    raw = {c["name"]: c["detail"] for c in json.loads(report.to_json())["checks"]}
    assert "\x1b]0;title\x07" in raw["gateway"] and "\r\x1b[2J" in raw["cloud-init"]


def failing_lines(table: str) -> dict[str, str]:
    return {line.split()[1]: line for line in table.splitlines()[1:] if line.startswith("FAIL")}


def test_serial_tail_is_escaped_and_crlf_read_as_lines(monkeypatch):
    from types import SimpleNamespace

    from builder.remote import libvirtd

    log = b"Debian login: \r\n\x1b[2J\x1b[Hroot\rpwned\r\n"
    chunks = [log, b""]
    stream = SimpleNamespace(recv=lambda n: chunks.pop(0), finish=lambda: None)
    vol = SimpleNamespace(download=lambda *a: None)
    pool = SimpleNamespace(
        refresh=lambda flags: None,
        storageVolLookupByName=lambda name: vol,
        connect=lambda: SimpleNamespace(newStream=lambda flags: stream),
    )
    monkeypatch.setattr(libvirtd, "volume_file_size", lambda v: len(log))
    tail = libvirtd.serial_tail(pool, "wg-gw-serial.log")
    assert tail == "Debian login: \n\\x1b[2J\\x1b[Hroot\\x0dpwned\n"
