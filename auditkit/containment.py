"""Dataset files read only where they really are inside the dataset root.

A manifest names files relative to its root. Comparing path strings is not enough: a symbolic link inside the
root (to a file or a folder) leads anywhere, and the decoder follows it. So every path is resolved (realpath,
after symlinks) and must lie under the resolved root; then the file is opened one component at a time from the
root's real folder with O_NOFOLLOW, so a link swapped in between the check and the open is refused, not
followed. Only regular files are read: a FIFO would block the audit, a device could be anything.
"""
from __future__ import annotations

import os
import stat

from .errors import AuditkitError
from .messages import quote

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def real_root(root: str | os.PathLike) -> str:
    """The dataset root, absolute, with symlinks resolved."""
    return os.path.realpath(os.path.abspath(root))


def check_text(raw: str, where: str) -> None:
    """A path string that the OS cannot take at all (a NUL byte) is bad input, not an internal error."""
    if "\0" in raw:
        raise AuditkitError(f"image path {quote(raw)} contains a NUL byte", where=where)


class Resolver:
    """Real paths of a dataset's files, each required to lie under `root` (a real_root). Folders are resolved
    once each: a full realpath per file cost 37 us a row, more than doubling a 3000-image cache hit."""

    def __init__(self, root: str):
        self.root = root
        self._folders: dict[str, str] = {}

    def regular_file(self, file: str, where: str) -> tuple[str, os.stat_result]:
        """(real path, lstat) of `file`; AuditkitError unless it lies under the root and is a regular file."""
        check_text(file, where)
        head, name = os.path.split(file)
        folder = self._folders.get(head)
        if folder is None:
            folder = self._folders[head] = os.path.realpath(head)
        real = os.path.join(folder, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if not _under(self.root, real):
            raise AuditkitError(f"image path {quote(file)} leads outside the dataset root {quote(self.root)} "
                                "(through a symbolic link)", where=where)
        return real, _stat_regular(real, where)


def _stat_regular(file: str, where: str) -> os.stat_result:
    """lstat of a resolved path; AuditkitError unless it is a regular file."""
    try:
        st = os.lstat(file)
    except FileNotFoundError:
        raise AuditkitError(f"image file not found: {quote(file)}", where=where) from None
    except OSError as e:
        raise AuditkitError(f"cannot read image file {quote(file)}: {e.strerror or e}", where=where) from None
    _require_regular(st, file, where)
    return st


def read_inside(root: str, real: str, where: str) -> bytes:
    """The bytes of `real` (a resolved path under `root`), opened component by component from `root` without
    following any symlink: a path changed into a link after Resolver.regular_file is refused."""
    parts = os.path.relpath(real, root).split(os.sep)
    fd = os.open(root, os.O_RDONLY | _DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before fstat could refuse it
            flags = os.O_RDONLY | _NOFOLLOW | (os.O_NONBLOCK if last else _DIRECTORY)
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                raise AuditkitError(f"image file {quote(real)} changed while being opened ({e.strerror}); "
                                    "symbolic links are not followed here", where=where) from None
            os.close(fd)
            fd = nxt
        _require_regular(os.fstat(fd), real, where)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)


def _require_regular(st: os.stat_result, file: str, where: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise AuditkitError(f"image path {quote(file)} is {kind}; only regular files are read", where=where)


def _under(root: str, path: str) -> bool:
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path.startswith(prefix)
