"""How the tool reaches a running appliance: its pinned SSH login, and the agent
(builder/guest/agent.py) it runs there. The image needs nothing of the tool's own: each call
sends the agent whole, inside a small loader that keeps a copy under /var/lib/wg-appliance
named by its digest. From the second call on, the loader imports that copy, whose compiled
bytecode Python caches, instead of compiling 18 KB of source again (under TCG, a good part of
a sync); a new tool version brings a new digest, so a stale copy is never run."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from builder.errors import GuestError
from builder.model.keys import Keys
from builder.model.site import Site
from builder.remote.ssh import Target, connect, execute
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


def agent_program(folder: str = AGENT_DIR) -> str:
    """The agent inside its loader: one Python program for `python3 -S -c`."""
    source = AGENT.read_text()
    name = "agent_" + hashlib.sha256(source.encode()).hexdigest()[:16]
    return LOADER.format(folder=folder, name=name, source=source)


def agent_command(mode: str, *args: str) -> str:
    """The agent as one `python3 -S -c` command, run as root."""
    words = [shlex.quote(agent_program()), mode, *map(shlex.quote, args)]
    return "sudo -n python3 -S -c " + " ".join(words)


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


def _agent_document(site: Site, keys: Keys, timeout: float, what: str, *mode: str) -> dict:
    """One connection, one agent command, its one JSON document."""
    client = connect(target_for(site, keys), timeout=timeout)
    try:
        result = execute(client, agent_command(*mode), timeout=timeout + 30)
    finally:
        client.close()
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


def gather(site: Site, keys: Keys, timeout: float = 20.0) -> dict[str, Any]:
    """Every fact verify judges: one connection, one command."""
    gateway6 = site.lan.gateway_for(6)
    arg = json.dumps(
        {
            "gateway": str(site.lan.gateway),
            "gateway6": None if gateway6 is None else str(gateway6),
            "metrics": metrics_url(site),
        }
    )
    return _agent_document(site, keys, timeout, "verify", "probe", arg)


def read_status(site: Site, keys: Keys, timeout: float = 20.0) -> dict[str, Any]:
    """What status shows (uptime, kernel, OS, wg0's peers): one connection, one command."""
    return _agent_document(site, keys, timeout, "status", "status")


class SyncChannel:
    """The agent in sync mode: it sends the light facts, takes one request, sends the outcome."""

    def __init__(self, stdin, stdout, stderr):
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr

    def answer(self) -> dict[str, Any]:
        return _document(self._stdout.readline(), "sync", self._stderr_text)

    def _stderr_text(self) -> str:
        return self._stderr.channel.recv_stderr(4096).decode(errors="replace")

    def send(self, request: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(request) + "\n")
        self._stdin.flush()


@contextmanager
def sync_channel(site: Site, keys: Keys) -> Iterator[SyncChannel]:
    """One SSH channel, one agent process for the whole sync: probe, then apply."""
    client = connect(target_for(site, keys))
    stdin, stdout, stderr = client.exec_command(agent_command("sync"), timeout=120)
    try:
        yield SyncChannel(stdin, stdout, stderr)
    finally:
        stdin.channel.shutdown_write()
        client.close()
