"""Audit reports from an AuditResult: self-contained HTML, PDF (WeasyPrint), results.json and JUnit XML.

Reads only the result and the run directory's .npy files (UAPs, example images); never imports TensorFlow,
so `auditkit report results.json` can rebuild every report from results.json alone.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import jinja2
import numpy as np
from markupsafe import Markup

from .errors import AuditkitError
from .metrics import Rate, row_normalise
from .fileio import atomic_write_bytes, atomic_write_text
from .results import AuditResult, CellResult, Example, RuleResult, SweepResult, write_json
from .supervisor import phase

# an installed wheel has auditkit/templates/; a source checkout has the repo's top-level templates/
TEMPLATES = next(p for p in (Path(__file__).resolve().parent / "templates",
                             Path(__file__).resolve().parent.parent / "templates") if p.is_dir())
FILENAMES = {"html": "report.html", "pdf": "report.pdf", "json": "results.json", "junit": "junit.xml"}
DPI = 110
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# ---------------------------------------------------------------- number formatting (one place for all)

def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_pct(x: float | None) -> str:
    """A proportion as a percentage with one decimal: 0.874 -> '87.4%'; None/nan -> 'n/a'."""
    return "n/a" if _missing(x) else f"{100 * x:.1f}%"


def fmt_rate(r: Rate | None) -> str:
    """A rate with its Wilson 95% interval: '87.4% [83.1–90.6]'."""
    if r is None or _missing(r.value):
        return "n/a"
    return f"{fmt_pct(r.value)} [{100 * r.low:.1f}–{100 * r.high:.1f}]"


def fmt_pp(x: float | None) -> str:
    """A change of a proportion in percentage points: 0.083 -> '+8.3 pp'."""
    return "n/a" if _missing(x) else f"{100 * x:+.1f} pp"


def fmt_num(x: float | int | None) -> str:
    """A plain number, four significant digits for floats."""
    if _missing(x):
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.4g}"


def fmt_db(x: float | None) -> str:
    return "n/a" if _missing(x) else ("∞ dB" if math.isinf(x) else f"{x:.1f} dB")


def fmt_seconds(x: float | None) -> str:
    if _missing(x):
        return "n/a"
    h, rest = divmod(int(round(x)), 3600)
    return f"{x:.1f} s" + (f" ({h}:{rest // 60:02d}:{rest % 60:02d})" if x >= 60 else "")


def fmt_norm(p: str) -> str:
    return "∞" if p == "inf" else p


def fmt_selectors(sel: dict[str, Any]) -> str:
    if not sel:
        return "all cells"
    return ", ".join(f"{k}={', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sel.items())


def cell_label(cell: CellResult) -> str:
    what = f"targeted to {cell.attack.target}" if cell.attack.kind == "targeted" else cell.attack.kind
    return f"{what}, p = {fmt_norm(cell.attack.norm)}, ζ = {fmt_pct(cell.attack.zeta)}"


def rule_comparison(rule: RuleResult) -> str:
    """'87.4% > 20.0%': the measured value against the limit, with the relation that holds.

    Every policy metric is a proportion (uap_over_random a difference of two), so all show as percentages.
    """
    measured, limit = fmt_pct(rule.measured), fmt_pct(rule.limit)
    if _missing(rule.measured):
        return f"measured n/a, limit {limit}"
    if rule.bound == "max":
        op = "≤" if rule.measured <= rule.limit else ">"
    else:
        op = "≥" if rule.measured >= rule.limit else "<"
    return f"{measured} {op} {limit}{_rise(rule)}"


def _rise(rule: RuleResult) -> str:
    """The change bound of a rule with max_increase: checked against the baseline, or said to be unchecked."""
    if rule.max_increase is None:
        return ""
    if rule.increase is None:
        return f"; rise not checked (no baseline given; bound {fmt_pp(rule.max_increase)})"
    op = "≤" if rule.increase <= rule.max_increase else ">"
    return f"; rise since the baseline {fmt_pp(rule.increase)} {op} {fmt_pp(rule.max_increase)}"


# ---------------------------------------------------------------- layout helpers over the result

def _splits(result: AuditResult) -> list[str]:
    """Evaluated splits: the declared eval splits first, then any other split found in the result."""
    seen = list(result.data.eval_splits)
    for evals in [result.clean, *(c.evals for c in result.cells)]:
        seen += [s for s in evals if s not in seen]
    return seen


def _figure_split(evals: dict[str, Any], splits: list[str]) -> str | None:
    """The split shown in figures: 'test' if present, else the last evaluated split."""
    if "test" in evals:
        return "test"
    present = [s for s in splits if s in evals]
    return present[-1] if present else None


def _held_out(result: AuditResult) -> str:
    """The first evaluated split other than the crafting split (the attacker never saw its images)."""
    splits = _splits(result)
    return next((s for s in splits if s != result.data.craft_split), splits[-1])


def _cell_order(cell: CellResult, classes: list[str]) -> tuple:
    """Nontargeted before targeted, then as in the paper's tables: p = 2 before ∞, ζ ascending, target class."""
    target = classes.index(cell.attack.target) if cell.attack.target in classes else len(classes)
    return (cell.attack.kind != "nontargeted", cell.attack.norm != "2", cell.attack.zeta, target, cell.key)


def _targeted_tables(result: AuditResult, classes: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Targets (columns) and rows of (norm, ζ) -> {target: cell}, one row per cell where a pair repeats."""
    cells = sorted((c for c in result.cells if c.attack.kind == "targeted"), key=lambda c: _cell_order(c, classes))
    targets = list(dict.fromkeys(c.attack.target for c in cells))
    rows: list[dict[str, Any]] = []
    for c in cells:
        a = c.attack
        row = next((r for r in rows if r["norm"] == a.norm and r["zeta"] == a.zeta and a.target not in r["cells"]),
                   None)
        if row is None:
            row = {"norm": a.norm, "zeta": a.zeta, "cells": {}}
            rows.append(row)
        row["cells"][a.target] = c
    return targets, rows


# ---------------------------------------------------------------- figures (matplotlib, Agg, inline PNG)

def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str) -> str:
    """Row-normalised heatmap with counts and percentages annotated (rows true labels, columns predictions)."""
    counts = np.asarray(confusion, dtype=np.int64)
    share = row_normalise(counts)
    k = len(classes)
    side = 1.0 + 0.55 * k
    fig = _new_figure(side + 1.0, side + 0.5)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    has_row = counts.sum(axis=1) > 0
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}\n{fmt_pct(share[i, j]) if has_row[i] else '–'}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5, parse_math=False,
                    color="white" if share[i, j] > 0.55 else "#1a1a1a")
    ax.set_xticks(range(k), labels=classes, rotation=30, ha="right", fontsize=8, parse_math=False)
    ax.set_yticks(range(k), labels=classes, fontsize=8, parse_math=False)
    ax.set_xlabel("Prediction", fontsize=8)
    ax.set_ylabel("True label", fontsize=8)
    ax.set_title(title, fontsize=8.5, parse_math=False)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("share of true class", fontsize=7)
    fig.tight_layout()
    return _png_uri(fig)


def hardening_figure(record) -> str:
    """Fig.-5 style: the fresh UAP's success on the test split per round, clean accuracy on a second axis."""
    rounds = [r.round for r in record.rounds]
    rate = np.array([r.attack_rate.value for r in record.rounds]) * 100
    err = np.array([[r.attack_rate.value - r.attack_rate.low, r.attack_rate.high - r.attack_rate.value]
                    for r in record.rounds]).T * 100
    acc = np.array([r.clean_accuracy.value for r in record.rounds]) * 100
    fig = _new_figure(5.6, 2.9)
    ax = fig.add_subplot()
    name = "R_s" if record.metric == "targeted_success_rate" else "R_f"
    ax.errorbar(rounds, rate, yerr=err, marker="o", color="#b2182b", capsize=3, label=f"{name} of a fresh UAP (test)")
    ax.set_xlabel("adversarial retraining round (0 = before)", fontsize=8)
    ax.set_ylabel(f"{name} (%)", fontsize=8, color="#b2182b")
    ax.set_ylim(0, 100)
    ax.set_xticks(rounds)
    ax2 = ax.twinx()
    ax2.plot(rounds, acc, marker="s", linestyle="--", color="#2166ac", label="clean test accuracy")
    ax2.set_ylabel("clean accuracy (%)", fontsize=8, color="#2166ac")
    ax2.set_ylim(0, 100)
    for a in (ax, ax2):
        a.tick_params(labelsize=7)
    fig.legend(loc="lower left", fontsize=7, bbox_to_anchor=(0.1, 0.18))
    fig.tight_layout()
    return _png_uri(fig)


def sweep_figure(sweep: SweepResult) -> str:
    """Headline rate against zeta (log scale) for the sweep's UAPs and their random controls, with the level and
    the bracket that holds the critical zeta."""
    points = sorted(sweep.points, key=lambda p: p.zeta)
    zetas = np.array([p.zeta for p in points]) * 100
    rate = np.array([p.rate.value for p in points]) * 100
    err = np.array([[p.rate.value - p.rate.low, p.rate.high - p.rate.value] for p in points]).T * 100
    fig = _new_figure(5.6, 2.9)
    ax = fig.add_subplot()
    name = "R_s" if sweep.attack.kind == "targeted" else "R_f"
    ax.errorbar(zetas, rate, yerr=err, marker="o", color="#b2182b", capsize=3, label=f"UAP {name}")
    controls = [(z, p.control.value * 100) for z, p in zip(zetas, points) if p.control is not None]
    if controls:
        ax.plot(*zip(*controls), marker="s", linestyle="--", color="#4d4d4d", label="random control")
    ax.axhline(sweep.level * 100, color="#2166ac", linewidth=0.8, label=f"level {fmt_pct(sweep.level)}")
    if sweep.critical_zeta is not None:
        ax.axvspan((sweep.below or sweep.critical_zeta) * 100, sweep.critical_zeta * 100, color="#fddbc7",
                   label="critical ζ lies here")
    ax.set_xscale("log")
    ladder = [z for z in (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100) if zetas.min() <= z <= zetas.max()]
    ax.set_xticks(ladder or list(zetas), labels=[f"{z:g}" for z in ladder or zetas])
    ax.minorticks_off()
    ax.set_xlabel(f"ζ (% of the mean image norm, p = {fmt_norm(sweep.attack.norm)})", fontsize=8)
    ax.set_ylabel(f"{name} on {sweep.split} (%)", fontsize=8)
    ax.set_ylim(0, 100)
    ax.tick_params(labelsize=7)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return _png_uri(fig)


def _hardening_view(result: AuditResult) -> dict[str, Any] | None:
    """What the hardening section shows: the per-round plot, the final confusion, before/after side by side."""
    record, after = result.hardening, result.hardened
    if record is None:
        return None
    classes = result.model.classes
    split = _held_out(result)
    before_cells = {c.key: c for c in result.cells}
    cells = []
    for c in (after.cells if after else []):
        b = before_cells.get(c.key)
        if b is not None and split in c.evals:
            cells.append({"key": c.key, "kind": c.attack.kind, "before": b.headline(split), "after": c.headline(split)})
    rules = []
    for a in (after.rules if after else []):
        b = next((x for x in result.rules if x.name == a.name), None)
        rules.append({"name": a.name, "bound": a.bound, "limit": a.limit, "before": b, "after": a})
    return {
        "record": record, "after": after, "split": split, "cells": cells, "rules": rules,
        "figure": hardening_figure(record),
        "confusion": confusion_figure(record.final_confusion, classes,
                                      "test split under the last round's UAP, hardened model"),
    }


def _groups(cells: list[CellResult], **fixed: Any) -> list[list[CellResult]]:
    """Cells grouped by their settings with the fields in `fixed` set alike (e.g. restart=0: a cell's restarts)."""
    groups: dict[str, list[CellResult]] = {}
    for c in cells:
        groups.setdefault(c.attack.model_copy(update=fixed).key, []).append(c)
    return list(groups.values())


def _worst(cells: list[CellResult], split: str) -> CellResult:
    """The cell with the highest headline rate on `split`: what a rule over all of them judges."""
    return max(cells, key=lambda c: c.headline(split).value)


def _worst_algorithms(cells: list[CellResult], split: str) -> list[dict[str, Any]]:
    """Per cell crafted with several algorithms: each one's headline rate on `split` (its worst restart) and the
    worst (highest) algorithm."""
    rows = []
    for group in _groups(cells, algorithm="paper", restart=0):
        per_algorithm = {a[0].attack.algorithm: _worst(a, split) for a in _groups(group, restart=0)}
        if len(per_algorithm) > 1:
            rows.append({"label": cell_label(group[0]),
                         "rates": {a: c.headline(split) for a, c in per_algorithm.items()},
                         "worst": _worst(group, split).attack.algorithm})
    return rows


def _restart_spread(cells: list[CellResult], splits: list[str], held_out: str) -> list[dict[str, Any]]:
    """Per cell crafted several times (`restarts`): min, median and max of the headline rate on each split, and
    the worst restart on the held-out split."""
    rows = []
    for group in _groups(cells, restart=0):
        if len(group) > 1:
            spread = {s: [float(f(values)) for f in (np.min, np.median, np.max)]
                      for s in splits if len(values := [c.headline(s).value for c in group if s in c.evals])}
            rows.append({"key": group[0].attack.model_copy(update={"restart": 0}).key, "label": cell_label(group[0]),
                         "restarts": len(group), "spread": spread, "worst": _worst(group, held_out).key})
    return rows


def _figure_cells(cells: list[CellResult], split: str) -> list[CellResult]:
    """The cells the figures section shows: of a cell's restarts only the worst on `split`."""
    shown = {_worst(group, split).key for group in _groups(cells, restart=0)}
    return [c for c in cells if c.key in shown]


def _transfer_view(result: AuditResult, cells: list[CellResult]) -> dict[str, Any] | None:
    """Transferability matrix on the held-out split: UAP (rows) x model (columns), audited model first."""
    if not result.transfer_models:
        return None
    split = _held_out(result)
    names = [m.name for m in result.transfer_models]
    rows = [{"key": c.key, "audited": c.headline(split),
             "others": [c.transfer.get(n, {}).get(split) for n in names]} for c in cells]
    return {"split": split, "models": result.transfer_models, "rows": rows}


# ---------------------------------------------------------------- what a submission needs: summary, trace, signatures

THREAT = "Model evasion by a universal adversarial perturbation: one fixed, near-imperceptible pattern added to every input"


def _summary_view(result: AuditResult, cells: list[CellResult]) -> dict[str, Any]:
    """The one-page summary: what was tested, the worst finding, the acceptance criteria."""
    split = _held_out(result)
    rated = [(c, c.headline(split)) for c in cells if split in c.evals]
    worst = max(rated, key=lambda cr: (cr[1].value, cr[0].attack.kind == "nontargeted"), default=None)
    failed = sorted(result.failed_rules, key=lambda r: abs(r.measured - r.limit), reverse=True)
    return {
        "split": split,
        "worst": worst and {"cell": worst[0], "rate": worst[1], "control": worst[0].control_headline(split),
                            "metric": "R_s" if worst[0].attack.kind == "targeted" else "R_f"},
        "worst_rule": failed[0] if failed else None,
        "images": {s: e.n for s, e in result.clean.items()},
        "kinds": sorted({c.attack.kind for c in cells}),
        "norms": sorted({fmt_norm(c.attack.norm) for c in cells}),
        "zetas": sorted({c.attack.zeta for c in cells}),
        "signatories": result.provenance.policy.get("report", {}).get("signatories") or [],
    }


def _traceability(result: AuditResult) -> list[dict[str, str]]:
    """Per rule: threat -> test -> result -> residual risk, the chain a premarket submission asks for."""
    by_key = {c.key: c for c in result.cells}
    rows = []
    for rule in result.rules:
        n = result.clean[rule.split].n if rule.split in result.clean else 0
        chosen = [by_key[k] for k in rule.cells if k in by_key]
        target = next((c.attack.target for c in chosen if c.attack.target), None)
        if rule.metric == "clean_accuracy":
            threat = "Misclassification without any attack: the baseline every robustness figure rests on"
            test = f"clean accuracy on {n} {rule.split} images"
        elif rule.metric == "critical_zeta":
            threat = f"{THREAT}, with a budget smaller than the policy allows for"
            test = (f"bisection on ζ for the smallest budget at which a UAP reaches the sweep's level on {n} "
                    f"{rule.split} images ({', '.join(rule.cells)})")
        else:
            harm = {"fooling_rate": "misclassification (prediction ≠ true label)",
                    "flip_rate": "changed predictions (prediction ≠ clean prediction)",
                    "targeted_success_rate": f"forced prediction of {target or 'the target class'}",
                    "targeted_induced_rate": f"forced prediction of {target or 'the target class'} on images not "
                                             "predicted so when clean",
                    "uap_over_random": "a systematic weak direction (a UAP beats random noise of the same norm)"}
            threat = f"{THREAT}, causing {harm[rule.metric]}"
            algos = ", ".join(sorted({c.attack.algorithm for c in chosen})) or "no"
            budgets = ", ".join(sorted({f"p = {fmt_norm(c.attack.norm)}, ζ = {fmt_pct(c.attack.zeta)}" for c in chosen}))
            test = (f"{len(chosen)} UAP{'s' if len(chosen) != 1 else ''} crafted ({algos} algorithm; {budgets}) on "
                    f"the {result.data.craft_split} split, {rule.metric} measured on {n} {rule.split} images")
        if not rule.passed:
            residual = ("Not acceptable under the policy: mitigate (e.g. adversarial retraining, input checks) and "
                        "audit again before release.")
        elif rule.metric == "clean_accuracy":
            residual = f"Up to {fmt_pct(1 - rule.measured)} of {rule.split} images misclassified; accepted by the policy."
        else:
            residual = (f"Worst measured {fmt_pct(rule.measured)} (limit {fmt_pct(rule.limit)}), accepted by the policy; "
                        "larger budgets, per-image attacks and other threats were not tested.")
        rows.append({"rule": rule.name, "threat": threat, "test": test, "result": rule_comparison(rule),
                     "passed": rule.passed, "residual": residual})
    return rows


def uap_figure(cell: CellResult, uap: np.ndarray) -> str:
    """The UAP stretched to the full grey range (min -> black, max -> white); the colour bar gives real values."""
    lo, hi = float(uap.min()), float(uap.max())
    fig = _new_figure(3.0, 2.85)
    ax = fig.add_subplot()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"UAP, p = {fmt_norm(cell.attack.norm)}, ζ = {fmt_pct(cell.attack.zeta)} (display-scaled)", fontsize=8,
                 parse_math=False)
    label = (f"‖ρ‖₂ = {fmt_num(cell.uap_norm_l2)}, ‖ρ‖∞ = {fmt_num(cell.uap_norm_linf)}\n"
             f"budget ξ = {fmt_num(cell.xi)}")
    if hi > lo:
        im = ax.imshow(uap, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.ax.tick_params(labelsize=6.5)
        bar.set_label("perturbation value", fontsize=7)
    else:
        ax.imshow(np.full(uap.shape, 0.5), cmap="gray", vmin=0.0, vmax=1.0)
        label += f"\nconstant: every value is {fmt_num(lo)}"
    ax.set_xlabel(label, fontsize=7.5, parse_math=False)
    fig.tight_layout()
    return _png_uri(fig)


def _tail(text: str, n: int = 22) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


EXAMPLES_PER_ROW = 4


def examples_figure(uap: np.ndarray, examples: list[tuple[Example, np.ndarray]],
                    per_row: int = EXAMPLES_PER_ROW) -> str:
    """Pairs of clean and adversarial (clean + UAP, clipped to [0, 1]) images with their predicted labels."""
    rows = math.ceil(len(examples) / per_row)
    cols = 2 * min(per_row, len(examples))
    height = 1.85 * rows
    fig = _new_figure(max(1.05 * cols, 3.0), height)
    grid = fig.add_gridspec(rows, cols, wspace=0.08, hspace=0.85, left=0.01, right=0.99,
                            top=1 - 0.22 / height, bottom=0.55 / height)

    def panel(row: int, col: int, img: np.ndarray, title: str, label: str, alarm: bool) -> None:
        ax = fig.add_subplot(grid[row, col])
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7.5, parse_math=False)
        ax.set_xlabel(label, fontsize=7, parse_math=False, color="#b00020" if alarm else "#1a1a1a")

    for i, (ex, img) in enumerate(examples):
        row, col = divmod(i, per_row)
        panel(row, 2 * col, img, "clean", f"{_tail(ex.id)}\ntrue: {ex.true_label}\npred: {ex.clean_prediction}",
              False)
        panel(row, 2 * col + 1, np.clip(img + uap, 0.0, 1.0), "+ UAP", f"\n\npred: {ex.adversarial_prediction}",
              ex.adversarial_prediction != ex.clean_prediction)
    return _png_uri(fig)


def _load_plane(run_dir: Path, rel: str) -> tuple[np.ndarray | None, str | None]:
    """A float HxW array from run_dir/rel, or None and a note saying why it cannot be shown."""
    root = run_dir.resolve()
    path = (run_dir / rel).resolve()
    if not path.is_relative_to(root):
        return None, f"{rel} lies outside the run directory and was not read"
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None, f"{rel} is missing"
    except (OSError, ValueError, EOFError) as exc:
        return None, f"{rel} could not be read ({exc})"
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
        return None, f"{rel} does not hold a floating-point array"
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        return None, f"{rel} has shape {arr.shape}, expected one H x W plane"
    if not np.all(np.isfinite(arr)):
        return None, f"{rel} holds non-finite values"
    return arr.astype(np.float32), None


def _cell_figures(cell: CellResult, result: AuditResult, run_dir: Path, splits: list[str]) -> dict[str, Any]:
    classes = result.model.classes
    fig: dict[str, Any] = {"cell": cell, "split": _figure_split(cell.evals, splits), "confusion": None,
                           "uap": None, "examples": None, "example_rows": 0, "notes": []}
    if fig["split"] is not None:
        conf = cell.evals[fig["split"]].confusion
        if np.shape(conf) == (len(classes), len(classes)):
            fig["confusion"] = confusion_figure(conf, classes, f"{fig['split']} split under attack")
        else:
            fig["notes"].append(f"confusion matrix has shape {np.shape(conf)}, not {len(classes)} x {len(classes)}")
    uap, note = _load_plane(run_dir, cell.uap_file)
    if uap is None:
        fig["notes"].append(f"UAP figure omitted: {note}")
        return fig
    examples = []
    for ex in cell.examples:
        img, note = _load_plane(run_dir, f"samples/{ex.sample}.npy")
        if img is None:
            fig["notes"].append(f"example {ex.id} omitted: {note}")
        elif img.shape != uap.shape:
            fig["notes"].append(f"example {ex.id} omitted: image shape {img.shape} differs from UAP {uap.shape}")
        else:
            examples.append((ex, img))
    fig["uap"] = uap_figure(cell, uap)
    fig["examples"] = examples_figure(uap, examples) if examples else None
    fig["example_rows"] = math.ceil(len(examples) / EXAMPLES_PER_ROW)
    return fig


# ---------------------------------------------------------------- HTML

def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=fmt_pct, pp=fmt_pp, rate=fmt_rate, num=fmt_num, db=fmt_db, seconds=fmt_seconds,
                       norm=fmt_norm, selectors=fmt_selectors, cell_label=cell_label, comparison=rule_comparison)
    return env


def render_html(result: AuditResult, run_dir: Path) -> str:
    """The audit report as one self-contained HTML page (CSS and figures inline as data: URIs)."""
    run_dir = Path(run_dir)
    splits = _splits(result)
    classes = result.model.classes
    cells = sorted(result.cells, key=lambda c: _cell_order(c, classes))
    targets, targeted_rows = _targeted_tables(result, classes)
    clean_split = _figure_split(result.clean, splits)
    clean_figure = None
    if clean_split is not None and np.shape(result.clean[clean_split].confusion) == (len(classes), len(classes)):
        clean_figure = confusion_figure(result.clean[clean_split].confusion, classes,
                                        f"clean (no perturbation): {clean_split} split")
    env = _environment()
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    return env.get_template("report.html.j2").render(
        r=result,
        css=Markup(css),
        splits=splits,
        cells=cells,
        nontargeted=[c for c in cells if c.attack.kind == "nontargeted"],
        targets=targets,
        targeted_rows=targeted_rows,
        small_splits=[(s, e.n) for s, e in result.clean.items() if e.n < 100],
        unclipped=[c.key for c in cells if not c.attack.clip],
        algorithms=sorted({c.attack.algorithm for c in cells}),
        draws=sorted({c.draws for cell in cells for c in cell.controls.values()}),
        clean_split=clean_split,
        clean_figure=clean_figure,
        figures=[_cell_figures(c, result, run_dir, splits) for c in _figure_cells(cells, _held_out(result))],
        policy_json=json.dumps(result.provenance.policy, indent=2, sort_keys=False, default=str),
        hardening=_hardening_view(result),
        transfer=_transfer_view(result, cells),
        summary=_summary_view(result, cells),
        traceability=_traceability(result),
        worst_algorithms=_worst_algorithms(cells, splits[-1]) if splits else [],
        restart_spread=_restart_spread(cells, splits, _held_out(result)),
        sweeps=[(sw, sweep_figure(sw)) for sw in result.sweeps],
    )


# ---------------------------------------------------------------- PDF

def _url_fetcher(run_dir: Path):
    """A WeasyPrint fetcher serving only data: URIs and files inside run_dir; anything else is refused."""
    from weasyprint import URLFetcher

    root = Path(run_dir).resolve()

    class RunDirFetcher(URLFetcher):
        def fetch(self, url, headers=None):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme == "data":
                return super().fetch(url, headers)
            if scheme == "file" and parts.netloc in ("", "localhost"):
                path = Path(url2pathname(parts.path)).resolve()
                if path.is_relative_to(root) and path.is_file():
                    return super().fetch(url, headers)
            raise ValueError(f"refused to fetch {url!r}: only data: URIs and files inside {root} are served")

    return RunDirFetcher(allowed_protocols=("data", "file"))


def render_pdf(html: str, run_dir: Path) -> bytes:
    """The PDF of the report's HTML; resources only from data: URIs and the run directory."""
    from weasyprint import HTML

    return HTML(string=html, base_url=str(Path(run_dir).resolve()), url_fetcher=_url_fetcher(run_dir)).write_pdf()


# ---------------------------------------------------------------- JUnit

def _xml(text: Any) -> str:
    return _XML_ILLEGAL.sub("\ufffd", str(text))


def _junit_suite(result: AuditResult, label: str) -> ET.Element:
    prov = result.provenance
    suite = ET.Element("testsuite", {
        "name": _xml(f"auditkit: {result.title}{label}"), "tests": str(len(result.rules)),
        "failures": str(len(result.failed_rules)), "errors": str(len(result.inconclusive_rules)), "skipped": "0",
        "time": f"{prov.seconds:.3f}", "timestamp": _xml(prov.started)})
    props = ET.SubElement(suite, "properties")
    entries = [("verdict", result.verdict), ("model", result.model.name)]
    entries += [("model.digest", result.model.digest)] if result.model.digest else []
    entries += [("model.sha256", f"{sha}  {name}") for name, sha in result.model.sha256.items()]
    entries += [("policy.sha256", prov.policy_sha256), ("seed", prov.seed), ("auditkit", prov.auditkit)]
    for name, value in entries:
        ET.SubElement(props, "property", name=name, value=_xml(value))
    prefix = "auditkit.hardened." if label else "auditkit."
    for rule in result.rules:
        case = ET.SubElement(suite, "testcase", classname=_xml(f"{prefix}{rule.split}"), name=_xml(rule.name),
                             time="0")
        detail = (f"{rule.metric} on {rule.split} ({fmt_selectors(rule.selectors)}), bound {rule.bound}: "
                  f"{rule_comparison(rule)}; worst cell {rule.worst_cell or 'n/a'}; "
                  f"cells {', '.join(rule.cells) or 'none'}")
        if rule.status == "PASS":
            ET.SubElement(case, "system-out").text = _xml(detail)
        elif rule.status == "INCONCLUSIVE":
            message = f"inconclusive: attack-strength checks failed ({'; '.join(rule.failed_checks)})"
            ET.SubElement(case, "error", message=_xml(message), type="AttackStrengthCheckFailed").text = _xml(detail)
        else:
            message = (f"{rule.metric} measured {fmt_pct(rule.measured)}, limit {rule.bound} {fmt_pct(rule.limit)}, "
                       f"worst cell {rule.worst_cell or 'n/a'}{_rise(rule)}")
            ET.SubElement(case, "failure", message=_xml(message), type="ThresholdViolated").text = _xml(detail)
    return suite


def render_junit(result: AuditResult) -> str:
    """JUnit XML: one testcase per threshold rule, a <failure> on each failing rule; a second suite for the
    hardened model when the run hardened it."""
    suites = [_junit_suite(result, "")]
    if result.hardened is not None:
        suites.append(_junit_suite(result.hardened, " (hardened model)"))
    root = ET.Element("testsuites", {"name": "auditkit", "tests": str(sum(int(s.get("tests")) for s in suites)),
                                     "failures": str(sum(int(s.get("failures")) for s in suites)), "errors": "0"})
    root.extend(suites)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---------------------------------------------------------------- Markdown summary (CI step summaries)

def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(result: AuditResult, report_link: str) -> str:
    """A short Markdown summary for a CI page ($GITHUB_STEP_SUMMARY): verdict, failed rules measured vs limit,
    and a link to the full report."""
    prov = result.provenance
    final = result.hardened or result
    lines = [f"## auditkit: {_md(result.title)}: **{final.verdict}**", "",
             f"Model `{_md(result.model.name)}` · policy `{_md(prov.policy_path or 'given as an object')}` "
             f"(sha256 `{prov.policy_sha256[:16]}`) · seed {prov.seed} · "
             f"{len(final.rules) - len(final.failed_rules)} of {len(final.rules)} rules passed"
             + (" by the hardened model" if result.hardened else ""), ""]
    if result.data.synthetic:
        lines += ["> Synthetic data: the images audited are not patient data.", ""]
    if final.failed_rules:
        lines += ["| Failed rule | Measured | Limit | Worst cell |", "|---|---:|---:|---|"]
        for r in final.failed_rules:
            rise = r.increase is not None and r.increase > r.max_increase
            measured = fmt_pct(r.measured) + (f" (rise {fmt_pp(r.increase)})" if rise else "")
            limit = f"{r.bound} {fmt_pct(r.limit)}" + (f", rise ≤ {fmt_pp(r.max_increase)}" if rise else "")
            lines.append(f"| {_md(r.name)} | {measured} | {limit} | {_md(r.increase_cell if rise else r.worst_cell or r.split)} |")
        lines.append("")
    if final.baseline is not None:
        split = _held_out(final)
        b = final.baseline
        lines += [f"Change since the baseline audit (`{_md(b.model.name)}`, {b.verdict}, {b.started}), {split} split:",
                  "", "| Cell | Baseline | This audit | Change |", "|---|---:|---:|---:|"]
        lines += [f"| {_md(d.key)} | {fmt_pct(d.before)} | {fmt_pct(d.after)} | {fmt_pp(d.delta)} |"
                  for d in b.deltas if d.split == split]
        lines.append("")
    label = report_link if "://" in report_link else Path(report_link).name
    lines.append(f"Full report: [{_md(label)}]({report_link})")
    return "\n".join(lines) + "\n"


def report_link(run_dir: Path, url: str | None = None) -> str:
    """Where the summary points: `url` when given (e.g. the CI run's artefacts page), else the path of the
    run's report (HTML, else PDF, else results.json)."""
    if url:
        return url
    found = [FILENAMES[f] for f in ("html", "pdf", "json") if (Path(run_dir) / FILENAMES[f]).is_file()]
    return (Path(run_dir) / (found or [FILENAMES["json"]])[0]).as_posix()


# ---------------------------------------------------------------- all of them

def write_reports(result: AuditResult, run_dir: Path, formats: Sequence[str]) -> dict[str, Path]:
    """Write the requested formats (html, pdf, json, junit) into run_dir atomically; format -> path."""
    phase("report")
    run_dir = Path(run_dir)
    wanted = list(dict.fromkeys(formats))
    for fmt in wanted:
        if fmt not in FILENAMES:
            raise AuditkitError(f"unknown report format {fmt!r} (choose from {', '.join(FILENAMES)})", "formats")
    html = render_html(result, run_dir) if {"html", "pdf"} & set(wanted) else ""
    written: dict[str, Path] = {}
    for fmt in wanted:
        path = run_dir / FILENAMES[fmt]
        if fmt == "json":
            write_json(result, path)
        elif fmt == "html":
            atomic_write_text(path, html)
        elif fmt == "pdf":
            atomic_write_bytes(path, render_pdf(html, run_dir))
        else:
            atomic_write_text(path, render_junit(result))
        written[fmt] = path
    return written
