"""A whole `auditkit run` of a policy, phase by phase: cells crafted side by side (the default) against every cell
crafted alone (`--jobs 1`), and optionally against another checkout (the previous commit), in one session.

    python benchmarks/bench_paper.py --model RUNS/cxr3-small/covidnet_small.keras --data CXR3/manifest.csv \
        [--policy policies/paper.yaml] [--before CHECKOUT]

Prints each run's wall time and its phases (results.json's provenance.phases: busy seconds, which overlap where
cells crafted side by side are evaluated while the others craft on), and whether the UAP bytes and results.json (without timings) equal the side-by-side run's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench_executors import audit  # this folder is on sys.path when the script runs
from bench_resume import comparable

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="policies/paper.yaml")
    ap.add_argument("--model", default="covidnet_small")
    ap.add_argument("--data", default=None)
    ap.add_argument("--before", type=Path, default=None, help="another checkout to time the same run with")
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-paper-"))
    base = ["run", "--model", str(Path(opts.model).resolve()) if Path(opts.model).exists() else opts.model,
            "--policy", str((REPO / opts.policy).resolve()), "--formats", "json", "--no-resume", "-q"]
    base += ["--data", str(Path(opts.data).resolve())] if opts.data else []
    runs = [("side by side (default)", REPO, []), ("every cell alone (--jobs 1)", REPO, ["--jobs", "1"])]
    if opts.before:
        runs.append((f"before ({opts.before.name})", opts.before.resolve(), []))
    try:
        reference = None
        print(f"{opts.policy} on {opts.model}; phases: busy s")
        for k, (name, checkout, extra) in enumerate(runs):
            out = work / str(k)
            seconds = audit(base + extra + ["--out", str(out)], checkout)
            phases = json.loads((out / "results.json").read_text())["provenance"].get("phases", {})
            shown = ", ".join(f"{p} {t:.1f}" for p, t in phases.items()) or "not recorded"
            line = f"{name}: wall {seconds:.1f} s; {shown}"
            if checkout == REPO:  # another commit's engine may round differently: not compared
                same = comparable(out)
                reference = reference or same
                line += f"; UAPs and results equal the side-by-side run's: {same == reference}"
            print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
