"""The staging folder a run writes into beside --out, and the stale ones that killed runs left behind.

A run writes `.<out>.partial-<id>/` and moves the finished outputs into --out at the end, so a failed run leaves
nothing half-written. A run killed outright (SIGKILL, a power cut) cannot remove its folder; the next run beside
the same --out does. Each run holds an flock on a lock file inside its folder for as long as it lives (the kernel
drops it when the process dies), so a folder whose lock can be taken belongs to no live run and is removed; one
whose lock is held is left alone. Under the `auditkit` command the supervisor removes the folder of a run it
kills (see supervisor).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import AuditkitError
from .messages import quote
from .supervisor import removed_if_killed

LOCK_NAME = ".auditkit-run.lock"
UNLOCKED_GRACE_S = 60  # a folder without a lock file is a live run's only in the moment between mkdir and lock


@contextlib.contextmanager
def staging_dir(out_dir: Path, log: Callable[[str], None]) -> Iterator[Path]:
    """A fresh, locked staging folder beside `out_dir` (stale ones removed first, each with a log line); removed
    with everything in it when the block ends, however it ends."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AuditkitError("exists and is not a directory", str(out_dir))
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditkitError(f"cannot create the output folder ({exc.strerror})", str(out_dir)) from None
    prefix = f".{out_dir.name}.partial-"
    work = parent / f"{prefix}{uuid.uuid4().hex[:8]}"
    with removed_if_killed(work):
        try:
            work.mkdir()
            lock = os.open(work / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise AuditkitError(f"cannot write beside the output folder ({exc.strerror})", str(out_dir)) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in _stale_siblings(parent, prefix, work):
                log(f"removed {quote(stale.name)}, the staging folder of an interrupted run")
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.close(lock)


def _stale_siblings(parent: Path, prefix: str, own: Path) -> Iterator[Path]:
    """Remove the staging folders beside `own` that no live run holds; yield each one removed."""
    for folder in sorted(parent.glob(f"{prefix}*")):
        if folder == own or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - folder.lstat().st_mtime > UNLOCKED_GRACE_S:
                    shutil.rmtree(folder, ignore_errors=True)
                    yield folder
            continue
        except OSError:
            continue  # not ours to judge (permissions, a link): leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
        except BlockingIOError:
            continue  # a live run holds it
        finally:
            os.close(fd)
        yield folder
