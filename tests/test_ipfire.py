"""IPFire host files: the firewall.local block and static routes, as pure text functions."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Interface
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.checks import ipfire as ipfire_checks
from builder.errors import HostError, InputError
from builder.model.login import parse_login
from builder.model.site import Site, load_site
from builder.remote import ipfire as ipfire_host
from builder.render import ipfire
from builder.text import printable
from tests.conftest import EXAMPLE, ROOT

# An admin-edited firewall.local as found on real boxes: an add-on's sed'ed variable under
# the header, blocklists inserted into CUSTOM* chains, a port forward of the admin's own,
# and a stop branch that flushes the shared chains.
ADMIN_FIREWALL_LOCAL = """\
#!/bin/sh
# Used for private firewall rules
IPSET="/sbin/iptables"

# See how we were called.
case "$1" in
  start)
        ## add your 'start' rules here
        ${IPSET} -I CUSTOMFORWARD -m set --match-set firehol dst -j REJECT
        ${IPSET} -I CUSTOMINPUT -m set --match-set firehol src -j REJECT
        # NAS from outside, port 8443
        /sbin/iptables -t nat -A CUSTOMPREROUTING -i red0 -p tcp --dport 8443 \\
            -j DNAT --to-destination 192.168.77.20:443
        /sbin/iptables -A CUSTOMFORWARD -i red0 -p tcp -d 192.168.77.20 --dport 443 -j ACCEPT
        ;;
  stop)
        ## add your 'stop' rules here
        /sbin/iptables -F CUSTOMFORWARD
        /sbin/iptables -F CUSTOMINPUT
        /sbin/iptables -t nat -F CUSTOMPREROUTING
        ;;
  reload)
        $0 stop
        $0 start
        ## add your 'reload' rules here
        ;;
  *)
        echo "Usage: $0 {start|stop|reload}"
        ;;
esac
"""

ADMIN_ROUTING = """\
on,10.10.0.0/16,192.168.77.2,office VPN box
,172.16.5.0/24,192.168.77.3,old lab (disabled)
"""


def make_site(
    tmp_path: Path, filename: str = "site.toml", changes: dict[str, str] | None = None
) -> Site:
    """The example site with text replacements, loaded as a user's file would be."""
    text = EXAMPLE.read_text()
    for old, new in (changes or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / filename
    path.write_text(text)
    return load_site(path)


def routed(
    tmp_path: Path, filename: str = "site.toml", changes: dict[str, str] | None = None
) -> Site:
    return make_site(
        tmp_path, filename, {'mode = "masquerade"': 'mode = "routed"', **(changes or {})}
    )


def second_site(tmp_path: Path) -> Site:
    """Another appliance on the same host: own name, address, port and tunnel."""
    text = EXAMPLE.read_text()
    for old, new in (
        ('name = "wg-gw"', 'name = "wg-lab2"'),
        ("192.168.77.50/24", "192.168.77.51/24"),
        ("listen_port = 51820", "listen_port = 51821"),
        ("vpn.example.org:51820", "vpn.example.org:51821"),
        ('mode = "masquerade"', 'mode = "routed"'),
        ("10.77.0.", "10.78.0."),
        ("fd77::", "fd78::"),
        ("192.168.88.0/24", "192.168.89.0/24"),
    ):
        text = text.replace(old, new)
    path = tmp_path / "second.toml"
    path.write_text(text)
    return load_site(path)


def sh_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "firewall.local.check"
    script.write_text(text)
    r = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- firewall.local ---------------------------------------------------------------------


def test_stock_file_is_ipfires_layout():
    stock = ipfire.stock_firewall_local()
    assert stock.startswith("#!/bin/sh\n# Used for private firewall rules\n")
    for branch in ("start)", "stop)", "reload)", "$0 stop", "$0 start", "*)"):
        assert branch in stock
    assert ipfire.stock_routing() == ""


def test_block_lands_before_the_admins_case_and_merge_is_idempotent(tmp_path):
    site = routed(tmp_path)
    stock = ipfire.stock_firewall_local()
    once = ipfire.merge_firewall_local(stock, site)
    twice = ipfire.merge_firewall_local(once, site)
    assert once == twice
    lines = once.splitlines()
    begin = lines.index("# BEGIN wg-appliance wg-gw")
    assert lines[:begin] == ["#!/bin/sh", "# Used for private firewall rules", ""]
    assert lines.index("# END wg-appliance wg-gw") < lines.index("# See how we were called.")
    assert once.count("# BEGIN wg-appliance") == 1
    sh_syntax_ok(once, tmp_path)


def test_block_rules(tmp_path):
    block = ipfire.render_block(routed(tmp_path))
    ipt = "/sbin/iptables -w"
    assert (
        f'{ipt} -t nat -A WGA_WG_GW_NAT -i "$wga_wg_gw_red" -p udp --dport 51820 '
        "-j DNAT --to-destination 192.168.77.50:51820"
    ) in block
    assert "--dport 51820 -m conntrack --ctstate DNAT -j ACCEPT" in block
    assert "wga_wg_gw_red=$(cat /var/ipfire/red/iface 2>/dev/null)" in block
    for net in ("10.77.0.0/24", "192.168.88.0/24"):
        assert (
            f"-t raw -A WGA_WG_GW_RAW -i green0 -s 192.168.77.0/24 -d {net} -j CT --notrack"
        ) in block
        assert f"-A WGA_WG_GW_FWD -i green0 -o green0 -s 192.168.77.0/24 -d {net} -j ACCEPT" in (
            block
        )
    assert "fd77::" not in block, "IPFire 2.x has no IPv6 firewall: v6 nets stay out"
    # The shared chains are only ever jumped from, never flushed or deleted.
    for chain in ("CUSTOMFORWARD", "CUSTOMPREROUTING", "PREROUTING"):
        assert f"-F {chain}" not in block and f"-X {chain}" not in block


def test_masquerade_mode_only_forwards_the_port(tmp_path):
    site = make_site(tmp_path)
    block = ipfire.render_block(site)
    assert "DNAT --to-destination 192.168.77.50:51820" in block
    assert "--notrack" not in block and "-o green0 -s" not in block
    assert ipfire.routes(site) == ()
    assert ipfire.merge_routing(ADMIN_ROUTING, site) == (ADMIN_ROUTING, ())


def test_red_port_follows_the_endpoint(tmp_path):
    site = make_site(tmp_path, changes={"vpn.example.org:51820": "vpn.example.org:4500"})
    block = ipfire.render_block(site)
    assert "--dport 4500 -j DNAT --to-destination 192.168.77.50:51820" in block


def test_admin_lines_are_kept_and_removal_is_exact(tmp_path):
    site = routed(tmp_path)
    merged = ipfire.merge_firewall_local(ADMIN_FIREWALL_LOCAL, site)
    lines = merged.splitlines()
    begin, end = lines.index("# BEGIN wg-appliance wg-gw"), lines.index("# END wg-appliance wg-gw")
    assert lines[begin : end + 1] == ipfire.render_block(site).splitlines()
    assert lines[:begin] + lines[end + 2 :] == ADMIN_FIREWALL_LOCAL.splitlines()
    assert merged.index("# END wg-appliance wg-gw") < merged.index("IPSET} -I CUSTOMFORWARD")
    assert merged.index('IPSET="/sbin/iptables"') < merged.index("# BEGIN wg-appliance")
    assert ipfire.remove_firewall_block(merged, "wg-gw") == ADMIN_FIREWALL_LOCAL
    assert ipfire.remove_firewall_block(ADMIN_FIREWALL_LOCAL, "wg-gw") == ADMIN_FIREWALL_LOCAL
    sh_syntax_ok(merged, tmp_path)


def test_changed_site_replaces_its_block_in_place(tmp_path):
    before = ipfire.merge_firewall_local(ADMIN_FIREWALL_LOCAL, routed(tmp_path))
    changed = make_site(tmp_path, "changed.toml")  # back to masquerade mode
    after = ipfire.merge_firewall_local(before, changed)
    assert "--notrack" in before and "--notrack" not in after
    assert after.count("# BEGIN wg-appliance wg-gw") == 1
    assert after.index("# BEGIN") == before.index("# BEGIN")
    assert ipfire.remove_firewall_block(after, "wg-gw") == ADMIN_FIREWALL_LOCAL


def test_two_appliances_coexist(tmp_path):
    one, two = routed(tmp_path), second_site(tmp_path)
    both = ipfire.merge_firewall_local(ipfire.merge_firewall_local(ADMIN_FIREWALL_LOCAL, one), two)
    assert [b.name for b in ipfire.find_blocks(both)] == ["wg-gw", "wg-lab2"]
    assert ipfire.merge_firewall_local(ipfire.merge_firewall_local(both, one), two) == both
    assert "WGA_WG_LAB2_FWD" in both and "--dport 51821" in both
    only_two = ipfire.remove_firewall_block(both, "wg-gw")
    assert only_two == ipfire.merge_firewall_local(ADMIN_FIREWALL_LOCAL, two)
    assert ipfire.remove_firewall_block(only_two, "wg-lab2") == ADMIN_FIREWALL_LOCAL
    sh_syntax_ok(both, tmp_path)

    routing, _ = ipfire.merge_routing(ipfire.merge_routing(ADMIN_ROUTING, one)[0], two)
    assert routing.count("wg-appliance wg-gw ") == 2
    assert routing.count("wg-appliance wg-lab2 ") == 2
    assert ipfire.remove_routing(routing, "wg-gw") == ipfire.merge_routing(ADMIN_ROUTING, two)[0]


def test_same_red_port_as_another_appliance_is_refused(tmp_path):
    one = routed(tmp_path)
    other = make_site(tmp_path, "other.toml", {'name = "wg-gw"': 'name = "wg-other"'})
    merged = ipfire.merge_firewall_local(ipfire.stock_firewall_local(), one)
    with pytest.raises(HostError) as e:
        ipfire.merge_firewall_local(merged, other)
    assert "wg-gw already forwards RED udp/51820" in str(e.value)
    assert "another wireguard.endpoint port" in e.value.fix


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t.replace("# END wg-appliance wg-gw\n", ""),
        lambda t: t.replace("# BEGIN wg-appliance wg-gw\n", ""),
        lambda t: t + "# BEGIN wg-appliance wg-gw\n# END wg-appliance wg-gw\n",
    ],
    ids=["no-end", "no-begin", "twice"],
)
def test_broken_markers_are_a_host_error_with_a_fix(tmp_path, damage):
    site = routed(tmp_path)
    broken = damage(ipfire.merge_firewall_local(ADMIN_FIREWALL_LOCAL, site))
    with pytest.raises(HostError) as e:
        ipfire.merge_firewall_local(broken, site)
    assert "firewall.local" in str(e.value) and e.value.fix


def test_empty_or_caseless_file(tmp_path):
    site = routed(tmp_path)
    from_empty = ipfire.merge_firewall_local("", site)
    assert from_empty.startswith("#!/bin/sh\n# BEGIN wg-appliance wg-gw\n")
    sh_syntax_ok(from_empty, tmp_path)
    caseless = "#!/bin/sh\n# mine\n/sbin/iptables -A CUSTOMINPUT -p tcp --dport 22 -j ACCEPT\n"
    merged = ipfire.merge_firewall_local(caseless, site)
    assert merged.index("# BEGIN") < merged.index("/sbin/iptables -A CUSTOMINPUT")
    assert ipfire.remove_firewall_block(merged, "wg-gw") == caseless


def test_chain_names_fit_iptables_and_stay_distinct():
    long_a = "a" * 40 + "-gateway-one"
    long_b = "a" * 40 + "-gateway-two"
    a, b = ipfire.chains_for(long_a), ipfire.chains_for(long_b)
    for chains in (a, b, ipfire.chains_for("wg-gw")):
        assert all(len(chain) <= 28 for _, chain in chains.all)
    assert a.forward != b.forward and a.function != b.function
    assert ipfire.chains_for("wg-gw").forward == "WGA_WG_GW_FWD"


def test_teardown_script_removes_only_its_own_chains():
    script = ipfire.teardown_script("wg-gw")
    assert "-D CUSTOMFORWARD -j WGA_WG_GW_FWD" in script
    assert "-X WGA_WG_GW_RAW" in script
    assert "-F CUSTOM" not in script


# --- routing ----------------------------------------------------------------------------


def test_routing_lines_for_tunnel_and_peer_networks(tmp_path):
    site = routed(tmp_path)
    text, notes = ipfire.merge_routing("", site)
    assert text == (
        "on,10.77.0.0/24,192.168.77.50,wg-appliance wg-gw tunnel\n"
        "on,192.168.88.0/24,192.168.77.50,wg-appliance wg-gw peer branch\n"
    )
    assert notes == ()


def test_routing_merge_keeps_admin_lines_is_idempotent_and_removal_exact(tmp_path):
    site = routed(tmp_path)
    once, _ = ipfire.merge_routing(ADMIN_ROUTING, site)
    assert once.startswith(ADMIN_ROUTING)
    assert ipfire.merge_routing(once, site)[0] == once
    assert ipfire.remove_routing(once, "wg-gw") == ADMIN_ROUTING
    assert ipfire.remove_routing(once, "wg-g") == once, "a prefix of the name is not ours"


def test_routing_drops_stale_lines_of_a_changed_site(tmp_path):
    before, _ = ipfire.merge_routing(ADMIN_ROUTING, routed(tmp_path))
    changed = routed(tmp_path, "changed.toml", {"192.168.88.0/24": "10.99.0.0/16"})
    after, _ = ipfire.merge_routing(before, changed)
    assert "192.168.88.0/24" not in after
    assert "on,10.99.0.0/16,192.168.77.50,wg-appliance wg-gw peer branch" in after


def test_routing_refuses_a_competing_route_and_notes_a_duplicate(tmp_path):
    site = routed(tmp_path)
    with pytest.raises(HostError) as e:
        ipfire.merge_routing("on,192.168.88.0/24,192.168.77.9,old branch\n", site)
    assert "already routes 192.168.88.0/24 via 192.168.77.9" in str(e.value)
    assert "Network > Routing" in e.value.fix
    off = ",192.168.88.0/24,192.168.77.9,old branch (disabled)\n"
    assert ipfire.merge_routing(off, site)[0].startswith(off)
    text, notes = ipfire.merge_routing("on,10.77.0.0/24,192.168.77.50,by hand\n", site)
    assert len(notes) == 1 and "does the same as ours" in notes[0]
    assert text.count("10.77.0.0/24") == 2


def test_plan_uses_stock_files_without_a_host(tmp_path):
    site = routed(tmp_path)
    p = ipfire.host_files(site)
    assert p.firewall_local == ipfire.merge_firewall_local(ipfire.stock_firewall_local(), site)
    assert p.routing.count("\n") == 2
    gone = ipfire.host_files(site, p.firewall_local, p.routing, remove=True)
    assert gone.firewall_local == ipfire.stock_firewall_local()
    assert gone.routing == ""


def test_ipv6_stays_out_of_the_host_files_and_is_said_once(tmp_path):
    """IPFire 2.x has no IPv6 on RED: the dual-stack example's IPv6 LAN, tunnel and peer
    networks are nowhere in its files, and one note says so."""
    site = routed(
        tmp_path,
        changes={'networks = ["192.168.88.0/24"]': 'networks = ["192.168.88.0/24", "fd88::/64"]'},
    )
    files = ipfire.host_files(site)
    assert files.notes.count(ipfire.IPV6_NOTE) == 1
    for text in (files.firewall_local, files.routing):
        assert "fd77" not in text and "fd88" not in text
    assert "192.168.88.0/24" in files.routing


def test_an_ipv6_only_lan_is_refused_for_ipfire(tmp_path):
    site = make_site(
        tmp_path,
        "site.toml",
        {
            '["192.168.77.50/24", "fd77:77::50/64"]': '"fd77:77::50/64"',
            '["192.168.77.1", "fd77:77::1"]': '"fd77:77::1"',
            'allow = ["192.168.77.0/24"]': "",
        },
    )
    with pytest.raises(InputError) as e:
        ipfire.host_files(site)
    assert e.value.key == "lan.address" and "IPv4 only" in str(e.value)


# --- preflight judgement and the host scripts (no SSH) ------------------------------------


def good_facts(**values: str) -> ipfire_checks.Facts:
    """What a ready IPFire host reports."""
    v = {
        "uid": "0",
        "virsh": "/usr/bin/virsh",
        "qemu": "/usr/bin/qemu-system-x86_64",
        "pak_libvirt": "yes",
        "pak_qemu": "yes",
        "libvirtd": "1234",
        "libvirt_sock": "yes",
        "kvm": "yes",
        "bridge_dev": "yes",
        "bridge_is": "yes",
        "mem_kib": str(4 * 1024 * 1024),
        "disk_dir": "/var/lib/libvirt/images",
        "disk_kib": str(50 * 1024 * 1024),
        "addr_local": "0",
        "ping_rc": "1",
        "neigh": "",
    }
    v.update(values)
    files = {
        "firewall_local": ipfire.stock_firewall_local(),
        "routing": "",
        "red_iface": "red0\n",
        "wg_settings": "ENABLED=off\nPORT=51820\n",
        "wg_peers": "",
        "release": "IPFire 2.29 (x86_64) - core195\n",
    }
    return ipfire_checks.Facts(v, files)


def failed(checks) -> dict[str, str]:
    return {c.name: c.fix for c in checks if not c.ok}


def test_judge_all_ok(tmp_path):
    checks = ipfire_checks.judge(routed(tmp_path), good_facts())
    assert failed(checks) == {}
    assert len(checks) == 13


@pytest.mark.parametrize(
    "change, name, fix",
    [
        ({"uid": "1000"}, "root login", "log in as root"),
        ({"bridge_is": "no"}, "GREEN bridge", "bridge mode in the web UI"),
        ({"bridge_is": "no", "bridge_dev": "no"}, "GREEN bridge", "Zone Configuration"),
        ({"pak_libvirt": "no"}, "libvirt add-on", "pakfire install libvirt qemu"),
        ({"qemu": ""}, "qemu add-on", "pakfire install libvirt qemu"),
        ({"libvirtd": "", "libvirt_sock": "no"}, "libvirtd running", "libvirtd start"),
        ({"kvm": "no"}, "/dev/kvm", "VT-x/AMD-V"),
        ({"mem_kib": str(300 * 1024)}, "free memory", "appliance.memory_mib"),
        ({"disk_kib": str(1024 * 1024)}, "free disk", "appliance.disk_gib"),
        ({"addr_local": "1"}, "LAN address free", "another lan.address"),
        (
            {"neigh": "192.168.77.50 dev green0 lladdr 52:54:00:12:34:56 REACHABLE"},
            "LAN address free",
            "free lan.address",
        ),
    ],
)
def test_judge_names_each_failure_with_its_fix(tmp_path, change, name, fix):
    checks = ipfire_checks.judge(routed(tmp_path), good_facts(**change))
    assert list(failed(checks)) == [name]
    assert fix in failed(checks)[name]


def test_judge_file_cases(tmp_path):
    site = routed(tmp_path)
    f = good_facts()
    f.files["wg_settings"] = "ENABLED=on\nPORT=51820\n"
    assert (
        "another wireguard.endpoint port"
        in failed(ipfire_checks.judge(site, f))["IPFire WireGuard"]
    )
    f = good_facts()
    f.files["wg_settings"] = "ENABLED=on\nPORT=51821\n"
    assert failed(ipfire_checks.judge(site, f)) == {}
    f = good_facts()
    f.files["wg_peers"] = "3,on,net,branch-office,pub,priv,51820,1.2.3.4,51820,10.0.0.0/24\n"
    assert "IPFire WireGuard" in failed(ipfire_checks.judge(site, f))
    f = good_facts()
    f.files["red_iface"] = None
    assert list(failed(ipfire_checks.judge(site, f))) == ["RED interface"]
    f = good_facts()
    f.files["release"] = "Debian GNU/Linux 12\n"
    assert list(failed(ipfire_checks.judge(site, f))) == ["IPFire version"]
    f = good_facts()
    f.files["routing"] = "on,10.77.0.0/24,192.168.77.9,someone else\n"
    assert "Network > Routing" in failed(ipfire_checks.judge(site, f))["host files"]
    f = good_facts(neigh=f"192.168.77.50 dev green0 lladdr {site.lan.mac} REACHABLE")
    assert failed(ipfire_checks.judge(site, f)) == {}, "our own appliance may hold the address"


def test_judge_for_removal_only_needs_root_and_files(tmp_path):
    site = routed(tmp_path)
    f = good_facts(bridge_is="no", kvm="no")
    names = [c.name for c in ipfire_checks.judge(site, f, removing=True)]
    assert names == ["root login", "host files"]


def test_probe_output_round_trip():
    text = "uid=0\nfirewall_local=b64:IyEvYmluL3NoCg==\nrouting=-\nneigh=a=b c\n"
    facts = ipfire_checks.parse_probe(text)
    assert facts.files == {"firewall_local": "#!/bin/sh\n", "routing": None}
    assert facts.get("neigh") == "a=b c" and facts.get("uid") == "0"


def test_probe_and_apply_scripts_are_posix_sh(tmp_path):
    site = routed(tmp_path)
    facts = good_facts()
    scripts = {
        "probe": ipfire_host.probe_script(site),
        "apply": ipfire_host.apply_script(site, facts, ipfire.host_files(site), removing=False),
        "remove": ipfire_host.apply_script(site, facts, ipfire.host_files(site), removing=True),
    }
    for name, text in scripts.items():
        path = tmp_path / f"{name}.sh"
        path.write_text(text)
        r = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
    assert "sha256sum" in scripts["apply"] and "bak-wg-appliance" in scripts["apply"]
    assert "-X WGA_WG_GW_FWD" in scripts["remove"]


@pytest.mark.parametrize(
    "value, login",
    [
        ("root@ipfire", ("root", "ipfire", 222)),
        ("root@192.168.77.1:2222", ("root", "192.168.77.1", 2222)),
        ("ipfire.lan", ("root", "ipfire.lan", 222)),
        ("admin@[fd00::1]:22", ("admin", "fd00::1", 22)),
    ],
)
def test_parse_login(value, login):
    got = parse_login(value)
    assert (got.user, got.host, got.port) == login


@pytest.mark.parametrize("value", ["root@", "root@host:99999", "a b@host", "root@host:port"])
def test_parse_login_rejects(value):
    with pytest.raises(InputError) as e:
        parse_login(value)
    assert e.value.key == "--ssh"


# --- the command line (the wired `wg-appliance ipfire`, or its stand-in until then) -------


def ipfire_cli(*args: str) -> subprocess.CompletedProcess:
    from tests.lab.ipfire_standin import ipfire_cli_argv

    return subprocess.run(
        [*ipfire_cli_argv(), *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_cli_out_without_a_host_uses_the_stock_files(tmp_path):
    site = routed(tmp_path)
    out = tmp_path / "out"
    r = ipfire_cli("--site", str(site.path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "firewall.local").read_text() == ipfire.host_files(site).firewall_local
    assert (out / "firewall.local").stat().st_mode & 0o777 == 0o755
    assert (out / "routing").read_text() == ipfire.host_files(site).routing
    assert "scp -P 222" in r.stdout and "--apply" in r.stdout
    r = ipfire_cli("--site", str(site.path), "--out", str(out), "--remove", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out"]["routing"] == str(out / "routing")
    assert (out / "firewall.local").read_text() == ipfire.stock_firewall_local()


@pytest.mark.parametrize(
    "args, start",
    [
        (["--apply"], "error: --apply: needs --ssh"),
        (["--ssh", "root@host:99999"], "error: root@host:99999: --ssh: port 99999"),
        (["--ssh", "root@h", "--host-key", "MD5:ab"], "error: MD5:ab: --host-key: expected"),
    ],
)
def test_cli_bad_input_is_exit_2_in_one_line(tmp_path, args, start):
    site = routed(tmp_path)
    r = ipfire_cli("--site", str(site.path), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(start) and r.stderr.count("\n") == 1, r.stderr


def test_cli_unreachable_host_is_exit_1_with_the_fix(tmp_path):
    site = routed(tmp_path)
    known = tmp_path / "known_hosts"
    known.write_text("")
    r = ipfire_cli(
        "--site", str(site.path), "--ssh", "root@127.0.0.1:9", "--known-hosts", str(known)
    )
    assert r.returncode == 1, r.stderr
    assert "cannot connect: connection refused" in r.stderr and "port 222" in r.stderr
    assert r.stderr.count("\n") == 1


# --- hostile site values: quoted, refused or escaped, never run ---------------------------

# Fragments that end a word, a quote, a command or a line in sh, around a command that
# leaves a mark when it runs. MARK is replaced by a path in each example's own directory.
BREAKERS = [
    "; touch MARK; #",
    " -j ACCEPT; touch MARK; #",
    "$(touch MARK)",
    "`touch MARK`",
    "' ; touch MARK ; '",
    '" ; touch MARK ; "',
    "&& touch MARK",
    "| touch MARK",
    "\ntouch MARK\n",
    "\rtouch MARK",
    "${IFS}touch${IFS}MARK",
    "\\",
    "*",
    "-o",
    "",
    " ",
    "#",
    "\u2028touch MARK",
]
hostile = st.builds(
    lambda a, b, c: a + b + c,
    st.sampled_from(["green0", "", "-i", "br0 "]),
    st.sampled_from(BREAKERS),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
)

IPTABLES_STUB = r"""#!/bin/sh
# Logs each call (a header with the argument count, then one argument a line) and keeps
# the rules of each table in $STUB/table.NAME, enough for -A/-I/-D/-S/-F/-N/-X.
{ echo "@@@ $#"; for a in "$@"; do printf '%s\n' "$a"; done; } >> "$STUB/iptables.log"
t=filter
[ "$1" = -w ] && shift
[ "$1" = -t ] && { t=$2; shift 2; }
s="$STUB/table.$t"
touch "$s"
op=$1
shift
case "$op" in
-N) grep -qxF -- "-N $1" "$s" && exit 1; echo "-N $1" >> "$s" ;;
-A|-I) echo "-A $*" >> "$s" ;;
-D) grep -qxF -- "-A $*" "$s" || exit 1
    grep -vxF -- "-A $*" "$s" > "$s.new"; mv "$s.new" "$s" ;;
-S) grep -- "^-[AN] $1\( \|\$\)" "$s" ;;
-F) grep -v -- "^-A $1 " "$s" > "$s.new"; mv "$s.new" "$s" ;;
-X) grep -qxF -- "-N $1" "$s" || exit 1
    grep -vxF -- "-N $1" "$s" > "$s.new"; mv "$s.new" "$s" ;;
esac
exit 0
"""
STUBS = {
    "iptables": IPTABLES_STUB,
    "cat": "#!/bin/sh\necho red0\n",
    "chown": "#!/bin/sh\nexit 0\n",
    # `ip route show table 200` shows what the static-routes stand-in put there.
    "ip": '#!/bin/sh\n[ "$1 $2" = "route show" ] && /bin/cat "$STUB/table200" 2>/dev/null\n'
    "exit 0\n",
    # A failure to inject: `mv` refuses when its target or source is named in $STUB/mv-fails.
    "mv": '#!/bin/sh\nif [ -f "$STUB/mv-fails" ]; then while read -r p; do\n'
    '\tfor a in "$@"; do case "$a" in $p) exit 1 ;; esac; done\n'
    'done < "$STUB/mv-fails"; fi\nexec /bin/mv "$@"\n',
}
STATIC_ROUTES_STUB = r"""#!/bin/sh
# Routes from the routing file into $STUB/table200; fails while the routing file holds
# the text in $STUB/routes-fail.
if [ -f "$STUB/routes-fail" ] && grep -qF "$(/bin/cat "$STUB/routes-fail")" "$ROUTING"; then
	echo "static-routes: RTNETLINK answers: Invalid argument"
	exit 2
fi
: > "$STUB/table200"
while IFS=, read -r status network gateway remark; do
	[ "$status" = on ] && echo "$network via $gateway dev green0 proto static" >> "$STUB/table200"
done < "$ROUTING"
exit 0
"""


class Sandbox:
    """A directory standing in for the IPFire host's files, with stub commands first in
    PATH; the block and the apply script run there without touching this machine."""

    def __init__(self, path: Path):
        self.path = path
        self.stub = path / "bin"
        self.stub.mkdir(parents=True)
        for name, text in STUBS.items():
            (self.stub / name).write_text(text)
            (self.stub / name).chmod(0o755)
        (path / "sysconfig").mkdir()
        (path / "main").mkdir()
        self.firewall_local = path / "sysconfig" / "firewall.local"
        self.routing = path / "main" / "routing"
        self.static_routes = path / "static-routes"
        self.static_routes.write_text(STATIC_ROUTES_STUB)
        self.static_routes.chmod(0o755)

    @contextlib.contextmanager
    def active(self):
        """ipfire's paths and commands pointed into the sandbox."""
        with contextlib.ExitStack() as stack:
            for module, name, value in (
                (ipfire, "IPTABLES", "iptables -w"),
                (ipfire, "FIREWALL_LOCAL", str(self.firewall_local)),
                (ipfire, "ROUTING", str(self.routing)),
                (ipfire, "STATIC_ROUTES", str(self.static_routes)),
                (ipfire_host, "HOST_PATH", f"{self.stub}:/usr/bin:/bin"),
            ):
                stack.enter_context(mock.patch.object(module, name, value))
            yield self

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.stub}:/usr/bin:/bin",
            "STUB": str(self.stub),
            "ROUTING": str(self.routing),
        }

    def sh(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", *argv], input=stdin, capture_output=True, text=True, env=self.env, timeout=30
        )

    def iptables_calls(self) -> list[list[str]]:
        log = self.stub / "iptables.log"
        lines = log.read_text().split("\n") if log.exists() else []
        calls, i = [], 0
        while i < len(lines) and lines[i].startswith("@@@ "):
            n = int(lines[i][4:])
            calls.append(lines[i + 1 : i + 1 + n])
            i += 1 + n
        return calls

    def tables(self) -> dict[str, str]:
        """The rules of each table and table 200's routes (an empty table counts as none)."""
        return {p.name: p.read_text() for p in sorted(self.stub.glob("table*")) if p.stat().st_size}

    def files(self) -> dict[str, bytes | None]:
        return {
            p.name: p.read_bytes() if p.exists() else None
            for p in (self.firewall_local, self.routing)
        }


def interface_args(call: list[str]) -> list[tuple[str, str]]:
    """(-i or -o, value) pairs of one iptables call, read left to right as iptables does."""
    pairs, i = [], 0
    while i < len(call):
        if call[i] in ("-i", "-o") and i + 1 < len(call):
            pairs.append((call[i], call[i + 1]))
            i += 2
        else:
            i += 1
    return pairs


@pytest.fixture(scope="module")
def routed_site(tmp_path_factory) -> Site:
    return routed(tmp_path_factory.mktemp("site"))


def run_block(site: Site, where: Path) -> Sandbox:
    """firewall.local (stock + this site's block) checked by sh -n, then run with `start`."""
    box = Sandbox(where)
    with box.active():
        text = ipfire.merge_firewall_local(ipfire.stock_firewall_local(), site)
    box.firewall_local.write_text(text)
    assert box.sh("-n", str(box.firewall_local)).returncode == 0, text
    r = box.sh(str(box.firewall_local), "start")
    assert r.returncode == 0, r.stderr
    return box


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=hostile)
def test_hostile_bridge_is_one_quoted_word_or_refused(routed_site, template):
    with tempfile.TemporaryDirectory() as d:
        marker = Path(d) / "pwned"
        bridge = template.replace("MARK", str(marker))
        site = dataclasses.replace(
            routed_site, host=dataclasses.replace(routed_site.host, bridge=bridge)
        )
        if printable(bridge, keep_newlines=False) != bridge:
            with pytest.raises(InputError) as e:
                ipfire.render_block(site)
            assert e.value.key == "host.bridge"
            return
        box = run_block(site, Path(d) / "host")
        calls = box.iptables_calls()
        assert not marker.exists(), f"{bridge!r} ran a command"
        pairs = [p for call in calls for p in interface_args(call)]
        assert [v for flag, v in pairs if flag == "-o"] == [bridge] * 3, pairs
        assert {v for flag, v in pairs if flag == "-i"} == {"red0", bridge}, pairs
        # The same calls as with a plain bridge: nothing added, nothing split.
        plain = run_block(routed_site, Path(d) / "plain").iptables_calls()
        assert len(calls) == len(plain)
        assert [len(c) for c in calls] == [len(c) for c in plain]


@settings(max_examples=200, deadline=None)
@given(name=st.one_of(hostile, st.text(max_size=70)))
def test_hostile_name_cannot_break_its_markers_or_chains(routed_site, name):
    site = dataclasses.replace(
        routed_site, appliance=dataclasses.replace(routed_site.appliance, name=name)
    )
    c = ipfire.chains_for(name)
    assert all(re.fullmatch(r"[A-Z0-9_]{1,28}", chain) for _, chain in c.all)
    assert re.fullmatch(r"[a-z0-9_]+", c.function)
    try:
        merged = ipfire.merge_firewall_local(ADMIN_FIREWALL_LOCAL, site)
    except InputError as e:
        assert e.key == "appliance.name"
        assert not ipfire.MARKER_NAME_RE.fullmatch(name)
        return
    assert [b.name for b in ipfire.find_blocks(merged)] == [name]
    assert ipfire.remove_firewall_block(merged, name) == ADMIN_FIREWALL_LOCAL


def test_the_example_of_the_issue_is_one_word(routed_site, tmp_path):
    marker = tmp_path / "x"
    bridge = f"green0 -j ACCEPT; touch {marker}; #"
    site = dataclasses.replace(
        routed_site, host=dataclasses.replace(routed_site.host, bridge=bridge)
    )
    block = ipfire.render_block(site)
    assert f"-o '{bridge}' -p udp" in block
    box = run_block(site, tmp_path / "host")
    assert not marker.exists()
    accepts = [c for c in box.iptables_calls() if c[-2:] == ["-j", "ACCEPT"]]
    assert accepts and all(c[c.index("-o") + 1] == bridge for c in accepts)


def test_hostile_values_in_comments_stay_on_their_line(routed_site, tmp_path):
    marker = tmp_path / "x"
    site = dataclasses.replace(
        routed_site,
        wireguard=dataclasses.replace(routed_site.wireguard, mode=f"routed\ntouch {marker}"),
    )
    block = ipfire.render_block(site)
    assert "masquerade" not in block and "routed\\ntouch" in block
    assert not any(line.startswith("touch") for line in block.splitlines())
    meta = ipfire.find_blocks(ipfire.merge_firewall_local("", site))[0].meta
    assert set(meta) == {"address", "port", "mode"}
    run_block(site, tmp_path / "host")
    assert not marker.exists()


@pytest.mark.parametrize("peer_name", ["a,b", "a\nb", "a\rb"])
def test_routing_remark_holds_no_comma_or_newline(routed_site, peer_name):
    peers = list(routed_site.peers)
    peers[-1] = dataclasses.replace(peers[-1], name=peer_name)
    site = dataclasses.replace(routed_site, peers=tuple(peers))
    with pytest.raises(InputError) as e:
        ipfire.merge_routing(ADMIN_ROUTING, site)
    assert "no ','" in e.value.message


def test_lines_are_split_where_sh_splits_them(routed_site):
    """\\x0c, \\x85 or \\u2028 inside an admin's comment are not line ends: kept as they are,
    and the rest of that comment does not become a line of code."""
    odd = "#!/bin/sh\n# note\x0cx\x85y\u2028rm -rf /tmp/nothing\r\n" + ADMIN_FIREWALL_LOCAL[10:]
    merged = ipfire.merge_firewall_local(odd, routed_site)
    assert "# note\x0cx\x85y\u2028rm -rf /tmp/nothing\r\n" in merged
    assert ipfire.remove_firewall_block(merged, routed_site.name) == odd
    routing = "on,10.10.0.0/16,192.168.77.2,office\u2028box\n"
    assert ipfire.merge_routing(routing, routed_site)[0].startswith(routing)


# --- host files that are not UTF-8 ----------------------------------------------------------

LATIN1_FIREWALL_LOCAL = ADMIN_FIREWALL_LOCAL.encode().replace(
    b"# NAS from outside", b"# NAS bei M\xfcller, \xa7 3"
)


def probe_facts(firewall_local: bytes | None, routing: bytes | None) -> ipfire_checks.Facts:
    """good_facts, with the two files as the probe reports real bytes."""

    def line(key: str, data: bytes | None) -> str:
        return f"{key}=" + ("-" if data is None else "b64:" + base64.b64encode(data).decode())

    parsed = ipfire_checks.parse_probe(
        line("firewall_local", firewall_local) + "\n" + line("routing", routing) + "\n"
    )
    facts = good_facts()
    facts.files.update(parsed.files)
    return facts


def test_probe_keeps_bytes_that_are_not_utf8(routed_site):
    facts = probe_facts(LATIN1_FIREWALL_LOCAL, b"")
    text = facts.files["firewall_local"]
    assert ipfire.host_bytes(text) == LATIN1_FIREWALL_LOCAL
    assert ipfire_host._sha(text) == hashlib.sha256(LATIN1_FIREWALL_LOCAL).hexdigest()
    plan = ipfire_checks.current_files(routed_site, facts, removing=False)
    merged = ipfire.host_bytes(plan.firewall_local)
    assert b"# NAS bei M\xfcller, \xa7 3, port 8443\n" in merged
    script = ipfire_host.apply_script(routed_site, facts, plan, removing=False)
    assert hashlib.sha256(LATIN1_FIREWALL_LOCAL).hexdigest() in script
    assert base64.b64encode(merged).decode() in script


# --- apply in a sandbox: rollback, bytes, no fixed paths in /tmp ---------------------------


@pytest.fixture
def box(tmp_path) -> Iterator[Sandbox]:
    with Sandbox(tmp_path / "host").active() as b:
        yield b


def install_host(box: Sandbox, firewall_local: bytes | None, routing: bytes | None) -> None:
    """The host's files as given, and its rules as IPFire's reload leaves them."""
    for path, data in ((box.firewall_local, firewall_local), (box.routing, routing)):
        if data is not None:
            path.write_bytes(data)
    if firewall_local is not None:
        box.firewall_local.chmod(0o755)
        assert box.sh(str(box.firewall_local), "reload").returncode == 0
    assert box.sh(str(box.static_routes), "start").returncode == 0


def apply_in(box: Sandbox, site: Site, removing: bool = False) -> subprocess.CompletedProcess:
    """Probe the sandbox, plan, and run the apply script as the host would."""
    facts = probe_facts(
        *(p.read_bytes() if p.exists() else None for p in (box.firewall_local, box.routing))
    )
    plan = ipfire_checks.current_files(site, facts, removing)
    return box.sh("-s", stdin=ipfire_host.apply_script(site, facts, plan, removing))


STUB_FIREWALL_LOCAL = (
    ipfire.stock_firewall_local()
    .replace(
        "## add your 'start' rules here",
        "## add your 'start' rules here\n"
        "        iptables -A CUSTOMINPUT -p tcp --dport 22 -j ACCEPT",
    )
    .replace(
        "## add your 'stop' rules here",
        "## add your 'stop' rules here\n        iptables -F CUSTOMINPUT",
    )
)


def test_apply_installs_and_reads_back(box, routed_site):
    install_host(box, STUB_FIREWALL_LOCAL.encode(), b"")
    r = apply_in(box, routed_site)
    assert r.returncode == 0, r.stdout + r.stderr
    values, backups = ipfire_host.parse_apply(r.stdout)
    assert values["jump_forward"] == values["jump_nat"] == values["jump_raw"] == "1"
    assert values["fw_changed"] == values["rt_changed"] == "1"
    assert sorted(Path(b).name for b in backups)[0].startswith("firewall.local.bak-wg-appliance-")
    assert "10.77.0.0/24 via" in values["table200"]
    assert box.sh(str(box.firewall_local), "stop").returncode == 0
    leftover = sorted(p.name for p in box.firewall_local.parent.iterdir())
    assert len(leftover) == 2, "no staged file is left next to the installed one"


@pytest.mark.parametrize("before", ["stock", "absent", "applied"])
@pytest.mark.parametrize("failure", ["routes", "install-routing", "read-back"])
def test_a_failed_step_restores_the_files_and_rules(box, routed_site, tmp_path, before, failure):
    fw = {"stock": STUB_FIREWALL_LOCAL.encode(), "absent": None, "applied": None}[before]
    if before == "applied":
        install_host(box, STUB_FIREWALL_LOCAL.encode(), b"")
        assert apply_in(box, routed_site).returncode == 0
        for b in box.firewall_local.parent.glob("*.bak-*"):
            b.unlink()
        for b in box.routing.parent.glob("*.bak-*"):
            b.unlink()
    else:
        install_host(box, fw, None if before == "absent" else b"on,10.10.0.0/16,192.168.77.2,x\n")
    files, tables = box.files(), box.tables()
    changed = dataclasses.replace(
        routed_site,
        wireguard=dataclasses.replace(routed_site.wireguard, listen_port=51999),
        lan=dataclasses.replace(routed_site.lan, addresses=(IPv4Interface("192.168.77.60/24"),)),
    )
    if failure == "routes":
        (box.stub / "routes-fail").write_text("192.168.77.60")
    elif failure == "install-routing":
        (box.stub / "mv-fails").write_text(str(box.routing) + "\n")
    else:
        (box.stub / "ip").write_text("#!/bin/sh\nexit 0\n")  # table 200 stays empty
    r = apply_in(box, changed)
    assert r.returncode == ipfire_host.ROLLED_BACK, r.stdout + r.stderr
    values, backups = ipfire_host.parse_apply(r.stdout)
    assert values["restored"] == "1", values
    assert box.files() == files
    assert box.tables() == tables
    assert backups == []
    for name, path in (("firewall.local", box.firewall_local), ("routing", box.routing)):
        left = sorted(p.name for p in path.parent.iterdir())
        assert left == ([] if files[name] is None else [name]), "no backup, no staged file"
    err = ipfire_host._rolled_back(values)
    assert "restored the previous files and rules" in str(err)


def test_a_failed_restore_says_what_is_left_where(box, routed_site):
    install_host(box, STUB_FIREWALL_LOCAL.encode(), b"")
    (box.stub / "routes-fail").write_text("wg-appliance")
    (box.stub / "mv-fails").write_text("*firewall.local.bak-wg-appliance-*\n")
    r = apply_in(box, routed_site)
    assert r.returncode == ipfire_host.ROLLED_BACK, r.stdout + r.stderr
    values, _ = ipfire_host.parse_apply(r.stdout)
    assert values["restored"] == "0"
    err = ipfire_host._rolled_back(values)
    backup = next(box.firewall_local.parent.glob("firewall.local.bak-wg-appliance-*"))
    assert f"{box.firewall_local} is the new one, the old is {backup}" in str(err)
    assert "static-routes start exited 2" in str(err) and "restoring failed too" in str(err)
    assert backup.read_bytes() == STUB_FIREWALL_LOCAL.encode()


def test_staging_failure_changes_nothing(box, routed_site):
    install_host(box, STUB_FIREWALL_LOCAL.encode(), b"")
    files, tables = box.files(), box.tables()
    box.routing.parent.chmod(0o500)
    (box.stub / "mktemp").write_text(
        f'#!/bin/sh\ncase "$1" in {box.routing}*) exit 1 ;; esac\nexec /usr/bin/mktemp "$@"\n'
    )
    (box.stub / "mktemp").chmod(0o755)
    r = apply_in(box, routed_site)
    box.routing.parent.chmod(0o755)
    assert r.returncode == ipfire_host.NOT_STAGED, r.stdout + r.stderr
    assert box.files() == files and box.tables() == tables
    assert sorted(p.name for p in box.firewall_local.parent.iterdir()) == ["firewall.local"]


def test_a_file_changed_since_the_probe_is_not_touched(box, routed_site):
    install_host(box, STUB_FIREWALL_LOCAL.encode(), b"")
    facts = probe_facts(box.firewall_local.read_bytes(), box.routing.read_bytes())
    plan = ipfire_checks.current_files(routed_site, facts, False)
    box.routing.write_bytes(b"on,10.1.0.0/16,192.168.77.2,new\n")
    r = box.sh("-s", stdin=ipfire_host.apply_script(routed_site, facts, plan, False))
    assert r.returncode == ipfire_host.CHANGED
    assert box.routing.read_bytes() == b"on,10.1.0.0/16,192.168.77.2,new\n"


def test_non_utf8_firewall_local_applies_byte_exact(box, routed_site):
    original = STUB_FIREWALL_LOCAL.encode().replace(b"# Used for", b"# M\xfcller: used for")
    install_host(box, original, b"")
    r = apply_in(box, routed_site)
    assert r.returncode == 0, r.stdout + r.stderr
    data = box.firewall_local.read_bytes()
    assert data.startswith(b"#!/bin/sh\n# M\xfcller: used for private firewall rules\n")
    assert ipfire.remove_firewall_block(ipfire.host_text(data), routed_site.name) == (
        ipfire.host_text(original)
    )
    r = apply_in(box, routed_site)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ipfire_host.parse_apply(r.stdout)[0]["fw_changed"] == "0"


def test_host_scripts_write_no_fixed_path_in_tmp(routed_site):
    facts = good_facts()
    for removing in (False, True):
        script = ipfire_host.apply_script(
            routed_site, facts, ipfire.host_files(routed_site), removing
        )
        assert "/tmp" not in script
    assert "/tmp" not in ipfire_host.probe_script(routed_site)


# --- host text on the terminal ----------------------------------------------------------


def test_host_values_reach_the_terminal_escaped(routed_site, capsys):
    from builder.cli import _show_ipfire
    from builder.ipfire import IpfireRun
    from builder.remote.ipfire import Applied

    facts = good_facts()
    facts.files["release"] = "IPFire 2.29\x1b]0;owned\x07\x1b[2J"
    facts.files["red_iface"] = ipfire.host_text(b"red0\xff\x1b[31m")
    checks = ipfire_checks.judge(routed_site, facts)
    applied = {
        "firewall_local_changed": True,
        "routing_changed": False,
        "backups": ["/etc/sysconfig/firewall.local.bak\x1b[1A"],
        "rules": [],
        "routes": [],
        "reload_output": "wg-appliance: no port forward\n\x1b[2Kdone\r",
    }
    args = mock.Mock(json=False, remove=False, site="site.toml")
    run = IpfireRun("wg-gw", "routed", "root@ipfire:222", checks, applied=Applied(**applied))
    _show_ipfire(args, run)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "IPFire 2.29\\x1b]0;owned\\x07\\x1b[2J" in out
    assert "red0\\xff\\x1b[31m" in out
    assert "reload: wg-appliance: no port forward\nreload: \\x1b[2Kdone\\x0d\n" in out


def test_host_output_in_errors_is_escaped():
    err = ipfire_host._rolled_back(
        {"failed": "reload exited 1", "reload_out": "bad\x1b[2J\nend\x9b", "restored": "1"}
    )
    assert "\x1b" not in str(err) and "\x9b" not in str(err)
    assert "bad\\x1b[2J | end\\x9b" in str(err)


def test_out_writes_a_non_utf8_host_file_byte_exact(routed_site, tmp_path, capsys):
    from builder.cli import _show_ipfire
    from builder.ipfire import IpfireRun, write_out

    facts = probe_facts(LATIN1_FIREWALL_LOCAL, b"on,10.10.0.0/16,192.168.77.2,B\xfcro\n")
    plan = ipfire_checks.current_files(routed_site, facts, removing=False)
    args = mock.Mock(out=str(tmp_path / "out"), json=True, remove=False, ssh="root@ipfire")
    out = write_out(routed_site, plan, tmp_path / "out", None)
    run = IpfireRun(routed_site.name, "routed", out=out, source="the host")
    assert _show_ipfire(args, run) == 0
    assert (tmp_path / "out/firewall.local").read_bytes() == ipfire.host_bytes(plan.firewall_local)
    assert b"# NAS bei M\xfcller" in (tmp_path / "out/firewall.local").read_bytes()
    assert (
        (tmp_path / "out/routing")
        .read_bytes()
        .startswith(b"on,10.10.0.0/16,192.168.77.2,B\xfcro\n")
    )
    assert json.loads(capsys.readouterr().out)["out"]
