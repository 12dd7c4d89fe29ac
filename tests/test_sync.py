"""sync's workstation side with a fake appliance and host: the host's libvirt is asked while
the appliance's login runs, and its connection is closed however sync ends."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from builder import sync as sy
from builder.errors import ConnectError
from tests.plugins.samples import site_keys  # noqa: F401


class Conn:
    def __init__(self):
        self.opened = self.closed = 0

    def close(self):
        self.closed += 1


def _fakes(monkeypatch, site_keys, answer):  # noqa: F811
    site, keys = site_keys
    conn = Conn()
    asked = threading.Event()

    def metadata(site, access):
        asked.set()
        conn.opened += 1
        return conn, {}

    @contextmanager
    def channel(site, keys):
        yield SimpleNamespace(answer=lambda: answer(asked), send=lambda request: None)

    monkeypatch.setattr(sy, "_metadata", metadata)
    monkeypatch.setattr(sy, "sync_channel", channel)
    monkeypatch.setattr(sy, "vm_changes", lambda site, facts, metadata: [])
    monkeypatch.setattr(sy, "changes", lambda site, keys, facts, files: [])
    state = SimpleNamespace(keys_for=lambda site, existing: keys, look=lambda site: keys)
    return site, state, conn


def test_the_host_is_asked_while_the_appliance_answers(monkeypatch, site_keys):  # noqa: F811
    """The appliance's facts wait for the host's question to have started: one after the
    other, this would time out."""

    def answer(asked):
        assert asked.wait(10), "the host was not asked before the appliance answered"
        return {"facts": 1}

    site, state, conn = _fakes(monkeypatch, site_keys, answer)
    result = sy.sync(site, state)
    assert result.applied is False and result.changes == ()
    assert conn.opened == conn.closed == 1


def test_a_failed_login_still_closes_the_host_connection(monkeypatch, site_keys):  # noqa: F811
    def answer(asked):
        raise ConnectError("wg@192.168.77.50:22: cannot connect: connection refused")

    site, state, conn = _fakes(monkeypatch, site_keys, answer)
    with pytest.raises(ConnectError, match="connection refused"):
        sy.sync(site, state)
    assert conn.closed == conn.opened
