"""What each private TensorFlow use in auditkit/models/tf_runtime.py buys, on a whole audit.

Runs a policy (default policies/paper.yaml on the built-in model) once per variant, in fresh processes, each with
one private use replaced by its public fallback, and prints the wall time of each run against the baseline:

    python benchmarks/bench_tf_runtime.py [--policy P] [--model M] [--repeats N]

A use whose gain is under 5% of the run has no place in the code (see tf_runtime's docstring).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "all private uses": "",
    "FREEZE -> variables": """
from auditkit.models import keras
def unfreezable(_function):
    raise RuntimeError("freezing off for this benchmark")
keras.freeze = unfreezable
""",
}

RUN = """
import sys, time
{patch}
from auditkit import api
start = time.perf_counter()
result = api.run({model!r}, {policy!r}, {out!r}, formats=["json"])
print(time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="policies/paper.yaml")
    parser.add_argument("--model", default="covidnet_small")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, patch in VARIANTS.items():  # interleaved, so drift in machine speed hits every variant alike
            with tempfile.TemporaryDirectory() as out:
                code = RUN.format(patch=patch, model=args.model, policy=args.policy, out=out)
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                times[name].append(float(done.stdout.strip().splitlines()[-1]))
    base = min(times["all private uses"])
    print(f"# {args.policy} on {args.model}, {args.repeats} run(s) each, {time.strftime('%Y-%m-%d')}")
    print("| variant | wall s (best) | vs all private uses |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.1f} | {min(values) / base - 1:+.1%} |")
    print(json.dumps(times))


if __name__ == "__main__":
    main()
