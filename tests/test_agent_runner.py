"""How the agent is started cheaply: the short runner and the loader it falls back to, the
commands the probe runs side by side, its own HTTP scrape, and an MTU left alone."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from builder.errors import GuestError
from builder.guest import agent as ga
from builder.remote import appliance as ra
from builder.remote.ssh import Result


def _python(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-S", "-c", program, *args], capture_output=True, text=True, timeout=60
    )


def test_the_runner_says_missing_until_the_loader_kept_the_agent(tmp_path):
    folder = str(tmp_path / "agent")
    direct = _python(ra.AGENT.read_text(), "bogus")
    missing = _python(ra.agent_runner(folder), "bogus")
    assert (missing.returncode, missing.stdout) == (ra.MISSING, "")
    assert ra._missing(missing.returncode, missing.stdout)
    loaded = _python(ra.agent_program(folder), "bogus")
    assert (loaded.returncode, loaded.stderr) == (direct.returncode, direct.stderr)
    ran = _python(ra.agent_runner(folder), "bogus")
    assert (ran.returncode, ran.stderr) == (direct.returncode, direct.stderr)
    assert direct.returncode != ra.MISSING


def test_the_runner_is_short_and_names_the_digest():
    runner, whole = ra.agent_command("status"), ra.agent_command("status", whole=True)
    assert len(runner) < 400 < 20_000 < len(whole)
    name = ra._agent()[1]
    assert name in runner and name in whole and "def wg_dump" in whole


class FakeClient:
    """Answers MISSING to the runner while `kept` is False, and keeps the agent when the whole
    program comes; records every command."""

    def __init__(self, kept: bool):
        self.kept, self.commands = kept, []

    def close(self) -> None:
        pass

    def get_transport(self) -> None:  # no kept agent to reach: the sudo path runs
        return None

    def run(self, command: str) -> Result:
        self.commands.append(command)
        if "def wg_dump" in command:
            self.kept = True
        if not self.kept:
            return Result(ra.MISSING, "", "")
        return Result(0, json.dumps({"mode": command.split()[-1]}), "")


@pytest.fixture
def fake_ssh(monkeypatch, site_keys):
    def install(kept: bool) -> FakeClient:
        client = FakeClient(kept)
        monkeypatch.setattr(ra, "connect", lambda target, timeout=10: client)
        monkeypatch.setattr(ra, "execute", lambda c, command, timeout=60: c.run(command))
        return client

    return install


def test_a_missing_agent_is_sent_whole_once(fake_ssh, site_keys):
    site, keys = site_keys
    client = fake_ssh(kept=False)
    assert ra.read_status(site, keys) == {"mode": "status"}
    assert [("def wg_dump" in c) for c in client.commands] == [False, True]
    assert ra.read_status(site, keys) == {"mode": "status"}
    assert len(client.commands) == 3 and "def wg_dump" not in client.commands[2]


def test_an_agent_failure_is_not_taken_for_a_missing_copy(fake_ssh, site_keys, monkeypatch):
    """Exit MISSING after saying something is the agent's own failure: reported, not resent."""
    site, keys = site_keys
    fake_ssh(kept=True)
    sent = []

    def execute(client, command, timeout=60):
        sent.append(command)
        return Result(ra.MISSING, "half an answer", "")

    monkeypatch.setattr(ra, "execute", execute)
    with pytest.raises(GuestError):
        ra.read_status(site, keys)
    assert len(sent) == 1


class FakeChannel:
    def __init__(self, lines: list[str], rc: int):
        self.lines, self.rc, self.closed = list(lines), rc, False

    def readline(self) -> str:
        return self.lines.pop(0) if self.lines else ""

    def recv_exit_status(self) -> int:
        return self.rc

    def shutdown_write(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def test_sync_resends_the_whole_agent_only_when_missing(monkeypatch, site_keys):
    site, keys = site_keys
    commands = []

    def exec_command(command, timeout=None):
        commands.append(command)
        whole = "def wg_dump" in command
        ch = FakeChannel(['{"facts": 1}\n', '{"ok": true}\n'] if whole else [], 0 if whole else 75)
        out = SimpleNamespace(readline=ch.readline, channel=ch)
        return SimpleNamespace(channel=ch, write=lambda t: None, flush=lambda: None), out, out

    client = SimpleNamespace(
        exec_command=exec_command, close=lambda: None, get_transport=lambda: None
    )
    monkeypatch.setattr(ra, "connect", lambda target, timeout=10: client)
    with ra.sync_channel(site, keys) as channel:
        assert channel.answer() == {"facts": 1}
        assert channel.answer() == {"ok": True}
    assert [("def wg_dump" in c) for c in commands] == [False, True]


def test_commands_run_side_by_side_and_answer_in_order(tmp_path):
    """The first command waits for a file the second makes, and the second for one the
    `meanwhile` call makes: run one after another, they would time out."""
    a, b = tmp_path / "a", tmp_path / "b"
    wait = "for i in $(seq 200); do [ -e {} ] && break; sleep 0.05; done; [ -e {} ] && echo {}"
    out = ga.sh_all(
        ("sh", "-c", wait.format(a, a, "first")),
        ("sh", "-c", f"touch {a}; " + wait.format(b, b, "second") + "; echo err >&2; exit 3"),
        (str(tmp_path / "no-such-program"),),
        meanwhile=lambda: b.touch() or "meanwhile",
    )
    assert out[0] == {"rc": 0, "out": "first\n", "err": ""}
    assert out[1] == {"rc": 3, "out": "second\n", "err": "err\n"}
    assert out[2]["rc"] == 127 and out[2]["out"] == ""
    assert out[3] == "meanwhile"
    assert ga.sh("sh", "-c", "echo one") == {"rc": 0, "out": "one\n", "err": ""}


def test_a_command_given_text_reads_it_on_stdin():
    out = ga.sh_all((("sh", "-c", "cat; echo done"), "one\ntwo\n"), ("echo", "x"))
    assert out[0] == {"rc": 0, "out": "one\ntwo\ndone\n", "err": ""}
    assert out[1] == {"rc": 0, "out": "x\n", "err": ""}


ROUTES = [
    {"dst": "default", "gateway": "192.168.77.1", "dev": "lan0"},
    {"dst": "192.168.88.0/24", "dev": "wg0", "protocol": "boot"},
    {"type": "local", "dst": "192.168.77.50", "dev": "lan0", "table": "local"},
    {"dst": "10.7.7.0/24", "dev": "wg0", "table": "100"},
    {"dst": "fd88::/64", "dev": "wg0", "metric": 1024},
]
LINKS = [
    {"ifname": "lan0", "mtu": 1500, "addr_info": [{"local": "192.168.77.50", "prefixlen": 24}]},
    {"ifname": "wg0", "flags": ["UP"], "mtu": 1420, "addr_info": []},
]


@pytest.mark.parametrize("sep", ["\n", "", "\n\n "])
def test_the_ip_batch_gives_the_main_table_of_both_families_and_the_links(sep):
    """`table all` lists other tables' routes with their name; main has none."""
    routes, links = ga.ip_batch({"rc": 0, "out": json.dumps(ROUTES) + sep + json.dumps(LINKS)})
    assert routes == [ROUTES[0], ROUTES[1], ROUTES[4]]
    assert links == LINKS


@pytest.mark.parametrize(
    "out", ["", "garbage", json.dumps(ROUTES)[:-3], '{"not": "a list"}', json.dumps(ROUTES)]
)
def test_a_failed_ip_batch_gives_what_it_printed_and_empty_lists_for_the_rest(out):
    routes, links = ga.ip_batch({"rc": 1, "out": out})
    assert links == []
    assert routes == ([ROUTES[0], ROUTES[1], ROUTES[4]] if out == json.dumps(ROUTES) else [])


def test_the_probe_takes_wg0s_link_from_the_address_listing(monkeypatch):
    """One `ip` for routes, addresses and wg0's flags and MTU: what the checks judge."""
    batch = {"rc": 0, "out": json.dumps(ROUTES) + "\n" + json.dumps(LINKS) + "\n"}
    ran = []

    def sh_all(*argvs, meanwhile=None):
        ran.extend(argvs)
        results = {ga.IP_BATCH: batch, ga.WG_DUMP: {"rc": 1, "out": "", "err": "no wg0"}}
        return [results.get(a, {"rc": 0, "out": "", "err": ""}) for a in argvs] + [meanwhile()]

    monkeypatch.setattr(ga, "sh_all", sh_all)
    facts = ga.facts({})
    assert [a for a in ran if a[0] == "ip" or a[0][0] == "ip"] == [ga.IP_BATCH]
    assert facts["wg_link"] == [{"ifname": "wg0", "flags": ["UP"], "mtu": 1420}]
    assert facts["routes"] == [ROUTES[0], ROUTES[1], ROUTES[4]]
    assert facts["addresses"] == {"lan0": [], "wg0": []}


class Exporter(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path != "/metrics":
            self.send_error(404)
            return
        body = b'wireguard_sent_bytes_total{public_key="a"} 1\nwireguard_peers 1\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def exporter():
    server = http.server.HTTPServer(("127.0.0.1", 0), Exporter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_scrape_reads_status_and_body(exporter):
    status, body = ga.http_get(exporter + "/metrics")
    assert status == 200 and body.startswith(b"wireguard_sent_bytes_total{")
    assert ga.http_get(exporter + "/other")[0] == 404
    facts = ga.metrics_facts(exporter + "/metrics")["scrape"]
    assert (facts["status"], facts["lines"], facts["peers"]) == (200, 2, 1)
    assert ga.metrics_facts(exporter + "/other")["scrape"]["peers"] == 0


def test_a_scrape_of_something_else_is_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]

        def answer():
            conn, _ = s.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        scrape = ga.metrics_facts(f"http://127.0.0.1:{port}/metrics")["scrape"]
        t.join(10)
    assert scrape["status"] is None and "not an HTTP answer" in scrape["error"]


def test_a_refused_scrape_is_the_answer_at_once(tmp_path, monkeypatch):
    """Enabled or not: systemd holds the exporter's port from early boot (its socket unit), so
    a refusal is a failure to report, not a start to wait for."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "wants").touch()
    monkeypatch.setattr(ga, "METRICS_WANTS", str(tmp_path / "wants"))
    facts = ga.metrics_facts(f"http://127.0.0.1:{port}/metrics")
    assert facts["enabled"] and "ConnectionRefusedError" in facts["scrape"]["error"], facts
    assert facts["scrape"]["seconds"] < 5, facts
