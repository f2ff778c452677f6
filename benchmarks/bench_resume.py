"""Resume after SIGKILL at random moments: does every rerun give the uninterrupted run's UAPs and results?

    python benchmarks/bench_resume.py [--policy policies/quick.yaml] [--model covidnet_small] [--kills 10]
                                      [--jobs 1]

One uninterrupted `auditkit run` gives the reference; then each trial starts the same command and kills it with
SIGKILL at a drawn moment: once k cells are checkpointed (k drawn from 0 to all of them) and a further 0-3 s have
passed (machines shared with other work make wall-clock moments land unevenly, so the moment follows the run's
own progress). It reruns the command to the end and compares the UAP bytes and results.json (without timings)
with the reference. Prints one line per trial and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMES = ("started", "finished", "seconds", "command", "phases")


def checkpoints(resume: Path) -> int:
    return len(list((resume / "cells").glob("*.json")))


def run(args: list[str], resume: Path, kill: tuple[int, float] | None = None) -> tuple[int, str, float]:
    """(exit code, stderr, wall s); with `kill` (cells, extra s), SIGKILLed that long after that many checkpoints."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "auditkit", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reached = None
    while kill is not None and proc.poll() is None:
        if reached is None and checkpoints(resume) >= kill[0]:
            reached = time.perf_counter()
        if reached is not None and time.perf_counter() - reached >= kill[1]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate()
    return proc.returncode, stderr, time.perf_counter() - t0


def comparable(out: Path) -> tuple[dict, dict]:
    data = json.loads((out / "results.json").read_text())
    for k in TIMES:
        data["provenance"].pop(k)
    for cell in data["cells"]:
        cell.pop("seconds")
    return data, {p.name: p.read_bytes() for p in sorted((out / "uaps").glob("*.npy"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="policies/quick.yaml")
    ap.add_argument("--model", default="covidnet_small")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--jobs", default="1")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    base = ["run", "--model", opts.model, "--policy", opts.policy, "--formats", "json", "--jobs", opts.jobs]
    code, err, ref_s = run(base + ["--out", str(work / "ref")], work / ".ref.resume")
    assert code in (0, 1, 4), err
    reference = comparable(work / "ref")
    cells = len(reference[1])
    print(f"reference run: exit {code}, {ref_s:.1f} s, {cells} UAPs")
    rng = np.random.default_rng(opts.seed)
    identical = 0
    for trial in range(1, opts.kills + 1):
        out, resume = work / f"trial-{trial}", work / f".trial-{trial}.resume"
        kill = (int(rng.integers(0, cells + 1)), float(rng.uniform(0, 3)))
        killed_code, _, killed_s = run(base + ["--out", str(out)], resume, kill)
        cells_kept = checkpoints(resume)
        code, err, rerun_s = run(base + ["--out", str(out)], resume)
        reused = next((line.strip() for line in err.splitlines() if "resumed:" in line), "resumed: none")
        same = code in (0, 1, 4) and comparable(out) == reference
        identical += same
        print(f"trial {trial}: kill after {kill[0]} cells + {kill[1]:.1f} s: exit {killed_code} at {killed_s:.1f} s, "
              f"{cells_kept} cell checkpoints; "
              f"rerun {rerun_s:.1f} s, {reused}; identical: {same}")
    print(f"{identical} of {opts.kills} reruns identical to the uninterrupted run")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
