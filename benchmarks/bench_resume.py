"""Resume after SIGKILL at random moments: does every rerun give the uninterrupted run's UAPs and results?

    python benchmarks/bench_resume.py [--policy policies/quick.yaml] [--model covidnet_small] [--kills 10]
                                      [--jobs 1]

One uninterrupted `auditkit run` gives the reference, its wall time and when its checkpoint folder appeared (the
data loaded, the cells about to start); then each trial starts the same command, kills it with SIGKILL at a moment
drawn uniformly between those two times, reruns it to the end and compares the UAP bytes and results.json
(without timings) with the reference. Prints one line per trial and a summary.
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
TIMES = ("started", "finished", "seconds", "command")


def run(args: list[str], resume: Path, kill_after: float | None = None) -> tuple[int, str, float, float]:
    """(exit code, stderr, wall s, s until `resume` appeared); killed after `kill_after` s if given."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "auditkit", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    appeared = float("nan")
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if appeared != appeared and resume.exists():
            appeared = now
        if kill_after is not None and now >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate()
    return proc.returncode, stderr, time.perf_counter() - t0, appeared


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
    code, err, ref_s, cells_from = run(base + ["--out", str(work / "ref")], work / ".ref.resume")
    assert code in (0, 1, 4), err
    reference = comparable(work / "ref")
    print(f"reference run: exit {code}, {ref_s:.1f} s (cells from {cells_from:.1f} s), {len(reference[1])} UAPs")
    rng = np.random.default_rng(opts.seed)
    identical = 0
    for trial, moment in enumerate(rng.uniform(cells_from, ref_s, opts.kills), start=1):
        out, resume = work / f"trial-{trial}", work / f".trial-{trial}.resume"
        killed_code, _, killed_s, _ = run(base + ["--out", str(out)], resume, kill_after=moment)
        cells_kept = len(list((resume / "cells").glob("*.json")))
        code, err, rerun_s, _ = run(base + ["--out", str(out)], resume)
        reused = next((line.strip() for line in err.splitlines() if "resumed:" in line), "resumed: none")
        same = code in (0, 1, 4) and comparable(out) == reference
        identical += same
        print(f"trial {trial}: killed at {killed_s:.1f} s (exit {killed_code}), {cells_kept} cell checkpoints; "
              f"rerun {rerun_s:.1f} s, {reused}; identical: {same}")
    print(f"{identical} of {opts.kills} reruns identical to the uninterrupted run")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
