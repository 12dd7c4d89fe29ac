"""How the tool reaches a running appliance: its pinned SSH login, and the agent
(builder/guest/agent.py) it runs there. The image needs nothing of the tool's own: the agent
is kept under /var/lib/wg-appliance named by its digest. Each call sends only a short runner
that imports that copy, whose compiled bytecode Python caches; only when there is no copy of
this digest (the first call of a tool version, exit MISSING) is the agent sent whole, inside
a loader that keeps it and runs it. A new tool version brings a new digest, so a stale copy is
never run.

Faster still, where the appliance has it: the agent kept running as root behind a Unix
socket only the admin user may open (`serve` in the agent), reached over the same SSH
connection with a direct-streamlocal channel. Each call there runs in a fork of a process that
has the agent loaded, so it pays neither sudo nor a Python start (most of a second under
TCG). It runs only the agent of the tool's digest; otherwise, or where there is no socket (an
appliance deployed by an older version), the call goes through sudo as above."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import paramiko

from builder.errors import GuestError
from builder.guest.agent import SERVE_END, SERVE_RUN, SERVE_SOCKET, agent_name
from builder.model.keys import Keys
from builder.model.site import Site
from builder.remote.ssh import Result, Target, connect, execute, open_unix
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
    source = AGENT.read_bytes()
    return source.decode(), agent_name(source)


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


def _open_served(client: paramiko.SSHClient, argv: list[str], timeout: float):
    """A channel to the kept agent with the request sent, or None when there is no socket."""
    chan = open_unix(client, SERVE_SOCKET, timeout)
    if chan is None:
        return None
    chan.settimeout(timeout)
    try:
        chan.sendall(json.dumps({"agent": _agent()[1], "argv": argv}).encode() + b"\n")
    except (OSError, paramiko.SSHException):
        chan.close()
        return None
    return chan


def served(
    client: paramiko.SSHClient, argv: list[str], input: str = "", timeout: float = 60
) -> Result | None:
    """One agent call through the kept agent, or None when it cannot run it (no socket, or
    it is another version of the agent than the tool's): then sudo runs it."""
    chan = _open_served(client, argv, timeout)
    if chan is None:
        return None
    with contextlib.closing(chan):
        stream = chan.makefile("rb")
        try:
            if input:
                chan.sendall(input.encode())
            chan.shutdown_write()
            head = stream.readline()
        except (OSError, paramiko.SSHException):
            return None
        if head != SERVE_RUN:
            return None
        return ended(stream.read().decode(errors="replace"))


def ended(text: str) -> Result:
    """The kept agent's output split from its end line {"rc", "stderr"}."""
    out, sep, tail = text.rpartition("\n" + SERVE_END)
    try:
        end = json.loads(tail) if sep else None
        return Result(int(end["rc"]), out, str(end["stderr"]))
    except (ValueError, TypeError, KeyError):
        return Result(255, text, "the agent's process ended without saying how")


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
        result = served(client, list(mode), timeout=timeout + 30)
        if result is not None:
            return _answer(result, what, mode)
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
    return _answer(result, what, mode)


def _answer(result: Result, what: str, mode: tuple[str, ...]) -> dict:
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
    return f"http://{site.metrics_listen}/metrics"


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
    `reopen`: how to start the agent the next way, in order, when the first answer shows that
    this start cannot run it (the kept agent says MISSING; the runner finds no copy). `served`:
    this start is the kept agent, whose first line says whether it runs the call."""

    def __init__(self, stdin, stdout, stderr, reopen=(), served=False):
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr
        self._reopen, self._served = list(reopen), served

    def _next(self) -> str:
        self._stdin.channel.close()
        self._stdin, self._stdout, self._stderr = self._reopen.pop(0)()
        return self._stdout.readline()

    def answer(self) -> dict[str, Any]:
        line = self._stdout.readline()
        if self._served:
            self._served = False
            if line == SERVE_RUN.decode():
                self._reopen = []
                line = self._stdout.readline()
            else:
                line = self._next()
        if self._reopen and not line and _missing(self._stdout.channel.recv_exit_status(), line):
            line = self._next()
        self._reopen = []
        while line == "\n":  # the kept agent's end line follows a blank one
            line = self._stdout.readline()
        if line.startswith(SERVE_END):  # the kept agent ended before it answered
            return _answer(ended("\n" + line), "sync", ("sync",))
        return _document(line, "sync", self._stderr_text)

    def _stderr_text(self) -> str:
        if self._stderr is None:  # the kept agent's stderr is in its end line
            return ""
        return self._stderr.channel.recv_stderr(4096).decode(errors="replace")

    def send(self, request: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(request) + "\n")
        self._stdin.flush()

    def close(self) -> None:
        self._stdin.channel.shutdown_write()


@contextmanager
def sync_channel(site: Site, keys: Keys) -> Iterator[SyncChannel]:
    """One SSH channel, one agent process for the whole sync: probe, then apply. The agent is
    started before the facts are asked for, so the caller can work while it gathers them:
    the kept agent where it runs this version, else through sudo."""
    client = connect(target_for(site, keys))

    def sudo(whole: bool):
        return lambda: client.exec_command(agent_command("sync", whole=whole), timeout=120)

    try:
        chan = _open_served(client, ["sync"], 120)
        if chan is not None:
            channel = SyncChannel(
                chan.makefile("wb"), chan.makefile("r"), None, [sudo(False), sudo(True)], True
            )
        else:
            channel = SyncChannel(*sudo(False)(), reopen=[sudo(True)])
        try:
            yield channel
        finally:
            channel.close()
    finally:
        client.close()
