"""Errors the tool raises; builder.cli is the one place that maps them to exit codes."""

from __future__ import annotations

from builder.text import printable


class ApplianceError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(ApplianceError):
    """Bad input from the user: exit 2, one line naming the file and key path."""

    exit_code = 2

    def __init__(self, file: str, key: str, message: str, line: int | None = None):
        self.file = file
        self.key = key
        self.message = message
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        line = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return printable(line, keep_newlines=False)


class RenderError(ApplianceError):
    """A value that validation let through would break the file it is written into: a bug,
    refused rather than written."""


class HostError(ApplianceError):
    """The build host, libvirt host or IPFire host failed: exit 1 with what to do."""

    def __init__(self, what: str, fix: str = ""):
        self.what = what
        self.fix = fix
        super().__init__(what + (f" ({fix})" if fix else ""))


class GuestError(HostError):
    """The appliance itself failed or is not as expected."""


class ConnectError(ApplianceError):
    """Could not connect or authenticate (SSH): exit 3."""

    exit_code = 3


class CommandError(HostError):
    """A subprocess failed; carries its command line and stderr tail."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = " | ".join(stderr.strip().splitlines()[-5:])
        super().__init__(f"`{' '.join(argv[:3])}...` exited {returncode}: {tail}")
