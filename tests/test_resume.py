"""Resume: a run killed outright (SIGKILL) and rerun gives the same UAPs and results as one never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auditkit.checkpoints import CellStore, resume_dir
from auditkit.results import read_json
from conftest import json_without_times, write_policy

REPO = Path(__file__).resolve().parents[1]
CELLS = 4  # write_policy's grid


def cli(args, **kw) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "auditkit", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_args(tiny_model, policy, manifest, out):
    return ["run", "--model", tiny_model, "--policy", policy, "--data", manifest, "--out", out, "--jobs", "1",
            "--formats", "json"]


def finished_cells(out: Path) -> int:
    folder = resume_dir(out) / "cells"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def uaps(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "uaps").glob("*.npy"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, phantom_manifest):
    d = tmp_path_factory.mktemp("resume")
    policy = write_policy(d / "p.yaml")
    proc = cli(run_args(tiny_model, policy, phantom_manifest, d / "ref"))
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    assert not resume_dir(d / "ref").exists()  # a finished run leaves nothing to resume
    return d, policy


@pytest.fixture
def finished(tmp_path):
    """A finished run's folder without an audit (test_report's two-cell result, through results.json): what the
    checkpoint store's own tests need (the kill tests resume real audits)."""
    from auditkit import report
    from test_report import make_result

    run = tmp_path / "run"
    report.write_reports(make_result(run), run, ["json"])
    return run


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_cells", [0, 2, CELLS])
def test_a_run_killed_at_any_point_resumes_to_the_same_uaps_and_results(reference, tiny_model, phantom_manifest,
                                                                         kill_after_cells):
    d, policy = reference
    out = d / f"killed-{kill_after_cells}"
    args = run_args(tiny_model, policy, phantom_manifest, out)
    proc = cli(args)
    while finished_cells(out) < kill_after_cells or not any(out.parent.glob(f".{out.name}.partial-*")):
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    kept = finished_cells(out)

    rerun = cli(args)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert (f"resumed: {kept} of {CELLS} cells reused" in stderr) == (kept > 0)
    assert uaps(out) == uaps(d / "ref")
    assert json_without_times(out / "results.json") == json_without_times(d / "ref" / "results.json")
    assert not resume_dir(out).exists()


def test_a_changed_input_starts_afresh_and_says_which(finished, tmp_path):
    result = read_json(finished / "results.json")
    inputs = {"model": "a", "data": "b", "policy": "c", "seed": 5}
    store = CellStore.open(tmp_path / ".out.resume", inputs, print)
    store.save(result.cells[0], finished)
    lines = []
    same = CellStore.open(tmp_path / ".out.resume", inputs, lines.append)
    restored = same.restore(result.cells[0].key, tmp_path / "staging")
    assert lines == [] and restored == result.cells[0]
    assert (tmp_path / "staging" / result.cells[0].uap_file).read_bytes() == \
        (finished / result.cells[0].uap_file).read_bytes()
    changed = CellStore.open(tmp_path / ".out.resume", inputs | {"seed": 6}, lines.append)
    assert lines == ["starting afresh: the seed differs from the interrupted run's ('.out.resume')"]
    assert changed.restore(result.cells[0].key, tmp_path / "again") is None


def test_a_damaged_checkpoint_is_crafted_again_not_trusted(finished, tmp_path):
    cell = read_json(finished / "results.json").cells[0]
    store = CellStore.open(tmp_path / "r", {"model": "a"}, print)
    store.save(cell, finished)
    blob = next((tmp_path / "r" / "files").iterdir())
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    assert store.restore(cell.key, tmp_path / "staging") is None
    assert json.loads((tmp_path / "r" / "inputs.json").read_text()) == {"model": "a"}


def test_the_folder_is_made_at_the_first_write_and_an_outdated_one_kept_until_then(finished, tmp_path):
    """A run refused or killed before it finishes anything leaves no folder, and an earlier run's stays usable."""
    cell = read_json(finished / "results.json").cells[0]
    folder, inputs, lines = tmp_path / ".out.resume", {"model": "a", "seed": 5}, []
    store = CellStore.open(folder, inputs, lines.append)
    assert store.restore(cell.key, tmp_path / "staging") is None and not folder.exists()
    assert store.remembered("reach:x", lambda: 0.5) == 0.5
    assert json.loads((folder / "inputs.json").read_text()) == inputs
    store.save(cell, finished)

    changed = CellStore.open(folder, inputs | {"seed": 6}, lines.append)
    assert lines == ["starting afresh: the seed differs from the interrupted run's ('.out.resume')"]
    assert changed.restore(cell.key, tmp_path / "staging") is None
    earlier = CellStore.open(folder, inputs, lines.append)  # the changed run wrote nothing: the earlier one's stays
    assert earlier.restore(cell.key, tmp_path / "staging") == cell and earlier.remembered("reach:x", list) == 0.5

    assert changed.remembered("reach:x", lambda: 0.25) == 0.25  # its first write replaces the outdated folder
    assert json.loads((folder / "inputs.json").read_text()) == inputs | {"seed": 6}
    assert not (folder / "cells").exists()
