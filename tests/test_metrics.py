"""Metrics: the [metrics] section, what the seed and ruleset make of it, the exporter's
output against a fake `wg show all dump` (and a real HTTP round trip on loopback), and how
sync and verify judge the exporter. The appliance itself is in tests/test_e2e.py."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.checks.appliance import evaluate
from builder.checks.drift import changes
from builder.errors import InputError
from builder.guest import metrics as gm
from builder.guest.agent import FILES, METRICS_UNIT
from builder.model.site import load_site
from builder.render.appliance import appliance_files, render_nftables, render_seed
from tests.plugins.samples import BASE, NOW, write, written_files

ON = BASE.replace("[[peers]]", "[metrics]\nenabled = true\n\n[[peers]]", 1)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(InputError) as e:
        load_site(write(tmp_path, text))
    return str(e.value)


def test_defaults_off_on_9586_open_to_the_lan(tmp_path):
    m = load_site(write(tmp_path, BASE)).metrics
    assert (m.enabled, m.port, [str(n) for n in m.allow]) == (False, 9586, ["192.168.1.0/24"])
    m = load_site(write(tmp_path, ON)).metrics
    assert m.enabled and [str(n) for n in m.allow] == ["192.168.1.0/24"]


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ('allow = ["192.168.1.0/24", "10.0.0.1/8"]', "metrics.allow[1]", "host bits set"),
        ('allow = ["fe80::1%eth0/64"]', "metrics.allow[0]", "scoped address"),
        ('allow = ["fd00::/8"]', "metrics.allow[0]", "is IPv6"),
        ('allow = ["192.168.1.0"]', "metrics.allow[0]", "no prefix length"),
        ('allow = "192.168.1.0/24"', "metrics.allow", "expected a list"),
        ("allow = []", "metrics.allow", "is empty"),
        ('allow = ["192.168.1.0/24 "]', "metrics.allow[0]", "not a valid network"),
        ("port = 0", "metrics.port", "out of range"),
        ("port = 22", "metrics.port", "SSH port"),
        ('enabled = "yes"', "metrics.enabled", "expected a boolean"),
        ("enable = true", "metrics.enable", "did you mean 'enabled'"),
    ],
)
def test_bad_metrics_values_name_their_key(tmp_path, body, key, message):
    text = BASE.replace("[[peers]]", f"[metrics]\n{body}\n\n[[peers]]", 1)
    error = error_of(tmp_path, text)
    assert f"site.toml: {key}: " in error and message in error, error
    assert "\n" not in error


def test_ruleset_admits_the_port_only_from_allow(tmp_path):
    off = load_site(write(tmp_path, BASE))
    assert "9586" not in render_nftables(off)
    on = load_site(
        write(
            tmp_path,
            ON.replace(
                "enabled = true",
                'enabled = true\nport = 9100\nallow = ["192.168.1.0/24", "10.9.0.2/32"]',
            ),
        )
    )
    rules = [ln.strip() for ln in render_nftables(on).splitlines() if "9100" in ln]
    assert rules == [
        "ip saddr { 192.168.1.0/24, 10.9.0.2/32 } ip daddr 192.168.1.50 tcp dport 9100 accept"
    ]


def test_ruleset_with_metrics_passes_nft_check(tmp_path):
    site = load_site(write(tmp_path, ON))
    conf = tmp_path / "nft.conf"
    conf.write_text(render_nftables(site))
    r = subprocess.run(["nft", "--check", "--file", str(conf)], capture_output=True, text=True)
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("nft --check needs CAP_NET_ADMIN")
    assert r.returncode == 0, r.stderr


def test_seed_ships_exporter_unit_and_names_and_starts_it_only_when_on(site_keys, tmp_path):
    import yaml

    site, keys = site_keys
    assert site.metrics.enabled, "the example site turns metrics on"
    doc = yaml.safe_load(render_seed(site, keys)["user-data"])
    written = written_files(doc)
    files = appliance_files(site, keys)
    for name in ("metrics.py", "metrics.service", "metrics.socket", "names.json"):
        path, owner, mode = FILES[name]
        assert written[path]["content"] == files[name]
        assert written[path]["permissions"] == f"{mode:04o}" and written[path]["owner"] == owner
    assert files["metrics.py"] == Path(gm.__file__).read_text()
    names = json.loads(files["names.json"])
    assert names == {keys.peers[p.name].public: p.name for p in site.peers}
    enable = next(c for c in doc["runcmd"] if c[:2] == ["systemctl", "enable"])
    assert METRICS_UNIT in enable and "--now" in enable
    off = load_site(write(tmp_path, BASE))
    off_doc = yaml.safe_load(render_seed(off, keys_for(off))["user-data"])
    assert not [c for c in off_doc["runcmd"] if METRICS_UNIT in c]


def keys_for(site):
    from builder.local.state import State

    return State.for_site(site).keys_for(site)


def test_unit_is_unprivileged_with_net_admin_only_and_listens_on_the_lan(site_keys):
    site, keys = site_keys
    unit = appliance_files(site, keys)["metrics.service"]
    settings = dict(
        ln.split("=", 1) for ln in unit.splitlines() if "=" in ln and not ln.startswith("#")
    )
    assert settings["DynamicUser"] == "yes" and settings["NoNewPrivileges"] == "yes"
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert settings["ProtectSystem"] == "strict"
    # Started by its socket, never by a target: no boot runs it before the first scrape.
    assert settings["Requires"] == METRICS_UNIT and METRICS_UNIT in settings["After"].split()
    assert "[Install]" not in unit and "Type" not in settings
    assert "--listen 192.168.77.50 --port 9586 " in settings["ExecStart"]
    assert settings["ExecStart"].startswith("/usr/bin/python3 -I -S " + FILES["metrics.py"][0])


def test_the_socket_listens_on_the_lan_address_of_its_family_from_early_boot(tmp_path):
    on = load_site(write(tmp_path, ON.replace("enabled = true", "enabled = true\nport = 9100")))
    socket_unit = appliance_files(on, keys_for(on))["metrics.socket"]
    assert "ListenStream=192.168.1.50:9100\n" in socket_unit
    assert "FreeBind=yes\n" in socket_unit and "WantedBy=sockets.target\n" in socket_unit
    v6 = ON.replace('address = "192.168.1.50/24"', 'address = "fd01:1::50/64"')
    v6 = v6.replace('gateway = "192.168.1.1"', 'gateway = "fd01:1::1"')
    v6 = v6.replace('dns = ["192.168.1.1"]', 'dns = ["fd01:1::1"]')
    site6 = load_site(write(tmp_path, v6))
    assert (
        "ListenStream=[fd01:1::50]:9586\n"
        in appliance_files(site6, keys_for(site6))["metrics.socket"]
    )


KEY_A = "9Tc5QqD3HExMFc2DfHkqEk7z2fTcb3xdN6q3e+4LZxk="
KEY_B = "PLFprTORegLmS9wXtI2oVh5J/Ql4OSaIL0KoPcNBTAU="
SECRET = "aGVsbG8gc2VjcmV0IGtleSBoZXJlIHNvIHRoZXJlIDMy"
DUMP = (
    f"wg0\t{SECRET}\tWGPUB=\t51820\toff\n"
    f"wg0\t{KEY_A}\t{SECRET}\t203.0.113.9:40211\t10.77.0.2/32\t1800000000\t1536\t5242880\t25\n"
    f"wg0\t{KEY_B}\t(none)\t(none)\t10.77.0.3/32\t0\t0\t0\toff\n"
    f"wg1\t{SECRET}\tWG1PUB=\t51821\toff\n"
)

SAMPLE_RE = re.compile(r'([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (\S+)|([a-z_]+) (\S+)')


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict reader of the text format: every line a comment (HELP/TYPE) or a sample."""
    samples: dict[str, list] = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE_RE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1) or m.group(4)
        labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        assert name in types, f"{name} has no TYPE line before it"
        samples.setdefault(name, []).append((labels, float(m.group(3) or m.group(5))))
    samples["__types__"] = [({k: v}, 0) for k, v in types.items()]
    return samples


def test_exporter_output_per_peer_with_names_and_no_secrets():
    text = gm.render(gm.parse_dump(DUMP), {KEY_A: "laptop"}, "c0ffee" * 10 + "beef")
    assert SECRET not in text
    s = parse_exposition(text)
    types = {k: v for d, _ in s["__types__"] for k, v in d.items()}
    assert (
        types["wireguard_sent_bytes_total"]
        == types["wireguard_received_bytes_total"]
        == ("counter")
    )
    assert types["wireguard_latest_handshake_seconds"] == types["wireguard_peers"] == "gauge"
    sent = {d["public_key"]: (d, v) for d, v in s["wireguard_sent_bytes_total"]}
    assert sent[KEY_A] == ({"interface": "wg0", "public_key": KEY_A, "name": "laptop"}, 5242880)
    assert sent[KEY_B][0]["name"] == "" and sent[KEY_B][1] == 0
    received = {d["public_key"]: v for d, v in s["wireguard_received_bytes_total"]}
    assert received == {KEY_A: 1536, KEY_B: 0}
    handshake = {d["public_key"]: v for d, v in s["wireguard_latest_handshake_seconds"]}
    assert handshake == {KEY_A: 1800000000, KEY_B: 0}
    assert sorted((d["interface"], v) for d, v in s["wireguard_peers"]) == [("wg0", 2), ("wg1", 0)]
    assert s["wg_appliance_image_info"] == [({"digest": "c0ffee" * 10 + "beef"}, 1)]


@given(st.text(max_size=40))
def test_label_values_are_quoted_whatever_they_hold(name):
    text = gm.render(gm.parse_dump(DUMP), {KEY_A: name}, "")
    # The format's lines end at "\n" only (a "\r" in a label value is just a character).
    line = next(ln for ln in text.split("\n") if ln.startswith("wireguard_sent_bytes_total{"))
    assert "\n" not in line
    labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', line))
    unquoted = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), labels["name"])
    assert unquoted == name


def test_names_are_read_again_when_the_file_changes(tmp_path):
    path = tmp_path / "peers.json"
    names = gm.Names(str(path))
    assert names.get() == {}
    path.write_text(json.dumps({KEY_A: "laptop"}))
    assert names.get() == {KEY_A: "laptop"}
    path.write_text(json.dumps({KEY_A: "laptop", KEY_B: "phone"}))
    assert names.get() == {KEY_A: "laptop", KEY_B: "phone"}
    path.write_text("[not a map")
    assert names.get() == {}


@pytest.mark.parametrize("listen,host", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_the_server_answers_metrics_and_nothing_else(tmp_path, monkeypatch, listen, host):
    """A real HTTP round trip on loopback in both families (an IPv6-only LAN listens on
    IPv6), `wg` stood in for by the fake dump."""
    monkeypatch.setattr(
        gm, "scrape", lambda names, image: gm.render(gm.parse_dump(DUMP), names.get(), image)
    )
    (tmp_path / "peers.json").write_text(json.dumps({KEY_A: "laptop"}))
    handle = gm.handler(gm.Names(str(tmp_path / "peers.json")), "d1")
    server = gm.server_for(listen, 0, handle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://{host}:{server.server_address[1]}"
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            assert r.headers["Content-Type"] == gm.CONTENT_TYPE
            body = r.read().decode()
        assert 'name="laptop"' in body and parse_exposition(body)["wireguard_peers"]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/", timeout=5)
        assert e.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_the_exporter_runs_without_site_packages_and_says_how_to_call_it():
    p = subprocess.run(
        [sys.executable, "-I", "-S", gm.__file__, "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0 and "--listen" in p.stdout, p.stderr


def test_the_exporter_serves_on_the_socket_systemd_passes(tmp_path):
    """As its socket unit starts it: systemd's own socket activation (systemd-socket-activate
    listens, starts the exporter at the first connection and passes the socket as fd 3). The
    exporter is told a port nothing listens on, so an answer came through the passed socket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unused = s.getsockname()[1]
    (tmp_path / "names.json").write_text("{}\n")
    (tmp_path / "image").write_text("0123abcd\n")
    argv = ["--listen", "127.0.0.1", "--port", str(unused)]
    argv += ["--names", str(tmp_path / "names.json"), "--image", str(tmp_path / "image")]
    activate = ["systemd-socket-activate", "--listen", f"127.0.0.1:{port}"]
    p = subprocess.Popen(
        [*activate, sys.executable, "-I", "-S", gm.__file__, *argv],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30)
            except urllib.error.HTTPError as e:  # /metrics needs `wg`; 404 is the exporter's
                body = e.read().decode()
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and p.poll() is None, p.stderr
                time.sleep(0.2)
                continue
            raise AssertionError(f"/ answered {r.status}")
        assert "try /metrics" in body, body
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{unused}/", timeout=5)
    finally:
        p.kill()
        p.wait()
    assert "on the socket systemd passed" in p.stderr.read()


def _live_files(site, keys) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.encode()).hexdigest() for k, v in appliance_files(site, keys).items()
    }


def test_sync_sees_metrics_turned_on_off_and_changed(site_keys, facts, tmp_path):
    site, keys = site_keys
    live = {**copy.deepcopy(facts), "files": _live_files(site, keys)}
    live["metrics"] = {"enabled": True}
    assert changes(site, keys, live) == []
    live["metrics"] = {"enabled": False}
    assert changes(site, keys, live) == ["metrics: turned on, port 9586"]
    text = site.path.read_text().replace("port = 9586", "port = 9100")
    moved = load_site(write(tmp_path, text))
    live["metrics"] = {"enabled": True}
    found = changes(moved, keys, live)
    assert "metrics: exporter unit (port 9100)" in found
    assert any(c.startswith("firewall: ") for c in found)
    off = load_site(write(tmp_path, text.replace("enabled = true", "enabled = false")))
    assert "metrics: turned off" in changes(off, keys, live)


def test_verify_judges_the_exporter(site_keys, facts):
    site, keys = site_keys

    def metrics_check(f):
        report = evaluate(site, keys, f, NOW)
        return next(c for c in report.checks if c.name == "metrics")

    good = metrics_check(facts)
    assert good.ok and "http://192.168.77.50:9586/metrics answers, 3 peers" in good.detail
    down = copy.deepcopy(facts)
    down["metrics"]["scrape"] = {"status": None, "error": "ConnectionRefusedError: refused"}
    check = metrics_check(down)
    assert not check.ok and "refused" in check.detail and "journalctl" in check.detail
    short = copy.deepcopy(facts)
    short["metrics"]["scrape"]["peers"] = 2
    assert not metrics_check(short).ok
    off = copy.deepcopy(facts)
    off["metrics"] = {"enabled": False}
    assert "not enabled" in metrics_check(off).detail
    no_rule = copy.deepcopy(facts)
    no_rule["nft"]["out"] = no_rule["nft"]["out"].replace("tcp dport 9586 accept", "")
    nft = next(c for c in evaluate(site, keys, no_rule, NOW).checks if c.name == "nftables")
    assert not nft.ok and "metrics port" in nft.detail
