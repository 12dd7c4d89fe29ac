"""IPFire host files: the firewall.local block and static routes, as pure text functions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder import ipfire, ipfire_host
from builder.errors import HostError, InputError
from builder.site import Site, load_site
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
    p = ipfire.plan(site)
    assert p.firewall_local == ipfire.merge_firewall_local(ipfire.stock_firewall_local(), site)
    assert p.routing.count("\n") == 2
    gone = ipfire.plan(site, p.firewall_local, p.routing, remove=True)
    assert gone.firewall_local == ipfire.stock_firewall_local()
    assert gone.routing == ""


# --- preflight judgement and the host scripts (no SSH) ------------------------------------


def good_facts(**values: str) -> ipfire_host.Facts:
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
    return ipfire_host.Facts(v, files)


def failed(checks) -> dict[str, str]:
    return {c.name: c.fix for c in checks if not c.ok}


def test_judge_all_ok(tmp_path):
    checks = ipfire_host.judge(routed(tmp_path), good_facts())
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
    checks = ipfire_host.judge(routed(tmp_path), good_facts(**change))
    assert list(failed(checks)) == [name]
    assert fix in failed(checks)[name]


def test_judge_file_cases(tmp_path):
    site = routed(tmp_path)
    f = good_facts()
    f.files["wg_settings"] = "ENABLED=on\nPORT=51820\n"
    assert (
        "another wireguard.endpoint port" in failed(ipfire_host.judge(site, f))["IPFire WireGuard"]
    )
    f = good_facts()
    f.files["wg_settings"] = "ENABLED=on\nPORT=51821\n"
    assert failed(ipfire_host.judge(site, f)) == {}
    f = good_facts()
    f.files["wg_peers"] = "3,on,net,branch-office,pub,priv,51820,1.2.3.4,51820,10.0.0.0/24\n"
    assert "IPFire WireGuard" in failed(ipfire_host.judge(site, f))
    f = good_facts()
    f.files["red_iface"] = None
    assert list(failed(ipfire_host.judge(site, f))) == ["RED interface"]
    f = good_facts()
    f.files["release"] = "Debian GNU/Linux 12\n"
    assert list(failed(ipfire_host.judge(site, f))) == ["IPFire version"]
    f = good_facts()
    f.files["routing"] = "on,10.77.0.0/24,192.168.77.9,someone else\n"
    assert "Network > Routing" in failed(ipfire_host.judge(site, f))["host files"]
    f = good_facts(neigh=f"192.168.77.50 dev green0 lladdr {site.lan.mac} REACHABLE")
    assert failed(ipfire_host.judge(site, f)) == {}, "our own appliance may hold the address"


def test_judge_for_removal_only_needs_root_and_files(tmp_path):
    site = routed(tmp_path)
    f = good_facts(bridge_is="no", kvm="no")
    names = [c.name for c in ipfire_host.judge(site, f, removing=True)]
    assert names == ["root login", "host files"]


def test_probe_output_round_trip():
    text = "uid=0\nfirewall_local=b64:IyEvYmluL3NoCg==\nrouting=-\nneigh=a=b c\n"
    facts = ipfire_host.parse_probe(text)
    assert facts.files == {"firewall_local": "#!/bin/sh\n", "routing": None}
    assert facts.get("neigh") == "a=b c" and facts.get("uid") == "0"


def test_probe_and_apply_scripts_are_posix_sh(tmp_path):
    site = routed(tmp_path)
    facts = good_facts()
    scripts = {
        "probe": ipfire_host.probe_script(site),
        "apply": ipfire_host.apply_script(site, facts, ipfire.plan(site), removing=False),
        "remove": ipfire_host.apply_script(site, facts, ipfire.plan(site), removing=True),
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
    got = ipfire_host.parse_login(value)
    assert (got.user, got.host, got.port) == login


@pytest.mark.parametrize("value", ["root@", "root@host:99999", "a b@host", "root@host:port"])
def test_parse_login_rejects(value):
    with pytest.raises(InputError) as e:
        ipfire_host.parse_login(value)
    assert e.value.key == "--ssh"


# --- the command line (the wired `wg-appliance ipfire`, or its stand-in until then) -------


def ipfire_cli(*args: str) -> subprocess.CompletedProcess:
    from tests.lab.ipfire_host import ipfire_cli_argv

    return subprocess.run(
        [*ipfire_cli_argv(), *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_cli_out_without_a_host_uses_the_stock_files(tmp_path):
    site = routed(tmp_path)
    out = tmp_path / "out"
    r = ipfire_cli("--site", str(site.path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "firewall.local").read_text() == ipfire.plan(site).firewall_local
    assert (out / "firewall.local").stat().st_mode & 0o777 == 0o755
    assert (out / "routing").read_text() == ipfire.plan(site).routing
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


def test_cli_unreachable_host_is_exit_3(tmp_path):
    site = routed(tmp_path)
    known = tmp_path / "known_hosts"
    known.write_text("")
    r = ipfire_cli(
        "--site", str(site.path), "--ssh", "root@127.0.0.1:9", "--known-hosts", str(known)
    )
    assert r.returncode == 3, r.stderr
    assert "cannot connect" in r.stderr and r.stderr.count("\n") == 1
