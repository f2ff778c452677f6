"""Signals handled by a thin parent process, never inside the audit.

`auditkit` forks once at start-up, before TensorFlow or onnxruntime is imported. The child runs the command. The
parent only waits for three things: the child's exit, a signal (SIGINT, SIGTERM, SIGHUP), and the child's notes
on a pipe: the folders it is staging, and the moment it publishes its outputs.

The child catches those signals with a handler that does nothing. So nothing is ever raised inside TensorFlow, a
C++ extension, an import or a thread. On a signal the parent kills the child with SIGKILL, which stops all its
threads at once wherever they are. The parent then removes the folders the child had noted and prints one line.
It exits 128 + the signal's number: SIGINT 130, SIGTERM 143, SIGHUP 129.

There is one window in which the parent does not kill: the child's move of its finished outputs into --out.
The child asks before it starts (`publishing`). From that answer until the child exits (a few file renames and
the summary), a signal is noted and the run finishes. A second signal ends it at once. Either nothing is
published and the exit code is the signal's, or everything is published and the exit code is the verdict's.

Like any background job, a process started with SIGINT or SIGHUP ignored (`cmd &` from a script, `nohup`)
keeps it ignored; SIGTERM is always honoured. The Python API has no supervisor: its caller owns the signals.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, NoReturn

PHASE_SIGNAL_ENV = "AUDITKIT_SIGNAL_AT"  # tests: "PHASE:SIGNAME" signals the supervisor when the run reaches PHASE
PHASE_LOG_ENV = "AUDITKIT_PHASE_LOG"  # benchmarks: a file to which each phase reached is appended, with a time
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KEEP_IGNORED = (signal.SIGINT, signal.SIGHUP)  # an inherited "ignore" of these stays (background jobs, nohup)
WHAT = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}
PR_SET_PDEATHSIG = 1


class _Channel:
    """The child's end: notes to the parent, one JSON line each, and the parent's one-byte answers."""

    def __init__(self, notes: int, answers: int):
        self.notes, self.answers = notes, answers
        self.lock = threading.Lock()

    def note(self, kind: str, value: str = "") -> None:
        with self.lock:
            os.write(self.notes, (json.dumps([kind, value]) + "\n").encode())

    def ask(self, kind: str) -> bytes:
        with self.lock:
            os.write(self.notes, (json.dumps([kind, ""]) + "\n").encode())
            return os.read(self.answers, 1)


_CHANNEL: _Channel | None = None  # set in a supervised child


# --------------------------------------------------------------------------- the child's side (no-ops unsupervised)
@contextlib.contextmanager
def removed_if_killed(path: Path) -> Iterator[Path]:
    """Ask the supervisor to remove `path` if the run is killed while the block runs. Noted before the caller
    creates it, so no moment exists in which it is on disk but unknown to the parent."""
    if _CHANNEL is not None:
        _CHANNEL.note("stage", str(Path(path).absolute()))
    try:
        yield path
    finally:
        if _CHANNEL is not None:
            _CHANNEL.note("unstage", str(Path(path).absolute()))


@contextlib.contextmanager
def scratch_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new private folder under `parent` for the block's work: removed when the block ends (a caller may have
    renamed it into place by then), and by the supervisor if the run is killed first."""
    path = Path(parent) / f"{prefix}{uuid.uuid4().hex[:12]}"
    with removed_if_killed(path):
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def publishing() -> Iterator[None]:
    """The move of finished outputs into place. After the supervisor agrees, no single signal interrupts the run:
    it finishes and its outputs stand. If a signal came first, the supervisor kills the run instead of answering."""
    phase("publish")
    if _CHANNEL is not None:
        _CHANNEL.ask("publish")
    yield
    phase("published")


def phase(name: str) -> None:
    """The run has reached `name` (load, decode, clean, craft, evaluate, controls, report, evidence, publish, ...).

    Instrumentation for tests and benchmarks, off unless asked: AUDITKIT_PHASE_LOG appends the phase to a file,
    and AUDITKIT_SIGNAL_AT=PHASE:SIGNAME makes the run signal its supervisor the first time it reaches PHASE,
    then wait until the supervisor has handled that signal (so a test knows the phase the signal arrived in)."""
    log = os.environ.get(PHASE_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{time.monotonic():.4f} {name}\n")
    at = os.environ.get(PHASE_SIGNAL_ENV, "")
    if _CHANNEL is None or not at or at.split(":")[0] != name:
        return
    os.environ.pop(PHASE_SIGNAL_ENV)  # once
    with _CHANNEL.lock:
        os.write(_CHANNEL.notes, (json.dumps(["await-signal", name]) + "\n").encode())
        os.kill(os.getppid(), signal.Signals[at.split(":")[1]])
        os.read(_CHANNEL.answers, 1)  # the supervisor kills this process, or answers when it lets the run finish


# --------------------------------------------------------------------------- the parent's side
def catch_signals() -> None:
    """Record SIGINT, SIGTERM and SIGHUP from now on, for `supervise` to act on (inherited ignores of SIGINT and
    SIGHUP kept). The command's first statement, so that a signal during its imports is not a default death."""
    _record_signals()
    phase("start")


def _record_signals() -> None:
    for sig in HANDLED:
        if sig in KEEP_IGNORED and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        signal.signal(sig, _Parent.record)


def supervise(child: Callable[[], int], say: Callable[[str], None]) -> NoReturn:
    """Run `child()` in a forked process and exit with its exit code; on a signal, kill it, remove what it staged,
    `say` one line and exit 128 + the signal's number. Where fork is impossible, run `child()` here."""
    _record_signals()
    notes_r, notes_w = os.pipe()
    answers_r, answers_w = os.pipe()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        signal.set_wakeup_fd(-1)
        sys.exit(child())
    if pid == 0:
        _become_child(parent, notes_w, answers_r, (notes_r, answers_w, wake_r, wake_w))
        code = 3
        try:
            code = child()
        except BaseException as exc:  # noqa: BLE001 - the commands catch their own; this is a bug's last line
            say(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)")
        finally:
            # Leave without finalising the interpreter: under threads still inside TensorFlow that crashed now and
            # then (SIGSEGV). Every output is written and closed by now; only the console streams need a flush.
            _leave(code)
    for fd in (notes_w, answers_r):
        os.close(fd)
    code = _Parent(pid, notes_r, answers_w, wake_r, say).wait()
    # Decided: a signal from here on changes nothing, and finalising the interpreter would restore the default
    # handlers, under which a late signal would still end the process with a negative exit code.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    _leave(code)


def _leave(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not keep the process alive
            stream.flush()
    os._exit(code)


def _become_child(parent: int, notes: int, answers: int, parents_fds: tuple[int, ...]) -> None:
    global _CHANNEL
    signal.set_wakeup_fd(-1)
    for sig in HANDLED:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _ignore)  # caught, not ignored: programs it starts (Ray) get the default back
            signal.siginterrupt(sig, False)  # and system calls in other threads restart instead of failing
    for fd in parents_fds:
        os.close(fd)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(3)
    _CHANNEL = _Channel(notes, answers)


def _ignore(signum, frame) -> None:
    """The child's handler: the parent decides what a signal does."""


class _Parent:
    pending: list[int] = []

    @staticmethod
    def record(signum, frame) -> None:
        _Parent.pending.append(signum)

    def __init__(self, pid: int, notes: int, answers: int, wake: int, say: Callable[[str], None]):
        self.pid, self.notes, self.answers, self.wake, self.say = pid, notes, answers, wake, say
        self.staged: dict[str, None] = {}
        self.buffer = b""
        self.publishing = False
        self.awaited = self.let_through = 0  # the test hook's waits, and signals that let the run go on
        self.late: int | None = None
        self.signal: int | None = None

    def wait(self) -> int:
        """The exit code: the child's, or 128 + the signal that ended it."""
        pidfd = os.pidfd_open(self.pid)
        while self.signal is None:
            ready, _, _ = select.select([self.notes, self.wake, pidfd] if self.notes >= 0 else [self.wake, pidfd],
                                        [], [])
            if self.notes in ready:
                self._read_notes()
            if self.wake in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake, 512)
            self._handle_signals()
            if pidfd in ready and self.signal is None:
                return self._exited()
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self._remove_staged()
        self._say_line(f"error: {WHAT[self.signal]} ({signal.Signals(self.signal).name}); no output was written")
        return 128 + self.signal

    def _read_notes(self) -> None:
        chunk = os.read(self.notes, 65536)
        if not chunk:  # the child has exited (or is exiting): nothing more to read
            os.close(self.notes)
            self.notes = -1
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            kind, value = json.loads(line)
            if kind == "stage":
                self.staged[value] = None
            elif kind == "unstage":
                self.staged.pop(value, None)
            elif kind == "await-signal":
                self.awaited += 1
                self._answer_awaited()
            elif kind == "publish" and not _Parent.pending and self.signal is None:
                self.publishing = True
                os.write(self.answers, b"y")
            # a publish asked for after a signal is not answered: the signal's handling kills the child

    def _handle_signals(self) -> None:
        while _Parent.pending and self.signal is None:
            sig = _Parent.pending.pop(0)
            if self.publishing and self.late is None:
                self.late = sig  # the outputs are being published: let the run finish
                self.let_through += 1
                self._answer_awaited()
            else:
                self.signal = sig

    def _answer_awaited(self) -> None:
        """The test hook waits until its signal is handled; a signal may be handled before its note is read."""
        while self.awaited and self.let_through:
            self.awaited, self.let_through = self.awaited - 1, self.let_through - 1
            os.write(self.answers, b"s")

    def _exited(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        while self.notes >= 0:  # what it noted before exiting (the pipe's write end closed with it)
            self._read_notes()
        if os.WIFSIGNALED(status):  # a crash (or the OOM killer): never a negative exit code
            self._remove_staged()
            name = signal.Signals(os.WTERMSIG(status)).name
            self._say_line(f"internal error: the run died of {name}; no output was written (rerun with --debug)")
            return 3
        if self.late is not None:
            self._say_line(f"warning: {signal.Signals(self.late).name} arrived while the outputs were being "
                           "published; the run finished")
        return os.waitstatus_to_exitcode(status)

    def _remove_staged(self) -> None:
        for path in self.staged:
            shutil.rmtree(path, ignore_errors=True)

    def _say_line(self, line: str) -> None:
        if sys.stderr.isatty():  # a progress bar may have hidden the cursor and left a line unfinished
            sys.stderr.write("\x1b[?25h\n")
        self.say(line)
