"""The CI examples in examples/ci: their audit scripts run as a pipeline would run them, and gate on the verdict."""
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import write_policy

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples" / "ci"
pytestmark = pytest.mark.slow  # each test runs a whole audit through a job's script


def github_job():
    """(audit script, job env, artefact paths) of the GitHub Actions example."""
    job = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())["jobs"]["uap-robustness"]
    script = next(s["run"] for s in job["steps"] if "auditkit run" in s.get("run", ""))
    uploads = [s["with"] for s in job["steps"] if s.get("uses", "").startswith(("actions/upload-artifact",
                                                                               "mikepenz/action-junit-report"))]
    return script, job["env"], [u.get("path") or u.get("report_paths") for u in uploads]


def gitlab_job():
    job = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())["auditkit-release-gate"]
    artefacts = job["artifacts"]
    return "\n".join(job["script"]), job["variables"], [*artefacts["paths"], artefacts["reports"]["junit"]]


def run_script(script: str, job_env: dict, tmp_path: Path, **overrides) -> subprocess.CompletedProcess:
    """Run a job's script with bash -eo pipefail (as both runners do) and `auditkit` on PATH from this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "auditkit"
    shim.write_text('#!/bin/sh\nexec python -m auditkit "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = os.environ | {k: str(v) for k, v in job_env.items()} | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "step-summary.md"), "GITHUB_SERVER_URL": "https://github.example",
        "GITHUB_REPOSITORY": "team/model", "GITHUB_RUN_ID": "42", "RUNNER_TEMP": str(tmp_path),
        "CI_JOB_URL": "https://gitlab.example/team/model/-/jobs/42"} | {k: str(v) for k, v in overrides.items()}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("job", [github_job, gitlab_job], ids=["github", "gitlab"])
def test_the_example_gate_passes_a_model_within_its_limits_and_keeps_its_artefacts(job, tmp_path, tiny_model,
                                                                                    phantom_manifest):
    script, env, artefacts = job()
    policy = write_policy(tmp_path / "gate.yaml")
    done = run_script(script, env, tmp_path, AUDIT_MODEL=tiny_model, AUDIT_DATA=phantom_manifest,
                      AUDIT_POLICY=policy)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK:" in done.stdout and "files match evidence.json" in done.stdout  # the job verified its evidence
    for path in artefacts:
        assert (tmp_path / path).exists(), path
    summary = (tmp_path / ("step-summary.md" if job is github_job else "audit-summary.md")).read_text()
    assert "**PASS**" in summary and "Failed rule" not in summary
    assert "(https://github.example/team/model/actions/runs/42)" in summary or "gitlab.example" in summary


def test_the_example_gate_fails_the_pipeline_on_fail_and_says_which_rule(tmp_path, tiny_model, phantom_manifest):
    script, env, artefacts = gitlab_job()
    policy = write_policy(tmp_path / "gate.yaml", thresholds="""  - name: nontargeted fooling
    metric: fooling_rate
    split: test
    kind: nontargeted
    max: 0.0""")
    done = run_script(script, env, tmp_path, AUDIT_MODEL=tiny_model, AUDIT_DATA=phantom_manifest,
                      AUDIT_POLICY=policy)
    assert done.returncode == 1
    assert "auditkit: FAIL" in done.stdout
    summary = (tmp_path / "audit-summary.md").read_text()
    assert "**FAIL**" in summary and "| nontargeted fooling |" in summary and "| max 0.0% |" in summary
    assert (tmp_path / "audit-out" / "junit.xml").exists()
