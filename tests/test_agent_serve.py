"""The agent kept running behind its socket (`agent serve`), driven as systemd starts it: a
listening socket passed as fd 3, the agent file as the program. The tool's side of the same
protocol (its request line, RUN or MISSING, the end line) reads what the real server says."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from builder.guest import agent as ga
from builder.remote import appliance as ra

START = """import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"], os.environ["LISTEN_FDS"] = str(os.getpid()), "1"
os.execv(sys.executable, [sys.executable, "-S", sys.argv[2], "serve"])
"""


@pytest.fixture
def server(tmp_path) -> Iterator[SimpleNamespace]:
    program = tmp_path / "wg-appliance-agent"
    shutil.copy(ga.__file__, program)
    folder = tempfile.mkdtemp(prefix="wga-serve-")  # not under tmp_path: others may enter
    os.chmod(folder, 0o711)
    path = os.path.join(folder, "agent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    proc = subprocess.Popen(
        [sys.executable, "-c", START, str(listener.fileno()), str(program)],
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
    )
    listener.close()
    try:
        yield SimpleNamespace(path=path, program=program, proc=proc, name=ga.source_name(program))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(folder)


def _call(path: str, request: dict) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    s.sendall(json.dumps(request).encode() + b"\n")
    return s


def _whole(s: socket.socket) -> bytes:
    s.shutdown(socket.SHUT_WR)
    with s, s.makefile("rb") as f:
        return f.read()


def test_a_call_runs_in_the_kept_agent_and_says_how_it_ended(server):
    said = _whole(_call(server.path, {"agent": server.name, "argv": ["bogus"]}))
    head, _, rest = said.partition(b"\n")
    assert head + b"\n" == ga.SERVE_RUN, said
    end = ra.ended(rest.decode())
    assert end.rc == 1 and "usage: agent" in end.stderr and end.stdout == "", end
    # the server goes on: a second call is served by another fork
    assert _whole(_call(server.path, {"agent": server.name, "argv": ["x"]})).startswith(b"RUN\n")


def test_sync_talks_to_the_kept_agent_line_by_line(server):
    """The tool's SyncChannel over the real server: RUN, the light facts, an empty request
    (nothing to change), and the end line after the agent returned."""
    s = _call(server.path, {"agent": server.name, "argv": ["sync"]})
    out, into = s.makefile("r"), s.makefile("w")
    ends = SimpleNamespace(shutdown_write=lambda: s.shutdown(socket.SHUT_WR), close=s.close)
    stdin = SimpleNamespace(write=into.write, flush=into.flush, channel=ends)
    channel = ra.SyncChannel(stdin, out, None, reopen=[], served=True)
    facts = channel.answer()
    assert {"wg", "files", "addresses", "metrics"} <= set(facts), facts
    channel.close()
    end = ra.ended(out.read())
    assert (end.rc, end.stdout.strip()) == (0, ""), end
    s.close()


def test_a_failing_kept_agent_is_a_guest_error_with_its_stderr(server):
    s = _call(server.path, {"agent": server.name, "argv": ["takeover", "not json"]})
    out = s.makefile("r")
    ends = SimpleNamespace(shutdown_write=lambda: s.shutdown(socket.SHUT_WR), close=s.close)
    channel = ra.SyncChannel(SimpleNamespace(channel=ends), out, None, served=True)
    with pytest.raises(ra.GuestError, match="JSONDecodeError"):
        channel.answer()
    s.close()


def test_another_agent_is_missing_and_a_replaced_one_ends_the_server(server):
    other = {"agent": "agent_" + "0" * 16, "argv": ["status"]}
    assert _whole(_call(server.path, other)) == ga.SERVE_MISSING
    assert server.proc.poll() is None  # still the agent of its file: it goes on
    server.program.write_text(server.program.read_text() + "\n# a newer version\n")
    new = {"agent": ga.source_name(server.program), "argv": ["status"]}
    assert _whole(_call(server.path, new)) == ga.SERVE_MISSING
    assert server.proc.wait(timeout=30) is not None  # systemd starts the new file next time


@pytest.mark.parametrize(
    "line", [b"not json\n", b'{"agent": "x"}\n', b'{"agent": "x", "argv": [1]}\n', b"[]\n"]
)
def test_a_bad_request_gets_no_answer(server, line):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(server.path)
    s.sendall(line)
    assert _whole(s) == b""
    assert _whole(_call(server.path, {"agent": server.name, "argv": ["x"]})).startswith(b"RUN\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call as another user")
def test_only_root_and_the_sockets_owner_are_served(server):
    """The socket file open to all for this test: the caller's credentials still refuse."""
    os.chmod(server.path, 0o777)
    assert _as_nobody(server) == b""
    os.chown(server.path, 65534, 65534)  # now nobody owns it, and is served
    assert _as_nobody(server).startswith(ga.SERVE_RUN)


def _as_nobody(server) -> bytes:
    """What a call by uid 65534 reads (b"" when the server hung up on it)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        with contextlib.suppress(BaseException):
            os.setgid(65534)
            os.setuid(65534)
            try:
                said = _whole(_call(server.path, {"agent": server.name, "argv": ["x"]}))
            except (BrokenPipeError, ConnectionResetError):
                said = b""
            os.write(write, said or b"-")
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said, "the call as nobody failed before it read anything"
    return b"" if said == b"-" else said


def test_the_server_refuses_to_start_without_systemds_socket():
    r = subprocess.run(
        [sys.executable, "-S", ga.__file__, "serve"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "no socket was passed" in r.stderr, r
