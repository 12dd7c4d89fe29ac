"""Writing output files: the one way the tool puts a file on disk.

A file is made under a fresh random name in its own folder (O_EXCL, O_NOFOLLOW, no more
than 0600 until it gets its final mode, before its first byte), synced, then renamed over
the target. The rename replaces
whatever link sits at the target and never writes through it. The folder is opened once
and checked on that handle (a real folder, ours or root's, nobody else may write to it),
and every file operation goes through that handle, so swapping the path midway changes
nothing. A re-run that would write the same bytes with the same mode writes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shlex
import stat
from pathlib import Path

from builder.errors import ApplianceError, HostError, InputError
from builder.text import printable

MAX_READ = 64 << 20


class OutDir:
    """A checked output folder, held open while the tool writes into it.

    `option` names the command line option that chose the folder (errors are then bad
    input, exit 2); without one the folder is the tool's own (errors exit 1 with `fix`).
    A link at a folder the user `chosen` is followed when the user (or root) made it; a
    link at one of the tool's own folders is refused.
    """

    def __init__(
        self,
        path: Path,
        option: str = "",
        fix: str = "",
        private: bool = False,
        chosen: bool | None = None,
    ):
        self.path = Path(path)
        self.option = option
        self.fix = fix
        self.private = private
        self.chosen = bool(option) if chosen is None else chosen
        self.fd = -1

    def __enter__(self) -> OutDir:
        return self if self.fd >= 0 else self.open(create=True)

    def __exit__(self, *exc) -> None:
        self.close()

    def error(self, message: str, path: Path | None = None, fix: str = "") -> ApplianceError:
        """The error for a folder or file that cannot be used, on one line."""
        where = printable(str(path or self.path), keep_newlines=False)
        fix = fix or self.fix
        if self.option:
            return InputError(where, self.option, message + (f" ({fix})" if fix else ""))
        return HostError(f"{where}: {message}", fix)

    def open(self, create: bool) -> OutDir:
        """Open the folder, making missing ones (0700 when private) if `create`."""
        if create:
            self._make()
        try:
            before = os.lstat(self.path)
        except FileNotFoundError:
            raise self.error("no such folder") from None
        except OSError as e:
            raise self.error(f"cannot use this folder: {e.strerror}") from None
        if stat.S_ISLNK(before.st_mode) and not self.chosen:
            raise self.error("is a link, not a folder", fix="put the real folder here")
        if stat.S_ISLNK(before.st_mode) and not _trusted_owner(before):
            raise self.error("is a link made by another user", fix="use the real folder")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise self.error("not a folder") from None
        except OSError as e:
            raise self.error(f"cannot open this folder: {e.strerror}") from None
        self._check(os.fstat(self.fd))
        return self

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _make(self) -> None:
        """mkdir -p that never follows a link in a folder it makes itself."""
        missing = []
        p = self.path
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                os.mkdir(p, 0o700 if self.private else 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(p).st_mode):
                    raise self.error("appeared as a non-folder while being made", p) from None
            except NotADirectoryError:
                raise self.error("is under a file, not a folder", p) from None
            except OSError as e:
                raise self.error(f"cannot make this folder: {e.strerror}", p) from None

    def _check(self, st: os.stat_result) -> None:
        """Refuse a folder that someone else could write into or own."""
        if not _trusted_owner(st):
            raise self.error("owned by another user", fix="pick a folder of your own")
        loose = stat.S_IMODE(st.st_mode) & (0o077 if self.private else 0o022)
        if loose:
            raise self.error(
                "others can read or write it" if self.private else "others can write to it",
                fix=f"chmod {'700' if self.private else 'go-w'} {_quoted(self.path)}",
            )

    def read(self, name: str, fix: str = "") -> bytes | None:
        """The bytes of a regular file in the folder, None when there is none; a link or
        anything else at that name is refused, not followed."""
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd
            )
        except FileNotFoundError:
            return None
        except OSError as e:
            what = "it is a link, not a file" if e.errno == errno.ELOOP else e.strerror
            raise self.error(f"cannot read: {what}", self.path / name, fix) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self.error("not a regular file", self.path / name, fix)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_READ + 1)
        if len(data) > MAX_READ:
            raise self.error("too large", self.path / name, fix)
        return data

    def target(self, name: str) -> os.stat_result | None:
        """What is at `name` now, without following a link; a folder, FIFO, device or
        socket there is refused (renaming over it would lose it or surprise its reader)."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            raise self.error("is a folder, not a file", self.path / name)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise self.error("is a FIFO, device or socket, not a file", self.path / name)
        return st

    def unchanged(self, name: str, data: bytes, mode: int) -> bool:
        """True when the target is already a regular file of ours with these bytes and mode."""
        st = self.target(name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return False
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != mode:
            return False
        return st.st_size == len(data) and self.read(name) == data

    def write(self, name: str, data: bytes, mode: int = 0o644) -> bool:
        """Put `data` at `name` unless it is there already; True when written."""
        if self.unchanged(name, data, mode):
            return False
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode & 0o600,
                dir_fd=self.fd,
            )
        except OSError as e:
            raise self.error(f"cannot make a file in this folder: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self.fd)
            if isinstance(e, OSError):
                raise self.error(f"cannot write: {e.strerror}", self.path / name) from None
            raise
        os.fsync(self.fd)
        return True


def _quoted(path: Path) -> str:
    return printable(shlex.quote(str(path)), keep_newlines=False)


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (os.getuid(), 0)


def write_files(out: OutDir, files: dict[str, bytes], secret: set[str]) -> list[str]:
    """Write each of `files` into the open folder `out` (secrets 0600, the rest 0644);
    return the names written, so re-runs with the same input write nothing."""
    return [n for n, data in files.items() if out.write(n, data, 0o600 if n in secret else 0o644)]


def file_target(path: Path, option: str) -> tuple[OutDir, str]:
    """The open, checked folder of the file `path` (made by nobody but its user) and the
    file's name in it: checked before any work, so a bad path costs nothing."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutDir(path, option).error("names a folder, not a file")
    out = OutDir(path.parent, option).open(create=False)
    try:
        out.target(path.name)
    except BaseException:
        out.close()
        raise
    return out, path.name
