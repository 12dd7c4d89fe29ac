"""Sample inputs shared by several test modules: a small site file, fixed keys for byte-exact
rendering, a domain spec, and what a healthy appliance's agent reports (as fixtures).

Test modules import from here, never from one another."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from builder.local.state import State
from builder.model.site import load_site
from builder.render.appliance import render_nftables
from builder.render.libvirt_xml import DomainSpec

BASE = """\
[appliance]
name = "gw"

[lan]
address = "192.168.1.50/24"
gateway = "192.168.1.1"
dns = ["192.168.1.1"]

[ssh]
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd41cylJeb1D/0kBJPiXsOVcFYMbhJsNd7RYxiUYOeM me"]

[wireguard]
address = ["10.9.0.1/24", "fd09::1/64"]
endpoint = "vpn.example.org:51820"

[[peers]]
name = "laptop"
address = ["10.9.0.2/32", "fd09::2/128"]

[[peers]]
name = "branch"
address = "10.9.0.3/32"
networks = ["192.168.2.0/24"]
"""
GOOD_KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def written_files(user_data: dict) -> dict[str, dict]:
    """write_files of a parsed user-data by path, each content decoded as cloud-init does."""
    out = {}
    for f in user_data["write_files"]:
        f = dict(f)
        if f.pop("encoding", None) == "gz+b64":
            f["content"] = gzip.decompress(base64.b64decode(f["content"])).decode()
        out[f["path"]] = f
    return out


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


GOLDEN = Path(__file__).resolve().parent.parent / "golden"
# Fixed test-only keys, so rendering can be compared byte for byte.
WG_PRIVATE = "eKFumKw0T62tBm0c2veryf+bW7RXbj+KmGHtPn+zLWQ="
LAPTOP_PRIVATE = "aC7dv5alAuTpCpKuz3ea4Pt7HtlOsldBIFEKblzMkEE="
PSK = "tz2P0llJ+YT2ZiQpz6+r2EnAcD8moAMMPvUjAanRrh8="
HOST_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n"
    "c2gtZWQyNTUxOQAAACAWNVUjILEdTjv5dkViECn4qj1/LGx2RMu3gOTwVfC7ZAAA\n"
    "AIh1zFucdcxbnAAAAAtzc2gtZWQyNTUxOQAAACAWNVUjILEdTjv5dkViECn4qj1/\n"
    "LGx2RMu3gOTwVfC7ZAAAAEAc8uelyBepJm3uCpjmAgAy7jCGYtW9jXFxzgMyCWjW\n"
    "YBY1VSMgsR1OO/l2RWIQKfiqPX8sbHZEy7eA5PBV8LtkAAAAAAECAwQF\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
ADMIN_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n"
    "c2gtZWQyNTUxOQAAACDJYjyI27AyZJLRuXztTwInT3j+Hi11QmfG5PyLcElPNgAA\n"
    "AIhxQATucUAE7gAAAAtzc2gtZWQyNTUxOQAAACDJYjyI27AyZJLRuXztTwInT3j+\n"
    "Hi11QmfG5PyLcElPNgAAAECTJrXu5tSfEQKg79xf0Qlfyh7NRLeqMhSJ1T0oO/4D\n"
    "KsliPIjbsDJkktG5fO1PAidPeP4eLXVCZ8bk/ItwSU82AAAAAAECAwQF\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


META = {
    "site": "home",
    "image-digest": "sha256:" + "ab" * 32,
    "seed-digest": "sha256:" + "cd" * 32,
    "pool": "wg-appliance",
    "volumes": "home-disk.qcow2 home-seed.iso",
}


def spec(**changes: object) -> DomainSpec:
    base = DomainSpec(
        name="wga-home",
        memory_mib=512,
        vcpus=1,
        virt_type="kvm",
        disk_path="/var/lib/libvirt/images/home-disk.qcow2",
        seed_path="/var/lib/libvirt/images/home-seed.iso",
        bridge="green0",
        mac="52:54:00:12:34:56",
        serial_log_path="/var/log/libvirt/qemu/wga-home-serial.log",
        metadata=dict(META),
    )
    return replace(base, **changes)


NOW = 1_800_000_000.0


@pytest.fixture
def site_keys(site_dir):
    site = load_site(site_dir / "site.toml")
    return site, State.for_site(site).keys_for(site)


def live_peer(p, pk, handshake: int, endpoint: str | None = None) -> dict:
    """One peer of `wg show wg0 dump` as the agent reports it, for site peer `p`."""
    return {
        "public_key": pk.public,
        "psk_sha256": hashlib.sha256(pk.psk.encode()).hexdigest() if pk.psk else None,
        "endpoint": endpoint,
        "allowed_ips": sorted(str(n) for n in p.allowed_ips),
        "latest_handshake": handshake,
        "rx": 1,
        "tx": 1,
        "keepalive": p.keepalive or 0,
    }


@pytest.fixture
def facts(site_keys):
    """What a healthy appliance reports."""
    site, keys = site_keys
    peers = [live_peer(p, keys.peers[p.name], int(NOW - 30)) for p in site.peers]
    # `nft list ruleset` prints rules as the conf file writes them, indented.
    return {
        "time": NOW,
        "cloud_init_status": json.dumps(
            {"v1": {"stage": None, "init": {"errors": []}, "modules-final": {"errors": []}}}
        ),
        "cloud_init_result": json.dumps({"v1": {"errors": []}}),
        "cloud_init_log_tail": "",
        "wg": {"public_key": keys.wg_public, "listen_port": 51820, "peers": peers},
        "wg_link": [
            {"ifname": "wg0", "flags": ["POINTOPOINT", "NOARP", "UP", "LOWER_UP"], "mtu": 1420}
        ],
        "ip_forward": "1",
        "ip6_forward": "1",
        "nft": {"rc": 0, "out": render_nftables(site), "err": ""},
        "routes": [{"dst": "192.168.88.0/24", "dev": "wg0"}]
        + [{"dst": "default", "gateway": str(g), "dev": "lan0"} for g in site.lan.gateways]
        + [{"dst": str(n), "dev": "wg0"} for p in site.peers for n in p.networks if n.version == 6],
        "addresses": {"lan0": [str(a) for a in site.lan.addresses], "wg0": []},
        "gateway": {"ok": True, "detail": "0.3 ms"},
        "gateway6": {"ok": True, "detail": "0.4 ms"} if site.lan.gateway_for(6) else None,
        "disk_free": 1.5e9,
        "disk_total": 2e9,
        "mem_available": 300e6,
        "mem_total": 500e6,
        "uptime": 100.0,
        "image": "ab" * 32,
        "metrics": {
            "enabled": site.metrics.enabled,
            "scrape": {"status": 200, "lines": 40, "peers": len(peers), "seconds": 0.1},
        },
        "peers_timer": "active",
    }
