"""Commands in an appliance through the qemu guest agent, carried by the libvirt connection.

An upgrade stages the new appliance with its NIC's link down, so SSH cannot reach it; the
guest agent's virtio-serial channel can, over the same connection (local or through SSH)
the tool already has to the host. Nothing is installed on the host for it.
"""

from __future__ import annotations

import base64
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
    args: dict[str, Any] = {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True}
    if stdin:
        args["input-data"] = base64.b64encode(stdin.encode()).decode()
    try:
        pid = _call(dom, "guest-exec", 30, **args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = _call(dom, "guest-exec-status", 30, pid=pid)
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise GuestError(
                    f"{command.split()[0]} did not end within {timeout:.0f}s on {dom.name()}",
                    "see the appliance's serial log; run the same command again",
                )
            time.sleep(POLL_S)
    except libvirt.libvirtError as e:
        raise AgentSilent(
            f"guest agent of {dom.name()}: {e.get_error_message()}",
            "run the same command again; if it repeats, the image lacks qemu-guest-agent",
        ) from None

    def text(key: str) -> str:
        return base64.b64decode(status.get(key, "")).decode(errors="replace")

    return Result(status.get("exitcode", 1), text("out-data"), text("err-data"))
