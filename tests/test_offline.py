"""An audit runs offline: no network connection from auditkit or its libraries, onnxruntime's telemetry off."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import network_guard, write_policy
from test_corpus import linear_onnx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def network_attempts() -> list:
    """conftest's network_guard() for the test: every attempt to reach the network fails and is recorded."""
    with network_guard() as attempts:
        yield attempts


def test_the_guard_refuses_and_records_network_use_only(network_attempts, tmp_path):
    """So that an empty record below means no attempt, not a guard that missed one."""
    with socket.socket(socket.AF_INET6) as ip:
        for reach in (lambda: socket.getaddrinfo("example.org", 443), lambda: socket.create_connection(("x", 1)),
                      lambda: ip.connect(("::1", 9))):
            with pytest.raises(OSError, match="offline test"):
                reach()
    assert [what for what, _ in network_attempts] == ["getaddrinfo", "create_connection", "connect"]
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(str(tmp_path / "s"))
        server.listen()
        client.connect(str(tmp_path / "s"))
    assert len(network_attempts) == 3


@pytest.mark.slow
def test_a_signed_audit_with_every_report_and_an_sbom_makes_no_network_attempt(signed_audit):
    """conftest's signed audit of the tiny Keras model (every format, an SBOM) ran under the same guard."""
    out, _, _, attempts = signed_audit
    assert (out / "report.pdf").is_file() and attempts == []


@pytest.mark.slow
def test_a_signed_onnx_audit_with_every_report_and_an_sbom_makes_no_network_attempt(network_attempts, tmp_path, phantom_manifest):
    from auditkit import api
    from auditkit.evidence import generate_keypair

    generate_keypair(tmp_path / "audit.key", tmp_path / "audit.pub")
    api.run(linear_onnx(tmp_path / "linear.onnx", ["N", 1, 32, 32]), write_policy(tmp_path / "policy.yaml"),
            tmp_path / "out", data=phantom_manifest, formats=["html", "pdf", "json", "junit"], sbom=True,
            sign_key=tmp_path / "audit.key")
    assert (tmp_path / "out" / "report.pdf").is_file() and network_attempts == []


def test_onnxruntime_telemetry_is_off_wherever_auditkit_is_imported_first(tmp_path):
    """onnxruntime 1.32 reads ORT_DISABLE_TELEMETRY when first imported; without it, a session keeps a telemetry
    database under ~/.cache/Microsoft and looks up Microsoft's event server."""
    import auditkit  # noqa: F401 - what sets it

    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1" and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    model = linear_onnx(tmp_path / "m.onnx", ["N", 1, 8, 8])
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    code = f"import auditkit, onnxruntime; onnxruntime.InferenceSession({str(model)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env | {"HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert not (tmp_path / ".cache" / "Microsoft").exists()
