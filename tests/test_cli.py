"""End-to-end: `auditkit run` on a tiny model, outputs, exit codes, re-rendering, determinism, bad input."""
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from auditkit.cli import app
from conftest import json_without_times, write_policy

runner = CliRunner()


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def onnx_twin(tiny_model, folder) -> Path:
    """The tiny Keras model exported with tf2onnx, with its model.yaml."""
    import keras
    import tensorflow as tf
    import tf2onnx

    model = keras.saving.load_model(tiny_model, safe_mode=True)
    sig = (tf.TensorSpec((None, 32, 32, 1), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=sig, opset=17, output_path=str(folder / "tiny.onnx"))
    (folder / "tiny.yaml").write_text("classes: [normal, pneumonia, COVID-19]\n")
    return folder / "tiny.onnx"


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory, tiny_model, phantom_manifest):
    d = tmp_path_factory.mktemp("run")
    policy = write_policy(d / "policy.yaml")
    code, output = run_cli("run", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                           "--out", d / "out", "--formats", "html,pdf,json,junit")
    return d, code, output


@pytest.mark.slow
def test_run_writes_every_output_and_exits_0_on_pass(passing_run):
    d, code, output = passing_run
    assert code == 0, output
    out = d / "out"
    for name in ("results.json", "report.html", "report.pdf", "junit.xml"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"] == "PASS" and results["schema_version"] == "2.0"
    keys = [c["key"] for c in results["cells"]]
    assert keys == ["nontargeted_inf_z0.2", "targeted-COVID-19_inf_z0.2", "nontargeted_2_z0.2",
                    "targeted-COVID-19_2_z0.2"]
    for cell in results["cells"]:
        rho = np.load(out / cell["uap_file"], allow_pickle=False)
        assert rho.dtype == np.float32 and rho.shape == (32, 32)
        norm = np.abs(rho).max() if cell["attack"]["norm"] == "inf" else np.linalg.norm(rho)
        assert 0 < norm <= cell["xi"] * (1 + 1e-5), cell["key"]
        assert cell["evals"]["test"]["n"] == 60 and cell["controls"]["test"]["draws"] == 2
    prov = results["provenance"]
    assert prov["seed"] == 5 and len(prov["policy_sha256"]) == 64 and prov["tensorflow"]
    assert set(results["model"]["sha256"]) == {"tiny.keras", "tiny.yaml"}  # the model and its spec sidecar
    assert not list(d.glob(".out.partial-*")), "the staging folder was left behind"


@pytest.mark.slow
def test_html_tables_hold_the_numbers_of_results_json(passing_run):
    d, _, _ = passing_run
    html = (d / "out" / "report.html").read_text()
    results = json.loads((d / "out" / "results.json").read_text())
    for cell in results["cells"]:
        for split in ("train", "test"):
            ev = cell["evals"][split]
            rate = ev["targeted_success_rate"] if cell["attack"]["kind"] == "targeted" else ev["fooling_rate"]
            assert f"{100 * rate['value']:.1f}%" in html, (cell["key"], split)
    clean = results["clean"]["test"]["accuracy"]["value"]
    assert f"{100 * clean:.1f}%" in html


@pytest.mark.slow
def test_pdf_text_holds_verdict_and_tables(passing_run):
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext (poppler-utils) is not installed")
    d, _, _ = passing_run
    text = subprocess.run(["pdftotext", "-layout", str(d / "out" / "report.pdf"), "-"], capture_output=True,
                          text=True, check=True).stdout
    results = json.loads((d / "out" / "results.json").read_text())
    assert "PASS" in text
    rf = results["cells"][0]["evals"]["test"]["fooling_rate"]["value"]
    assert f"{100 * rf:.1f}%" in text


@pytest.mark.slow
def test_junit_has_one_testcase_per_rule_and_failures_where_rules_fail(tmp_path, tiny_model, phantom_manifest):
    policy = write_policy(tmp_path / "p.yaml", thresholds="""  - name: loose
    metric: fooling_rate
    split: test
    max: 1.0
  - name: impossible
    metric: fooling_rate
    split: train
    kind: nontargeted
    max: 0.0
  - name: lift
    metric: uap_over_random
    split: train
    kind: nontargeted
    max: 1.0""")
    code, output = run_cli("run", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out")
    assert code == 1, output
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    cases = suite.iter("testcase")
    failed = {c.get("name"): c.find("failure") is not None for c in cases}
    assert failed == {"loose": False, "impossible": True, "lift": False}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["verdict"] == "FAIL"
    assert [r["passed"] for r in results["rules"]] == [True, False, True]


@pytest.mark.slow
def test_report_command_reproduces_the_html(passing_run, tmp_path):
    d, _, _ = passing_run
    code, output = run_cli("report", d / "out" / "results.json", "--out", tmp_path / "again", "--formats", "html")
    assert code == 0, output
    assert (tmp_path / "again" / "report.html").read_text() == (d / "out" / "report.html").read_text()
    code, output = run_cli("report", d / "out", "--out", tmp_path / "from-dir", "--formats", "html")
    assert code == 0, output  # the run directory stands for its results.json
    assert (tmp_path / "from-dir" / "report.html").read_text() == (d / "out" / "report.html").read_text()
    (tmp_path / "empty").mkdir()
    code, output = run_cli("report", tmp_path / "empty")
    assert code == 2 and "results.json" in output and "file not found" in output and "Traceback" not in output


@pytest.mark.slow
def test_same_inputs_give_the_same_uaps_and_json(passing_run, tiny_model, phantom_manifest):
    """Also whatever the number of cells crafted side by side: the first run crafted its cells together, this one
    crafts each alone."""
    d, _, _ = passing_run
    code, _ = run_cli("run", "--model", tiny_model, "--policy", d / "policy.yaml", "--data", phantom_manifest,
                      "--out", d / "again", "--formats", "json", "--jobs", "1")
    assert code == 0
    assert json_without_times(d / "again" / "results.json") == json_without_times(d / "out" / "results.json")
    for f in (d / "out" / "uaps").glob("*.npy"):
        assert np.array_equal(np.load(f), np.load(d / "again" / "uaps" / f.name))


@pytest.mark.slow
def test_a_script_label_is_escaped_in_the_html(tmp_path, tiny_model, phantom_manifest):
    evil = "<script>alert(1)</script>"
    classes = ("normal", "pneumonia", evil)
    policy = write_policy(tmp_path / "p.yaml", classes=classes, extra_data=f'  aliases: {{COVID-19: "{evil}"}}')
    spec = tmp_path / "spec.yaml"
    spec.write_text(f'classes: [normal, pneumonia, "{evil}"]\n')
    code, output = run_cli("run", "--model", tiny_model, "--model-spec", spec, "--policy", policy,
                           "--data", phantom_manifest, "--out", tmp_path / "out", "--formats", "html")
    assert code == 0, output
    html = (tmp_path / "out" / "report.html").read_text()
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_brackets_in_user_text_are_printed_verbatim(tmp_path):
    """Rich markup in a path or name must neither crash the error handler nor vanish from the message."""
    policy = tmp_path / "[/x] [bold]p.yaml"
    code, output = run_cli("policy", "check", policy)
    assert code == 2 and "[/x] [bold]p.yaml" in output and "Traceback" not in output


def test_hardening_a_model_that_cannot_be_trained_is_refused_before_the_audit(tmp_path, tiny_model,
                                                                              phantom_manifest):
    onnx_path = onnx_twin(tiny_model, tmp_path)
    policy = write_policy(tmp_path / "p.yaml")
    code, output = run_cli("run", "--model", onnx_path, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out", "--harden")
    assert code == 2 and "hardening needs a Keras model" in output
    assert "cells" not in output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.replace("zetas: [0.2]", "zetas: [1.5]", 1), "attacks.0.zetas.0"),
    (lambda p: p.replace("seed: 5", "seed: 5\ncolour: red"), "colour"),
    (lambda p: p.replace("max_iter: 6", "max_iter: two", 1), "attacks.0.max_iter"),
    (lambda p: p.replace('targets: ["COVID-19"]', 'targets: ["flu"]', 1), "flu"),
])
def test_bad_policy_exits_2_with_the_key_path(tmp_path, tiny_model, phantom_manifest, edit, message):
    policy = write_policy(tmp_path / "p.yaml")
    policy.write_text(edit(policy.read_text()))
    code, output = run_cli("run", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out")
    assert code == 2
    assert message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    code, output = run_cli("policy", "check", policy)
    assert code == 2 and message in output


def test_bad_manifest_row_exits_2_naming_file_and_row_and_writes_nothing(tmp_path, tiny_model, phantom_manifest):
    rows = phantom_manifest.read_text().splitlines()
    rows[3] = rows[3].replace("COVID-19", "influenza").replace("normal", "influenza").replace("pneumonia",
                                                                                                "influenza")
    bad = phantom_manifest.parent / "bad.csv"
    bad.write_text("\n".join(rows) + "\n")
    code, output = run_cli("run", "--model", tiny_model, "--policy", write_policy(tmp_path / "p.yaml"),
                           "--data", bad, "--out", tmp_path / "out")
    assert code == 2 and "bad.csv:4" in output and "influenza" in output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_onnx_model_is_audited_and_an_undifferentiable_one_exits_2(tmp_path, tiny_model, phantom_manifest):
    from test_onnx_grad import handmade_onnx

    policy = write_policy(tmp_path / "p.yaml")
    code, output = run_cli("run", "--model", tmp_path / "nope.keras", "--policy", policy, "--out", tmp_path / "o")
    assert code == 2 and "nope.keras" in output and "no such model" in output
    onnx_twin(tiny_model, tmp_path)
    code, output = run_cli("run", "--model", tmp_path / "tiny.onnx", "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "o", "--formats", "json")
    assert code == 0, output
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["model"]["format"] == "onnx" and len(results["cells"]) == 4
    gelu = handmade_onnx(tmp_path / "gelu.onnx", "Gelu", "com.microsoft")
    (tmp_path / "gelu.yaml").write_text("classes: [normal, pneumonia, COVID-19]\n")
    code, output = run_cli("run", "--model", gelu, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "g")
    assert code == 2 and "com.microsoft:Gelu" in output and "--surrogate" in output
    assert not (tmp_path / "g").exists()


def test_policy_check_and_inspect(tiny_model):
    code, output = run_cli("policy", "check", Path(__file__).parents[1] / "policies" / "paper.yaml")
    assert code == 0 and "16 cells" in output
    flat = " ".join(output.split())  # the console wraps long lines
    assert "hardening (off): 5 rounds x 10 UAPs nontargeted_inf_z0.02 eps=0.001 max_iter=15 clip=False on all" in flat
    code, output = run_cli("inspect", "--model", tiny_model)
    assert code == 0 and "COVID-19" in output and "32x32" in output


def test_help_is_fast_because_it_does_not_import_tensorflow():
    probe = "import sys, auditkit.cli; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    help_text = subprocess.run([sys.executable, "-m", "auditkit", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "Exit codes" in help_text and "run" in help_text


@pytest.mark.slow
def test_run_with_hardening_reports_before_and_after(tmp_path, tiny_model, phantom_manifest):
    policy = write_policy(tmp_path / "p.yaml", thresholds="""  - name: targeted success
    metric: targeted_success_rate
    split: test
    norm: inf
    max: 0.5""")
    policy.write_text(policy.read_text() + """hardening:
  enabled: true
  rounds: 1
  uaps_per_round: 1
  epochs: 1
  learning_rate: 0.001
  attack: {kind: targeted, target: COVID-19, norm: inf, zeta: 0.2}
""")
    code, output = run_cli("run", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out", "--formats", "html,json,junit")
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    h, after = results["hardening"], results["hardened"]
    assert [r["round"] for r in h["rounds"]] == [0, 1] and h["metric"] == "targeted_success_rate"
    assert h["parity"]["passed"] and h["parity"]["max_abs_prob_diff"] <= 1e-4
    assert (out / "hardened.keras").is_file() and (out / "hardened.onnx").is_file()
    assert (out / "hardening" / "state.json").is_file()
    assert [c["key"] for c in after["cells"]] == [c["key"] for c in results["cells"]]
    for c in after["cells"]:
        assert (out / "after-hardening" / c["uap_file"]).is_file()
    assert code == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 4}[after["verdict"]], output  # the hardened model's
    html = (out / "report.html").read_text()
    assert "Hardening by adversarial retraining" in html and "checked, PASS" in html
    suites = ET.parse(out / "junit.xml").getroot().findall("testsuite")
    assert len(suites) == 2 and suites[1].get("name").endswith("(hardened model)")


@pytest.mark.slow
def test_harden_command_publishes_the_hardened_model_and_its_record(tmp_path, tiny_model, phantom_manifest):
    """... beside an audit already in the folder, which it leaves alone."""
    (tmp_path / "out" / "uaps").mkdir(parents=True)
    for name in ("results.json", "report.html", "uaps/nontargeted_inf_z0.2.npy"):
        (tmp_path / "out" / name).write_text("an earlier audit's output")
    policy = write_policy(tmp_path / "p.yaml")
    policy.write_text(policy.read_text() + """hardening:
  rounds: 1
  uaps_per_round: 1
  epochs: 1
  attack: {kind: targeted, target: COVID-19, norm: inf, zeta: 0.2}
""")
    code, output = run_cli("harden", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out")
    assert code == 0, output
    out = tmp_path / "out"
    record = json.loads((out / "hardening.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1] and record["metric"] == "targeted_success_rate"
    assert record["parity"]["passed"]
    assert (out / record["keras_file"]).is_file() and (out / record["onnx_file"]).is_file()
    assert (out / "hardening" / "state.json").is_file()  # the round checkpoints, kept for a resumed run
    assert f"wrote{out / 'hardened.keras'}" in "".join(output.split())  # however the console wraps the line
    assert not list(tmp_path.glob(".out.partial-*")), "the staging folder was left behind"
    assert all((out / name).read_text() == "an earlier audit's output"
               for name in ("results.json", "report.html", "uaps/nontargeted_inf_z0.2.npy"))


@pytest.mark.slow
def test_deploy_parity_surrogate_and_transfer_matrix(tmp_path, tiny_model, phantom_manifest):
    onnx_twin(tiny_model, tmp_path)
    policy = write_policy(tmp_path / "p.yaml")
    code, output = run_cli("run", "--model", tiny_model, "--deploy", tmp_path / "tiny.onnx", "--transfer",
                           tmp_path / "tiny.onnx", "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out", "--formats", "html,json")
    assert code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    dp = results["deploy"]
    assert dp["passed"] and dp["max_abs_prob_diff"] <= 1e-4 and dp["argmax_agreement"] == 1.0
    for cell in results["cells"]:
        ev = cell["transfer"]["tiny"]["test"]
        own = cell["evals"]["test"]["targeted_success_rate" if cell["attack"]["kind"] == "targeted" else "fooling_rate"]
        assert ev["headline"]["value"] == own["value"] and ev["argmax_agreement"] == 1.0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Deployment parity" in html and "transferability" in html
    code, output = run_cli("run", "--model", tmp_path / "tiny.onnx", "--surrogate", tiny_model, "--policy", policy,
                           "--data", phantom_manifest, "--out", tmp_path / "sur", "--formats", "json")
    assert code == 0, output
    sur = json.loads((tmp_path / "sur" / "results.json").read_text())
    assert sur["crafted_on"]["format"] == "keras" and sur["model"]["format"] == "onnx"
    for a, b in zip(sur["cells"], results["cells"]):  # same crafting model and seed: the same UAPs
        assert np.allclose(np.load(tmp_path / "sur" / a["uap_file"]), np.load(tmp_path / "out" / b["uap_file"]))


@pytest.mark.slow
def test_blackbox_algorithm_runs_from_a_policy_and_counts_queries(tmp_path, tiny_model, phantom_manifest):
    policy = write_policy(tmp_path / "p.yaml")
    text = policy.read_text().replace("    max_iter: 6\n", "    max_iter: 2\n    algorithm: blackbox\n"
                                      "    blackbox: {batch_size: 20, samples: 2, low_res: 8}\n", 1)
    policy.write_text(text)
    code, output = run_cli("run", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out", "--formats", "html,json", "--allow-inconclusive")
    assert code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["verdict"] == "INCONCLUSIVE"  # 2 query-only epochs are too weak to show the model robust
    cells = results["cells"]
    bb = [c for c in cells if c["attack"]["algorithm"] == "blackbox"]
    assert [c["key"] for c in bb] == ["nontargeted_inf_z0.2_blackbox", "targeted-COVID-19_inf_z0.2_blackbox"]
    for c in bb:  # 60 images in batches of 20, 2 antithetic pairs per image per step, 2 epochs (+ evaluations)
        assert c["queries"] >= 2 * 3 * (2 * 2 * 20) and c["attack"]["blackbox"]["low_res"] == 8
    assert "Algorithm “blackbox”" in (tmp_path / "out" / "report.html").read_text()


def test_jobs_must_be_a_positive_integer(tmp_path, tiny_model, phantom_manifest):
    from auditkit import api
    from auditkit.errors import AuditkitError

    policy = write_policy(tmp_path / "policy.yaml")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(AuditkitError, match=f"jobs: must be a positive integer, got {bad!r}"):
            api.run(tiny_model, policy, tmp_path / "out", data=phantom_manifest, jobs=bad)
    code, output = run_cli("run", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                           "--out", tmp_path / "out", "--jobs", "0")
    assert code == 2 and "--jobs" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()
