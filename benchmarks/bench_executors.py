"""The local executor against Ray tasks on a two-node Ray cluster on this machine: same results? wall-time overhead?

    python benchmarks/bench_executors.py [--policy policies/quick.yaml] [--model covidnet_small] [--data MANIFEST]

Starts a Ray cluster of two nodes with one CPU each (`ray.cluster_utils.Cluster`, 200 MB object stores), runs
`auditkit run` once with the local executor (its default --jobs) and once with `--executor ray`, and compares UAP
bytes and results.json (without timings). Both nodes share this machine's cores: the Ray figure measures the
executor's overhead, not a cluster's speed-up. The cluster starts before either run and is billed to neither.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_resume import comparable  # this folder is on sys.path when the script runs

REPO = Path(__file__).resolve().parents[1]
STORE_BYTES = 200 * 1024**2


def audit(args: list[str], checkout: Path = REPO) -> float:
    """Wall seconds of `auditkit ARGS` run from `checkout` (default: this one)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "auditkit", *args], cwd=checkout, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(checkout)})
    assert proc.returncode in (0, 1, 4), proc.stderr
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="policies/quick.yaml")
    ap.add_argument("--model", default="covidnet_small")
    ap.add_argument("--data", default=None)
    opts = ap.parse_args()
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = str(REPO)  # the raylets' workers import this checkout
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE_BYTES})
    work = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    try:
        cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()
        base = ["run", "--model", opts.model, "--policy", opts.policy, "--formats", "json", "--no-resume"]
        base += ["--data", opts.data] if opts.data else []
        local_s = audit(base + ["--out", str(work / "local")])
        ray_s = audit(base + ["--out", str(work / "ray"), "--executor", "ray", "--ray-address", cluster.address])
        same = comparable(work / "local") == comparable(work / "ray")
        n = len(comparable(work / "local")[1])
        print(f"{opts.policy}, {n} cells: local {local_s:.1f} s, ray (2 nodes x 1 CPU) {ray_s:.1f} s, "
              f"overhead {ray_s / local_s - 1:+.1%}; UAPs and results identical: {same}")
    finally:
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
