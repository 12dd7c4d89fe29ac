"""Rendering: golden files, and the real judges (cloud-init schema, wg-quick, xorriso)."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from builder.local.state import State
from builder.model.keys import Keys, PeerKeys, wg_pubkey
from builder.model.site import load_site
from builder.render.appliance import (
    render_metrics_unit,
    render_nftables,
    render_peer_config,
    render_seed,
    render_wg_conf,
)
from builder.render.seed import make_iso
from tests.conftest import EXAMPLE
from tests.plugins.samples import (
    ADMIN_KEY,
    GOLDEN,
    HOST_KEY,
    LAPTOP_PRIVATE,
    PSK,
    WG_PRIVATE,
    written_files,
)


@pytest.fixture
def site():
    return load_site(EXAMPLE)


@pytest.fixture
def keys(site):
    phone = next(p for p in site.peers if p.name == "phone")
    return Keys(
        wg_private=WG_PRIVATE,
        host_key=HOST_KEY,
        admin_key=ADMIN_KEY,
        peers={
            "laptop": PeerKeys(wg_pubkey(LAPTOP_PRIVATE), LAPTOP_PRIVATE, PSK),
            "phone": PeerKeys(phone.public_key, None, PSK),
            "branch": PeerKeys(wg_pubkey(WG_PRIVATE), WG_PRIVATE, None),
        },
    )


def outputs(site, keys) -> dict[str, str]:
    out = dict(render_seed(site, keys))
    out["wg0.conf"] = render_wg_conf(site, keys)
    out["nftables.conf"] = render_nftables(site)
    for peer in site.peers:
        out[f"peer-{peer.name}.conf"] = render_peer_config(site, keys, peer)
    out["peer-laptop-full.conf"] = render_peer_config(site, keys, site.peer("laptop"), True)
    return out


def test_golden(site, keys):
    """Rendering of the example site equals the reviewed files in tests/golden.
    After an intended template change: WG_UPDATE_GOLDEN=1 pytest tests/test_render.py."""
    for name, text in outputs(site, keys).items():
        path = GOLDEN / name
        if os.environ.get("WG_UPDATE_GOLDEN"):
            GOLDEN.mkdir(exist_ok=True)
            path.write_text(text)
        assert path.read_text() == text, f"{name} differs from tests/golden/{name}"


def test_user_data_passes_cloud_init_schema(site, keys, tmp_path):
    f = tmp_path / "user-data"
    f.write_text(render_seed(site, keys)["user-data"])
    r = subprocess.run(["cloud-init", "schema", "-c", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Valid cloud-config" in r.stdout


def test_user_data_content(site, keys):
    data = yaml.safe_load(render_seed(site, keys)["user-data"])
    assert data["hostname"] == "wg-gw"
    assert data["ssh_keys"]["ed25519_private"] == HOST_KEY
    assert data["ssh_deletekeys"] is True
    user = data["users"][0]
    assert user["name"] == "wgadmin" and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert keys.admin_public in user["ssh_authorized_keys"]
    files = written_files(data)
    assert files["/etc/wireguard/wg0.conf"]["permissions"] == "0600"
    assert files["/etc/wireguard/wg0.conf"]["content"] == render_wg_conf(site, keys)
    assert (
        "net.ipv6.conf.all.forwarding = 1" in files["/etc/sysctl.d/90-wg-appliance.conf"]["content"]
    )
    # No resolver daemon in the image: glibc asks lan.dns from this file.
    resolv = files["/etc/resolv.conf"]["content"].splitlines()
    assert [ln for ln in resolv if not ln.startswith("#")] == ["nameserver 192.168.77.1"]
    # Every unit enabled without a reload of systemd and started in one transaction, by one
    # systemctl (their units order the ruleset before wg0).
    (enable,) = data["runcmd"][1:]
    assert enable[:5] == ["systemctl", "enable", "--now", "--no-reload", "--quiet"], data["runcmd"]
    start = enable[5:]
    assert {"nftables.service", "wg-quick@wg0.service", "wg-appliance-peers.timer"} <= set(start)
    assert {"wg-appliance-agent.socket", "wg-appliance-peers.service"} <= set(start)
    assert not [c for c in data["runcmd"] if c[0] == "nft"], "nftables.service loads the ruleset"
    assert "packages" not in data and "package_update" not in data


def test_network_config(site, keys):
    net = yaml.safe_load(render_seed(site, keys)["network-config"])
    eth = net["ethernets"]["lan0"]
    assert net["version"] == 2
    assert eth["match"]["macaddress"] == site.lan.mac
    assert eth["addresses"] == ["192.168.77.50/24", "fd77:77::50/64"]
    assert eth["routes"] == [
        {"to": "0.0.0.0/0", "via": "192.168.77.1"},
        {"to": "::/0", "via": "fd77:77::1"},
    ]
    assert eth["accept-ra"] is False and eth["dhcp6"] is False
    assert eth["nameservers"]["addresses"] == ["192.168.77.1"]


def _lan(tmp_path, lan: str, endpoint: str = '"vpn.example.org:51820"'):
    """The example site with another [lan] table (and endpoint)."""
    text = EXAMPLE.read_text()
    start, end = text.index("[lan]"), text.index("[ssh]")
    text = text[:start] + "[lan]\n" + lan + "\n\n" + text[end:]
    text = text.replace('"vpn.example.org:51820"', endpoint)
    text = text.replace('allow = ["192.168.77.0/24"]', "")
    (tmp_path / "site.toml").write_text(text)
    return load_site(tmp_path / "site.toml")


def test_ipv4_only_lan_renders_no_ipv6_on_it(tmp_path, keys):
    site = _lan(tmp_path, 'address = "192.168.77.50/24"\ngateway = "192.168.77.1"')
    eth = yaml.safe_load(render_seed(site, keys)["network-config"])["ethernets"]["lan0"]
    assert eth["routes"] == [{"to": "0.0.0.0/0", "via": "192.168.77.1"}]
    assert "accept-ra" not in eth
    nft = render_nftables(site)
    assert "ip6 saddr" not in nft and "ip saddr 192.168.77.0/24 tcp dport 22 accept" in nft


def test_ipv6_only_lan_renders_ipv6_everywhere(tmp_path, keys):
    site = _lan(
        tmp_path,
        'address = "fd77:77::50/64"\ngateway = "fd77:77::1"\ndns = ["fd77:77::1"]',
        '"[2001:db8::1]:51820"',
    )
    eth = yaml.safe_load(render_seed(site, keys)["network-config"])["ethernets"]["lan0"]
    assert eth["addresses"] == ["fd77:77::50/64"]
    assert eth["routes"] == [{"to": "::/0", "via": "fd77:77::1"}]
    assert eth["nameservers"]["addresses"] == ["fd77:77::1"]
    files = written_files(yaml.safe_load(render_seed(site, keys)["user-data"]))
    assert "nameserver fd77:77::1\n" in files["/etc/resolv.conf"]["content"]
    nft = render_nftables(site)
    assert "ip6 saddr fd77:77::/64 tcp dport 22 accept" in nft
    assert "ip6 saddr { fd77:77::/64 } ip6 daddr fd77:77::50 tcp dport 9586 accept" in nft
    assert "ip saddr" not in nft
    unit = render_metrics_unit(site)
    assert "--listen fd77:77::50 " in unit and "RestrictAddressFamilies=AF_INET6 " in unit
    laptop = render_peer_config(site, keys, site.peer("laptop"))
    assert "Endpoint = [2001:db8::1]:51820" in laptop
    assert "fd77:77::/64" in laptop.split("AllowedIPs = ")[1].splitlines()[0]


def test_instance_id_follows_content(site, keys, tmp_path):
    first = yaml.safe_load(render_seed(site, keys)["meta-data"])
    changed = tmp_path / "site.toml"
    changed.write_text(EXAMPLE.read_text().replace("mtu = 1420", "mtu = 1400"))
    second = yaml.safe_load(render_seed(load_site(changed), keys)["meta-data"])
    assert first["local-hostname"] == "wg-gw"
    assert first["instance-id"].startswith("wg-gw-")
    assert first["instance-id"] != second["instance-id"]


def test_wg_quick_strip_accepts_configs(site, keys, tmp_path):
    for name, text in outputs(site, keys).items():
        if not name.endswith(".conf") or name == "nftables.conf":
            continue
        f = tmp_path / "wg0.conf"
        f.write_text(text)
        f.chmod(0o600)
        r = subprocess.run(["wg-quick", "strip", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert "[Peer]" in r.stdout and "Address" not in r.stdout


def test_nftables_modes(site, tmp_path):
    masq = render_nftables(site)
    assert "masquerade" in masq and "maxseg size set rt mtu" in masq
    assert "ip saddr 192.168.77.0/24 tcp dport 22 accept" in masq
    assert "ip6 saddr fd77:77::/64 tcp dport 22 accept" in masq
    assert 'oifname "wg0" ip6 saddr fd77:77::/64 accept' in masq
    assert "udp dport 51820 accept" in masq
    routed_site = tmp_path / "site.toml"
    routed_site.write_text(EXAMPLE.read_text().replace('mode = "masquerade"', 'mode = "routed"'))
    routed = render_nftables(load_site(routed_site))
    assert "masquerade" not in routed and 'iifname "wg0" accept' in routed


def test_nftables_ruleset_parses(site, tmp_path):
    """nft --check parses the ruleset in a throwaway network namespace."""
    f = tmp_path / "nft.conf"
    f.write_text(render_nftables(site))
    ns = f"wgt-nft-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "--check", "-f", str(f)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_peer_configs(site, keys):
    laptop = render_peer_config(site, keys, site.peer("laptop"))
    assert f"PrivateKey = {LAPTOP_PRIVATE}" in laptop
    assert f"PublicKey = {keys.wg_public}" in laptop
    assert (
        "AllowedIPs = 10.77.0.0/24, fd77::/64, 192.168.77.0/24, fd77:77::/64, 192.168.88.0/24"
        in laptop
    )
    assert "Endpoint = vpn.example.org:51820" in laptop and "PersistentKeepalive = 25" in laptop
    phone = render_peer_config(site, keys, site.peer("phone"))
    assert "PrivateKey =" not in phone.replace("# PrivateKey", "")
    assert "never left its owner" in phone
    branch = render_peer_config(site, keys, site.peer("branch"))
    assert "192.168.88.0/24" not in branch.split("AllowedIPs")[1].splitlines()[0]
    assert "DNS" not in branch
    full = render_peer_config(site, keys, site.peer("laptop"), full_tunnel=True)
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in full


def test_seed_iso_reads_back_with_xorriso(site, keys, tmp_path):
    seed = render_seed(site, keys)
    iso = tmp_path / "seed.iso"
    iso.write_bytes(make_iso(seed))
    r = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], capture_output=True, text=True)
    assert "Volume Id    : cidata" in r.stdout
    out = tmp_path / "x"
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(out)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in out.iterdir()) == ["meta-data", "network-config", "user-data"]
    for name, text in seed.items():
        assert (out / name).read_text() == text
    r = subprocess.run(
        [
            "xorriso",
            "-indev",
            str(iso),
            "-report_system_area",
            "plain",
            "-rr_reloc_dir",
            "",
            "-lsl",
            "/",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0


def test_iso_is_deterministic(site, keys):
    seed = render_seed(site, keys)
    assert make_iso(seed) == make_iso(seed)


def test_state_keys_render_byte_identical_twice(site_dir):
    site = load_site(site_dir / "site.toml")
    state = State.for_site(site)
    a = render_seed(site, state.keys_for(site))
    b = render_seed(site, State.for_site(site).keys_for(site))
    assert a == b


def test_a_seed_from_files_rendered_once_is_the_same_seed(site, keys):
    """sync renders the appliance's files once and records the seed digest from them."""
    from builder.render.appliance import appliance_files, render_seed

    files = appliance_files(site, keys)
    assert render_seed(site, keys, files) == render_seed(site, keys)
    assert render_seed(site, keys, {**files, "sysctl": "# changed\n"}) != render_seed(site, keys)
