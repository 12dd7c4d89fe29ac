"""Commands in an appliance through the qemu guest agent, carried by the libvirt connection.

An upgrade stages the new appliance with its NIC's link down, so SSH cannot reach it; the
guest agent's virtio-serial channel can, over the same connection (local or through SSH)
the tool already has to the host. Nothing is installed on the host for it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from typing import Any

import libvirt
import libvirt_qemu

from builder.errors import GuestError
from builder.remote.ssh import Result

POLL_S = 0.1
PING_TIMEOUT_S = 5


class AgentSilent(GuestError):
    """The guest agent did not answer in time (still booting, or not in the image)."""


def _call(dom: libvirt.virDomain, command: str, timeout: int, **arguments: Any) -> Any:
    request = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
    answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps(request), timeout, 0)
    return json.loads(answer).get("return")


def ping(dom: libvirt.virDomain) -> bool:
    """True when the guest agent answers."""
    try:
        _call(dom, "guest-ping", PING_TIMEOUT_S)
        return True
    except libvirt.libvirtError:
        return False


def wait(dom: libvirt.virDomain, deadline: float) -> None:
    """Until the guest agent answers, or AgentSilent at `deadline` (time.monotonic)."""
    while not ping(dom):
        if time.monotonic() >= deadline:
            raise AgentSilent(
                f"the guest agent of {dom.name()} did not answer",
                "its serial log shows how far it booted; run the same command again",
            )
        time.sleep(1.0)


def run(dom: libvirt.virDomain, command: str, stdin: str = "", timeout: float = 120.0) -> Result:
    """`command` by /bin/sh in the guest as root; its exit code and output, like SSH's."""
    return finish(dom, start(dom, command, stdin), command, timeout)


def start(dom: libvirt.virDomain, command: str, stdin: str = "") -> int:
    """`command` started by /bin/sh in the guest as root, not waited for: its guest pid."""
    args: dict[str, Any] = {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True}
    if stdin:
        args["input-data"] = base64.b64encode(stdin.encode()).decode()
    try:
        return _call(dom, "guest-exec", 30, **args)["pid"]
    except libvirt.libvirtError as e:
        raise _silent(dom, e) from None


def finish(dom: libvirt.virDomain, pid: int, command: str, timeout: float = 120.0) -> Result:
    """What the command `start` gave `pid` did, once it ended: exit code and output."""
    deadline = time.monotonic() + timeout
    while True:
        result = poll(dom, pid)
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise GuestError(
                f"{command.split()[0]} did not end within {timeout:.0f}s on {dom.name()}",
                "see the appliance's serial log; run the same command again",
            )
        time.sleep(POLL_S)


def poll(dom: libvirt.virDomain, pid: int) -> Result | None:
    """The outcome of the command `start` gave `pid`, or None while it runs. The guest agent
    forgets an outcome once it has told it: keep what this returns."""
    try:
        status = _call(dom, "guest-exec-status", 30, pid=pid)
    except libvirt.libvirtError as e:
        raise _silent(dom, e) from None
    if not status.get("exited"):
        return None

    def text(key: str) -> str:
        return base64.b64decode(status.get(key, "")).decode(errors="replace")

    return Result(status.get("exitcode", 1), text("out-data"), text("err-data"))


def file_exists(dom: libvirt.virDomain, path: str) -> bool:
    """Whether the guest has a file at `path`, asked without starting a process in it."""
    try:
        handle = _call(dom, "guest-file-open", PING_TIMEOUT_S, path=path, mode="r")
    except libvirt.libvirtError:
        return False
    with contextlib.suppress(libvirt.libvirtError):
        _call(dom, "guest-file-close", PING_TIMEOUT_S, handle=handle)
    return True


def _silent(dom: libvirt.virDomain, e: libvirt.libvirtError) -> AgentSilent:
    return AgentSilent(
        f"guest agent of {dom.name()}: {e.get_error_message()}",
        "run the same command again; if it repeats, the image lacks qemu-guest-agent",
    )
