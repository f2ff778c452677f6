"""SIGINT and SIGTERM at random moments of every phase, on a loaded machine: does a run ever crash, publish or
leave a staging folder behind?

    python benchmarks/bench_signals.py [--runs 400] [--load 2] [--parallel 4] [--seed 0] [--model MODEL]

Two workloads: `auditkit run` of policies/quick.yaml (reports in every format, signed) and `auditkit harden` of
one retraining round (benchmarks/signals-harden.yaml). The model is by default a small untrained 64x64 Keras CNN
made by the benchmark, so that 400 runs fit in well under an hour on two loaded cores; the phases, threads and
files are those of any model (`--model covidnet_small` for the built-in one). One uninterrupted run of each, with AUDITKIT_PHASE_LOG
set, gives its phases. Each trial then draws a workload, a signal and a phase, and starts the command. It waits
until the run reaches that phase (a drawn occurrence of it), then a drawn fraction of that occurrence's
duration in the uninterrupted run, and sends the signal. The moment follows the run's own progress, because a
loaded machine stretches wall-clock time unevenly. `--load` busy-loop processes run throughout.

Each trial counts as a failure if any of these happens:
- a negative exit code, or an exit code other than 128 + the signal or the run's own 0, 1 or 4;
- after an interrupted exit, output files in --out (round checkpoints of `harden` excepted), or not exactly one
  "error:" line naming the signal;
- after a finished exit, outputs that are incomplete;
- a `.out.partial-*` staging folder left behind.

Prints one line per trial and a table by phase and workload.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIGNALS = (signal.SIGINT, signal.SIGTERM)
FINISHED = (0, 1, 4)
OUTPUTS = {"run": ("results.json", "evidence.json", "report.pdf"), "harden": ("hardened.keras", "hardening.json")}
CHECKPOINTS = {"run": set(), "harden": {"hardening"}}  # kept in --out for a rerun to resume from


@dataclass
class Trial:
    number: int
    workload: str
    sig: signal.Signals
    phase: str
    occurrence: int
    fraction: float


@dataclass
class Outcome:
    trial: Trial
    code: int
    hit: str  # the phase the run was in when the signal was sent ("finished" if it ended first)
    problems: list[str]


def default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def command(workload: str, out: Path, key: Path, model: str) -> list[str]:
    if workload == "run":
        return ["run", "--model", model, "--policy", str(REPO / "policies/quick.yaml"), "--out", str(out),
                "--formats", "html,pdf,json,junit", "--sign", str(key)]
    return ["harden", "--model", model, "--policy", str(REPO / "benchmarks/signals-harden.yaml"), "--out", str(out)]


def start(args: list[str], phase_log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "AUDITKIT_PHASE_LOG": str(phase_log)}
    return subprocess.Popen([sys.executable, "-m", "auditkit", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)


def phases(phase_log: Path, t0: float) -> list[tuple[float, str]]:
    """(seconds since the process started, phase) in order. The first, "start", is logged once the command
    handles signals; before it, in the interpreter's first moments, a signal takes its default action (as for
    any program), so no trial signals a run before its "start"."""
    events = []
    if phase_log.exists():
        for line in phase_log.read_text().splitlines():
            stamp, _, name = line.partition(" ")
            if name:
                events.append((float(stamp) - t0, name))
    return events


def profile(workload: str, work: Path, key: Path, model: str) -> dict[str, list[float]]:
    """Per phase, the duration of each of its occurrences in an uninterrupted run (the last one runs to exit)."""
    log = work / f"profile-{workload}.log"
    t0 = time.monotonic()
    proc = start(command(workload, work / f"profile-{workload}", key, model), log)
    _, err = proc.communicate()
    end = time.monotonic() - t0
    assert proc.returncode in FINISHED, err
    events = phases(log, t0)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    for (t, name), (t_next, _) in zip(events, events[1:] + [(end, "exit")]):
        durations[name].append(max(t_next - t, 0.0))
    print(f"{workload}: uninterrupted {end:.1f} s; phases " +
          ", ".join(f"{name} x{len(d)}" for name, d in durations.items()), flush=True)
    return durations


def run_trial(trial: Trial, work: Path, key: Path, model: str, durations: dict[str, list[float]]) -> Outcome:
    folder = work / f"trial-{trial.number}"
    folder.mkdir()
    out, log = folder / "out", folder / "phases.log"
    t0 = time.monotonic()
    proc = start(command(trial.workload, out, key, model), log)
    hit = "finished"
    while proc.poll() is None:
        seen = [name for _, name in phases(log, t0)]
        if seen.count(trial.phase) > trial.occurrence:
            time.sleep(trial.fraction * durations[trial.phase][trial.occurrence])
            if proc.poll() is None:
                hit = phases(log, t0)[-1][1]
                proc.send_signal(trial.sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate()
    problems = check(trial, proc.returncode, err, folder)
    shutil.rmtree(folder, ignore_errors=True)
    return Outcome(trial, proc.returncode, hit, problems)


def check(trial: Trial, code: int, err: str, folder: Path) -> list[str]:
    problems = []
    out = folder / "out"
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if code < 0:
        problems.append(f"negative exit {code}")
    elif code == 128 + trial.sig:
        if present - CHECKPOINTS[trial.workload]:
            problems.append(f"published after an interrupt: {sorted(present)}")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if len(errors) != 1 or trial.sig.name not in errors[0] or "Traceback" in err:
            problems.append(f"stderr: {err.strip()[-300:]!r}")
    elif code in FINISHED:
        missing = [name for name in OUTPUTS[trial.workload] if name not in present]
        if missing:
            problems.append(f"finished without {missing}")
    else:
        problems.append(f"exit {code}: {err.strip()[-300:]!r}")
    staging = list(folder.glob(".out.partial-*"))
    if staging:
        problems.append(f"staging left: {[p.name for p in staging]}")
    return problems


def tiny_model(folder: Path) -> str:
    """An untrained 64x64 CNN, saved as .keras with its model.yaml: every phase of a run at a small cost."""
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((64, 64, 1), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(image)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(image, keras.layers.Dense(3, activation="softmax")(x)).save(folder / "tiny.keras")
    (folder / "tiny.yaml").write_text("classes: [normal, pneumonia, COVID-19]\ncrop_top: 0.0\nresize: bilinear\n")
    return str(folder / "tiny.keras")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes running throughout")
    ap.add_argument("--parallel", type=int, default=4, help="trials at a time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="default: a small untrained CNN made here")
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-signals-"))
    subprocess.run([sys.executable, "-m", "auditkit", "keygen", "--out", str(work / "bench")], check=True,
                   env=os.environ | {"PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    key = work / "bench.key"
    opts.model = opts.model or tiny_model(work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f", "amx_tile")})
    print(f"commit {commit.strip()}, model {Path(opts.model).name}, {os.cpu_count()} CPUs ({', '.join(flags)}), "
          f"{opts.load} busy loops, {opts.parallel} trials at a time", flush=True)
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(opts.load)]
    try:
        durations = {w: profile(w, work, key, opts.model) for w in OUTPUTS}
        rng = np.random.default_rng(opts.seed)
        trials = []
        for number in range(1, opts.runs + 1):
            workload = ("run", "harden")[number % 2]
            names = sorted(durations[workload])
            phase = names[int(rng.integers(len(names)))]
            occurrence = int(rng.integers(len(durations[workload][phase])))
            trials.append(Trial(number, workload, SIGNALS[number // 2 % 2], phase, occurrence, float(rng.random())))
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def one(trial: Trial) -> None:
            outcome = run_trial(trial, work, key, opts.model, durations[trial.workload])
            with lock:
                outcomes.append(outcome)
                print(f"trial {trial.number} {trial.workload} {trial.sig.name} at {trial.phase}#{trial.occurrence}"
                      f"+{trial.fraction:.2f}: hit {outcome.hit}, exit {outcome.code}"
                      + (f"  PROBLEM {outcome.problems}" if outcome.problems else ""), flush=True)

        with ThreadPoolExecutor(opts.parallel) as pool:
            list(pool.map(one, trials))
    finally:
        for p in load:
            p.kill()
    table(outcomes)
    shutil.rmtree(work, ignore_errors=True)


def table(outcomes: list[Outcome]) -> None:
    rows: dict[tuple[str, str], list[Outcome]] = collections.defaultdict(list)
    for o in outcomes:
        rows[(o.trial.workload, o.hit)].append(o)
    print("\n| workload | phase hit | runs | exit 130 | exit 143 | finished (0/1/4) | negative exits | published "
          "after interrupt | staging left | other problems |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (workload, hit), group in sorted(rows.items()):
        codes = collections.Counter(o.code for o in group)
        problems = [p for o in group for p in o.problems]
        print(f"| {workload} | {hit} | {len(group)} | {codes[130]} | {codes[143]} | "
              f"{sum(codes[c] for c in FINISHED)} | {sum(n for c, n in codes.items() if c < 0)} | "
              f"{sum('published' in p for p in problems)} | {sum('staging' in p for p in problems)} | "
              f"{sum(not any(w in p for w in ('published', 'staging', 'negative')) for p in problems)} |")
    bad = sum(bool(o.problems) for o in outcomes)
    print(f"\n{len(outcomes)} runs, {bad} with a problem")


if __name__ == "__main__":
    main()
