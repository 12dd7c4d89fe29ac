"""`python -m tests.lab up|down|status|host-flags|workstation CMD...`: the lab by hand.

`up` also starts the host's sshd on GREEN port 222 (as IPFire's), `host-flags` prints the
flags that reach it with its host key pinned, and `workstation CMD...` runs CMD on the LAN
host where the host's libvirt socket cannot be seen: what `make appliance` does.
"""

from __future__ import annotations

import os
import sys

from builder.errors import ApplianceError
from tests.lab.host_sshd import host_flags, lab_sshd, start_lab_sshd, workstation
from tests.lab.lab import LAN_NS, Lab

USAGE = "usage: python -m tests.lab up|down|status|host-flags|workstation CMD..."


def main(argv: list[str]) -> int:
    if argv[:1] == ["workstation"] and len(argv) > 1:
        os.execvp("ip", ["ip", "netns", "exec", LAN_NS, *workstation(argv[1:])])
    if len(argv) != 1 or argv[0] not in ("up", "down", "status", "host-flags"):
        print(USAGE, file=sys.stderr)
        return 2
    lab = Lab()
    try:
        if argv[0] == "host-flags":
            print(" ".join(host_flags(lab_sshd())))
            return 0
        if argv[0] == "up":
            lab.up()
            sshd = start_lab_sshd(lab)
            lab.unlock()
            print(f"host sshd: root@192.168.77.1:222, host key {sshd.fingerprint()}")
        elif argv[0] == "down":
            lab.down()
            print("lab is down")
            return 0
        print(lab.status())
    except ApplianceError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
