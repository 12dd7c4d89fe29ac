"""Exact-text edits of installed files (images/edits.toml): for the few places where a
package does at boot what the appliance never needs, and no setting turns it off. Each edit
must match exactly once, so a changed package fails the build instead of booting half-edited."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from builder.errors import HostError


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str


def read_edits(path: Path) -> list[Edit]:
    if not path.exists():
        return []
    doc = tomllib.loads(path.read_text())
    return [Edit(e["path"], e["old"], e["new"]) for e in doc.get("edit", [])]


def apply_edits(root: Path, edits: list[Edit]) -> None:
    """Each edit in order; a file is written only when all its edits matched."""
    texts: dict[str, str] = {}
    for e in edits:
        text = texts.get(e.path)
        if text is None:
            text = (root / e.path).read_text()
        found = text.count(e.old)
        if found != 1:
            raise HostError(
                f"images/edits.toml: {e.path}: the text to replace occurs {found} times, not once"
                " (the package changed?); fix: update or remove that edit"
            )
        texts[e.path] = text.replace(e.old, e.new)
    for rel, text in texts.items():
        (root / rel).write_text(text)
