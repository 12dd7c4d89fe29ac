"""Upgrade and rollback without an outage: the next appliance boots and is checked while the
old one serves, then takes over in a second, and the old one is back by itself when the new
one fails at any point.

The new appliance boots in the site's other domain slot with the same MAC, keys and seed as
the site file says, but its NIC's link down: qemu passes no frame, so it cannot answer on the
LAN address or send a handshake that would pull a branch away. The host reaches it through
the qemu guest agent instead. At the takeover the old link goes down, the new one up, and the
new appliance sets every peer's endpoint as the old one saw it and starts the handshakes
itself. Only after SSH and every check pass there is the old one stopped; it stays defined,
for `rollback`, until the next upgrade.

A run killed between two steps is undone or finished by the next run (`converge`), and no
step ever brings a link up before the other is down.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from builder import provision
from builder.checks.appliance import Report, before_takeover, evaluate, fresh_site_peers
from builder.checks.result import Check
from builder.errors import ApplianceError, GuestError, HostError
from builder.local.state import State
from builder.model.keys import Keys
from builder.model.login import HostAccess
from builder.model.site import Site
from builder.progress import Progress
from builder.provision import BOOT_TIMEOUT_S
from builder.remote import guest_agent
from builder.remote import libvirtd as lh
from builder.remote.appliance import (
    agent_command,
    gather,
    probe_arg,
    read_status,
    run_agent,
    target_for,
)
from builder.remote.slots import (
    free_slot,
    link_up,
    set_link,
    set_role,
    site_domains,
    switch_links,
    twin,
)
from builder.remote.ssh import Result, wait_for_ssh
from builder.render.libvirt_xml import (
    META_ROLE,
    META_SEED_DIGEST,
    ROLE_ACTIVE,
    ROLE_PREVIOUS,
    ROLE_STAGED,
    has_agent_channel,
)
from builder.render.seed import make_seed

SHUTDOWN_S = 60.0
SSH_BACK_S = 120.0  # the new appliance answers SSH within this after its link comes up
BRANCH_BACK_S = 30.0  # and a branch that was up before has its tunnel back within this
ARM_S = 15.0  # the kick is ready in the new appliance within this, or the switch goes on
ARM_POLL_S = 0.05
CARRIER_S = 60  # how long the kick waits in the new appliance for its link
_ENDPOINT = re.compile(r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]):\d{1,5}$")


@dataclass(frozen=True)
class Handover:
    """What an upgrade or rollback did, for the terminal and --json."""

    name: str
    outcome: str  # "upgraded", "rolled back", "up to date"
    domain: str  # the domain that serves now
    previous: str | None
    address: str
    seconds: float
    virt_type: str = ""
    outage_s: float | None = None  # old link down until the new one answered SSH
    kicked: int = 0  # peers whose handshake the new appliance started itself
    phases: list[tuple[str, float]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class TakeoverFailed(HostError):
    """The new appliance failed before or after taking over; the old one serves again."""


def takeover_peers(status: dict) -> list[list[str]]:
    """[public key, endpoint] of every peer the old appliance has an endpoint for, from its
    status document; an endpoint that is not ADDRESS:PORT is dropped, never passed on."""
    out = []
    for p in (status.get("wg") or {}).get("peers", []):
        endpoint = p.get("endpoint") or ""
        if isinstance(p.get("public_key"), str) and _ENDPOINT.match(endpoint):
            out.append([p["public_key"], endpoint])
    return out


class _Clock:
    def __init__(self, progress: Progress):
        self.t0 = time.monotonic()
        self.progress = progress
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        self.phases.append((phase, round(time.monotonic() - self.t0, 2)))

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)


@dataclass(frozen=True)
class Switch:
    """One takeover: the site and its keys, the appliance that serves (`old`) and the one
    that takes its place (`new`, kept when it fails if `keep_new`: a rollback's target)."""

    site: Site
    keys: Keys
    old: libvirt.virDomain
    new: libvirt.virDomain
    progress: Progress
    clock: _Clock
    keep_new: bool = False


@dataclass(frozen=True)
class _Switched:
    """What the takeover itself gives the Handover."""

    virt_type: str
    outage_s: float | None
    kicked: int
    removed: list[str]


def converge(conn: libvirt.virConnect, site: Site, keys: Keys, progress: Progress) -> dict:
    """Put a host where a run was killed back into a state with one serving appliance: an
    interrupted takeover undone, the active link up, a previous one stopped (after verifying
    the active one, when the kill came between takeover and the old one's stop). Returns the
    site's domains by role."""
    doms = site_domains(conn, site.name)
    second = doms.pop(twin(ROLE_ACTIVE), None)
    if second is not None:  # killed between the two role writes: the link says who serves
        old, new = (doms[ROLE_ACTIVE], second) if link_up(second) else (second, doms[ROLE_ACTIVE])
        set_role(old, ROLE_PREVIOUS)
        doms[ROLE_ACTIVE], doms[ROLE_PREVIOUS] = new, old
    active, previous = doms.get(ROLE_ACTIVE), doms.get(ROLE_PREVIOUS)
    for dom in doms.values():  # first of all: no other domain on the LAN
        if dom is not active and link_up(dom):
            progress.say(f"an earlier run stopped during a takeover: {dom.name()} steps back")
            set_link(dom, False)
    if active is not None:
        if previous is not None and previous.isActive() and link_up(active):
            progress.say(f"an earlier run stopped before {previous.name()} was stopped")
            _after_takeover(Switch(site, keys, previous, active, progress, _Clock(progress)))
        elif not link_up(active):
            set_link(active, True)
            if not active.isActive():
                active.create()
            else:
                progress.say(f"{active.name()}'s link was down after an earlier run: up again")
        if previous is not None and previous.isActive():
            _stop(previous)
    return site_domains(conn, site.name)


def _stop(dom: libvirt.virDomain, timeout: float = SHUTDOWN_S) -> None:
    """A clean shutdown, so the kept disk boots without a journal replay; power off after
    `timeout`."""
    if not dom.isActive():
        return
    with contextlib.suppress(libvirt.libvirtError):  # it may have stopped meanwhile
        dom.shutdown()
    deadline = time.monotonic() + timeout
    while dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.5)
    if dom.isActive():
        dom.destroy()


def _check_staged(site: Site, keys: Keys, dom: libvirt.virDomain) -> Report:
    facts = run_agent(
        lambda cmd: guest_agent.run(dom, cmd), "check", "probe", probe_arg(site, gateway=False)
    )
    return evaluate(site, keys, facts, time.time())


def _failed(checks: Iterable[Check]) -> str:
    return "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.ok)


@dataclass(frozen=True)
class _Kick:
    """The takeover program started in the new appliance before the switch: its ARG, its
    guest pid (None when it could not be started), and its outcome when it ended already."""

    arg: str
    pid: int | None = None
    ended: Result | None = None


def _arm_kick(sw: Switch, peers: list[list[str]]) -> _Kick:
    """Start the kick in the new appliance while its link is down: it sets the endpoints,
    says it is ready, and waits for the carrier. Returns once it is ready (or has ended, or
    ARM_S passed: the switch does not wait on it longer)."""
    v4 = sw.site.lan.ipv4  # gratuitous ARP is IPv4's; an IPv6-only LAN learns from the handshakes
    armed = f"/run/wg-appliance-takeover-{secrets.token_hex(8)}"
    arg = json.dumps(
        {
            "lan": "lan0",
            "address": v4 and str(v4.ip),
            "peers": peers,
            "armed": armed,
            "carrier_s": CARRIER_S,
        }
    )
    try:
        pid = guest_agent.start(sw.new, agent_command("takeover", arg))
        deadline = time.monotonic() + ARM_S
        while time.monotonic() < deadline and not guest_agent.file_exists(sw.new, armed):
            ended = guest_agent.poll(sw.new, pid)
            if ended is not None:  # no copy of the agent there, or it failed: see _kicked
                return _Kick(arg, pid, ended)
            time.sleep(ARM_POLL_S)
    except GuestError as e:
        sw.progress.say(f"  note: the handshakes start after the switch ({e})")
        return _Kick(arg)
    return _Kick(arg, pid)


def _kicked(sw: Switch, kick: _Kick) -> dict:
    """The kick's outcome once the link is up; run now when it could not be started before
    (or the appliance had no copy of the agent yet)."""
    first = [] if kick.pid is None else [kick]

    def run(command: str) -> Result:
        if first:
            armed = first.pop()
            if armed.ended is not None:
                return armed.ended
            return guest_agent.finish(sw.new, armed.pid, command, timeout=CARRIER_S + 30)
        return guest_agent.run(sw.new, command)

    try:
        return run_agent(run, "takeover", "takeover", kick.arg)
    except GuestError as e:
        return {"error": str(e)}


def _verified(sw: Switch, branches: set[str]) -> tuple[Report, float]:
    """The new appliance's checks over SSH once it answers on the LAN address, waiting a
    little for the `branches` that were up before to shake hands; with when SSH answered."""
    client = wait_for_ssh(target_for(sw.site, sw.keys), time.monotonic() + SSH_BACK_S)
    answered = time.monotonic()
    try:
        deadline = time.monotonic() + BRANCH_BACK_S
        while True:
            facts = gather(sw.site, sw.keys, client=client)
            report = evaluate(sw.site, sw.keys, facts, time.time(), branches, only_required=True)
            waiting = [c for c in report.checks if not c.ok]
            if not waiting or time.monotonic() > deadline:
                return report, answered
            if not all(c.name.startswith("handshake ") for c in waiting):
                return report, answered
            time.sleep(2)
    finally:
        client.close()


def _after_takeover(
    sw: Switch, link_down_at: float | None = None, branches: set[str] = frozenset()
) -> float | None:
    """Verify the new appliance on the LAN address over SSH, with the handshakes of the
    `branches` that were up before (given a little while to come back); on any failure the
    old one takes the address back. Then the old one stops. Returns the outage when timed."""
    try:
        with sw.progress.stage(f"verifying {sw.new.name()} on {sw.site.lan.address.ip}"):
            report, answered = _verified(sw, branches)
        if not report.ok:
            raise TakeoverFailed(
                f"{sw.new.name()} failed verify after the takeover: {_failed(report.checks)}"
            )
    except ApplianceError as e:
        with sw.progress.stage(f"{sw.old.name()} takes the address back"):
            switch_links(sw.new, sw.old)
            set_role(sw.old, ROLE_ACTIVE)
            _put_aside(sw.new, sw.keep_new)
        raise TakeoverFailed(
            f"the new appliance failed, {sw.old.name()} serves again: {e}",
            "see `wg-appliance verify` and the new domain's serial log; fix, then upgrade again",
        ) from None
    sw.clock.mark("verified")
    with sw.progress.stage(f"stopping {sw.old.name()} (kept for rollback)"):
        _stop(sw.old)
    sw.clock.mark("old stopped")
    return None if link_down_at is None else answered - link_down_at


def _take_over(
    conn: libvirt.virConnect,
    sw: Switch,
    timeout: float,
    retire: libvirt.virDomain | None = None,
) -> _Switched:
    """The staged `new` checked through its guest agent, then the switch, then the checks
    over SSH; the old one serves again whenever a step fails."""
    site, new, progress = sw.site, sw.new, sw.progress
    try:
        first_boot = provision.wait_ready_agent(new, timeout, progress)
    except provision.NotProvisioned as e:
        raise _abandon(new, e.what, sw.keep_new) from None
    sw.clock.mark("booted")
    if not first_boot:
        raise _abandon(new, "cloud-init reported errors on it", sw.keep_new)
    with progress.stage(f"checking {new.name()} before it takes over"):
        report = _check_staged(site, sw.keys, new)
    failing = before_takeover(report)
    if failing:
        raise _abandon(new, _failed(failing), sw.keep_new)
    sw.clock.mark("checked")
    removed = []
    if retire is not None:  # only one previous is kept: the one before the old one goes now
        with progress.stage(f"removing the appliance before the old one, {retire.name()}"):
            removed = lh.destroy_domain(conn, retire.name())
    peers: list[list[str]] = []
    branches: set[str] = set()
    if link_up(sw.old):
        try:
            status = read_status(site, sw.keys)
            peers, branches = takeover_peers(status), fresh_site_peers(site, sw.keys, status)
        except ApplianceError as e:
            progress.say(f"  note: could not read the old appliance's endpoints ({e})")
    with progress.stage(f"takeover: {sw.old.name()} -> {new.name()}"):
        kick = _arm_kick(sw, peers)
        link_down_at = time.monotonic()
        switch_links(sw.old, new)
        set_role(new, ROLE_ACTIVE)
        set_role(sw.old, ROLE_PREVIOUS)
        kicked = _kicked(sw, kick)
    if kicked.get("error"):
        progress.say(f"  note: {kicked['error']}")
    sw.clock.mark("took over")
    outage = _after_takeover(sw, link_down_at, branches)
    pool = provision.pool_for(conn, site, progress)
    seed_digest = (lh.domain_metadata(new) or {}).get(META_SEED_DIGEST, "")
    seed = provision.volume_names(new.name(), seed_digest)["seed"]
    provision.retire_seed(new, pool, seed, progress)
    return _Switched(
        virt_type=lh.domain_virt_type(new),
        outage_s=None if outage is None else round(outage, 2),
        kicked=int(kicked.get("kicked", 0)),
        removed=removed,
    )


def _put_aside(dom: libvirt.virDomain, keep: bool) -> None:
    """A new appliance that failed: removed, or (a rollback's target) stopped and kept."""
    if keep:
        _stop(dom, timeout=0)
        set_role(dom, ROLE_PREVIOUS)
    else:
        lh.destroy_domain(dom.connect(), dom.name())


def _abandon(new: libvirt.virDomain, why: str, keep: bool) -> TakeoverFailed:
    """The staged domain goes or is put back (its serial log's end quoted first); the old
    one never left."""
    tail = lh.appliance_serial_tail(new.connect(), new.name(), lines=15) or "(no serial log)"
    _put_aside(new, keep)
    return TakeoverFailed(
        f"the new appliance {new.name()} failed before the takeover, the old one still "
        f"serves: {why}\n--- last lines of its serial log ---\n{tail}",
        "fix the cause (site file or image), then run the upgrade again",
    )


def upgrade(
    site: Site,
    state: State,
    image: tuple[Path, str],
    progress: Progress,
    *,
    access: HostAccess | None,
    prune: bool = False,
    boot_timeout: float = BOOT_TIMEOUT_S,
) -> Handover:
    """Every change that needs a new VM (image, memory, vCPUs, disk, seed), by handover."""
    conn = lh.connect_site(site, access, progress)
    try:
        return hand_over(conn, site, state, image, progress, prune=prune, boot_timeout=boot_timeout)
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt: {e}", "run the same command again; it resumes") from e
    finally:
        conn.close()


def hand_over(
    conn: libvirt.virConnect,
    site: Site,
    state: State,
    image: tuple[Path, str],
    progress: Progress,
    *,
    prune: bool = False,
    boot_timeout: float = BOOT_TIMEOUT_S,
) -> Handover:
    """upgrade on an open connection (deploy --replace has one)."""
    clock = _Clock(progress)
    if ROLE_ACTIVE not in site_domains(conn, site.name):  # before any key is made
        raise HostError(
            f"{site.name} is not on {site.host.uri}: there is nothing to upgrade",
            f"run `wg-appliance deploy --site {site.path}` first",
        )
    keys = state.keys_for(site)
    seed = make_seed(site, keys)
    doms = converge(conn, site, keys, progress)
    active = doms[ROLE_ACTIVE]
    staged = doms.get(ROLE_STAGED)
    in_use = {d.name() for r, d in doms.items() if r != ROLE_STAGED}
    slot = staged.name() if staged is not None else free_slot(site.name, in_use)
    want = provision.wanted_metadata(site, image[1], seed.digest, slot)
    removed: list[str] = []
    if not provision.differences(lh.domain_metadata(active) or {}, want):
        previous = doms.get(ROLE_PREVIOUS)
        if prune and previous is not None:
            removed = lh.destroy_domain(conn, previous.name())
            previous = None
        return Handover(
            site.name,
            "up to date",
            active.name(),
            _name(previous),
            str(site.lan.address.ip),
            clock.elapsed(),
            virt_type=lh.domain_virt_type(active),
            removed=removed,
        )
    if staged is not None and provision.differences(lh.domain_metadata(staged) or {}, want):
        with progress.stage(f"removing {staged.name()}, staged for other input"):
            removed += lh.destroy_domain(conn, staged.name())
        staged = None
    with progress.stage("preflight"):
        # What the serving appliance runs under is known to work here: no KVM probe again.
        learned = state.learned_virt_type(lh.host_identity(conn)) or lh.domain_virt_type(active)
        virt_type, report = provision.preflight(conn, site, staged is None, learned)
        for line in report:
            progress.say(f"  {line}")
    clock.mark("preflight")
    if staged is None:
        meta = {**want, META_ROLE: ROLE_STAGED}
        staged = provision.create_domain(
            conn, site, state, seed, image, slot, virt_type, meta, progress, staged=True
        )
    elif not staged.isActive():
        staged.create()
    clock.mark("staged")
    sw = Switch(site, keys, active, staged, progress, clock)
    done = _take_over(conn, sw, boot_timeout, retire=doms.get(ROLE_PREVIOUS))
    removed += done.removed
    if prune:
        with progress.stage(f"removing the previous appliance, {active.name()}"):
            removed += lh.destroy_domain(conn, active.name())
    return _handover(sw, "upgraded", done, None if prune else active.name(), removed)


def rollback(
    site: Site,
    state: State,
    progress: Progress,
    *,
    access: HostAccess | None,
    boot_timeout: float = BOOT_TIMEOUT_S,
) -> Handover:
    """Back to the previous appliance, by the same handover; the current one becomes the
    previous, so a second rollback returns to it."""
    clock = _Clock(progress)
    keys = state.look(site)
    conn = lh.connect_site(site, access, progress)
    try:
        doms = converge(conn, site, keys, progress)
        active, previous = doms.get(ROLE_ACTIVE), doms.get(ROLE_PREVIOUS)
        if active is None or previous is None:
            raise HostError(
                f"{site.name} has no previous appliance on {site.host.uri} to return to",
                "a previous appliance exists after an upgrade without --prune",
            )
        if not has_agent_channel(previous.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
            raise HostError(
                f"{previous.name()} was made before appliances had a guest agent channel, so "
                "it cannot be checked with its link down",
                "upgrade with its image instead (`wg-appliance upgrade --image FILE`)",
            )
        set_link(previous, False)
        with progress.stage(f"starting {previous.name()} with its link down"):
            if not previous.isActive():
                previous.create()
        clock.mark("staged")
        sw = Switch(site, keys, active, previous, progress, clock, keep_new=True)
        done = _take_over(conn, sw, boot_timeout)
        return _handover(sw, "rolled back", done, active.name(), done.removed)
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt: {e}", "run the same command again; it resumes") from e
    finally:
        conn.close()


def _handover(
    sw: Switch, outcome: str, done: _Switched, previous: str | None, removed: list[str]
) -> Handover:
    return Handover(
        name=sw.site.name,
        outcome=outcome,
        domain=sw.new.name(),
        previous=previous,
        address=str(sw.site.lan.address.ip),
        seconds=sw.clock.elapsed(),
        virt_type=done.virt_type,
        outage_s=done.outage_s,
        kicked=done.kicked,
        phases=sw.clock.phases,
        removed=removed,
    )


def _name(dom: libvirt.virDomain | None) -> str | None:
    return dom.name() if dom is not None else None
