"""One check's outcome, the same shape for the appliance's verify and the IPFire preflight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what the admin does about a failure; empty when there is nothing to add
