"""The `auditkit` command: a thin typer layer over auditkit.api. TensorFlow is imported only by commands that need it."""
from __future__ import annotations

import functools
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import AuditkitError

EXIT_CODES = """Exit codes: 0 every threshold passed · 1 a threshold failed · 2 bad input or usage (one line naming
what and where) · 3 internal error (a bug: rerun with --debug and report it)."""

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help=f"Audit image classifiers against universal adversarial perturbations.\n\n{EXIT_CODES}")
policy_app = typer.Typer(no_args_is_help=True, help="Policy files.")
zoo_app = typer.Typer(no_args_is_help=True, help="Built-in reference models.")
app.add_typer(policy_app, name="policy")
app.add_typer(zoo_app, name="zoo")
# markup off by default: names, labels and paths from user files may contain [brackets]
console = Console(stderr=True, markup=False)
out = Console(markup=False)
STATE = {"debug": False}
FORMATS = ("html", "pdf", "json", "junit")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    STATE["debug"] = debug


def _guarded(fn):
    """Bad input -> one line on stderr and exit 2; anything unexpected -> exit 3 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except AuditkitError as exc:
            if STATE["debug"]:
                raise
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: no output was written", markup=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence of a CLI
            if STATE["debug"]:
                raise
            console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug)",
                          highlight=False, markup=True, soft_wrap=True)
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

    def __exit__(self, *exc):
        self.bar.stop()

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
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Cells crafted at a time (default: one "
                                       "per CPU core); the results do not depend on it."),
    model_spec: Optional[Path] = SPEC_OPTS["model_spec"], classes: Optional[str] = SPEC_OPTS["classes"],
    input_size: Optional[int] = SPEC_OPTS["input_size"], channels: Optional[int] = SPEC_OPTS["channels"],
    scale: Optional[float] = SPEC_OPTS["scale"], output: Optional[str] = SPEC_OPTS["output"],
    layout: Optional[str] = SPEC_OPTS["layout"], mean: Optional[str] = SPEC_OPTS["mean"],
    std: Optional[str] = SPEC_OPTS["std"],
):
    """Run a policy's UAP audit on a model; write results.json, report.html/.pdf, junit.xml and uaps/.

    With hardening, the model is retrained against UAPs, exported (.keras and ONNX, parity-checked), and the
    policy is re-run on it; the exit code then follows the hardened model's verdict."""
    from . import api

    fmts = _formats(formats)
    overrides = _spec_overrides(classes, input_size, channels, scale, output, layout, mean, std)
    command = "auditkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with RichProgress() as progress:
        result = api.run(model, policy, out_dir, data=data, formats=fmts, seed=seed, spec_overrides=overrides,
                         spec_file=model_spec, harden=harden, surrogate=surrogate, deploy=deploy,
                         transfer=transfer or (), jobs=jobs, command=command, progress=progress, log=_log)
    _print_summary(result, out_dir)
    if result.hardened is not None:
        out.print("after hardening:")
        _print_summary(result.hardened, out_dir / "after-hardening")
    final = result.hardened or result
    raise typer.Exit(0 if final.verdict == "PASS" else 1)


def _log(message: str) -> None:
    console.print(f"  {message}", highlight=False)


@app.command("harden")
@_guarded
def harden_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Zoo name or .keras file (the model must be trainable)."),
    policy: Path = typer.Option(..., "--policy", "-p", help="Policy YAML; its hardening block is used."),
    data: Optional[Path] = typer.Option(None, "--data", help="Manifest instead of the policy's."),
    out_dir: Path = typer.Option(Path("hardened"), "--out", "-o", help="Output directory."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Override the policy's seed."),
    model_spec: Optional[Path] = SPEC_OPTS["model_spec"], classes: Optional[str] = SPEC_OPTS["classes"],
):
    """Adversarially retrain a model (paper section 2.4): writes hardened.keras, hardened.onnx (parity-checked)
    and hardening.json. Rerunning the same command resumes after the last finished round."""
    from . import api

    with RichProgress() as progress:
        record = api.harden(model, policy, out_dir, data=data, seed=seed, progress=progress, log=_log,
                            spec_overrides=_spec_overrides(classes, None, None, None, None), spec_file=model_spec)
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
):
    """Show a model's classes, input spec, format and file hashes."""
    from .models import load_model

    m = load_model(model, _spec_overrides(classes, input_size, channels, scale, output, layout, mean, std), model_spec)
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
    out.print(table)


def _stated(value) -> str:
    if value is None:
        return "not stated (auditkit's default unless the policy sets it)"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
@_guarded
def models():
    """List the built-in zoo models."""
    from .models import zoo

    table = Table(title="auditkit zoo")
    for col in ("name", "input", "parameters", "FLOPs/image", "classes", "weights"):
        table.add_column(col)
    for name, entry in zoo.ZOO.items():
        model = zoo.build_model(name)
        info = zoo.weights_info(name)
        source = info.get("trained_on", "?").split(", default set")[0]  # the generator's parameters: in the json
        weights = f"{source}; test accuracy {info.get('test_accuracy', float('nan')):.1%} ({info.get('date', '?')})" \
            if info else "not trained"
        table.add_row(name, f"{entry.input_size}x{entry.input_size}x1", f"{model.count_params():,}",
                      f"{zoo.count_flops(model) / 1e6:.1f} M", ", ".join(entry.classes), weights)
    out.print(table)


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
):
    """Train a zoo model with the documented deterministic recipe (the one behind the shipped weights)."""
    from . import api

    with RichProgress() as progress:
        progress.start(f"training {name}", epochs)

        def on_epoch(epoch: int, logs: dict) -> None:
            acc = logs.get("val_accuracy", logs.get("accuracy"))
            progress.update(epoch, f"training {name}: epoch {epoch}/{epochs}, accuracy {acc:.1%}")

        info = api.train_zoo(name, data=data, out_dir=out_dir, epochs=epochs, seed=seed, progress=on_epoch)
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
    out.print(table)
    out.print(SUMMARY_LEGEND, style="dim")
    for r in result.rules:
        mark = "[green]PASS[/]" if r.passed else "[bold red]FAIL[/]"
        out.print(f"{mark} {escape(r.name)}: measured {r.measured:.3f} ({escape(r.worst_cell or r.split)}), "
                  f"{r.bound} {r.limit:g}", highlight=False, markup=True)
    colour = "green" if result.verdict == "PASS" else "bold red"
    out.print(f"verdict: [{colour}]{result.verdict}[/]  ->  {escape(str(out_dir))}", markup=True)


def _pct(rate) -> str:
    return "–" if rate is None or rate.value != rate.value else f"{rate.value:.1%}"


def main() -> None:
    app()
