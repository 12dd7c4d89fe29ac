"""The layers of builder/, held by a test: every module's imports read with `ast`.

- model/, render/ and checks/ are pure: they import nothing from remote/, local/ (files,
  the state dir, subprocesses), image/ or the commands, and neither libvirt, paramiko nor
  subprocess; model/ imports no other layer at all.
- guest/ holds the programs that run inside the VM: standard library only.
- The commands (deploy, sync, verify, ipfire, status) are peers: none imports another, and none
  imports cli, the one face. What they share lives in a layer below.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "builder.deploy",
    "builder.sync",
    "builder.verify",
    "builder.ipfire",
    "builder.status",
}
PURE = ("builder.model", "builder.render", "builder.checks")
SIDE_EFFECTS = {"libvirt", "paramiko", "subprocess"}


# The standard library as the guest's Python (3.13) names it: since 3.12 the builtin sha256
# module is `_sha2` (it was `_sha256`, the name this host's Python knows).
GUEST_STDLIB = sys.stdlib_module_names | {"_sha2"}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved)."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Each broken rule as `module imports other: why`."""
    out = []
    for path in sorted((root / "builder").rglob("*.py")):
        me = module_name(root, path)
        for other in sorted(imports_of(root, path)):
            top = other.split(".")[0]
            why = None
            if any(within(me, p) for p in PURE):
                if (
                    any(within(other, f"builder.{side}") for side in ("remote", "local", "image"))
                    or other in COMMANDS
                    or top in SIDE_EFFECTS
                ):
                    why = "a pure layer reaches a side effect"
                elif within(other, "builder.cli"):
                    why = "a pure layer imports the CLI"
            if within(me, "builder.model") and any(
                within(other, f"builder.{layer}")
                for layer in ("render", "checks", "remote", "image", "guest")
            ):
                why = "the site model depends on nothing above it"
            if within(me, "builder.guest") and top not in GUEST_STDLIB:
                why = "guest programs run in the VM with the standard library only"
            if me in COMMANDS and (other in COMMANDS - {me} or within(other, "builder.cli")):
                why = "commands are peers: share through a layer below"
            if (
                other in COMMANDS
                and me not in COMMANDS
                and me not in ("builder.__main__", "builder.cli")
            ):
                why = "a layer below the commands imports one"
            if within(other, "builder.cli") and me not in ("builder.__main__", "builder.cli"):
                why = "only __main__ imports the CLI"
            if why:
                out.append(f"{me} imports {other}: {why}")
    return sorted(set(out))


def test_the_layers_hold() -> None:
    assert violations(ROOT) == []


def test_the_layer_folders_exist() -> None:
    for layer in ("model", "render", "checks", "remote", "guest", "image"):
        assert (ROOT / "builder" / layer / "__init__.py").is_file(), layer
    for command in COMMANDS:
        assert (ROOT / (command.replace(".", "/") + ".py")).is_file(), command


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    """The rule can fail: throwaway modules that break it, in a copy of the package."""
    shutil.copytree(ROOT / "builder", tmp_path / "builder")
    (tmp_path / "builder/render/throwaway.py").write_text("import paramiko\n")
    (tmp_path / "builder/checks/throwaway.py").write_text("from ..remote import ssh\n")
    (tmp_path / "builder/guest/throwaway.py").write_text("import yaml\n")
    with (tmp_path / "builder/sync.py").open("a") as f:
        f.write("\nfrom builder import deploy\n")
    found = violations(tmp_path)
    assert "builder.render.throwaway imports paramiko: a pure layer reaches a side effect" in found
    assert any(v.startswith("builder.checks.throwaway imports builder.remote") for v in found)
    assert any(v.startswith("builder.guest.throwaway imports yaml") for v in found)
    assert (
        "builder.sync imports builder.deploy: commands are peers: share through a layer below"
        in found
    )
    offenders = {v.split(" imports ")[0] for v in found}
    assert offenders == {
        "builder.render.throwaway",
        "builder.checks.throwaway",
        "builder.guest.throwaway",
        "builder.sync",
    }, found
