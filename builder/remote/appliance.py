"""How the tool reaches a running appliance: its pinned SSH login, and the agent
(builder/guest/agent.py) it runs there. The image needs nothing of the tool's own: the agent
is kept under /var/lib/wg-appliance named by its digest. Each call sends only a short runner
that imports that copy, whose compiled bytecode Python caches; only when there is no copy of
this digest (the first call of a tool version, exit MISSING) is the agent sent whole, inside
a loader that keeps it and runs it. A new tool version brings a new digest, so a stale copy is
never run."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import paramiko

from builder.errors import GuestError
from builder.model.keys import Keys
from builder.model.site import Site
from builder.remote.ssh import Result, Target, connect, execute
from builder.text import printable

AGENT = Path(__file__).resolve().parent.parent / "guest" / "agent.py"
SUDO_FIX = "check that the admin user has passwordless sudo and python3 is present"
AGENT_DIR = "/var/lib/wg-appliance"
# The loader: import the kept copy, else keep one (dropping older ones) and import it; if
# the disk refuses, run the source as sent. Formatted with the folder, module name, source.
LOADER = """import os, sys
folder, name, source = {folder!r}, {name!r}, {source!r}
sys.path.insert(0, folder)
sys.dont_write_bytecode = False
try:
    import importlib
    agent = importlib.import_module(name)
except ImportError:
    agent = None
    try:
        os.makedirs(folder, 0o700, exist_ok=True)
        for old in os.listdir(folder):
            if old.startswith("agent_") and old.endswith(".py"):
                os.remove(os.path.join(folder, old))
        path = os.path.join(folder, name + ".py")
        with open(path + ".tmp", "w") as f:
            f.write(source)
        os.replace(path + ".tmp", path)
        sys.path_importer_cache.pop(folder, None)
        importlib.invalidate_caches()
        agent = importlib.import_module(name)
    except (OSError, ImportError):
        pass
if agent is None:
    exec(compile(source, "agent", "exec"), {{"__name__": "__main__"}})
else:
    agent.main()
"""


def target_for(site: Site, keys: Keys) -> Target:
    return Target(
        host=str(site.lan.address.ip),
        user=site.ssh.user,
        private_key=keys.admin_key,
        host_public=keys.host_public,
    )


# The runner: the kept copy of this digest, or exit MISSING (nothing ran) for the loader.
RUNNER = """import sys
sys.path.insert(0, {folder!r})
sys.dont_write_bytecode = False
try:
    import {name} as agent
except ImportError:
    sys.exit({missing})
agent.main()
"""
MISSING = 75  # EX_TEMPFAIL: no copy of this agent yet; the agent itself never exits so


@cache
def _agent() -> tuple[str, str]:
    """The agent's source and its module name, which carries the digest."""
    source = AGENT.read_text()
    return source, "agent_" + hashlib.sha256(source.encode()).hexdigest()[:16]


def agent_program(folder: str = AGENT_DIR) -> str:
    """The agent inside its loader: one Python program for `python3 -S -c`."""
    source, name = _agent()
    return LOADER.format(folder=folder, name=name, source=source)


def agent_runner(folder: str = AGENT_DIR) -> str:
    """The short program that runs the kept copy, or exits MISSING when there is none."""
    return RUNNER.format(folder=folder, name=_agent()[1], missing=MISSING)


def agent_command(mode: str, *args: str, whole: bool = False) -> str:
    """The agent as one `python3 -S -c` command, run as root: the runner, or with `whole`
    the loader with the agent's source."""
    program = agent_program() if whole else agent_runner()
    words = [shlex.quote(program), mode, *map(shlex.quote, args)]
    return "sudo -n python3 -S -c " + " ".join(words)


def _missing(rc: int, stdout: str) -> bool:
    """The runner found no kept copy: it exited MISSING before the agent said anything."""
    return rc == MISSING and not stdout


def _shown(text: str) -> str:
    return printable(text, keep_newlines=False)


def _document(text: str, what: str, stderr=lambda: "") -> dict[str, Any]:
    """One JSON object from the agent, or a GuestError quoting what came instead (the
    agent's stderr when it has any, read only then)."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        return answer
    said = stderr().strip() or text.strip()
    raise GuestError(f"{what}: the appliance did not answer: {_shown(said[-300:])}", SUDO_FIX)


def _agent_document(
    site: Site,
    keys: Keys,
    timeout: float,
    what: str,
    *mode: str,
    client: paramiko.SSHClient | None = None,
) -> dict:
    """One agent command, its one JSON document: over `client`, else over a connection of
    its own."""
    own = client is None
    if client is None:
        client = connect(target_for(site, keys), timeout=timeout)
    try:
        return run_agent(lambda cmd: execute(client, cmd, timeout=timeout + 30), what, *mode)
    finally:
        if own:
            client.close()


def run_agent(run: Callable[[str], Result], what: str, *mode: str) -> dict:
    """The agent in `mode` through `run` (SSH, or the guest agent while the link is down),
    its one JSON document: the runner first, the agent whole when the runner finds no copy."""
    result = run(agent_command(*mode))
    if _missing(result.rc, result.stdout):
        result = run(agent_command(*mode, whole=True))
    if result.rc != 0:
        raise GuestError(
            f"the {mode[0]} command failed on the appliance (exit {result.rc}): "
            + _shown(result.stderr.strip()[-300:]),
            SUDO_FIX,
        )
    return _document(result.stdout, what, lambda: result.stderr)


def metrics_url(site: Site) -> str | None:
    """Where the exporter answers, when the site turns it on."""
    if not site.metrics.enabled:
        return None
    ip = site.lan.address.ip
    return f"http://{f'[{ip}]' if ip.version == 6 else ip}:{site.metrics.port}/metrics"


def probe_arg(site: Site, gateway: bool = True) -> str:
    """The probe's ARG; without `gateway` no ping (a staged appliance's link is down)."""
    gateway6 = site.lan.gateway_for(6) if gateway else None
    return json.dumps(
        {
            "gateway": str(site.lan.gateway) if gateway else None,
            "gateway6": None if gateway6 is None else str(gateway6),
            "metrics": metrics_url(site),
        }
    )


def gather(
    site: Site, keys: Keys, timeout: float = 20.0, client: paramiko.SSHClient | None = None
) -> dict[str, Any]:
    """Every fact verify judges: one command, over `client` when one is open."""
    return _agent_document(site, keys, timeout, "verify", "probe", probe_arg(site), client=client)


def read_status(site: Site, keys: Keys, timeout: float = 20.0) -> dict[str, Any]:
    """What status shows (uptime, kernel, OS, wg0's peers): one connection, one command."""
    return _agent_document(site, keys, timeout, "status", "status")


class SyncChannel:
    """The agent in sync mode: it sends the light facts, takes one request, sends the outcome.
    `reopen`: how to start the agent sent whole, when the first answer shows that no copy of
    it is kept."""

    def __init__(self, stdin, stdout, stderr, reopen=None):
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr
        self._reopen = reopen

    def answer(self) -> dict[str, Any]:
        line = self._stdout.readline()
        reopen, self._reopen = self._reopen, None
        if (
            reopen is not None
            and not line
            and _missing(self._stdout.channel.recv_exit_status(), line)
        ):
            self._stdin, self._stdout, self._stderr = reopen()
            line = self._stdout.readline()
        return _document(line, "sync", self._stderr_text)

    def _stderr_text(self) -> str:
        return self._stderr.channel.recv_stderr(4096).decode(errors="replace")

    def send(self, request: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(request) + "\n")
        self._stdin.flush()

    def close(self) -> None:
        self._stdin.channel.shutdown_write()


@contextmanager
def sync_channel(site: Site, keys: Keys) -> Iterator[SyncChannel]:
    """One SSH channel, one agent process for the whole sync: probe, then apply. The agent is
    started before the facts are asked for, so the caller can work while it gathers them."""
    client = connect(target_for(site, keys))
    try:
        channel = SyncChannel(
            *client.exec_command(agent_command("sync"), timeout=120),
            reopen=lambda: client.exec_command(agent_command("sync", whole=True), timeout=120),
        )
        try:
            yield channel
        finally:
            channel.close()
    finally:
        client.close()
