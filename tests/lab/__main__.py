"""`python -m tests.lab up|down|status`: the lab by hand (make lab / make lab-down)."""

from __future__ import annotations

import sys

from builder.errors import ApplianceError
from tests.lab.lab import Lab


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down", "status"):
        print("usage: python -m tests.lab up|down|status", file=sys.stderr)
        return 2
    lab = Lab()
    try:
        if argv[0] == "up":
            lab.up()
            lab.unlock()
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
