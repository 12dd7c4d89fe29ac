"""Peer lifecycle and access: enabled, expires, allow and endpoint names. Validation with
its messages, rendering (golden files), and the appliance's own timer mode against a fake
guest and a real DNS server on loopback."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from datetime import UTC, datetime

import pytest

from builder.checks.drift import peer_drift
from builder.checks.status import DISABLED, EXPIRED, LIVE, view
from builder.errors import InputError
from builder.guest import agent as ga
from builder.model.keys import Keys, PeerKeys, wg_pubkey
from builder.model.site import load_site
from builder.render.appliance import (
    appliance_files,
    render_nftables,
    render_peers_json,
    render_wg_conf,
)
from tests.plugins.samples import (
    ADMIN_KEY,
    BASE,
    GOLDEN,
    HOST_KEY,
    LAPTOP_PRIVATE,
    PSK,
    WG_PRIVATE,
    live_peer,
    write,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BEFORE = int(NOW.timestamp())
LIFECYCLE = """
[[peers]]
name = "off"
address = "10.9.0.4/32"
enabled = false

[[peers]]
name = "gone"
address = "10.9.0.5/32"
expires = 2026-11-30

[[peers]]
name = "temp"
address = "10.9.0.6/32"
expires = 2026-12-01T14:30:00+01:00

[[peers]]
name = "web"
address = ["10.9.0.7/32", "fd09::7/128"]
allow = ["192.168.1.20/32 tcp/443", "192.168.1.0/24 udp/5000-5010", "fd00::20", "192.168.1.30"]

[[peers]]
name = "shop"
address = "10.9.0.8/32"
networks = ["192.168.3.0/24"]
endpoint = "shop.example.org:51820"
keepalive = 25
"""


def load(tmp_path, extra: str = LIFECYCLE, now: datetime = NOW):
    return load_site(write(tmp_path, BASE + extra), now=now)


def error_of(tmp_path, extra: str) -> str:
    with pytest.raises(InputError) as e:
        load(tmp_path, extra)
    return str(e.value)


def peer(body: str) -> str:
    return f'\n[[peers]]\nname = "x"\naddress = ["10.9.0.9/32", "fd09::9/128"]\n{body}\n'


@pytest.mark.parametrize(
    "body, key, message",
    [
        ('enabled = "no"', "peers[2].enabled", "expected a boolean, got a string"),
        ("expires = 2026-12-31T18:00:00", "peers[2].expires", "has no zone: add an offset"),
        ('expires = "2026-12-31"', "peers[2].expires", "expected a TOML date or offset"),
        ("expires = 12:00:00", "peers[2].expires", "expected a TOML date or offset"),
        ("expires = 5", "peers[2].expires", "got an integer"),
        ('allow = "10.0.0.1"', "peers[2].allow", "expected a list, got a string"),
        ("allow = [5]", "peers[2].allow[0]", "expected a string, got an integer"),
        ('allow = ["192.168.1.0/33"]', "peers[2].allow[0]", "not a valid network"),
        ('allow = ["192.168.1.1/24"]', "peers[2].allow[0]", "host bits set"),
        ('allow = ["10.0.0.1", "bogus"]', "peers[2].allow[1]", "not a valid address"),
        ('allow = ["192.168.1.300"]', "peers[2].allow[0]", "not a valid address or network"),
        ('allow = ["fe80::1%eth0"]', "peers[2].allow[0]", "scoped address"),
        ('allow = ["10.0.0.1 icmp/1"]', "peers[2].allow[0]", "is not tcp/PORT, udp/PORT"),
        ('allow = ["10.0.0.1 tcp/0"]', "peers[2].allow[0]", "port 0 is out of range"),
        ('allow = ["10.0.0.1 tcp/70000"]', "peers[2].allow[0]", "port 70000 is out of range"),
        ('allow = ["10.0.0.1 tcp/90-80"]', "peers[2].allow[0]", "runs backwards"),
        ('allow = ["10.0.0.1  tcp/80"]', "peers[2].allow[0]", "is not 'ADDRESS[/PREFIX]'"),
        ('allow = ["10.0.0.1 tcp/80 x"]', "peers[2].allow[0]", "is not 'ADDRESS[/PREFIX]'"),
        ('allow = ["10.0.0.1 tcp/80\\n"]', "peers[2].allow[0]", "control character"),
        ('allow = [""]', "peers[2].allow[0]", "must not be empty"),
        ('alow = ["10.0.0.1"]', "peers[2].alow", "did you mean 'allow'"),
    ],
)
def test_validation(tmp_path, body, key, message):
    err = error_of(tmp_path, peer(body))
    assert f"site.toml: {key}: " in err and message in err, err


def test_allow_of_a_family_the_peer_has_no_address_of(tmp_path):
    extra = '\n[[peers]]\nname = "x"\naddress = "10.9.0.9/32"\nallow = ["fd00::/64"]\n'
    err = error_of(tmp_path, extra)
    assert "peers[2].allow[0]: fd00::/64 is IPv6, but 'x' has no IPv6 address" in err, err


def test_parsed_values(tmp_path):
    site = load(tmp_path)
    off, gone, temp, web, shop = site.peers[2:]
    assert not off.enabled and not off.active and not off.expired
    assert gone.expires == datetime(2026, 11, 30, tzinfo=UTC) and gone.expired
    assert not gone.active and gone.enabled
    assert temp.expires == datetime(2026, 12, 1, 13, 30, tzinfo=UTC) and temp.active
    assert [str(a) for a in web.allow] == [
        "192.168.1.20/32 tcp/443",
        "192.168.1.0/24 udp/5000-5010",
        "fd00::20/128",
        "192.168.1.30/32",
    ]
    assert site.peers[0].allow is None and site.peers[0].enabled
    assert shop.dns_endpoint and not site.peers[0].dns_endpoint
    later = load(tmp_path, now=datetime(2026, 12, 1, 13, 30, tzinfo=UTC))
    assert later.peer("temp").expired, "expired at the very second"


def test_a_past_expiry_warns_and_is_no_error(tmp_path):
    site = load(tmp_path)
    assert site.warnings() == [
        f"{site.path}: peers[3].expires: 2026-11-30T00:00:00Z is past: "
        "peer 'gone' is rendered disabled"
    ]


def test_check_warns_on_stderr_and_exits_0(tmp_path):
    path = write(
        tmp_path,
        BASE + '\n[[peers]]\nname = "old"\naddress = "10.9.0.9/32"\nexpires = 2020-01-01\n',
    )
    p = subprocess.run(
        [sys.executable, "-m", "builder", "check", "--site", str(path)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert "3 peers (2 road warriors, 1 site-to-site, 1 expired)" in p.stdout, p.stdout
    assert p.stderr == (
        f"warning: {path}: peers[2].expires: 2020-01-01T00:00:00Z is past: "
        "peer 'old' is rendered disabled\n"
    )


@pytest.fixture
def site(tmp_path):
    return load(tmp_path)


@pytest.fixture
def keys(site):
    made = {}
    for i, p in enumerate(site.peers):
        private = LAPTOP_PRIVATE if p.name == "laptop" else _key(i)
        made[p.name] = PeerKeys(wg_pubkey(private), private, PSK if i % 2 else None)
    return Keys(wg_private=WG_PRIVATE, host_key=HOST_KEY, admin_key=ADMIN_KEY, peers=made)


def _key(i: int) -> str:
    import base64

    raw = bytearray(range(i, i + 32))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


def test_golden(site, keys):
    """Disabled and expired peers are not rendered, restricted ones get forward rules, the
    timer's file holds expiries and names. WG_UPDATE_GOLDEN=1 rewrites the files."""
    out = {
        "lifecycle-wg0.conf": render_wg_conf(site, keys),
        "lifecycle-nftables.conf": render_nftables(site),
        "lifecycle-peers.json": render_peers_json(site, keys),
    }
    for name, text in out.items():
        path = GOLDEN / name
        if os.environ.get("WG_UPDATE_GOLDEN"):
            path.write_text(text)
        assert path.read_text() == text, f"{name} differs from tests/golden/{name}"
    conf = out["lifecycle-wg0.conf"]
    assert "# off\n" not in conf and "# gone\n" not in conf and "# temp\n" in conf
    doc = json.loads(out["lifecycle-peers.json"])
    assert doc["dns"] == ["192.168.1.1"]
    assert [(p["name"], p.get("expires"), p.get("endpoint")) for p in doc["peers"]] == [
        ("temp", int(datetime(2026, 12, 1, 13, 30, tzinfo=UTC).timestamp()), None),
        ("shop", None, "shop.example.org:51820"),
    ]


def test_ruleset_with_restricted_peers_parses(site, tmp_path):
    path = tmp_path / "nft.conf"
    path.write_text(render_nftables(site))
    p = subprocess.run(["nft", "--check", "--file", str(path)], capture_output=True, text=True)
    if p.returncode != 0 and "Operation not permitted" in p.stderr:
        pytest.skip("nft --check needs CAP_NET_ADMIN")
    assert p.returncode == 0, p.stderr


def test_an_empty_allow_list_drops_everything_the_peer_sends(tmp_path):
    site = load(tmp_path, '\n[[peers]]\nname = "x"\naddress = "10.9.0.9/32"\nallow = []\n')
    text = render_nftables(site)
    assert '\t\tiifname "wg0" ip saddr 10.9.0.9/32 drop\n' in text
    assert "10.9.0.9/32 ip daddr" not in text


# --- the appliance's timer mode ------------------------------------------------------------


class Guest:
    """The files and the live wg0 the timer mode touches."""

    def __init__(self, files: dict[str, str], live: dict[str, dict] | None):
        self.files = {
            k: {"data": v.encode(), "mode": 0o600, "uid": 0, "gid": 0} for k, v in files.items()
        }
        self.live = live  # public key -> {"handshake", "endpoint"}; None: wg0 not up
        self.ran: list[tuple] = []

    def read(self, path):
        return self.files.get(path)

    def write(self, path, data, mode, owner=(0, 0)):
        self.files[path] = {"data": data, "mode": mode, "uid": owner[0], "gid": owner[1]}

    def poke(self, address: str) -> None:
        self.ran.append(("poke", address))

    def text(self, key: str) -> str:
        return self.files[ga.FILES[key][0]]["data"].decode()

    def run(self, *argv, input=None):
        self.ran.append(argv)
        if self.live is None:
            raise ga.Failed("wg0: no such device")
        if argv[:3] == ("wg", "show", "wg0"):
            field = {"allowed-ips": None, "latest-handshakes": "handshake", "endpoints": "endpoint"}
            column = field[argv[3]]
            return "".join(
                f"{k}\t{'10.9.0.99/32' if column is None else v[column]}\n"
                for k, v in self.live.items()
            )
        if argv[:4] == ("wg", "set", "wg0", "peer") and argv[5] == "remove":
            del self.live[argv[4]]
            return ""
        if argv[:4] == ("wg", "set", "wg0", "peer") and argv[5] == "endpoint":
            self.live[argv[4]]["endpoint"] = argv[6]
            return ""
        if argv == ("ip", "-j", "-batch", "-"):
            assert input.splitlines()[0].startswith("route show table all dev wg0"), input
            return "[]\n" + json.dumps([{"addr_info": [{"local": "10.9.0.1", "prefixlen": 24}]}])
        raise AssertionError(f"unexpected command {argv}")


def test_expiry_on_the_appliance_matches_a_render_after_it(tmp_path, site, keys):
    """The timer removes `temp` at its time; the files it leaves are what a render after the
    expiry gives, byte for byte, so verify and sync then see no drift."""
    files = appliance_files(site, keys)
    temp = keys.peers["temp"].public
    live = {
        keys.peers[p.name].public: {"handshake": BEFORE, "endpoint": "(none)"}
        for p in site.peers
        if p.active
    }
    guest = Guest({ga.FILES[k][0]: files[k] for k in ("wg0.conf", "peers.json")}, live)
    expiry = datetime(2026, 12, 1, 13, 30, tzinfo=UTC).timestamp()
    assert ga.peers_tick(guest, now=expiry - 1)["expired"] == []
    assert temp in guest.live
    out = ga.peers_tick(guest, now=expiry)
    assert out["expired"] == ["temp"] and temp not in guest.live
    after = load(tmp_path, now=datetime(2026, 12, 1, 13, 30, tzinfo=UTC))
    assert guest.text("wg0.conf") == render_wg_conf(after, keys)
    assert guest.text("peers.json") == render_peers_json(after, keys)
    again = ga.peers_tick(guest, now=expiry + 60)
    assert again["expired"] == [], "nothing left to do"


def test_expiry_while_wg0_is_down_prunes_the_files_for_the_boot(site, keys):
    files = appliance_files(site, keys)
    guest = Guest({ga.FILES[k][0]: files[k] for k in ("wg0.conf", "peers.json")}, None)
    out = ga.peers_tick(guest, now=2_000_000_000)
    assert out == {"expired": ["temp"], "reresolved": []}
    assert keys.peers["temp"].public not in guest.text("wg0.conf")
    assert keys.peers["shop"].public in guest.text("wg0.conf")


def test_no_peers_file_is_nothing_to_do():
    guest = Guest({}, {})
    assert ga.peers_tick(guest) == {"expired": [], "reresolved": []}
    assert guest.ran == []


@pytest.mark.parametrize(
    "extra, agent",
    [
        ("", False),
        ('\n[[peers]]\nname = "t"\naddress = "10.9.0.9/32"\nexpires = 2027-01-01\n', True),
        ('\n[[peers]]\nname = "t"\naddress = "10.9.0.9/32"\nexpires = 2020-01-01\n', False),
        ('\n[[peers]]\nname = "b"\naddress = "10.9.0.9/32"\nendpoint = "b.example:5"\n', True),
        ('\n[[peers]]\nname = "b"\naddress = "10.9.0.9/32"\nendpoint = "192.0.2.5:5"\n', False),
    ],
)
def test_the_timer_starts_the_agent_only_with_work_for_it(tmp_path, extra, agent):
    """A site where no live peer expires or names its endpoint gets a timer that only marks
    its runs; with one, the agent runs."""
    site = load(tmp_path, extra)
    keys = Keys(
        wg_private=WG_PRIVATE,
        host_key=HOST_KEY,
        admin_key=ADMIN_KEY,
        peers={
            p.name: PeerKeys(wg_pubkey(_key(i)), _key(i), None) for i, p in enumerate(site.peers)
        },
    )
    unit = appliance_files(site, keys)["peers.service"]
    starts = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    want = f"ExecStart=/usr/bin/python3 -S {ga.FILES['agent'][0]} peers"
    assert starts == ([want] if agent else [f"ExecStart=/usr/bin/touch {ga.TICKED}"]), unit


def test_drop_peers_keeps_everything_else():
    conf = "[Interface]\nA = 1\n\n[Peer]\n# a\nPublicKey = K1\n\n[Peer]\n# b\nPublicKey = K2\n"
    assert ga.drop_peers(conf, {"K1"}) == "[Interface]\nA = 1\n\n[Peer]\n# b\nPublicKey = K2\n"
    assert ga.drop_peers(conf, {"K2"}) == "[Interface]\nA = 1\n\n[Peer]\n# a\nPublicKey = K1\n"
    assert ga.drop_peers(conf, {"K"}) == conf


class DnsServer:
    """A tiny authoritative answer on loopback: one A record, changeable."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = "198.51.100.20"
        self.asked: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(512)
            except OSError:
                return
            end = data.index(b"\0", 12) + 5
            qtype = struct.unpack("!H", data[end - 4 : end - 2])[0]
            self.asked.append(qtype)
            answers = b""
            if qtype == 1:
                answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4)
                answers += socket.inet_aton(self.address)
            header = data[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if answers else 0, 0, 0)
            self.sock.sendto(header + data[12:end] + answers, addr)

    def close(self):
        self.sock.close()


@pytest.fixture
def dns(monkeypatch):
    server = DnsServer()
    real = ga.dns_query
    monkeypatch.setattr(
        ga,
        "dns_query",
        lambda host, srv, qtype, timeout=2.0, port=53: real(host, srv, qtype, 2.0, server.port),
    )
    yield server
    server.close()


def test_dns_query_reads_an_answer(dns):
    assert ga.resolve("shop.example.org", ["127.0.0.1"]) == "198.51.100.20"
    dns.address = "198.51.100.21"
    assert ga.resolve("shop.example.org", ["127.0.0.1"]) == "198.51.100.21"
    assert ga.dns_query("x.example", "127.0.0.1", 28, 2.0, dns.port) is None


def test_a_stale_named_peer_gets_the_new_address(site, keys, dns):
    files = appliance_files(site, keys)
    doc = json.loads(files["peers.json"])
    doc["dns"] = ["127.0.0.1"]
    shop = keys.peers["shop"].public
    live = {shop: {"handshake": str(BEFORE), "endpoint": "198.51.100.20:51820"}}
    guest = Guest({ga.FILES["peers.json"][0]: ga.peers_text(doc)}, live)
    assert ga.peers_tick(guest, now=BEFORE + 135)["reresolved"] == [], "fresh enough"
    dns.address = "198.51.100.21"
    assert ga.peers_tick(guest, now=BEFORE + 135)["reresolved"] == []
    out = ga.peers_tick(guest, now=BEFORE + 136)
    assert out["reresolved"] == ["shop 198.51.100.21:51820"]
    assert guest.live[shop]["endpoint"] == "198.51.100.21:51820"
    assert guest.ran[-1] == ("poke", "10.9.0.8"), "a handshake is started at once"
    assert ga.peers_tick(guest, now=BEFORE + 200)["reresolved"] == [], "already there"


def test_a_broken_answer_is_no_address():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def answer():
        data, addr = sock.recvfrom(512)
        sock.sendto(data[:2] + b"\x81\x80\x00\x01\x00\x05", addr)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        assert ga.dns_query("a.example", "127.0.0.1", 1, 2.0, sock.getsockname()[1]) is None
    finally:
        sock.close()


# --- verify, sync's judge and status ---------------------------------------------------------


def live_peers(site, keys, extra=()):
    """wg0 as a healthy appliance holds it for `site`, plus the peers named in `extra`."""
    return [
        live_peer(p, keys.peers[p.name], BEFORE - 10, "198.51.100.20:51820" if p.endpoint else None)
        for p in site.peers
        if p.active or p.name in extra
    ]


def test_absent_disabled_and_expired_peers_are_no_drift(site, keys):
    """`shop`'s endpoint is a name: the appliance holds an address, and only the port counts."""
    assert peer_drift(site, keys, live_peers(site, keys)) == []


def test_an_expired_or_disabled_peer_still_live_is_named(site, keys):
    drift = peer_drift(site, keys, live_peers(site, keys, extra=("gone", "off")))
    assert sorted(drift) == [
        "gone: expired at 2026-11-30T00:00:00Z, still on wg0",
        "off: disabled, still on wg0",
    ]


def test_a_named_endpoint_on_another_port_is_drift(site, keys):
    live = live_peers(site, keys)
    shop = next(p for p in live if p["public_key"] == keys.peers["shop"].public)
    shop["endpoint"] = "198.51.100.20:4500"
    assert peer_drift(site, keys, live) == [
        "shop: endpoint 198.51.100.20:4500 is not on port 51820"
    ]


def test_status_shows_enabled_expired_and_the_expiry(site, keys):
    facts = {"time": BEFORE, "uptime": 5.0, "wg": {"peers": live_peers(site, keys)}}
    s = view(site, keys, facts)
    by_name = {p.name: p for p in s.peers}
    assert by_name["off"].state == DISABLED and not by_name["off"].enabled
    assert by_name["gone"].state == EXPIRED and by_name["gone"].expired
    assert by_name["gone"].expires == "2026-11-30T00:00:00Z"
    assert by_name["temp"].state == LIVE and by_name["temp"].expires == "2026-12-01T13:30:00Z"
    assert s.appliance["drift"] == 0
    table = s.table()
    assert "EXPIRES" in table.splitlines()[1]
    assert any(ln.startswith("off (disabled)") for ln in table.splitlines())
    assert any(
        ln.startswith("gone (expired)") and ln.endswith("2026-11-30T00:00:00Z")
        for ln in table.splitlines()
    )
    assert s.to_dict()["peers"][4]["expires"] == "2026-12-01T13:30:00Z"


def test_verify_fails_on_an_expired_peer_still_live_and_a_stopped_timer(site, keys):
    from builder.checks.appliance import _peers_ok, _timer

    assert _timer({"peers_timer": "active"}).ok
    stopped = _timer({"peers_timer": "inactive"})
    assert not stopped.ok and "timer is inactive; run `wg-appliance sync`" in stopped.detail
    assert _peers_ok(site) == "5 peers as in the site file, 2 disabled or expired and absent"
