"""The `auditkit` command: a thin typer layer over auditkit.api. TensorFlow is imported only by commands that need it."""
from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from .errors import AuditkitError
from .messages import error_line
from .messages import escape as one_line
from .plainprogress import PlainProgress
from .quiet import silence_third_party
from .supervisor import supervise

EXIT_CODES = """Exit codes: 0 every threshold passed · 1 a threshold failed · 2 bad input or usage (one line naming
what and where) · 3 internal error (a bug: rerun with --debug and report it) · 4 inconclusive: no threshold
failed, but an attack-strength check did (the attack did not show it worked), so nothing passed · 5 verify: a
file or field differs from the evidence · 6 verify --recompute: a cell was not reproduced."""
VERIFY_FAILED, NOT_REPRODUCED = 5, 6

# typer >= 0.24 carries its own copy of click, whose exceptions derive from TyperException
_USAGE_ERRORS = tuple({getattr(typer, "TyperException", click.ClickException), click.ClickException})


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (unknown option, --jobs -1, a missing --model) as the same one line as any bad input, exit 2,
    instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # no arguments at all: the help text, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f"see {ctx.command_path if ctx else self.name} --help"
            _print_line(error_line(exc.format_message(), hint))
            code = 2
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, cls=_OneLineUsageErrors,
                  help=f"Audit image classifiers against universal adversarial perturbations.\n\n{EXIT_CODES}")
policy_app = typer.Typer(no_args_is_help=True, help="Policy files.")
zoo_app = typer.Typer(no_args_is_help=True, help="Built-in reference models.")
app.add_typer(policy_app, name="policy")
app.add_typer(zoo_app, name="zoo")
# markup off by default: names, labels and paths from user files may contain [brackets]
console = Console(stderr=True, markup=False)
out = Console(markup=False)
STATE = {"debug": False, "quiet": False}
STATUS_COLOURS = {"PASS": "green", "FAIL": "bold red", "INCONCLUSIVE": "bold yellow"}
FORMATS = ("html", "pdf", "json", "junit")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    STATE["debug"] = debug
    if not debug:
        silence_third_party(_print_line)


def _print_line(line: str) -> None:
    """One already escaped line on stderr, its leading 'error:' or 'warning:' in red on a terminal."""
    text = Text(line)
    head = line.split(":", 1)[0]
    if head in ("error", "warning", "internal error"):
        text.stylize("bold red", 0, len(head) + 1)
    console.print(text, highlight=False, soft_wrap=True)


def _guarded(fn):
    """Bad input -> one line on stderr and exit 2; anything unexpected -> exit 3 (traceback with --debug).
    Signals are the supervisor's (see supervisor): they never reach this code as exceptions."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except AuditkitError as exc:
            if STATE["debug"]:
                raise
            _print_line(error_line(str(exc)))
            raise typer.Exit(2) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence of a CLI
            if STATE["debug"]:
                raise
            _print_line("internal " + error_line(f"{type(exc).__name__}: {exc}", "rerun with --debug"))
            raise typer.Exit(3) from None

    return wrapper


class RichProgress:
    """audit.Progress drawn as one rich bar at a time, on the shared stderr console."""

    def __init__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=False)
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.bar.stop()
        else:  # an error follows: leave no bar behind it, nor the blank line Progress.stop adds off a terminal
            self.bar.live.transient = True
            self.bar.live.stop()

    def start(self, label, total):
        if self.task is not None:
            self.bar.update(self.task, visible=self.bar.tasks[-1].completed > 0)
            self.bar.stop_task(self.task)
        self.task = self.bar.add_task(label, total=total)

    def update(self, completed, label=None, total=None):
        kw = {"description": label} if label else {}
        if total is not None:
            kw["total"] = total
        self.bar.update(self.task, completed=completed, **kw)

    def done(self):
        if self.task is not None:
            self.bar.stop_task(self.task)


class _LogProgress(PlainProgress):
    """Progress off a terminal: a plain line at most every 10 s on stderr (see plainprogress)."""

    def __init__(self, quiet: bool = False):
        super().__init__(lambda line: None if quiet else console.print(Text(one_line(line)), highlight=False,
                                                                        soft_wrap=True), heartbeat=not quiet)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _progress(quiet: bool):
    """The progress display for this run: a rich bar on a terminal, log lines off one, nothing with --quiet."""
    STATE["quiet"] = quiet
    if quiet:
        return _LogProgress(quiet=True)
    return RichProgress() if console.is_terminal else _LogProgress()


JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No progress bar or progress lines; only warnings, errors "
                         "and the summary.")


def _formats(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in FORMATS]
    if bad or not items:
        raise AuditkitError(f"unknown format {', '.join(bad) or repr(value)} (choose from {', '.join(FORMATS)})",
                            "--formats")
    return items


def _spec_overrides(classes: Optional[str], input_size: Optional[int], channels: Optional[int],
                    scale: Optional[float], output: Optional[str], layout: Optional[str] = None,
                    mean: Optional[str] = None, std: Optional[str] = None) -> dict:
    """The spec values given as flags; they override the model's spec file."""
    flags = {"classes": classes.split(",") if classes else None, "input_size": input_size, "channels": channels,
             "scale": scale, "output": output, "layout": layout,
             "mean": _numbers(mean, "--mean"), "std": _numbers(std, "--std")}
    return {k: v for k, v in flags.items() if v is not None}


def _numbers(value: Optional[str], flag: str) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise AuditkitError(f"must be a number or comma-separated numbers, got {value!r}", flag) from None


IMAGE_ROOT_OPT = typer.Option(None, "--image-root", help="Folder every image path must lie in (default: the "
                              "policy's data.image_root, else the manifest's folder).")
MODEL_HELP = ("Zoo name (covidnet_small, covidnet_large), .keras file, SavedModel directory, .onnx file or TF1 "
              "checkpoint (model.meta, or its directory).")
SPEC_OPTS = dict(
    model_spec=typer.Option(None, "--model-spec", help="A model.yaml to use instead of the one beside the model."),
    classes=typer.Option(None, "--classes", help="Comma-separated class names in output order."),
    input_size=typer.Option(None, "--input-size"),
    channels=typer.Option(None, "--channels", help="1 or 3 (the grayscale plane is repeated)."),
    scale=typer.Option(None, "--scale", help="Model input = image in [0,1] x scale (then mean/std)."),
    output=typer.Option(None, "--output", help="softmax or logits."),
    layout=typer.Option(None, "--layout", help="NHWC or NCHW."),
    mean=typer.Option(None, "--mean", help="Subtracted after scaling: one number or one per channel, comma-separated."),
    std=typer.Option(None, "--std", help="Divided by after the mean: one number or one per channel."),
)


@app.command()
@_guarded
def run(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    policy: Path = typer.Option(..., "--policy", "-p", help="Policy YAML (see policies/)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Manifest to audit on instead of the policy's."),
    image_root: Optional[Path] = IMAGE_ROOT_OPT,
    out_dir: Path = typer.Option(Path("audit-out"), "--out", "-o", help="Output directory."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Comma-separated: html,pdf,json,junit."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Override the policy's seed."),
    harden: Optional[bool] = typer.Option(None, "--harden/--no-harden", help="Run the policy's hardening block "
                                          "(default: as the policy's hardening.enabled says)."),
    surrogate: Optional[str] = typer.Option(None, "--surrogate", help="Craft the UAPs on this white-box model and "
                                            "evaluate them on --model (a transfer attack)."),
    deploy: Optional[str] = typer.Option(None, "--deploy", help="The deployed file (e.g. model.onnx): every UAP is "
                                         "also evaluated on it, with a parity check against --model."),
    transfer: Optional[list[str]] = typer.Option(None, "--transfer", help="Another model to evaluate every UAP "
                                                 "on (repeatable): a transferability matrix."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Most cells crafted side by side "
                                       "(default: every cell that shares norms and clip); the results do not "
                                       "depend on it."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Ed25519 private key (auditkit keygen): sign "
                                        "evidence.json as a DSSE envelope."),
    sbom: bool = typer.Option(False, "--sbom", help="Also write sbom.cdx.json, a CycloneDX SBOM of the audit "
                              "environment (listed in evidence.json)."),
    summary_md: Optional[Path] = typer.Option(None, "--summary-md", help="Write a short Markdown summary here "
                                              "(verdict, failed rules, link to the report), e.g. "
                                              "$GITHUB_STEP_SUMMARY."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="results.json of the last released model's "
                                            "audit under the same policy: per-cell changes, and rules with "
                                            "max_increase fail where a cell got worse by more."),
    report_url: Optional[str] = typer.Option(None, "--report-url", help="Link the Markdown summary to this URL "
                                             "(e.g. the CI run's artefacts) instead of the report's path."),
    allow_inconclusive: bool = typer.Option(False, "--allow-inconclusive", help="Exit 0 on an INCONCLUSIVE "
                                            "verdict (research runs; never for a release gate)."),
    executor: str = typer.Option("local", "--executor", help="local: cells run here, side by side; ray: one "
                                 "Ray task per cell (pip install \"auditkit[ray]\"); the same results."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The Ray cluster to join (default: "
                                              "RAY_ADDRESS, else a Ray started on this machine)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Keep finished cells beside --out until the "
                                "run finishes, and reuse those of an interrupted run of the same model, data and "
                                "policy (default: on)."),
    quiet: bool = QUIET_OPT,
    model_spec: Optional[Path] = SPEC_OPTS["model_spec"], classes: Optional[str] = SPEC_OPTS["classes"],
    input_size: Optional[int] = SPEC_OPTS["input_size"], channels: Optional[int] = SPEC_OPTS["channels"],
    scale: Optional[float] = SPEC_OPTS["scale"], output: Optional[str] = SPEC_OPTS["output"],
    layout: Optional[str] = SPEC_OPTS["layout"], mean: Optional[str] = SPEC_OPTS["mean"],
    std: Optional[str] = SPEC_OPTS["std"],
):
    """Run a policy's UAP audit on a model; write results.json, report.html/.pdf, junit.xml, uaps/ and
    evidence.json (digests of all of them, for `auditkit verify`).

    With hardening, the model is retrained against UAPs, exported (.keras and ONNX, parity-checked), and the
    policy is re-run on it; the exit code then follows the hardened model's verdict."""
    from . import api

    fmts = _formats(formats)
    overrides = _spec_overrides(classes, input_size, channels, scale, output, layout, mean, std)
    command = "auditkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _progress(quiet) as progress:
        result = api.run(model, policy, out_dir, data=data, image_root=image_root, formats=fmts, seed=seed,
                         spec_overrides=overrides, spec_file=model_spec, harden=harden, surrogate=surrogate, deploy=deploy, transfer=transfer or (), jobs=jobs,
                         command=command, sign_key=sign, sbom=sbom, baseline=baseline, resume=resume,
                         executor=executor, ray_address=ray_address, progress=progress,
                         log=_log)
    if summary_md is not None:
        from .fileio import atomic_write_text
        from .report import render_markdown, report_link

        try:
            atomic_write_text(summary_md, render_markdown(result, report_link(out_dir, report_url)))
        except OSError as exc:
            raise AuditkitError(f"cannot write the Markdown summary ({exc.strerror})", str(summary_md)) from None
    _print_summary(result, out_dir)
    if result.hardened is not None:
        out.print("after hardening:")
        _print_summary(result.hardened, out_dir / "after-hardening")
    final = result.hardened or result
    raise typer.Exit({"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 0 if allow_inconclusive else 4}[final.verdict])


def _log(message: str) -> None:
    if STATE["quiet"] and not message.startswith("warning:"):
        return
    console.print(Text(one_line(f"  {message}")), highlight=False, soft_wrap=True)


@app.command("harden")
@_guarded
def harden_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Zoo name or .keras file (the model must be trainable)."),
    policy: Path = typer.Option(..., "--policy", "-p", help="Policy YAML; its hardening block is used."),
    data: Optional[Path] = typer.Option(None, "--data", help="Manifest instead of the policy's."),
    image_root: Optional[Path] = IMAGE_ROOT_OPT,
    out_dir: Path = typer.Option(Path("hardened"), "--out", "-o", help="Output directory."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Override the policy's seed."),
    quiet: bool = QUIET_OPT,
    model_spec: Optional[Path] = SPEC_OPTS["model_spec"], classes: Optional[str] = SPEC_OPTS["classes"],
):
    """Adversarially retrain a model (paper section 2.4): writes hardened.keras, hardened.onnx (parity-checked)
    and hardening.json. Rerunning the same command resumes after the last finished round."""
    from . import api

    with _progress(quiet) as progress:
        record = api.harden(model, policy, out_dir, data=data, image_root=image_root, seed=seed, progress=progress,
                            log=_log, spec_overrides=_spec_overrides(classes, None, None, None, None),
                            spec_file=model_spec)
    first, last = record.rounds[0], record.rounds[-1]
    parity = record.parity
    out.print(f"attack success {first.attack_rate.value:.1%} -> {last.attack_rate.value:.1%}, clean accuracy "
              f"{first.clean_accuracy.value:.1%} -> {last.clean_accuracy.value:.1%}")
    out.print(f"wrote {out_dir / record.keras_file}" + (f" and {out_dir / record.onnx_file}" if record.onnx_file
                                                         else "") +
              (f"; ONNX parity {'PASS' if parity['passed'] else 'FAIL'} (max |Δp| {parity['max_abs_prob_diff']:.1e})"
               if parity else ""))


@app.command()
@_guarded
def report(
    results: Path = typer.Argument(..., help="results.json of an earlier run (uaps/ and samples/ beside it), or "
                                             "its run directory."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write (default: beside results)."),
    formats: Optional[str] = typer.Option("html,pdf,junit", "--formats"),
):
    """Re-render the reports from results.json without recomputing anything."""
    from . import api

    written = api.rerender(results, out_dir, _formats(formats))
    for fmt, path in written.items():
        out.print(f"{fmt}: {path}")


@app.command()
@_guarded
def keygen(
    prefix: Path = typer.Option(Path("auditkit"), "--out", "-o", help="Path prefix: writes PREFIX.key (private, "
                                "mode 0600) and PREFIX.pub."),
):
    """Make an Ed25519 key pair for `auditkit run --sign`. Never overwrites a key."""
    from .evidence import generate_keypair

    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    kid = generate_keypair(private, public)
    _out_print(f"private key: {private} (keep it secret)\npublic key:  {public} (give it to reviewers)\nkeyid: {kid}")


@app.command()
@_guarded
def verify(
    run_dir: Path = typer.Argument(..., help="An audit's output folder (with evidence.json)."),
    key: Optional[Path] = typer.Option(None, "--key", help="Ed25519 public key: check evidence.json's signature."),
    recompute: Optional[str] = typer.Option(None, "--recompute", help="CELL or all: re-craft cells from the "
                                            "recorded model, data, policy and seed and compare the UAPs."),
    quiet: bool = QUIET_OPT,
):
    """Check an audit folder against its evidence.json: every file's sha256, the signature (with --key), and
    with --recompute that the UAPs can be reproduced. Exit 0 when everything holds, 5 (or 6) with one line
    naming the first file or field that differs."""
    from .evidence import Mismatch, verify_run

    try:
        checked = verify_run(run_dir, key)
    except Mismatch as exc:
        console.print(f"[bold red]verify failed:[/] {escape(str(exc))}", highlight=False, markup=True,
                      soft_wrap=True)
        raise typer.Exit(VERIFY_FAILED) from None
    signature = (f"signature by keyid {checked.keyid[:16]}… holds" if checked.keyid else
                 "signed, signature not checked (give --key)" if checked.signed else "not signed")
    _out_print(f"OK: {checked.files} files match evidence.json; {signature}")
    if recompute is None:
        return
    from .reproduce import recompute_cells

    with _progress(quiet) as progress:
        report = recompute_cells(run_dir, recompute, progress=progress)
    _out_print(report.platform_note)
    for line in report.lines:
        _out_print(line)
    if report.problem:
        console.print(f"[bold red]not reproduced:[/] {escape(report.problem)}", highlight=False, markup=True,
                      soft_wrap=True)
        raise typer.Exit(NOT_REPRODUCED)


def _out_print(text: str) -> None:
    out.print(text, highlight=False, soft_wrap=True)


@policy_app.command("check")
@_guarded
def policy_check(policy: Path = typer.Argument(..., help="Policy YAML.")):
    """Validate a policy file; print its attack grid and rules."""
    from .policy import load_policy, validate_against_classes

    pol = load_policy(policy)
    validate_against_classes(pol, pol.data.classes)
    cells = pol.cells(pol.data.classes)
    out.print(f"{policy}: OK — {len(cells)} cells, {len(pol.thresholds)} rules, seed {pol.seed}, "
              f"sha256 {pol.sha256()[:16]}")
    for c in cells:
        out.print(f"  cell {c.key}  eps={c.eps:g} max_iter={c.max_iter} clip={c.clip}")
    for t in pol.thresholds:
        out.print(f"  rule {t.name}")
    h = pol.hardening
    hc = h.attack.settings(pol.attacks[0])
    out.print(f"  hardening ({'enabled' if h.enabled else 'off'}): {h.rounds} rounds x {h.uaps_per_round} UAPs "
              f"{hc.key}  eps={hc.eps:g} max_iter={hc.max_iter} clip={hc.clip} "
              f"on {h.attack.craft_images or 'all'} crafting images each, {h.epochs} fine-tuning epochs")


@app.command()
@_guarded
def inspect(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    model_spec: Optional[Path] = SPEC_OPTS["model_spec"], classes: Optional[str] = SPEC_OPTS["classes"],
    input_size: Optional[int] = SPEC_OPTS["input_size"], channels: Optional[int] = SPEC_OPTS["channels"],
    scale: Optional[float] = SPEC_OPTS["scale"], output: Optional[str] = SPEC_OPTS["output"],
    layout: Optional[str] = SPEC_OPTS["layout"], mean: Optional[str] = SPEC_OPTS["mean"],
    std: Optional[str] = SPEC_OPTS["std"],
    as_json: bool = JSON_OPT,
):
    """Show a model's classes, input spec, format and file hashes."""
    from .models import load_model

    m = load_model(model, _spec_overrides(classes, input_size, channels, scale, output, layout, mean, std), model_spec)
    if as_json:
        from .audit import model_info

        _print_json(dataclasses.asdict(model_info(m)) | {"white_box": m.can_craft, "refusal": m.craft_refusal})
        return
    s = m.spec
    table = Table(title=f"model {m.name}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # digests in full, folded, never cut
    rows = [("format", m.format), ("path", str(m.path or "")), ("classes", ", ".join(m.classes)),
            ("input", f"{s.input_size}x{s.input_size}, {s.channels} channel(s), {s.layout}"),
            ("preprocessing", f"x*{s.scale:g}, mean {list(s.mean)}, std {list(s.std)}"),
            ("trained with", f"crop_top {_stated(s.crop_top)}, resize {_stated(s.resize)}"),
            ("output", s.output), ("parameters", f"{m.parameters:,}" if m.parameters else "unknown"),
            ("white-box gradients", f"yes — {m.gradient_source()}" if m.can_craft else f"no — {m.craft_refusal}"),
            ("spec file", str(m.spec_file or "none")), ("digest (all files)", m.digest())]
    rows += [(f"sha256 {name}", digest) for name, digest in m.sha256().items()]
    for k, v in rows:
        table.add_row(k, v)
    _print_table(table)


def _print_table(table: Table) -> None:
    """A table at its full width off a terminal, never cut to 80 columns: a script reading `auditkit models | cat`
    gets whole names."""
    if out.is_terminal:
        out.print(table)
        return
    width = Measurement.get(out, out.options.update(width=10_000), table).maximum
    Console(file=out.file, width=width, markup=False, color_system=None).print(table)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _stated(value) -> str:
    if value is None:
        return "not stated (auditkit's default unless the policy sets it)"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
@_guarded
def models(as_json: bool = JSON_OPT):
    """List the built-in zoo models."""
    from .models import zoo

    rows = []
    for name, entry in zoo.ZOO.items():
        model = zoo.build_model(name)
        info = zoo.weights_info(name)
        rows.append({"name": name, "input_size": entry.input_size, "channels": 1, "parameters": model.count_params(),
                     "flops_per_image": zoo.count_flops(model), "classes": list(entry.classes),
                     "trained_on": info.get("trained_on"), "test_accuracy": info.get("test_accuracy"),
                     "date": info.get("date")})
    if as_json:
        _print_json(rows)
        return
    table = Table(title="auditkit zoo")
    for col in ("name", "input", "parameters", "FLOPs/image", "classes", "weights"):
        table.add_column(col)
    for row in rows:
        source = (row["trained_on"] or "?").split(", default set")[0]  # the generator's parameters: in the json
        weights = f"{source}; test accuracy {row['test_accuracy'] or float('nan'):.1%} ({row['date'] or '?'})" \
            if row["trained_on"] else "not trained"
        table.add_row(row["name"], f"{row['input_size']}x{row['input_size']}x1", f"{row['parameters']:,}",
                      f"{row['flops_per_image'] / 1e6:.1f} M", ", ".join(row["classes"]), weights)
    _print_table(table)


@zoo_app.command("train")
@_guarded
def zoo_train(
    name: str = typer.Argument(..., help="covidnet_small or covidnet_large."),
    data: Optional[Path] = typer.Option(None, "--data", help="Manifest with train/test splits (default: the "
                                        "built-in phantoms, i.e. the shipped weights' recipe)."),
    out_dir: Path = typer.Option(Path("zoo-weights"), "--out", "-o", help="Where to write <name>.weights.h5, "
                                 "<name>.json and <name>.keras."),
    epochs: int = typer.Option(30, "--epochs", min=1),
    seed: int = typer.Option(0, "--seed", min=0),
    quiet: bool = QUIET_OPT,
):
    """Train a zoo model with the documented deterministic recipe (the one behind the shipped weights)."""
    from . import api

    with _progress(quiet) as progress:
        progress.start(f"training {name}", epochs)

        def on_epoch(epoch: int, logs: dict) -> None:
            acc = logs.get("val_accuracy", logs.get("accuracy"))
            label = f"training {name}: epoch {epoch}/{epochs}, accuracy {acc:.1%}"
            if isinstance(progress, RichProgress):
                progress.update(epoch, label)
            else:  # off a terminal: one line per epoch (none with --quiet)
                _log(label)

        info = api.train_zoo(name, data=data, out_dir=out_dir, epochs=epochs, seed=seed, progress=on_epoch,
                             log=_log)
    out.print(f"{name}: test accuracy {info['test_accuracy']:.1%} on {info['trained_on']}")
    out.print(f"weights: {out_dir / (name + '.weights.h5')} (sha256 {info['sha256'][:16]}…)")


SUMMARY_LEGEND = ("induced = what the UAP changed: flip rate (prediction ≠ clean prediction); R_s induced (images not "
                  "predicted as the target when clean that the UAP sends there). paper = the paper's rates, clean "
                  "errors included: R_f (prediction ≠ true label); R_s (all images predicted as the target). In "
                  "brackets: random noise of the same norm.")


def _print_summary(result, out_dir: Path) -> None:
    """Two rows a cell: what the UAP itself changed (clean errors left out), then the paper's rate; each with its
    random controls' rate in brackets."""
    splits = result.data.eval_splits
    table = Table(title=f"{result.title}: {result.verdict}")
    table.add_column("cell", overflow="fold")
    table.add_column("metric", no_wrap=True)
    for s in splits:
        table.add_column(f"{s}: UAP (random)", justify="right", no_wrap=True)
    for c in result.cells:
        targeted = c.attack.kind == "targeted"
        rows = [("R_s induced" if targeted else "flip rate", c.induced, c.control_induced),
                ("R_s (paper)" if targeted else "R_f (paper)", c.headline, c.control_headline)]
        for i, (metric, uap, random) in enumerate(rows):
            values = [f"{_pct(uap(s))} ({_pct(random(s))})" for s in splits]
            table.add_row(c.key if i == 0 else "", metric, *values, end_section=i == len(rows) - 1)
    _print_table(table)
    out.print(SUMMARY_LEGEND, style="dim")
    for r in result.rules:
        mark = f"[{STATUS_COLOURS[r.status]}]{r.status}[/]"
        rise = "" if r.increase is None else \
            f"; rise {r.increase:+.3f} ({escape(r.increase_cell)}), max_increase {r.max_increase:g}"
        checks = f"; failed checks: {escape(', '.join(r.failed_checks))}" if r.failed_checks else ""
        out.print(f"{mark} {escape(r.name)}: measured {r.measured:.3f} ({escape(r.worst_cell or r.split)}), "
                  f"{r.bound} {r.limit:g}{rise}{checks}", highlight=False, markup=True)
    colour = STATUS_COLOURS[result.verdict]
    out.print(f"verdict: [{colour}]{result.verdict}[/]  ->  {escape(str(out_dir))}", markup=True)


def _pct(rate) -> str:
    return "–" if rate is None or rate.value != rate.value else f"{rate.value:.1%}"


def main() -> None:
    """The `auditkit` command: the work runs in a child process; this one owns the signals (see supervisor)."""
    supervise(_run_app, _print_line)


def _run_app() -> int:
    try:
        app()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0
