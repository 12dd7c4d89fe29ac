"""status: what the appliance says of its peers, read in one SSH round trip and shown by
their site-file names. It only looks: the state dir is read, never written, and the agent's
status mode changes nothing on the appliance."""

from __future__ import annotations

import time
from collections.abc import Iterator

from builder.checks.status import Status, view
from builder.local.state import State
from builder.model.site import Site
from builder.remote.appliance import read_status


def status(site: Site, state: State, timeout: float = 20.0) -> Status:
    """One reading."""
    keys = state.look(site)
    return view(site, keys, read_status(site, keys, timeout))


def watch(site: Site, state: State, interval: float, timeout: float = 20.0) -> Iterator[Status]:
    """A reading every `interval` seconds, each with the rates since the one before."""
    keys = state.look(site)
    previous = None
    while True:
        started = time.monotonic()
        previous = view(site, keys, read_status(site, keys, timeout), previous)
        yield previous
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
