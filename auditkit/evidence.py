"""Evidence a reviewer can check: an in-toto Statement over a run's outputs, optionally signed (DSSE, Ed25519),
and its verification from the output folder alone.

No TensorFlow here: `auditkit verify` reads files, hashes them and checks a signature.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AuditkitError
from .fileio import atomic_write_text, sha256_files
from .policy import canonical_sha256
from .results import AuditResult
from .staging import LOCK_NAME
from .supervisor import phase

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://auditkit.dev/attestation/uap-audit/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
EVIDENCE_FILE = "evidence.json"
SBOM_FILE = "sbom.cdx.json"
OUTPUTS = (EVIDENCE_FILE, SBOM_FILE)
CHECKPOINTS = "hardening"  # resumable retraining state, kept in the output folder but not an output of the run
LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "onnxruntime", "onnx", "onnx-ad", "tf2onnx", "numpy",
             "pydantic", "pyyaml", "pillow", "pydicom", "jinja2", "weasyprint", "matplotlib", "cryptography")


# ---------------------------------------------------------------- the statement

def build_statement(result: AuditResult, run_dir: Path, policy_text: str) -> dict[str, Any]:
    """The in-toto Statement: every file in run_dir as a subject, the run's inputs and settings as predicate."""
    prov, data = result.provenance, result.data
    subjects = [{"name": name, "digest": {"sha256": digest}} for name, digest in _output_digests(run_dir).items()]
    predicate = {
        "verdict": (result.hardened or result).verdict,
        "model": _model_entry(result.model),
        "crafted_on": _model_entry(result.crafted_on) if result.crafted_on else None,
        "data": {"source": data.source, "synthetic": data.synthetic,
                 "manifest": {"sha256": data.manifest_sha256},
                 "decoded_images": {"sha256": data.content_sha256}},
        "policy": {"path": prov.policy_path, "sha256": prov.policy_sha256, "resolved": prov.policy,
                   "text": policy_text, "text_sha256": hashlib.sha256(policy_text.encode("utf-8")).hexdigest()},
        "seed": prov.seed,
        "command": prov.command,
        "tool": {"name": "auditkit", "version": prov.auditkit},
        "versions": {"python": prov.python, "tensorflow": prov.tensorflow, "onnxruntime": prov.onnxruntime,
                     "numpy": prov.numpy} | _library_versions(),
        "platform": {"system": prov.platform, "machine": platform.machine(), "processor": platform.processor()},
        "started": prov.started,
        "finished": prov.finished,
    }
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def _model_entry(model) -> dict[str, Any]:
    return {"name": model.name, "format": model.format, "path": model.path,
            "files": [{"name": name, "digest": {"sha256": sha}} for name, sha in model.sha256.items()]}


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _output_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every output file below run_dir: all but the evidence itself, hardening checkpoints and the
    staging folder's lock (which stays behind when the run is published)."""
    return {name: digest for name, digest in sha256_files(run_dir).items()
            if name not in (EVIDENCE_FILE, LOCK_NAME) and name.split("/")[0] != CHECKPOINTS}


def write_evidence(result: AuditResult, run_dir: Path, policy_text: str, signing_key=None) -> Path:
    """evidence.json in run_dir: the Statement, or with `signing_key` a DSSE envelope holding it."""
    phase("evidence")
    statement = build_statement(result, run_dir, policy_text)
    payload = json.dumps(statement, indent=2, ensure_ascii=False)
    text = payload if signing_key is None else json.dumps(sign(payload.encode("utf-8"), signing_key), indent=2)
    path = Path(run_dir) / EVIDENCE_FILE
    atomic_write_text(path, text + "\n")
    return path


def write_sbom(run_dir: Path) -> Path:
    """A CycloneDX SBOM of the Python environment the audit ran in (every installed distribution)."""
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    seen: dict[str, Component] = {}
    for dist in metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and name.lower() not in seen:
            seen[name.lower()] = Component(name=name, version=version, type=ComponentType.LIBRARY,
                                           purl=PackageURL("pypi", name.lower(), version), bom_ref=f"{name}@{version}")
    components = sorted(seen.values(), key=lambda c: c.name.lower())
    bom = Bom(components=components)
    root = Component(name="auditkit audit environment", version=__version__, type=ComponentType.APPLICATION,
                     bom_ref="auditkit-audit-environment")
    bom.metadata.component = root
    bom.register_dependency(root, components)  # everything installed was importable by the audit
    path = Path(run_dir) / SBOM_FILE
    atomic_write_text(path, JsonV1Dot6(bom).output_as_string(indent=2) + "\n")
    return path


# ---------------------------------------------------------------- keys and DSSE

def generate_keypair(private_path: Path, public_path: Path) -> str:
    """A new Ed25519 key pair: private key PEM (mode 0600), public key PEM. Never overwrites. Returns the keyid."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise AuditkitError("already exists; refusing to overwrite a key", str(path))
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _create_exclusive(private_path, private_pem, 0o600)
    try:
        _create_exclusive(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return keyid(key.public_key())


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise AuditkitError("already exists; refusing to overwrite a key", str(path)) from None
    except OSError as exc:
        raise AuditkitError(f"cannot create ({exc.strerror})", str(path)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # the umask may have narrowed the public key's mode


def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM file (as `auditkit keygen` writes it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_read_key(path), password=None)
    except (ValueError, TypeError) as exc:
        raise AuditkitError(f"not an unencrypted PEM private key ({exc})", str(path)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditkitError(f"is a {type(key).__name__}, not an Ed25519 private key", str(path))
    return key


def load_public_key(path: str | Path):
    """An Ed25519 public key from a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(_read_key(path))
    except (ValueError, TypeError) as exc:
        raise AuditkitError(f"not a PEM public key ({exc})", str(path)) from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditkitError(f"is a {type(key).__name__}, not an Ed25519 public key", str(path))
    return key


def _read_key(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise AuditkitError("key file not found", str(path)) from None
    except OSError as exc:
        raise AuditkitError(f"cannot read key file ({exc.strerror})", str(path)) from None


def keyid(public_key) -> str:
    """sha256 of the raw 32-byte public key, hex: what a DSSE signature names its key by."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is signed, so the type cannot be swapped under the payload."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign(payload: bytes, private_key) -> dict[str, Any]:
    """A DSSE envelope over `payload` with one Ed25519 signature."""
    signature = private_key.sign(pae(PAYLOAD_TYPE, payload))
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"),
            "signatures": [{"keyid": keyid(private_key.public_key()),
                            "sig": base64.b64encode(signature).decode("ascii")}]}


# ---------------------------------------------------------------- verification

class Mismatch(Exception):
    """The first file or field of a run that does not match its evidence."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


@dataclass
class Verification:
    files: int  # output files whose digests were checked
    signed: bool
    keyid: str | None  # the key the signature was checked against (None: not checked)
    statement: dict[str, Any]


def verify_run(run_dir: str | Path, public_key_path: str | Path | None = None) -> Verification:
    """Check a run folder against its evidence.json: the signature (with a key), every output file's sha256,
    no unlisted output, and the predicate against results.json. Raises Mismatch naming the first difference;
    AuditkitError for bad input (no such folder, unreadable key)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditkitError("no such run folder", str(run_dir))
    public_key = load_public_key(public_key_path) if public_key_path is not None else None
    document = _read_json(run_dir / EVIDENCE_FILE, EVIDENCE_FILE)
    signed = isinstance(document, dict) and "payloadType" in document
    if signed:
        statement = _open_envelope(document, public_key, public_key_path)
    elif public_key is not None:
        raise Mismatch(EVIDENCE_FILE, f"is not signed, but --key {public_key_path} was given")
    else:
        statement = document
    _check_statement(statement)
    recorded = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    found = _output_digests(run_dir)
    for name, digest in recorded.items():
        if name not in found:
            raise Mismatch(name, "missing (listed in evidence.json)")
        if found[name] != digest:
            raise Mismatch(name, f"sha256 {found[name][:16]}… differs from evidence.json's {digest[:16]}…")
    for name in found:
        if name not in recorded:
            raise Mismatch(name, "not listed in evidence.json (added after the run)")
    _check_predicate(statement["predicate"], run_dir)
    return Verification(files=len(recorded), signed=signed,
                        keyid=keyid(public_key) if public_key is not None and signed else None, statement=statement)


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Mismatch(name, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Mismatch(name, f"cannot be read as JSON ({exc})") from None


def _open_envelope(envelope: dict[str, Any], public_key, key_path) -> dict[str, Any]:
    """The statement inside a DSSE envelope, after checking its signature when a key is given."""
    where = EVIDENCE_FILE
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise Mismatch(f"{where}: payloadType", f"is {envelope.get('payloadType')!r}, expected {PAYLOAD_TYPE!r}")
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in envelope["signatures"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise Mismatch(where, f"not a DSSE envelope ({exc})") from None
    if public_key is not None:
        from cryptography.exceptions import InvalidSignature

        wanted = keyid(public_key)
        sigs = [sig for kid, sig in signatures if kid == wanted]
        if not sigs:
            kids = ", ".join(kid[:16] + "…" for kid, _ in signatures) or "none"
            raise Mismatch(f"{where}: signatures", f"signed by keyid {kids}, not by the key in {key_path} "
                                                   f"({wanted[:16]}…)")
        try:
            public_key.verify(sigs[0], pae(PAYLOAD_TYPE, payload))
        except InvalidSignature:
            raise Mismatch(f"{where}: signatures", f"the signature does not verify with {key_path}: the payload "
                                                   "was changed after signing") from None
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Mismatch(f"{where}: payload", f"not a JSON statement ({exc})") from None


def _check_statement(statement: Any) -> None:
    where = EVIDENCE_FILE
    if not isinstance(statement, dict):
        raise Mismatch(where, "not an in-toto statement")
    if statement.get("_type") != STATEMENT_TYPE:
        raise Mismatch(f"{where}: _type", f"is {statement.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise Mismatch(f"{where}: predicateType",
                       f"is {statement.get('predicateType')!r}, expected {PREDICATE_TYPE!r}")
    try:
        for s in statement["subject"]:
            if not isinstance(s["name"], str) or len(s["digest"]["sha256"]) != 64:
                raise ValueError(s)
        statement["predicate"]["policy"]["resolved"]
    except KeyError as exc:
        raise Mismatch(where, f"malformed statement (no {exc.args[0]!r} field)") from None
    except (TypeError, ValueError):
        raise Mismatch(where, "malformed statement (a subject or the policy is not of the expected shape)") from None


def _check_predicate(predicate: dict[str, Any], run_dir: Path) -> None:
    """The predicate's own digests, and its fields against results.json (whose bytes were checked already)."""
    where = f"{EVIDENCE_FILE}: predicate"
    policy = predicate["policy"]
    if hashlib.sha256(policy["text"].encode("utf-8")).hexdigest() != policy["text_sha256"]:
        raise Mismatch(f"{where}.policy.text", "does not hash to policy.text_sha256")
    if canonical_sha256(policy["resolved"]) != policy["sha256"]:
        raise Mismatch(f"{where}.policy.resolved", "does not hash to policy.sha256")
    if not (run_dir / "results.json").exists():
        return  # a run written without the json format: the subjects' digests are all there is to check
    results = _read_json(run_dir / "results.json", "results.json")
    final = results.get("hardened") or results
    prov, data = results["provenance"], results["data"]
    recorded = {
        "verdict": (predicate["verdict"], final["verdict"]),
        "policy.sha256": (policy["sha256"], prov["policy_sha256"]),
        "seed": (predicate["seed"], prov["seed"]),
        "model.files": ({f["name"]: f["digest"]["sha256"] for f in predicate["model"]["files"]},
                        results["model"]["sha256"]),
        "data.manifest.sha256": (predicate["data"]["manifest"]["sha256"], data["manifest_sha256"]),
        "data.decoded_images.sha256": (predicate["data"]["decoded_images"]["sha256"], data["content_sha256"]),
        "started": (predicate["started"], prov["started"]),
    }
    for field, (mine, theirs) in recorded.items():
        if mine != theirs:
            raise Mismatch(f"{where}.{field}", f"{_short(mine)} differs from results.json's {_short(theirs)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
