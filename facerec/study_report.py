"""Tables, CSV and figures of a normalization study (:mod:`facerec.study`) from its runs' results.

The table has the SN paper's shape: one row per norm (BN, GN, SN, ...) and per difference of two norms
(GN-BN, SN-BN, SN-GN), one column per setting (GPUs, images per GPU); one table per verification set.
Entries are the final step's verification accuracy in percent with the 10-fold std; a diverged run is
"—" (its reason under the table), a run not done yet "…". Pure functions build the text and rows;
:func:`write_report` writes ``study.md``, ``study.csv``, ``study.png`` and ``study_sn.png``.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from eval.report import SN_TERMS, duration, new_figure, save_figure, write_sn_png

ROW_ORDER = ("bn", "syncbn", "gn", "ln", "in", "sn", "syncsn")  # the paper's rows: BN, GN, SN
DIVERGED, PENDING = "—", "…"
CSV_FIELDS = ("norm", "gpus", "per_device", "batch", "lr", "steps", "set", "accuracy", "std", "status",
              "reason", "seconds")


def norm_rows(specs) -> list[str]:
    """The study's norms in table order."""
    norms = list(dict.fromkeys(spec.norm for spec in specs))
    return sorted(norms, key=lambda n: (ROW_ORDER.index(n) if n in ROW_ORDER else len(ROW_ORDER)))


def setting_columns(specs) -> list:
    """The study's settings in planned order, as (gpus, per_device, batch, lr)."""
    return list(dict.fromkeys((s.gpus, s.per_device, s.batch, s.lr) for s in specs))


def label(gpus: int, per_device: int) -> str:
    return f"({gpus},{per_device})"


def _by_key(specs, results) -> dict:
    return {(s.norm, s.gpus, s.per_device): r for s, r in zip(specs, results)}


def accuracy_cell(result: dict | None, name: str) -> str:
    """``91.23 ± 1.10`` (percent), ``—`` for a diverged run, ``…`` for one not done."""
    if result is None or result["status"] == "stopped":
        return PENDING
    if result["status"] == "diverged":
        return DIVERGED
    found = result["verification"].get(name)
    return f"{100 * found['accuracy']:.2f} ± {100 * found['accuracy_std']:.2f}" if found else PENDING


def difference_cell(a: dict | None, b: dict | None, name: str) -> str:
    """``a - b`` in accuracy points (``+0.85``), or the missing run's mark."""
    cells = [accuracy_cell(r, name) for r in (a, b)]
    for mark in (DIVERGED, PENDING):
        if mark in cells:
            return mark
    return f"{100 * (a['verification'][name]['accuracy'] - b['verification'][name]['accuracy']):+.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of ``header`` and ``rows`` (lists of cell texts)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_table(specs, results, name: str) -> str:
    """The paper-shaped table of verification set ``name``: norms, then their differences."""
    found, norms, columns = _by_key(specs, results), norm_rows(specs), setting_columns(specs)
    rows = [[norm.upper()] + [accuracy_cell(found.get((norm, g, b)), name) for g, b, _, _ in columns]
            for norm in norms]
    for i, lower in enumerate(norms):
        for upper in norms[i + 1:]:
            rows.append([f"{upper.upper()}−{lower.upper()}"]
                        + [difference_cell(found.get((upper, g, b)), found.get((lower, g, b)), name)
                           for g, b, _, _ in columns])
    return markdown_table([""] + [label(g, b) for g, b, _, _ in columns], rows)


def time_table(specs, results) -> str:
    """Wall time of each run (including verification; resumed runs: all their sessions)."""
    found, columns = _by_key(specs, results), setting_columns(specs)
    rows = []
    for norm in norm_rows(specs):
        cells = []
        for g, b, _, _ in columns:
            result = found.get((norm, g, b))
            cells.append(PENDING if result is None else duration(result["seconds"]))
        rows.append([norm.upper()] + cells)
    return markdown_table(["wall time"] + [label(g, b) for g, b, _, _ in columns], rows)


def sn_summary(layers: list[dict]) -> dict:
    """The mean over SN layers of each term's weight, as one pseudo-layer (``terms``, ``mean``,
    ``var``), plus ``largest``: how many layers give each term the largest mean / var weight."""
    summary = {"terms": list(SN_TERMS)}
    largest = {}
    for kind in ("mean", "var"):
        weights = np.array([[dict(zip(layer["terms"], layer[kind])).get(t, 0.0) for t in SN_TERMS]
                            for layer in layers])
        summary[kind] = weights.mean(axis=0).tolist()
        largest[kind] = {t: int((weights.argmax(axis=1) == k).sum()) for k, t in enumerate(SN_TERMS)}
    summary["largest"] = largest
    summary["layers"] = len(layers)
    return summary


def sn_entries(specs, results, norm: str) -> list[dict]:
    """One :func:`sn_summary` per setting of ``norm`` that has SN weights, named by its setting."""
    found = _by_key(specs, results)
    entries = []
    for g, b, _, _ in setting_columns(specs):
        result = found.get((norm, g, b))
        if result and result.get("sn_weights"):
            entries.append({"name": label(g, b), **sn_summary(result["sn_weights"])})
    return entries


def sn_table(entries: list[dict]) -> str:
    """Markdown table of the mean IN/LN/BN weights per setting and the layers each term leads."""
    header = ["setting"] + [f"{kind} {t}" for kind in ("mean", "var") for t in SN_TERMS] + [
        "layers led by BN (mean / var)"]
    rows = [[e["name"]] + [f"{w:.3f}" for kind in ("mean", "var") for w in e[kind]]
            + [f"{e['largest']['mean']['BN']} / {e['largest']['var']['BN']} of {e['layers']}"]
            for e in entries]
    return markdown_table(header, rows)


def csv_rows(specs, results, set_names: list[str]) -> list[dict]:
    """One row per finished run (done or diverged) and verification set (fields ``CSV_FIELDS``)."""
    from facerec.study import short_reason

    rows = []
    for spec, result in zip(specs, results):
        if result is None or result["status"] == "stopped":
            continue
        for name in set_names:
            found = result["verification"].get(name) or {}
            rows.append({"norm": spec.norm, "gpus": spec.gpus, "per_device": spec.per_device,
                         "batch": spec.batch, "lr": spec.lr, "steps": result["steps"], "set": name,
                         "accuracy": _rounded(found.get("accuracy")),
                         "std": _rounded(found.get("accuracy_std")),
                         "status": result["status"], "reason": short_reason(result["reason"]),
                         "seconds": round(result["seconds"], 1)})
    return rows


def _rounded(value: float | None) -> float | str:
    return "" if value is None else round(value, 6)


def format_markdown(config: dict, specs, results, set_names: list[str], wall_seconds: float,
                    source: str = "") -> str:
    """``study.md``: recipe, settings, one accuracy table per verification set, times, SN weights."""
    from facerec.study import short_reason

    m, t = config["model"], config["train"]
    columns = setting_columns(specs)
    capped = f" (at most {t['max_steps']} steps)" if t["max_steps"] else ""
    done = [r for r in results if r is not None and r["status"] != "stopped"]
    parts = [
        f"# Normalization study: {source}" if source else "# Normalization study",
        f"{m['name']} width {m['width']}, input {m['input_size']}, {config['head']['type']} head; "
        f"{t['epochs']} epochs{capped} for every run; "
        f"lr {config['optim']['lr']:g} at a total batch of {config['study']['reference_batch']}, scaled "
        "linearly; the same recipe for every norm. A column (G,B) is G GPUs x B images per GPU: G virtual "
        "devices (train.virtual_devices) in one process, batch G x B. SN at one image per GPU drops its "
        "BN term (using_bn: false). Entries: the final step's verification accuracy (%) ± its std over "
        "the 10 folds; — diverged, … not run yet.",
        markdown_table(["setting"] + [label(g, b) for g, b, _, _ in columns],
                        [["batch"] + [str(batch) for _, _, batch, _ in columns],
                         ["lr"] + [f"{lr:.6g}" for _, _, _, lr in columns]]),
    ]
    for name in set_names:
        parts += [f"## {name}", accuracy_table(specs, results, name)]
    diverged = [(s, r) for s, r in zip(specs, results) if r is not None and r["status"] == "diverged"]
    if diverged:
        parts.append("\n".join(f"- — {s.norm.upper()} {label(s.gpus, s.per_device)}: "
                               f"{short_reason(r['reason'])}" for s, r in diverged))
    total = sum(r["seconds"] for r in done)
    parts += ["## Wall time", time_table(specs, results),
              f"{len(done)} of {len(specs)} runs finished; their runs took {duration(total)} in all; "
              f"this invocation of the study {duration(wall_seconds)}."]
    for norm in norm_rows(specs):
        entries = sn_entries(specs, results, norm)
        if entries:
            parts += [f"## {norm.upper()}: learned importance of IN, LN and BN (mean over "
                      f"{entries[0]['layers']} layers)", sn_table(entries),
                      f"Figure: {sn_figure_name(norm)}."]
    return "\n\n".join(parts) + "\n"


def sn_figure_name(norm: str) -> str:
    return "study_sn.png" if norm == "sn" else f"study_{norm}.png"


def write_accuracy_png(path, specs, results, set_names: list[str]) -> None:
    """Accuracy against images per GPU: one panel per verification set, one colour per norm, one line
    style per number of GPUs (8: solid, 1: dashed); diverged runs as x on the axis."""
    from matplotlib import rcParams

    found = _by_key(specs, results)
    norms = norm_rows(specs)
    gpus_counts = sorted({s.gpus for s in specs}, reverse=True)
    styles = dict(zip(gpus_counts, ("-", "--", ":", "-.")))
    colors = dict(zip(norms, rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = new_figure(1, max(len(set_names), 1), figsize=(5.5 * max(len(set_names), 1), 4.2),
                           squeeze=False)
    for ax, name in zip(axes[0], set_names):
        for norm in norms:
            for gpus in gpus_counts:
                points = sorted((s.per_device, found.get((norm, s.gpus, s.per_device))) for s in specs
                                if s.norm == norm and s.gpus == gpus)
                done = [(b, 100 * r["verification"][name]["accuracy"]) for b, r in points
                        if r is not None and r["status"] == "done" and name in r["verification"]]
                if done:
                    x, y = zip(*done)
                    ax.plot(x, y, styles.get(gpus, "-"), marker="o", color=colors[norm],
                            label=f"{norm.upper()}, {gpus} GPU{'s' if gpus > 1 else ''}")
                failed = [b for b, r in points if r is not None and r["status"] == "diverged"]
                if failed:
                    ax.plot(failed, [0.02] * len(failed), "x", color=colors[norm], markersize=9,
                            transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xscale("log", base=2)
        per_device = sorted({s.per_device for s in specs})
        ax.set_xticks(per_device, [str(b) for b in per_device])
        ax.set_xlabel("images per GPU")
        ax.set_ylabel("verification accuracy (%)")
        diverged = any(r is not None and r["status"] == "diverged" for r in results)
        ax.set_title(f"{name} (x: diverged)" if diverged else name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(output_dir, config: dict, specs, results, wall_seconds: float, source: str = "") -> list:
    """Write ``study.md``, ``study.csv``, ``study.png`` (and one SN figure per SN norm) into
    ``output_dir``; returns the paths written."""
    output_dir = Path(output_dir)
    set_names = [Path(p).stem for p in config["data"]["verify"]]
    paths = [output_dir / "study.md", output_dir / "study.csv", output_dir / "study.png"]
    paths[0].write_text(format_markdown(config, specs, results, set_names, wall_seconds, source))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(specs, results, set_names))
    paths[1].write_text(text.getvalue())
    write_accuracy_png(paths[2], specs, results, set_names)
    for norm in norm_rows(specs):
        entries = sn_entries(specs, results, norm)
        if entries:
            paths.append(output_dir / sn_figure_name(norm))
            title = f"{norm.upper()}: mean importance over layers, per setting"
            write_sn_png(paths[-1], entries, title=title, xlabel="setting (GPUs, images per GPU)",
                         tick_names=True)
    return paths


__all__ = ["accuracy_table", "csv_rows", "format_markdown", "sn_summary", "write_report"]
