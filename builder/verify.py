"""verify: one SSH round trip gathers the appliance's facts; pure checks judge them."""

from __future__ import annotations

import time

from builder.checks.appliance import Report, evaluate
from builder.errors import InputError
from builder.local.state import State
from builder.model.site import Site
from builder.remote.appliance import gather


def verify(
    site: Site, state: State, timeout: float = 20.0, required: set[str] = frozenset()
) -> Report:
    """Judge the running appliance; only looks, so the state dir is never written."""
    unknown = set(required) - {p.name for p in site.peers}
    if unknown:
        raise InputError(
            str(site.path), "--require-handshake", f"no peer named {sorted(unknown)[0]!r}"
        )
    keys = state.look(site)
    facts = gather(site, keys, timeout)
    return evaluate(site, keys, facts, time.time(), required)
