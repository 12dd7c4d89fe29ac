"""status's view of the appliance, on facts shaped like the agent's status mode; the
reading itself is proven in the lab (tests/test_e2e.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from builder.checks.status import MISSING, UNKNOWN, age, duration, human_bytes, view
from tests.conftest import wg_cli
from tests.plugins.samples import NOW

STRANGER = "PLFprTORegLmS9wXtI2oVh5J/Ql4OSaIL0KoPcNBTAU="


@pytest.fixture
def reading(facts):
    f = copy.deepcopy(facts)
    f.update(os="Debian GNU/Linux 12 (bookworm)", kernel="6.1.0-28-cloud-amd64", uptime=7300.0)
    return f


def _live(facts, site, keys, name):
    pub = keys.peers[name].public
    return next(p for p in facts["wg"]["peers"] if p["public_key"] == pub)


def test_site_peers_by_name_in_site_order(site_keys, reading):
    site, keys = site_keys
    laptop = _live(reading, site, keys, "laptop")
    laptop.update(endpoint="203.0.113.9:40211", rx=1536, tx=5 * 1024 * 1024)
    _live(reading, site, keys, "phone")["latest_handshake"] = 0
    s = view(site, keys, reading)
    assert [p.name for p in s.peers] == [p.name for p in site.peers]
    doc = s.to_dict()
    first = doc["peers"][0]
    assert first["endpoint"] == "203.0.113.9:40211"
    assert first["latest_handshake"] == int(NOW - 30) and first["handshake_age_s"] == 30
    assert (first["rx_bytes"], first["tx_bytes"]) == (1536, 5 * 1024 * 1024)
    phone = next(p for p in doc["peers"] if p["name"] == "phone")
    assert phone["latest_handshake"] is None and phone["endpoint"] is None
    assert doc["appliance"]["drift"] == 0 and doc["appliance"]["uptime_s"] == 7300.0
    json.dumps(doc)
    table = s.table()
    assert table.splitlines()[0] == (
        "wg-gw at 192.168.77.50: up 2 h 1 min, Debian GNU/Linux 12 (bookworm), "
        "kernel 6.1.0-28-cloud-amd64, image abababababab, peers as in the site file"
    )
    row = next(ln for ln in table.splitlines() if ln.startswith("laptop"))
    assert row.split()[1:] == ["203.0.113.9:40211", "30", "s", "ago", "1.5", "KiB", "5.0", "MiB"]
    assert "never" in next(ln for ln in table.splitlines() if ln.startswith("phone"))


def test_unknown_and_missing_peers_count_as_drift(site_keys, reading):
    site, keys = site_keys
    peers = reading["wg"]["peers"]
    peers.remove(_live(reading, site, keys, "branch"))
    peers.append({**peers[0], "public_key": STRANGER, "endpoint": "198.51.100.7:1"})
    s = view(site, keys, reading)
    states = {p.name: p.state for p in s.peers}
    assert states["branch"] == MISSING and states[None] == UNKNOWN
    assert s.peers[-1].public_key == STRANGER
    assert s.peers[[p.name for p in s.peers].index("branch")].public_key == (
        keys.peers["branch"].public
    )
    assert s.appliance["drift"] == 2
    table = s.table()
    assert f"{STRANGER} (unknown)" in table and "branch (missing on the appliance)" in table
    assert "2 difference(s) from the site file" in table.splitlines()[0]


def test_rates_since_the_previous_reading(site_keys, reading):
    site, keys = site_keys
    first = view(site, keys, reading)
    assert "RX/s" not in first.table()
    later = copy.deepcopy(reading)
    later["time"] += 2
    laptop = _live(later, site, keys, "laptop")
    laptop["rx"] += 4096
    _live(later, site, keys, "phone")["tx"] = 0  # went back: wg0 restarted, no rate
    second = view(site, keys, later, first)
    rates = {p.name: (p.rx_rate, p.tx_rate) for p in second.peers}
    assert rates["laptop"] == (2048.0, 0.0)
    assert rates["phone"] == (None, None)
    assert "2.0 KiB/s" in second.table()


def test_guest_text_is_escaped_on_the_terminal_and_raw_in_json(site_keys, reading):
    site, keys = site_keys
    reading["os"] = "Debian\x1b[2J"
    _live(reading, site, keys, "laptop")["endpoint"] = "1.2.3.4:5\x1b]0;x\x07"
    reading["wg"]["peers"].append({**reading["wg"]["peers"][0], "public_key": "k\x1b[31m"})
    s = view(site, keys, reading)
    assert "\x1b" not in s.table() and "\\x1b" in s.table()
    assert "\x1b" in s.to_dict()["appliance"]["os"]


def test_wg0_down_is_shown_not_an_error(site_keys, reading):
    site, keys = site_keys
    reading["wg"] = {"error": "Unable to access interface: No such device"}
    s = view(site, keys, reading)
    assert all(p.state == MISSING for p in s.peers)
    assert "wg0 not up: Unable to access interface" in s.table().splitlines()[0]


@pytest.mark.parametrize(
    "seconds, text",
    [
        (None, "never"),
        (0, "0 s ago"),
        (12.7, "12 s ago"),
        (300, "5 min ago"),
        (90000, "1 d 1 h ago"),
    ],
)
def test_age(seconds, text):
    assert age(seconds) == text


def test_units():
    assert duration(3 * 3600 + 120) == "3 h 2 min"
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 * 1024**2, 3 * 1024**5)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 GiB",
        "3072.0 TiB",
    ]


def test_the_agent_status_mode_runs_without_site_packages():
    """As status sends it: the agent, whole, under `python3 -S -c`; without wg0 here it
    says so in the document instead of failing."""
    from builder.remote.appliance import AGENT

    p = subprocess.run(
        [sys.executable, "-S", "-I", "-c", AGENT.read_text(), "status"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert set(doc) == {"time", "uptime", "kernel", "os", "image", "wg"} and doc["uptime"] > 0


def test_status_exits_3_when_it_cannot_connect_and_writes_nothing(site_dir):
    site = str(site_dir / "site.toml")
    assert wg_cli("render", "--site", site).returncode == 0
    state = site_dir / ".wg-appliance" / "wg-gw"
    before = {p: p.stat().st_mtime_ns for p in state.rglob("*")}
    r = wg_cli("status", "--site", site, "--timeout", "1", "--state", str(state))
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: wgadmin@192.168.77.50:22: cannot connect")
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*")} == before


def test_watch_needs_a_positive_interval(site_dir):
    r = wg_cli("status", "--site", str(site_dir / "site.toml"), "--watch", "0")
    assert (
        r.returncode == 2
        and r.stderr == "error: --watch: must be a number of seconds above 0, not 0.0\n"
    )


def test_watch_reads_again_and_rates_against_the_reading_before(site_keys, reading, monkeypatch):
    import builder.status as flow
    from builder.local.state import State

    site, keys = site_keys
    readings = []

    def read_status(site_, keys_, timeout):
        r = copy.deepcopy(reading)
        r["time"] += 5 * len(readings)
        _live(r, site, keys, "laptop")["tx"] += 1000 * len(readings)
        readings.append(r)
        return r

    monkeypatch.setattr(flow, "read_status", read_status)
    monkeypatch.setattr(flow.time, "sleep", lambda s: None)
    watched = flow.watch(site, State.for_site(site), interval=5)
    first, second = next(watched), next(watched)
    assert first.peers[0].tx_rate is None
    assert second.peers[0].name == "laptop" and second.peers[0].tx_rate == 200.0
