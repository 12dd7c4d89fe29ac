"""verify: one SSH round trip gathers the appliance's facts; pure checks judge them.

When the appliance does not answer, the host is asked for the end of its serial log, so the
error shows why (a boot that hangs, a full disk) without a console.
"""

from __future__ import annotations

import time

from builder.checks.appliance import Report, evaluate
from builder.errors import ApplianceError, ConnectError, InputError
from builder.local.state import State
from builder.model.login import HostAccess
from builder.model.site import Site
from builder.remote.appliance import gather
from builder.remote.slots import active_domain
from builder.remote.ssh import HostKeyMismatch


class Unreachable(ConnectError):
    """The appliance did not answer; carries the serial log's end when the host gave it."""

    def __init__(self, error: ConnectError, serial: str | None):
        self.serial = serial
        super().__init__(str(error))


def verify(
    site: Site,
    state: State,
    timeout: float = 20.0,
    required: set[str] = frozenset(),
    access: HostAccess | None = None,
) -> Report:
    """Judge the running appliance; only looks, so the state dir is never written."""
    unknown = set(required) - {p.name for p in site.peers}
    if unknown:
        raise InputError(
            str(site.path), "--require-handshake", f"no peer named {sorted(unknown)[0]!r}"
        )
    keys = state.look(site)
    try:
        facts = gather(site, keys, timeout)
    except HostKeyMismatch:
        raise
    except ConnectError as e:
        raise Unreachable(e, serial_log(site, access)) from None
    return evaluate(site, keys, facts, time.time(), required)


def serial_log(site: Site, access: HostAccess | None) -> str | None:
    """The appliance's serial log end from its host, or None when the host cannot say."""
    from builder.remote import libvirtd as lh  # libvirt: only when the appliance is silent

    try:
        conn = lh.connect_site(site, access)
    except ApplianceError:
        return None
    try:
        dom = active_domain(conn, site.name)
        return lh.appliance_serial_tail(conn, dom.name()) if dom is not None else None
    except ApplianceError:
        return None
    finally:
        conn.close()
