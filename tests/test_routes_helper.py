"""The appliance's routes helper (builder/guest/routes.py): the networks it routes, and one
run against a real WireGuard interface (wireguard-go) in a network namespace of its own."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from builder.guest import routes
from builder.render.appliance import STATIC_FILES


def test_only_networks_beyond_the_own_subnets_are_routed() -> None:
    own = [ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("fd77::/64")]
    allowed = ["10.77.0.2/32", "fd77::2/128", "192.168.88.0/24", "fd88::/64", "192.168.88.0/24"]
    assert routes.beyond(allowed, own) == ["192.168.88.0/24", "fd88::/64"]
    assert routes.beyond(["10.0.0.0/8"], [ipaddress.ip_network("10.77.0.0/24")]) == ["10.0.0.0/8"]
    assert routes.batch("wg0", ["192.168.88.0/24"]) == "route replace 192.168.88.0/24 dev wg0\n"


def test_the_seed_installs_the_helper_and_its_drop_in() -> None:
    (src, mode), (drop_in, _) = STATIC_FILES.values()
    assert src == Path(routes.__file__) and mode == 0o644
    assert "/usr/local/lib/wg-appliance/routes.py wg0" in drop_in.read_text()


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


def test_one_run_adds_the_routes_wg_quick_would_and_a_second_changes_nothing(
    netns: str, tmp_path: Path
) -> None:
    dev = f"wgr{uuid.uuid4().hex[:6]}"
    key = run("wg", "genkey").stdout.strip()
    peers = "".join(
        f"[Peer]\nPublicKey = {run('wg', 'pubkey', input=run('wg', 'genkey').stdout).stdout}"
        f"AllowedIPs = 10.99.{i // 250}.{1 + i % 250}/32{extra}\n"
        for i, extra in enumerate([", 192.168.88.0/24", ", 172.16.0.0/16", ", fd88::/64", ""])
    )
    conf = tmp_path / f"{dev}.conf"
    conf.write_text(
        f"[Interface]\nAddress = 10.99.0.254/16, fd99::fe/64\nPrivateKey = {key}\n"
        f"Table = off\n{peers}"
    )
    conf.chmod(0o600)
    ns = ["ip", "netns", "exec", netns]
    run(*ns, "wg-quick", "up", str(conf))
    try:
        assert run(*ns, "ip", "route", "show", "dev", dev).stdout.count("\n") == 1
        helper = [*ns, sys.executable, "-S", "-I", routes.__file__, dev]
        run(*helper)
        first = run(*ns, "ip", "route", "show", "dev", dev).stdout
        assert "192.168.88.0/24 scope link" in first and "172.16.0.0/16 scope link" in first
        assert "10.99.0.1" not in first, "peers inside the tunnel subnet need no route"
        first6 = run(*ns, "ip", "-6", "route", "show", "dev", dev).stdout
        assert "fd88::/64" in first6, first6
        run(*helper)
        assert run(*ns, "ip", "route", "show", "dev", dev).stdout == first
        assert run(*ns, "ip", "-6", "route", "show", "dev", dev).stdout == first6
    finally:
        subprocess.run([*ns, "wg-quick", "down", str(conf)], capture_output=True, check=False)
