"""The handover's rules without a VM: slots and roles, link states, how a killed run is put
back, what the new appliance is told at the takeover. The lab tests in test_e2e.py do it
with real appliances and clients."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import libvirt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.checks.appliance import Report, before_takeover
from builder.checks.result import Check
from builder.errors import HostError
from builder.guest import agent
from builder.handover import converge, takeover_peers
from builder.model.site import load_site
from builder.progress import Progress
from builder.remote import slots
from builder.remote.ssh import Result
from builder.render.libvirt_xml import (
    META_ROLE,
    META_SITE,
    ROLE_ACTIVE,
    ROLE_PREVIOUS,
    ROLE_STAGED,
    DomainSpec,
    domain_xml,
    has_agent_channel,
    interface_xml,
    link_is_up,
)
from tests.conftest import EXAMPLE

MAC = "52:54:00:12:34:56"


def _spec(name: str, meta: dict[str, str], link_up: bool = True) -> DomainSpec:
    return DomainSpec(
        name=name,
        memory_mib=512,
        vcpus=1,
        virt_type="qemu",
        disk_path=f"/pool/{name}-disk.qcow2",
        seed_path=None,
        bridge="green0",
        mac=MAC,
        serial_log_path=f"/pool/{name}-serial.log",
        metadata=meta,
        link_up=link_up,
    )


class FakeDomain:
    """What the handover asks of a libvirt domain, kept in memory; XML from domain_xml."""

    def __init__(self, name: str, role: str | None, active: bool, link: bool, site="wg-gw"):
        self._name, self.active, self.autostart = name, active, role == ROLE_ACTIVE
        self.meta = {META_SITE: site, **({META_ROLE: role} if role else {})}
        self.link_live, self.link_saved = link, link
        self.log: list[str] = []

    def name(self) -> str:
        return self._name

    def connect(self) -> FakeConn:
        return self.conn

    def isActive(self) -> int:
        return int(self.active)

    def XMLDesc(self, flags: int = 0) -> str:
        saved = bool(flags & libvirt.VIR_DOMAIN_XML_INACTIVE) or not self.active
        return domain_xml(
            _spec(self._name, self.meta, self.link_saved if saved else self.link_live)
        )

    def updateDeviceFlags(self, xml: str, flags: int) -> None:
        up = ET.fromstring(xml).find("link").get("state") == "up"
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            assert self.active, "a live update of a stopped domain"
            self.link_live = up
            self.log.append(f"live {'up' if up else 'down'}")
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            self.link_saved = up

    def setMetadata(self, _type, xml, _prefix, _uri, _flags) -> None:
        self.meta = {child.tag: child.text or "" for child in ET.fromstring(xml)}

    def setAutostart(self, on: int) -> None:
        self.autostart = bool(on)

    def create(self) -> None:
        self.active, self.link_live = True, self.link_saved
        self.log.append("start")

    def shutdown(self) -> None:
        self.destroy()

    def destroy(self) -> None:
        self.active = False
        self.log.append("stop")


class FakeConn:
    def __init__(self, *doms: FakeDomain):
        self.doms = {d.name(): d for d in doms}
        for d in doms:
            d.conn = self

    def lookupByName(self, name: str) -> FakeDomain:
        if name in self.doms:
            return self.doms[name]
        return libvirt.open("test:///default").lookupByName(name)  # raises "no domain"


def _up(conn: FakeConn) -> list[str]:
    return sorted(n for n, d in conn.doms.items() if d.active and d.link_live)


def test_three_slots_and_the_first_free_one() -> None:
    assert slots.slot_names("gw") == ("gw", "gw_2", "gw_3")
    assert slots.free_slot("gw", {"gw"}) == "gw_2"
    assert slots.free_slot("gw", {"gw_2", "gw"}) == "gw_3"
    assert slots.free_slot("gw", {"gw_2"}) == "gw"


def test_roles_come_from_metadata_and_a_stranger_is_refused() -> None:
    conn = FakeConn(
        FakeDomain("wg-gw", None, True, True), FakeDomain("wg-gw_2", ROLE_PREVIOUS, False, False)
    )
    found = slots.site_domains(conn, "wg-gw")
    assert {r: d.name() for r, d in found.items()} == {"active": "wg-gw", "previous": "wg-gw_2"}
    other = FakeConn(FakeDomain("wg-gw_3", ROLE_ACTIVE, True, True, site="elsewhere"))
    with pytest.raises(HostError, match="not this site's appliance"):
        slots.site_domains(other, "wg-gw")


def test_set_link_changes_the_guest_and_the_saved_definition() -> None:
    dom = FakeDomain("wg-gw", ROLE_ACTIVE, True, True)
    slots.set_link(dom, False)
    assert (dom.link_live, dom.link_saved) == (False, False)
    assert not slots.link_up(dom)
    stopped = FakeDomain("wg-gw_2", ROLE_PREVIOUS, False, False)
    slots.set_link(stopped, True)  # no live update of a stopped domain
    assert stopped.link_saved and not slots.link_up(stopped)


def test_set_role_autostarts_only_the_active_one() -> None:
    dom = FakeDomain("wg-gw_2", ROLE_STAGED, True, False)
    slots.set_role(dom, ROLE_ACTIVE)
    assert dom.autostart and dom.meta[META_ROLE] == ROLE_ACTIVE
    slots.set_role(dom, ROLE_PREVIOUS)
    assert not dom.autostart


def test_a_run_killed_in_the_takeover_is_undone_old_link_first() -> None:
    """Killed after the switch of links, before the roles: the new one steps back (its link
    down before the old one's comes up), so the next run can do the takeover again."""
    old = FakeDomain("wg-gw", ROLE_ACTIVE, True, False)
    new = FakeDomain("wg-gw_2", ROLE_STAGED, True, True)
    conn = FakeConn(old, new)
    doms = converge(conn, _site(), None, Progress(quiet=True))
    assert _up(conn) == ["wg-gw"]
    assert new.log == ["live down"] and old.log == ["live up"]
    assert doms[ROLE_STAGED] is new and new.active, "the staged one is kept for the retry"


def test_a_rollback_killed_in_the_takeover_puts_the_previous_one_back_first() -> None:
    old = FakeDomain("wg-gw_2", ROLE_ACTIVE, True, False)
    back = FakeDomain("wg-gw", ROLE_PREVIOUS, True, True)
    conn = FakeConn(old, back)
    converge(conn, _site(), None, Progress(quiet=True))
    assert _up(conn) == ["wg-gw_2"] and not back.active
    assert back.log[0] == "live down" and old.log == ["live up"]


def test_both_links_down_brings_the_active_one_back() -> None:
    conn = FakeConn(
        FakeDomain("wg-gw", ROLE_ACTIVE, True, False),
        FakeDomain("wg-gw_3", ROLE_STAGED, True, False),
    )
    converge(conn, _site(), None, Progress(quiet=True))
    assert _up(conn) == ["wg-gw"]


def test_a_stopped_active_one_is_started_with_its_link_up() -> None:
    conn = FakeConn(FakeDomain("wg-gw", ROLE_ACTIVE, False, False))
    converge(conn, _site(), None, Progress(quiet=True))
    assert _up(conn) == ["wg-gw"]


def test_killed_between_the_role_writes_the_link_says_who_serves() -> None:
    old = FakeDomain("wg-gw", ROLE_ACTIVE, False, False)
    new = FakeDomain("wg-gw_2", ROLE_ACTIVE, True, True)
    conn = FakeConn(old, new)
    doms = converge(conn, _site(), None, Progress(quiet=True))
    assert doms[ROLE_ACTIVE] is new and doms[ROLE_PREVIOUS] is old
    assert old.meta[META_ROLE] == ROLE_PREVIOUS and not old.autostart
    assert _up(conn) == ["wg-gw_2"]


def test_no_step_of_converge_ever_has_two_links_up() -> None:
    for old_link in (True, False):
        for new_link in (True, False):
            old = FakeDomain("wg-gw", ROLE_ACTIVE, True, old_link)
            new = FakeDomain("wg-gw_2", ROLE_STAGED, True, new_link)
            conn = FakeConn(old, new)
            if old_link and new_link:
                continue  # never made by the tool
            converge(conn, _site(), None, Progress(quiet=True))
            assert _up(conn) == ["wg-gw"], (old_link, new_link)


def _site():
    return load_site(EXAMPLE)


def test_the_domain_has_the_agent_channel_and_a_link_state() -> None:
    xml = domain_xml(_spec("wg-gw", {META_SITE: "wg-gw"}, link_up=False))
    assert has_agent_channel(xml) and not link_is_up(xml)
    nic = interface_xml(xml, True)
    assert '<mac address="52:54:00:12:34:56" />' in nic and 'state="up"' in nic
    assert link_is_up(domain_xml(_spec("wg-gw", {META_SITE: "wg-gw"})))


def test_endpoints_for_the_takeover_are_address_and_port_only() -> None:
    status = {
        "wg": {
            "peers": [
                {"public_key": "A=", "endpoint": "198.51.100.10:40000"},
                {"public_key": "B=", "endpoint": "[2001:db8::1]:51820"},
                {"public_key": "C=", "endpoint": None},
                {"public_key": "D=", "endpoint": "host; reboot:1"},
            ]
        }
    }
    assert takeover_peers(status) == [["A=", "198.51.100.10:40000"], ["B=", "[2001:db8::1]:51820"]]


@given(st.text(max_size=60))
def test_no_other_endpoint_text_is_passed_on(text: str) -> None:
    got = takeover_peers({"wg": {"peers": [{"public_key": "K=", "endpoint": text}]}})
    if got:
        host, _, port = text.rpartition(":")
        assert port.isdigit() and (host.count(".") == 3 or host.startswith("["))
        assert not any(c in text for c in " ;$`'\"\n\\")


def test_before_takeover_ignores_only_what_needs_the_link() -> None:
    report = Report(
        "wg-gw",
        (
            Check("ssh", True, ""),
            Check("gateway", False, "not probed"),
            Check("handshake laptop", False, "never"),
            Check("wg0", False, "wg0 is not up"),
            Check("peers", True, ""),
        ),
    )
    assert [c.name for c in before_takeover(report)] == ["wg0"]


SHOWCONF = """[Interface]
ListenPort = 51820
PrivateKey = cHJpdmF0ZQ==

[Peer]
PublicKey = A=
PresharedKey = cHNr
AllowedIPs = 10.77.0.2/32
Endpoint = 9.9.9.9:1
PersistentKeepalive = 25

[Peer]
PublicKey = B=
AllowedIPs = 10.77.0.3/32
"""


class GuestSystem(agent.System):
    """The guest's commands with stdin recorded, files real (in tmp_path); `fail` makes
    the command whose argv starts so exit non-zero."""

    def __init__(self, events: list, fail: tuple = ()):
        self.events, self.fail = events, fail

    def run(self, *argv, input=None):
        self.events.append(("run", *argv, input))
        if self.fail and argv[: len(self.fail)] == self.fail:
            raise agent.Failed(f"{' '.join(argv[:3])}: no")
        return SHOWCONF if argv[:2] == ("wg", "showconf") else ""


def _guest(monkeypatch, tmp_path, carrier_after: int, keepalives: str = "A=\toff\nB=\t25\n"):
    """The agent's takeover with its commands, carrier, clock and files faked; the events in
    the order they came."""
    events: list[tuple] = []
    polls = iter([False] * carrier_after + [True] * 1000)
    now = [0.0]

    def sh(*argv):
        events.append(("sh", *argv))
        if argv[:4] == ("wg", "show", "wg0", "persistent-keepalive"):
            return {"rc": 0, "out": keepalives, "err": ""}
        return {"rc": 0, "out": "", "err": ""}

    def carrier(ifname):
        up = next(polls)
        events.append(("carrier", up))
        return up

    def sleep(s):
        now[0] += s

    monkeypatch.setattr(agent, "sh", sh)
    monkeypatch.setattr(agent, "has_carrier", carrier)
    monkeypatch.setattr(agent, "garp", lambda ifname, address: events.append(("garp", address)))
    monkeypatch.setattr(agent.time, "sleep", sleep)
    monkeypatch.setattr(agent, "KEEPALIVES", str(tmp_path / "keepalives.json"))
    armed = tmp_path / "armed"

    def run(fail: tuple = (), **extra):
        arg = {
            "lan": "lan0",
            "address": "192.168.77.50",
            "peers": [["A=", "1.2.3.4:5"], ["X=", "6.7.8.9:1"]],
            "armed": str(armed),
            "carrier_s": 1,
            **extra,
        }
        return agent.takeover(arg, clock=lambda: now[0], system=GuestSystem(events, fail))

    return events, run, armed


def _wg_sets(events) -> list[tuple]:
    return [e[4:] for e in events if e[:4] == ("sh", "wg", "set", "wg0")]


def test_the_kick_renews_peers_before_the_link_and_handshakes_when_it_comes(
    monkeypatch, tmp_path
) -> None:
    """Before the carrier: each known peer removed and added again as it was (its key and
    networks), with the old appliance's endpoint and no keepalive, so the kernel may start
    its handshake at once; at the carrier: announced, kicked, keepalives put back."""
    events, run, armed = _guest(monkeypatch, tmp_path, carrier_after=3)
    seen_armed = []
    monkeypatch.setattr(
        agent, "has_carrier", lambda _: seen_armed.append(armed.exists()) or len(seen_armed) > 3
    )
    out = run()
    runs = [e[1:] for e in events if e[0] == "run"]
    assert runs[1] == ("wg", "set", "wg0", "peer", "A=", "remove", None), "unknown X= untouched"
    assert runs[2][:4] == ("wg", "addconf", "wg0", "/dev/stdin")
    assert runs[2][4] == (
        "[Peer]\nPublicKey = A=\nPresharedKey = cHNr\nAllowedIPs = 10.77.0.2/32\n"
        "Endpoint = 1.2.3.4:5\n"
    )
    assert _wg_sets(events) == [
        ("peer", "A=", "persistent-keepalive", "25"),
        ("peer", "A=", "persistent-keepalive", "0"),
    ], "A='s keepalive is put back as it was (off)"
    assert all(seen_armed), "ready is said before the carrier is polled"
    kick = events.index(("sh", "wg", "set", "wg0", "peer", "A=", "persistent-keepalive", "25"))
    assert events[kick - 1] == ("garp", "192.168.77.50"), "announced at once, then the kick"
    assert events.index(("run", *runs[2])) < kick
    assert out["kicked"] == 1 and out["garp"] == 3 and "error" not in out, out
    assert out["carrier_after_s"] == pytest.approx(3 * agent.CARRIER_POLL_S)
    assert not armed.exists() and not (tmp_path / "keepalives.json").exists()
    json.dumps(out)


def test_peers_that_cannot_be_renewed_are_put_back_and_kicked_as_they_are(
    monkeypatch, tmp_path
) -> None:
    events, run, _ = _guest(monkeypatch, tmp_path, carrier_after=0)
    out = run(fail=("wg", "addconf"))
    runs = [e[1:] for e in events if e[0] == "run"]
    assert runs[-1] == ("wg", "syncconf", "wg0", "/dev/stdin", SHOWCONF), "wg0 as it was"
    assert "peers not renewed" in out["error"], out
    assert _wg_sets(events)[:2] == [
        ("peer", "A=", "endpoint", "1.2.3.4:5", "persistent-keepalive", "0"),
        ("peer", "A=", "persistent-keepalive", "25"),
    ]


def test_without_carrier_the_kick_gives_up_and_puts_keepalives_back(monkeypatch, tmp_path) -> None:
    events, run, armed = _guest(monkeypatch, tmp_path, carrier_after=10_000)
    out = run()
    assert "no carrier" in out["error"] and out["garp"] == 0, out
    assert _wg_sets(events) == [("peer", "A=", "persistent-keepalive", "0")], "no handshake"
    assert not armed.exists()


def test_a_second_kick_puts_back_what_the_first_recorded(monkeypatch, tmp_path) -> None:
    """An earlier takeover set the keepalives to 0 and died: its record, not the live 0,
    says what to put back."""
    (tmp_path / "keepalives.json").write_text(json.dumps({"A=": "25"}))
    events, run, _ = _guest(monkeypatch, tmp_path, carrier_after=0, keepalives="A=\toff\n")
    run()
    assert _wg_sets(events)[-1] == ("peer", "A=", "persistent-keepalive", "25")
    assert not any(e[:3] == ("sh", "wg", "show") for e in events)


def test_branches_up_before_the_takeover_must_be_up_after(site_keys, facts) -> None:
    from builder.checks.appliance import evaluate, fresh_site_peers
    from tests.plugins.samples import NOW

    site, keys = site_keys
    branch = next(p for p in site.peers if p.is_site).name
    before = {"time": NOW, "wg": facts["wg"]}
    assert fresh_site_peers(site, keys, before) == {branch}, "road warriors never count"
    stale = json.loads(json.dumps(facts))
    for p in stale["wg"]["peers"]:
        p["latest_handshake"] = 0
    assert fresh_site_peers(site, keys, {"time": NOW, "wg": stale["wg"]}) == set()
    after = evaluate(site, keys, stale, NOW, {branch}, only_required=True)
    failing = [c.name for c in after.checks if not c.ok]
    assert failing == [f"handshake {branch}"]
    assert evaluate(site, keys, stale, NOW, set(), only_required=True).ok


# --- the whole upgrade on fake domains: the host side of every step, no VM -----------------


class FakeState:
    def __init__(self, keys):
        self.keys = keys

    def keys_for(self, site):
        return self.keys

    def learned_virt_type(self, host):
        return "qemu"


class Host:
    """An upgrade's surroundings faked in builder.handover: domains in a FakeConn, the guest
    agent and SSH answering with `facts`; `after` (the facts once the new one serves) may be
    made to fail. Every live link change is checked: never two links up."""

    def __init__(self, monkeypatch, site, keys, facts, previous: bool = False):
        from builder import handover as H

        self.site, self.keys, self.H = site, keys, H
        self.old = FakeDomain(site.name, ROLE_ACTIVE, True, True, site=site.name)
        doms = [self.old]
        if previous:
            doms.append(FakeDomain(site.name + "_3", ROLE_PREVIOUS, False, False, site=site.name))
        self.conn = FakeConn(*doms)
        self.most_up = 1
        self.after = json.loads(json.dumps(facts))
        self.destroyed: list[str] = []
        self.kick_started = False
        now = time.time()
        self.after["time"] = now
        for p in self.after["wg"]["peers"]:
            p["latest_handshake"] = int(now - 5)
        conn, host = self.conn, self

        def update(dom, xml, flags, _real=FakeDomain.updateDeviceFlags):
            _real(dom, xml, flags)
            host.most_up = max(host.most_up, len(_up(conn)))

        def create_domain(conn_, site_, state, seed, image, slot, virt, meta, progress, staged):
            dom = FakeDomain(slot, ROLE_STAGED, True, False, site=site_.name)
            dom.meta, dom.conn = dict(meta), conn
            conn.doms[slot] = dom
            return dom

        def destroy(conn_, name):
            conn.doms.pop(name).active = False
            host.destroyed.append(name)
            return [f"domain {name}"]

        def start(dom, command):
            host.kick_started = not slots.link_up(dom)  # started before its link is up
            return 7

        def finish(dom, pid, command, timeout=0):
            return Result(0, json.dumps({"kicked": 2, "garp": 3}), "")

        class Client:
            def close(self):
                host.closed = True

        m = monkeypatch.setattr
        m(FakeDomain, "updateDeviceFlags", update)
        m(H.provision, "create_domain", create_domain)
        m(H.provision, "preflight", lambda *a: ("qemu", []))
        m(H.lh, "host_identity", lambda c: "test")
        m(H.lh, "destroy_domain", destroy)
        m(H.lh, "appliance_serial_tail", lambda *a, **k: "")
        m(H.provision, "wait_ready_agent", lambda dom, t, p: True)
        m(H, "_check_staged", lambda s, k, d: Report(s.name, (Check("wg0", True, ""),)))
        m(H, "read_status", lambda s, k: {"time": now, "wg": self.after["wg"]})
        m(H.guest_agent, "start", start)
        m(H.guest_agent, "file_exists", lambda dom, path: True)
        m(H.guest_agent, "poll", lambda dom, pid: None)
        m(H.guest_agent, "finish", finish)
        m(H, "wait_for_ssh", lambda target, deadline: Client())
        m(H, "gather", lambda s, k, client=None: self.after)
        m(H.provision, "pool_for", lambda *a: None)
        m(H.provision, "retire_seed", lambda *a: None)
        m(H, "_stop", lambda dom, timeout=0: dom.destroy())

    def upgrade(self, prune: bool = False):
        return self.H.hand_over(
            self.conn,
            self.site,
            FakeState(self.keys),
            (None, "cd" * 32),
            Progress(quiet=True),
            prune=prune,
        )


def test_an_upgrade_hands_over_with_the_kick_armed_first(monkeypatch, site_keys, facts) -> None:
    host = Host(monkeypatch, *site_keys, facts, previous=True)
    done = host.upgrade()
    assert host.kick_started, "the kick waits in the new appliance before its link comes up"
    assert (done.outcome, done.previous, done.kicked) == ("upgraded", host.old.name(), 2)
    assert done.domain == host.old.name() + "_2" and done.outage_s is not None
    assert host.most_up == 1 and _up(host.conn) == [done.domain]
    assert host.destroyed == [host.old.name() + "_3"], "the one before the old one goes"
    assert host.old.meta[META_ROLE] == ROLE_PREVIOUS and not host.old.active
    assert host.conn.doms[done.domain].meta[META_ROLE] == ROLE_ACTIVE and host.closed


def test_upgrade_prune_removes_the_previous_appliance(monkeypatch, site_keys, facts) -> None:
    host = Host(monkeypatch, *site_keys, facts)
    done = host.upgrade(prune=True)
    assert done.previous is None and done.removed == [f"domain {host.old.name()}"], done
    assert list(host.conn.doms) == [done.domain] and _up(host.conn) == [done.domain]


def test_prune_of_an_up_to_date_site_removes_only_the_previous(
    monkeypatch, site_keys, facts
) -> None:
    host = Host(monkeypatch, *site_keys, facts)
    first = host.upgrade()
    again = host.upgrade(prune=True)
    assert (again.outcome, again.domain, again.previous) == ("up to date", first.domain, None)
    assert list(host.conn.doms) == [first.domain] and _up(host.conn) == [first.domain]


def test_a_failure_after_the_takeover_brings_the_old_one_back(
    monkeypatch, site_keys, facts
) -> None:
    """The new appliance took the address but fails verify over SSH: its link goes down
    before the old one's comes up, it is removed, and the run is exit 1 naming the check."""
    host = Host(monkeypatch, *site_keys, facts)
    host.after["wg_link"] = []
    with pytest.raises(host.H.TakeoverFailed) as failed:
        host.upgrade()
    assert failed.value.exit_code == 1
    assert f"{host.old.name()} serves again" in str(failed.value) and "wg0" in str(failed.value)
    assert host.destroyed == [host.old.name() + "_2"] and list(host.conn.doms) == [host.old.name()]
    assert _up(host.conn) == [host.old.name()] and host.most_up == 1
    assert host.old.meta[META_ROLE] == ROLE_ACTIVE and host.old.autostart
    assert host.old.log[-1] == "live up", "the old link came back last"


def test_a_new_appliance_that_never_answers_ssh_is_rolled_back(
    monkeypatch, site_keys, facts
) -> None:
    host = Host(monkeypatch, *site_keys, facts)

    def silent(target, deadline):
        raise HostError("the appliance did not answer SSH", "see its serial log")

    monkeypatch.setattr(host.H, "wait_for_ssh", silent)
    with pytest.raises(host.H.TakeoverFailed, match="did not answer SSH"):
        host.upgrade()
    assert _up(host.conn) == [host.old.name()] and host.most_up == 1


def test_a_new_appliance_that_booted_without_cloud_init_is_removed_at_once(
    monkeypatch, site_keys, facts
) -> None:
    """No wait to the boot timeout: the boot's end without a result is the image's fault."""
    host = Host(monkeypatch, *site_keys, facts)

    def unprovisioned(dom, timeout, progress):
        raise host.H.provision.NotProvisioned(f"cloud-init did not run on {dom.name()}")

    monkeypatch.setattr(host.H.provision, "wait_ready_agent", unprovisioned)
    with pytest.raises(host.H.TakeoverFailed, match="cloud-init did not run") as failed:
        host.upgrade()
    assert "the old one still serves" in str(failed.value)
    assert host.destroyed == [host.old.name() + "_2"] and list(host.conn.doms) == [host.old.name()]
    assert _up(host.conn) == [host.old.name()] and host.old.meta[META_ROLE] == ROLE_ACTIVE


def test_upgrade_of_a_site_that_is_not_deployed_is_exit_1_with_the_fix(
    site_dir, monkeypatch, capsys
) -> None:
    from builder import cli
    from builder.remote import libvirtd

    monkeypatch.setattr(libvirtd, "connect_site", lambda *a: libvirt.open("test:///default"))
    image = site_dir / "new.qcow2"
    image.write_bytes(b"not looked at")
    state = site_dir / "state"
    code = cli.main(
        ["upgrade", "--site", str(site_dir / "site.toml"), "--image", str(image)]
        + ["--state", str(state)]
    )
    err = capsys.readouterr().err
    assert code == 1 and "nothing to upgrade" in err and "wg-appliance deploy --site" in err, err
    assert not state.exists(), "no keys are made for a site that is not there"


def test_a_kick_that_found_no_agent_copy_runs_whole_after_the_switch(
    monkeypatch, site_keys, facts
) -> None:
    """The guest agent forgets an ended command's outcome once told: the one seen while
    waiting for the kick to be ready is the one judged, and the agent then goes whole."""
    from builder.remote.appliance import MISSING

    host = Host(monkeypatch, *site_keys, facts)
    told: list[int] = []
    whole: list[bool] = []

    def poll(dom, pid):
        assert not told, "asked again for an outcome already told"
        told.append(pid)
        return Result(MISSING, "", "")

    def run(dom, command, stdin="", timeout=0):
        whole.append(slots.link_up(dom))
        return Result(0, json.dumps({"kicked": 2, "garp": 3}), "")

    monkeypatch.setattr(host.H.guest_agent, "file_exists", lambda dom, path: False)
    monkeypatch.setattr(host.H.guest_agent, "poll", poll)
    monkeypatch.setattr(host.H.guest_agent, "run", run)
    done = host.upgrade()
    assert told == [7] and whole == [True] and done.kicked == 2, (told, whole, done)
