"""evidence.json, signing and `auditkit verify`: a reviewer can check that the files are the run's."""
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from auditkit import evidence
from auditkit.cli import app
from auditkit.fileio import sha256_file

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def run_copy(signed_run, tmp_path):
    run_dir, public_key, _ = signed_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, public_key


def flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_an_untouched_signed_run_verifies(signed_run):
    run_dir, public_key, _ = signed_run
    code, output = cli("verify", run_dir, "--key", public_key)
    assert code == 0, output
    files = sum(1 for p in run_dir.rglob("*") if p.is_file()) - 1  # all but evidence.json
    assert f"OK: {files} files match evidence.json; signature by keyid" in output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["report.pdf", "results.json", "uaps/nontargeted_inf_z0.2.npy"])
def test_one_changed_byte_fails_verify_naming_the_file(run_copy, name):
    run_dir, public_key = run_copy
    flip_byte(run_dir / name)
    code, output = cli("verify", run_dir, "--key", public_key)
    assert code == 5
    assert f"verify failed: {name}: sha256" in output


@pytest.mark.slow
def test_a_deleted_file_fails_verify_naming_it(run_copy):
    run_dir, public_key = run_copy
    (run_dir / "junit.xml").unlink()
    code, output = cli("verify", run_dir, "--key", public_key)
    assert code == 5 and "verify failed: junit.xml: missing" in output


@pytest.mark.slow
def test_an_added_file_fails_verify(run_copy):
    run_dir, public_key = run_copy
    np.save(run_dir / "uaps" / "extra.npy", np.zeros((32, 32), np.float32))
    code, output = cli("verify", run_dir, "--key", public_key)
    assert code == 5 and "uaps/extra.npy: not listed in evidence.json" in output


@pytest.mark.slow
def test_another_key_fails_verify(run_copy, tmp_path):
    run_dir, _ = run_copy
    evidence.generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    code, output = cli("verify", run_dir, "--key", tmp_path / "other.pub")
    assert code == 5 and "evidence.json: signatures: signed by keyid" in output and "other.pub" in output


@pytest.mark.slow
def test_a_re_signed_statement_with_a_changed_digest_and_file_fails(run_copy, tmp_path):
    """Someone swaps a UAP and rewrites its digest in the payload: the signature no longer holds."""
    run_dir, public_key = run_copy
    name = "uaps/nontargeted_inf_z0.2.npy"
    np.save(run_dir / name, np.zeros((32, 32), np.float32))
    envelope = json.loads((run_dir / "evidence.json").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    for subject in statement["subject"]:
        if subject["name"] == name:
            subject["digest"]["sha256"] = sha256_file(run_dir / name)
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (run_dir / "evidence.json").write_text(json.dumps(envelope))
    code, output = cli("verify", run_dir, "--key", public_key)
    assert code == 5 and "the signature does not verify" in output
    code, output = cli("verify", run_dir)  # without the key, digests alone cannot catch it: the output says so
    assert code == 0 and "signature not checked" in output


@pytest.mark.slow
def test_statement_lists_every_output_and_records_inputs(signed_run):
    run_dir, public_key, policy = signed_run
    envelope = json.loads((run_dir / "evidence.json").read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["signatures"][0]["keyid"] == evidence.keyid(evidence.load_public_key(public_key))
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"].startswith("https://auditkit.dev/") and statement["predicateType"][-3:] == "/v1"
    names = {s["name"] for s in statement["subject"]}
    assert {"report.html", "report.pdf", "results.json", "junit.xml", "sbom.cdx.json",
            "uaps/nontargeted_inf_z0.2.npy", "uaps/targeted-COVID-19_2_z0.2.npy"} <= names
    results = json.loads((run_dir / "results.json").read_text())
    p = statement["predicate"]
    assert p["verdict"] == results["verdict"] and p["seed"] == 5
    assert p["data"]["decoded_images"]["sha256"] == results["data"]["content_sha256"]
    assert p["model"]["files"] == [{"name": name, "digest": {"sha256": results["model"]["sha256"][name]}}
                                   for name in ("tiny.keras", "tiny.yaml")]
    assert p["policy"]["text"] == policy.read_text() and p["policy"]["sha256"] == results["provenance"]["policy_sha256"]
    assert p["versions"]["tensorflow"] and p["versions"]["cryptography"] and p["started"] <= p["finished"]


@pytest.mark.slow
def test_sbom_is_cyclonedx_of_the_environment(signed_run):
    sbom = json.loads((signed_run[0] / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    names = {c["name"].lower() for c in sbom["components"]}
    assert {"numpy", "cryptography", "pydantic"} <= names


def test_pae_matches_the_dsse_spec_example():
    assert evidence.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    code, output = cli("keygen", "--out", tmp_path / "team")
    assert code == 0, output
    assert os.stat(tmp_path / "team.key").st_mode & 0o777 == 0o600
    private = evidence.load_private_key(tmp_path / "team.key")
    assert evidence.keyid(private.public_key()) == evidence.keyid(evidence.load_public_key(tmp_path / "team.pub"))
    before = (tmp_path / "team.key").read_bytes()
    code, output = cli("keygen", "--out", tmp_path / "team")
    assert code == 2 and "refusing to overwrite" in output
    assert (tmp_path / "team.key").read_bytes() == before


@pytest.mark.slow
def test_verify_with_a_key_on_an_unsigned_run_fails_and_a_bad_key_file_is_bad_input(run_copy, tmp_path):
    run_dir, public_key = run_copy
    envelope = json.loads((run_dir / "evidence.json").read_text())
    (run_dir / "evidence.json").write_bytes(base64.b64decode(envelope["payload"]))
    assert cli("verify", run_dir)[0] == 0
    code, output = cli("verify", run_dir, "--key", public_key)
    assert code == 5 and "is not signed" in output
    (tmp_path / "junk.pub").write_text("not a key")
    code, output = cli("verify", run_dir, "--key", tmp_path / "junk.pub")
    assert code == 2 and "junk.pub" in output


@pytest.mark.slow
def test_recompute_all_reproduces_every_uap_byte_for_byte(signed_run):
    run_dir, public_key, _ = signed_run
    code, output = cli("verify", run_dir, "--key", public_key, "--recompute", "all")
    assert code == 0, output
    assert "same platform" in output
    assert output.count("UAP identical byte for byte") == 4


@pytest.mark.slow
def test_recompute_on_another_platform_compares_rates_with_the_intervals(signed_run, monkeypatch):
    from auditkit import reproduce

    monkeypatch.setattr(reproduce, "_same_platform", lambda recorded, again: False)
    result = reproduce.recompute_cells(signed_run[0], "nontargeted_inf_z0.2")
    assert result.problem is None and "another platform" in result.platform_note
    assert [line.split(":")[0].strip() for line in result.lines] == ["nontargeted_inf_z0.2", "train", "test"]
    assert all("within the interval" in line for line in result.lines[1:])


@pytest.mark.slow
def test_recompute_of_an_unknown_cell_is_bad_input(signed_run):
    code, output = cli("verify", signed_run[0], "--recompute", "nope")
    assert code == 2 and "no cell 'nope'" in output


@pytest.mark.slow
def test_verify_does_not_import_tensorflow(signed_run):
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom auditkit.cli import app\n"
             f"r = CliRunner().invoke(app, ['verify', {str(signed_run[0])!r}, '--key', {str(signed_run[1])!r}])\n"
             "print(r.exit_code, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}).stdout
    assert out.split() == ["0", "False"]
