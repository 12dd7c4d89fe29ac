"""The appliance's wg0 helper (builder/guest/wg0.py): how it reads wg0.conf, what it asks of
`ip`, and runs against a real WireGuard interface (wireguard-go) in a network namespace of
its own, beside wg-quick."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from builder.guest import wg0
from builder.guest.agent import PEERS_UNIT
from builder.render.appliance import STATIC_FILES, render_wg_conf


def test_only_networks_beyond_the_own_subnets_are_routed() -> None:
    own = [ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("fd77::/64")]
    allowed = ["10.77.0.2/32", "fd77::2/128", "192.168.88.0/24", "fd88::/64", "192.168.88.0/24"]
    assert wg0.beyond(allowed, own) == ["192.168.88.0/24", "fd88::/64"]
    assert wg0.beyond(["10.0.0.0/8"], [ipaddress.ip_network("10.77.0.0/24")]) == ["10.0.0.0/8"]


def test_parse_keeps_for_wg_only_its_own_keys() -> None:
    conf = (
        "[Interface]\nAddress = 10.9.0.1/24, fd09::1/64\nAddress=10.8.0.1/24\nMTU = 1380\n"
        "Table = off\nPrivateKey = K\nListenPort = 51820\n\n[Peer]\n# Address = not this\n"
        "PublicKey = P\nAllowedIPs = 10.9.0.2/32, 192.168.2.0/24\n"
    )
    wg, quick, allowed = wg0.parse(conf)
    assert quick == {"address": ["10.9.0.1/24", "fd09::1/64", "10.8.0.1/24"], "mtu": ["1380"],
                     "table": ["off"]}  # fmt: skip
    assert "Address" not in wg.split("# Address")[0] and "MTU" not in wg and "Table" not in wg
    assert "PrivateKey = K\n" in wg and "ListenPort = 51820\n" in wg and "PublicKey = P\n" in wg
    assert allowed == ["10.9.0.2/32", "192.168.2.0/24"]
    assert wg0.batch("wg0", quick, allowed) == (
        "address replace 10.9.0.1/24 dev wg0\naddress replace fd09::1/64 dev wg0\n"
        "address replace 10.8.0.1/24 dev wg0\nlink set dev wg0 mtu 1380 up\n"
        "route replace 192.168.2.0/24 dev wg0\n"
    )


def test_parse_strips_what_wg_quick_strip_strips(site_keys, tmp_path: Path) -> None:
    """The rendered wg0.conf, judged by wg-quick's own strip."""
    conf = render_wg_conf(*site_keys)
    path = tmp_path / "wg0.conf"
    path.write_text(conf)
    path.chmod(0o600)
    want = run("wg-quick", "strip", str(path))
    strip = lambda text: [x for x in text.splitlines() if x.strip() and not x.startswith("#")]  # noqa: E731
    assert strip(wg0.parse(conf)[0]) == strip(want.stdout)


def test_the_seed_installs_the_helper_and_its_drop_in() -> None:
    (src, mode), (drop_in, _) = STATIC_FILES.values()
    assert src == Path(wg0.__file__) and mode == 0o644
    text = drop_in.read_text()
    assert "ExecStart=\n" in text and "/usr/local/lib/wg-appliance/wg0.py up wg0" in text
    assert "/usr/local/lib/wg-appliance/wg0.py reload wg0" in text
    # The ruleset is in before wg0 starts (the seed starts both in one transaction).
    assert "[Unit]\nAfter=nftables.service\n" in text
    # The peer timer's work once more on a live wg0, so endpoint names resolve at once.
    assert f"ExecStartPost=-/usr/bin/systemctl --no-block start {PEERS_UNIT}\n" in text


def run(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kw)


@pytest.fixture
def netns() -> str:
    ns = f"wgr-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _conf(tmp_path: Path, dev: str) -> Path:
    key = run("wg", "genkey").stdout.strip()
    pub = lambda: run("wg", "pubkey", input=run("wg", "genkey").stdout).stdout  # noqa: E731
    peers = "".join(
        f"[Peer]\n# peer {i}\nPublicKey = {pub()}"
        f"AllowedIPs = 10.99.{i // 250}.{1 + i % 250}/32{extra}\n"
        for i, extra in enumerate([", 192.168.88.0/24", ", 172.16.0.0/16", ", fd88::/64", ""])
    )
    conf = tmp_path / f"{dev}.conf"
    conf.write_text(
        f"[Interface]\nAddress = 10.99.0.254/16, fd99::fe/64\nListenPort = 51999\nMTU = 1380\n"
        f"PrivateKey = {key}\nTable = off\n{peers}"
    )
    conf.chmod(0o600)
    return conf


def _state(ns: list[str], dev: str) -> tuple[str, ...]:
    conf = run(*ns, "wg", "showconf", dev).stdout
    return (
        "\n[Peer]".join(sorted(conf.split("\n[Peer]"))),  # in no fixed order
        " ".join(  # without the link-local address the kernel makes at random
            w
            for w in run(*ns, "ip", "-br", "addr", "show", "dev", dev).stdout.split()
            if not w.startswith("fe80:")
        ),
        run(*ns, "ip", "link", "show", "dev", dev).stdout.split(":", 1)[1].split("link/")[0],
        run(*ns, "ip", "route", "show", "dev", dev).stdout,
        run(*ns, "ip", "-6", "route", "show", "dev", dev).stdout,
    )


def test_up_brings_wg0_up_as_wg_quick_does_and_a_second_run_changes_nothing(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wg-quick (routes for Table = auto by hand) and the helper bring up the same interface."""
    dev = f"wgr{uuid.uuid4().hex[:6]}"
    conf = _conf(tmp_path, dev)
    ns = ["ip", "netns", "exec", netns]
    run(*ns, "wg-quick", "up", str(conf))  # wireguard-go here: no kernel module on this host
    for net in ("192.168.88.0/24", "172.16.0.0/16", "fd88::/64"):
        run(*ns, "ip", "route", "replace", net, "dev", dev)
    by_wg_quick = _state(ns, dev)
    run(*ns, "wg-quick", "down", str(conf))
    run(*ns, "wireguard-go", dev)  # the helper's `ip link add` would need the kernel module
    # The helper reads /etc/wireguard/DEV.conf: here a copy of it, in a mount namespace.
    helper = f"mount --bind {tmp_path} /etc/wireguard && exec {sys.executable} -S -I {wg0.__file__}"
    unshared = [*ns, "unshare", "-m", "sh", "-c"]
    try:
        run(*unshared, f"{helper} up {dev}")
        first = _state(ns, dev)
        assert first == by_wg_quick
        assert "192.168.88.0/24 scope link" in first[3] and "10.99.0.1 " not in first[3]
        run(*unshared, f"{helper} up {dev}")
        assert _state(ns, dev) == first
        conf.write_text(conf.read_text().replace(", 172.16.0.0/16", ", 172.17.0.0/16"))
        run(*unshared, f"{helper} reload {dev}")
        assert "172.17.0.0/16" in _state(ns, dev)[0] and "172.17.0.0/16" in _state(ns, dev)[3]
    finally:
        subprocess.run([*ns, "ip", "link", "delete", "dev", dev], capture_output=True)


def test_a_failed_up_leaves_no_interface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As wg-quick does: an interface the helper made goes again when setting it up fails."""
    calls = []

    def fake(*argv, input=None):
        calls.append(argv[:2])
        if argv[0] == "wg":
            raise subprocess.CalledProcessError(1, argv)

    monkeypatch.setattr(wg0, "run", fake)
    monkeypatch.setattr(wg0.subprocess, "run", lambda argv, check: calls.append(tuple(argv[:3])))
    (tmp_path / "wgt0.conf").write_text("[Interface]\nPrivateKey = bad\n")
    monkeypatch.setattr(wg0, "CONF", str(tmp_path / "{}.conf"))
    monkeypatch.setattr(wg0, "SYS", str(tmp_path / "{}"))
    with pytest.raises(subprocess.CalledProcessError):
        wg0.up("wgt0")
    assert calls == [("ip", "link"), ("wg", "setconf"), ("ip", "link", "delete")]
