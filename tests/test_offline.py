"""An audit runs offline: no network connection from auditkit or its libraries, onnxruntime's telemetry off."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_policy
from test_corpus import linear_onnx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Every attempt to reach the network (a name lookup, an IP connection) fails and is recorded. Local
    (AF_UNIX) sockets still connect."""
    attempts = []
    connect = socket.socket.connect

    def refused(what: str, target) -> OSError:
        attempts.append((what, target))
        return OSError(f"offline test: {what} {target}")

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise refused("connect", address)
        return connect(sock, address)

    def lookup(host, *args, **kw):
        raise refused("getaddrinfo", host)

    def create_connection(address, *args, **kw):
        raise refused("create_connection", address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


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


@pytest.mark.parametrize("kind", ["keras", "onnx"])
def test_a_signed_audit_with_every_report_and_an_sbom_makes_no_network_attempt(
        network_attempts, tmp_path, tiny_model, phantom_manifest, kind):
    from auditkit import api
    from auditkit.evidence import generate_keypair

    model = tiny_model if kind == "keras" else linear_onnx(tmp_path / "linear.onnx", ["N", 1, 32, 32])
    generate_keypair(tmp_path / "audit.key", tmp_path / "audit.pub")
    api.run(model, write_policy(tmp_path / "policy.yaml"), tmp_path / "out", data=phantom_manifest,
            formats=["html", "pdf", "json", "junit"], sbom=True, sign_key=tmp_path / "audit.key")
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
