"""What each private TensorFlow use in auditkit/models/tf_runtime.py buys, on a whole audit.

Runs a policy (default policies/paper.yaml on the built-in model) once per variant, in fresh processes, each with
one private use replaced by its public fallback, and prints the wall and CPU time of each run against the
baseline (CPU time is the steadier figure on a shared machine):

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
import resource, sys, time
{patch}
from auditkit import api
start = time.perf_counter()
result = api.run({model!r}, {policy!r}, {out!r}, formats=["json"])
usage = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="policies/paper.yaml")
    parser.add_argument("--model", default="covidnet_small")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, patch in VARIANTS.items():  # interleaved, so drift in machine speed hits every variant alike
            with tempfile.TemporaryDirectory() as out:
                code = RUN.format(patch=patch, model=args.model, policy=args.policy, out=out)
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                wall, used = done.stdout.strip().splitlines()[-1].split()
                times[name].append(float(wall))
                cpu[name].append(float(used))
    base, base_cpu = min(times["all private uses"]), min(cpu["all private uses"])
    print(f"# {args.policy} on {args.model}, {args.repeats} run(s) each, {time.strftime('%Y-%m-%d')}")
    print("| variant | wall s (best) | vs all private uses | CPU s (best) | vs all private uses |")
    print("|---|---:|---:|---:|---:|")
    for name in VARIANTS:
        wall, used = min(times[name]), min(cpu[name])
        print(f"| {name} | {wall:.1f} | {wall / base - 1:+.1%} | {used:.1f} | {used / base_cpu - 1:+.1%} |")
    print(json.dumps({"wall": times, "cpu": cpu}))


if __name__ == "__main__":
    main()
