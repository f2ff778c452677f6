"""Signals: the `auditkit` command's supervisor (auditkit.supervisor) and runs interrupted at every phase.

Every process these tests signal is started with the default disposition of SIGINT and SIGHUP restored, so the
tests pass however pytest was started (a job started with `&` by a script inherits SIGINT ignored, `nohup`
SIGHUP). Runs are signalled at a known phase through the supervisor's test hook, never after a sleep.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_corpus import POLICY, REPO, SIZE, World, dataset, linear_onnx

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
WORDS = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)",
         signal.SIGHUP: "hung up (SIGHUP)"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """The corpus's tiny ONNX model, black-box crafted: a whole run in a few seconds."""
    root = tmp_path_factory.mktemp("signals-world")
    (root / "p.yaml").write_text(POLICY)
    return World(root, linear_onnx(root / "m.onnx", ["N", 1, SIZE, SIZE]), root / "p.yaml")


def default_signals() -> None:
    """preexec_fn: the child starts as a foreground job would, whatever this process inherited."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def start(args: list[str], err: Path, *, env: dict | None = None, ignore=()) -> subprocess.Popen:
    def preexec() -> None:
        default_signals()
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)

    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(err, "wb"), stdin=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})), preexec_fn=preexec)


# --------------------------------------------------------------------------- the supervisor alone
def supervised(tmp_path: Path, body: str, *, ignore=()) -> tuple[int, str, Path]:
    """Run `body` as a supervised child (with `folder`, `parent` and the supervisor's helpers in scope)."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, threading
        from pathlib import Path
        from auditkit.supervisor import publishing, removed_if_killed, scratch_folder, supervise

        folder = Path(sys.argv[1])
        parent = os.getpid()

        def child():
            with removed_if_killed(folder):
                folder.mkdir()
        {body}
            return 0

        supervise(child, lambda line: print(line, file=sys.stderr))
    """).replace("{body}", textwrap.indent(textwrap.dedent(body), " " * 8)))
    proc = start([sys.executable, str(script), str(tmp_path / "staged")], tmp_path / "err.txt", ignore=ignore)
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()  # a hung supervisor must fail the test, not outlive it
    return proc.returncode, (tmp_path / "err.txt").read_text(), tmp_path / "staged"


def test_the_childs_exit_code_is_the_commands(tmp_path):
    code, err, staged = supervised(tmp_path, "return 7")
    assert (code, err) == (7, "")
    assert staged.is_dir()  # the child's own business: it left the block without being killed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_kills_the_child_and_removes_what_it_staged(tmp_path, sig):
    code, err, staged = supervised(tmp_path, f"""
        os.kill(parent, {int(sig)})
        threading.Event().wait()  # busy forever: only the supervisor's SIGKILL ends it
    """)
    assert code == CODES[sig] and not staged.exists()
    assert err == f"error: {WORDS[sig]}; no output was written\n"


def test_a_scratch_folder_goes_with_the_block_or_with_the_killed_run(tmp_path):
    (tmp_path / "ends").mkdir()
    code, _, _ = supervised(tmp_path / "ends", """
        with scratch_folder(folder.parent, "scratch-") as scratch:
            (scratch / "x").write_text("x")
    """)
    assert code == 0 and not list((tmp_path / "ends").glob("scratch-*"))
    (tmp_path / "killed").mkdir()
    code, _, _ = supervised(tmp_path / "killed", f"""
        with scratch_folder(folder.parent, "scratch-") as scratch:
            (scratch / "x").write_text("x")
            os.kill(parent, {int(signal.SIGTERM)})
            threading.Event().wait()
    """)
    assert code == 143 and not list((tmp_path / "killed").glob("scratch-*"))


def test_an_inherited_ignored_sigint_stays_ignored_and_sigterm_is_always_honoured(tmp_path):
    (tmp_path / "int").mkdir()
    code, err, _ = supervised(tmp_path / "int", f"os.kill(parent, {int(signal.SIGINT)})",
                              ignore=(signal.SIGINT, signal.SIGTERM))
    assert (code, err) == (0, "")
    (tmp_path / "term").mkdir()
    code, err, staged = supervised(tmp_path / "term", f"""
        os.kill(parent, {int(signal.SIGTERM)})
        threading.Event().wait()
    """, ignore=(signal.SIGINT, signal.SIGTERM))
    assert code == 143 and "SIGTERM" in err and not staged.exists()


def test_a_signal_while_publishing_lets_the_run_finish_and_a_second_ends_it(tmp_path):
    (tmp_path / "one").mkdir()
    code, err, staged = supervised(tmp_path / "one", f"""
        with publishing():
            os.kill(parent, {int(signal.SIGTERM)})
    """)
    assert code == 0 and staged.is_dir()
    assert err == "warning: SIGTERM arrived while the outputs were being published; the run finished\n"
    (tmp_path / "two").mkdir()
    code, err, staged = supervised(tmp_path / "two", f"""
        os.environ["AUDITKIT_SIGNAL_AT"] = "published:SIGTERM"  # sent, and handled, as the block ends
        with publishing():
            pass
        os.kill(parent, {int(signal.SIGINT)})
        threading.Event().wait()
    """)
    assert code == 130 and not staged.exists() and err == "error: interrupted (SIGINT); no output was written\n"


def test_a_child_that_crashes_is_an_internal_error_never_a_negative_exit(tmp_path):
    code, err, staged = supervised(tmp_path, f"os.kill(os.getpid(), {int(signal.SIGSEGV)})")
    assert code == 3 and not staged.exists()
    assert err.startswith("internal error: the run died of SIGSEGV") and err.count("\n") == 1


# --------------------------------------------------------------------------- real runs, every phase
SIGNAL_POLICY = POLICY.replace("random_controls: {draws: 0}", "random_controls: {draws: 1}").replace(
    "report: {formats: [json]}", "report: {formats: [json, html]}")  # controls and a report: every phase
PHASES = {"load": signal.SIGTERM, "decode": signal.SIGINT, "clean": signal.SIGHUP, "craft": signal.SIGTERM,
          "evaluate": signal.SIGINT, "controls": signal.SIGHUP, "report": signal.SIGTERM,
          "evidence": signal.SIGINT, "publish": signal.SIGHUP}


def run_signalled(world: World, d: Path, at: str) -> tuple[int, str, Path]:
    (d / "w").mkdir(parents=True)
    policy = d / "p.yaml"
    policy.write_text(SIGNAL_POLICY)
    args = [sys.executable, "-m", "auditkit", *world.run(d / "w", None, policy=policy)]
    proc = start(args, d / "err.txt", env={"AUDITKIT_SIGNAL_AT": at})
    proc.communicate(timeout=120)
    return proc.returncode, (d / "err.txt").read_text(), d / "w"


@pytest.mark.parametrize("phase", [p if p in ("craft", "publish") else pytest.param(p, marks=pytest.mark.slow)
                                   for p in sorted(PHASES)])  # two phases in the fast suite, all in the full one
def test_a_signal_at_any_phase_publishes_nothing_and_says_so_in_one_line(world, tmp_path, phase):
    sig = PHASES[phase]
    code, err, w = run_signalled(world, tmp_path, f"{phase}:{sig.name}")
    assert code == CODES[sig], err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == [
        f"error: {WORDS[sig]}; no output was written"]  # after the cells' log lines, if any
    assert not (w / "out").exists()
    assert not list(w.glob(".out.partial-*"))


@pytest.mark.slow
def test_a_signal_after_the_outputs_are_published_lets_the_run_finish(world, tmp_path):
    code, err, w = run_signalled(world, tmp_path, "published:SIGTERM")
    assert code in (0, 1, 4), err
    assert err.splitlines()[-1] == ("warning: SIGTERM arrived while the outputs were being published; the run "
                                    "finished")
    assert {"results.json", "report.html", "evidence.json"} <= {p.name for p in (w / "out").iterdir()}
    assert not list(w.glob(".out.partial-*")) and not (w / ".out.resume").exists()


# --------------------------------------------------------------------------- what killed runs left behind
@pytest.mark.slow
def test_stale_staging_folders_are_removed_and_a_live_ones_kept(world, tmp_path):
    import fcntl

    from auditkit.staging import LOCK_NAME

    w = tmp_path / "w"
    dead, unlocked, live = (w / f".out.partial-{n}" for n in ("dead", "old", "live"))
    for folder in (dead, unlocked, live):
        folder.mkdir(parents=True)
        (folder / "junk.npy").write_bytes(b"x")
    (dead / LOCK_NAME).write_bytes(b"")
    os.utime(unlocked, (time.time() - 3600, time.time() - 3600))
    holder = os.open(live / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # this process stands for a live run
    try:
        # and a manifest in a sub-folder naming ../img/..., which needs --image-root
        m = dataset(w)
        (m.parent / "manifests").mkdir()
        (m.parent / "manifests" / "x.csv").write_text(m.read_text().replace("img/", "../img/"))
        proc = subprocess.run([sys.executable, "-m", "auditkit", *world.run(w, m.parent / "manifests" / "x.csv",
                                                                          "--image-root", m.parent)],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        os.close(holder)
    assert proc.returncode == 0, proc.stderr
    assert "removed '.out.partial-dead'" in proc.stderr and "removed '.out.partial-old'" in proc.stderr
    assert not dead.exists() and not unlocked.exists() and (live / "junk.npy").exists()
    assert sorted(p.name for p in (w / "out").iterdir()) == ["evidence.json", "results.json", "samples", "uaps"]
    assert [p.name for p in w.glob(".out.partial-*")] == [live.name]


# --------------------------------------------------------------------------- harden, zoo train and Ray
HARDENING = "hardening: {rounds: 1, uaps_per_round: 1, epochs: 1}\n"


def cli_signalled(tmp_path: Path, args: list[str], at: str) -> tuple[int, str]:
    proc = start([sys.executable, "-m", "auditkit", *args], tmp_path / "err.txt", env={"AUDITKIT_SIGNAL_AT": at})
    proc.communicate(timeout=600)
    return proc.returncode, (tmp_path / "err.txt").read_text()


def assert_interrupted(code: int, err: str, sig: signal.Signals) -> None:
    assert code == CODES[sig], err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == [
        f"error: {WORDS[sig]}; no output was written"]


@pytest.mark.slow
@pytest.mark.parametrize("at", ["harden:SIGTERM", "export:SIGINT"])
def test_harden_interrupted_in_a_round_or_its_export_publishes_nothing(tmp_path, tiny_model, phantom_manifest, at):
    from conftest import write_policy

    policy = write_policy(tmp_path / "p.yaml")
    policy.write_text(policy.read_text() + HARDENING)
    args = ["harden", "--model", str(tiny_model), "--policy", str(policy), "--data", str(phantom_manifest),
            "--out", str(tmp_path / "out")]
    code, err = cli_signalled(tmp_path, args, at)
    assert_interrupted(code, err, signal.Signals[at.split(":")[1]])
    # only the round checkpoints a rerun resumes from: no hardened model, no record
    left = {p.name for p in (tmp_path / "out").iterdir()} if (tmp_path / "out").exists() else set()
    assert left <= {"hardening"}
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
@pytest.mark.parametrize("at", ["craft:SIGINT", "evaluate:SIGTERM"])
def test_cells_crafted_side_by_side_interrupted_while_crafting_or_evaluating(tmp_path, tiny_model, phantom_manifest,
                                                                            at):
    """Four gradient cells in two groups: crafted side by side, each evaluated in a second thread while the others
    craft on, so the signal finds threads inside TensorFlow."""
    from conftest import write_policy

    args = ["run", "--model", str(tiny_model), "--policy", str(write_policy(tmp_path / "p.yaml")), "--data",
            str(phantom_manifest), "--out", str(tmp_path / "out")]
    code, err = cli_signalled(tmp_path, args, at)
    assert_interrupted(code, err, signal.Signals[at.split(":")[1]])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
def test_zoo_train_interrupted_publishes_no_weights(tmp_path, phantom_manifest):
    args = ["zoo", "train", "covidnet_small", "--data", str(phantom_manifest), "--epochs", "1",
            "--out", str(tmp_path / "out")]
    code, err = cli_signalled(tmp_path, args, "train:SIGTERM")
    assert_interrupted(code, err, signal.SIGTERM)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def ray_processes(temp_dir: Path) -> set[int]:
    """The processes of the Ray started with `temp_dir` as its RAY_TMPDIR (its daemons and workers name it)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(temp_dir).encode() in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_ray_run_interrupted_while_its_tasks_craft_leaves_no_ray_process(tmp_path, tiny_model, phantom_manifest):
    pytest.importorskip("ray", reason="Ray is not installed (pip install \"auditkit[ray]\")")
    import tempfile

    from conftest import write_policy

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    args = ["run", "--model", str(tiny_model), "--policy", str(write_policy(tmp_path / "p.yaml")), "--data",
            str(phantom_manifest), "--out", str(tmp_path / "out"), "--executor", "ray"]
    proc = start([sys.executable, "-m", "auditkit", *args], tmp_path / "err.txt",
                 env={"AUDITKIT_SIGNAL_AT": "craft:SIGINT", "RAY_TMPDIR": str(ray_tmp)})
    proc.communicate(timeout=600)
    assert_interrupted(proc.returncode, (tmp_path / "err.txt").read_text(), signal.SIGINT)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    deadline = time.monotonic() + 60  # Ray's fate-sharing ends its daemons once they notice the driver is gone
    while ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_processes(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
