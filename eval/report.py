"""Verification reports: a text table, JSON, a ROC curve PNG and per-pair scores CSV (the I/O edge)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

COLUMNS = ("dataset", "pairs", "accuracy", "threshold", "TAR@FAR=1e-3", "TAR@FAR=1e-4", "AUC", "EER", "XNorm")


def _percent(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _row(name: str, m: dict) -> list[str]:
    tar = m.get("tar_at_far", {})
    xnorm = m.get("xnorm")
    return [
        name,
        str(m["pairs"]),
        f"{100 * m['accuracy']:.2f} ± {100 * m['accuracy_std']:.2f}",
        f"{m['threshold']:.3f}",
        _percent(tar.get(1e-3)),
        _percent(tar.get(1e-4)),
        f"{m['auc']:.4f}",
        _percent(m["eer"]),
        "-" if xnorm is None else f"{xnorm:.3f}",
    ]


def format_table(results: dict[str, dict]) -> str:
    """Aligned text table, one row per dataset: accuracy ± std, TAR, EER in percent, AUC, mean threshold."""
    rows = [list(COLUMNS)] + [_row(name, metrics) for name, metrics in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    align = lambda i, cell: cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
    lines = ["  ".join(align(i, cell) for i, cell in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``1h02m03s``, ``3m12s`` or ``5s``."""
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def _plain(value):
    """JSON-ready copy: numpy scalars/arrays to Python, dict keys to strings (1e-3 -> "0.001")."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf are not JSON
    return value


def write_json(path, data: dict) -> None:
    """Write ``data`` (nested dicts of metrics, numpy values allowed) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(data), indent=2) + "\n")


def new_figure(nrows: int = 1, ncols: int = 1, figsize=None, **subplots):
    """A matplotlib ``(figure, axes)`` kept off pyplot: no backend is selected and no figure registry
    grows, so plotting here changes nothing process-wide. ``subplots`` go to ``Figure.subplots``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **subplots)


def save_figure(figure, path, dpi: int = 120, rect=(0, 0, 1, 1)) -> Path:
    """Lay out ``figure`` within ``rect`` and save it to ``path`` (folders made, the format from its
    suffix); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout(rect=rect)
    figure.savefig(path, dpi=dpi)
    return path


def write_roc_png(path, curves: dict[str, tuple[np.ndarray, np.ndarray]], far_range=(1e-4, 1.0)) -> None:
    """ROC curves ``{label: (fpr, tpr)}`` on a log false-accept axis over ``far_range``, saved as PNG."""
    fig, ax = new_figure(figsize=(6, 5))
    for label, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr)
        keep = fpr > 0  # log axis
        ax.plot(fpr[keep], np.asarray(tpr)[keep], label=label)
    ax.set_xscale("log")
    ax.set_xlim(*far_range)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def write_pair_scores_csv(path, rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Per-pair CSV ``dataset,pair,issame,distance,cosine`` from ``{dataset: (distances, issame)}``.

    ``cosine`` = 1 - distance / 2 (the cosine similarity of the L2-normalised embeddings).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "pair", "issame", "distance", "cosine"])
        for name, (distances, issame) in rows.items():
            for i, (d, s) in enumerate(zip(np.asarray(distances), np.asarray(issame, dtype=bool))):
                writer.writerow([name, i, int(s), f"{d:.6f}", f"{1 - d / 2:.6f}"])


SN_TERMS = ("IN", "LN", "BN")
SN_COLORS = {"IN": "#4c72b0", "LN": "#dd8452", "BN": "#55a868"}


def format_sn_table(layers: list[dict]) -> str:
    """Table of Switchable Normalization importance weights: one row per layer, mean and var per term."""
    header = ["#", "layer"] + [f"{kind} {t}" for kind in ("mean", "var") for t in SN_TERMS]
    rows = [header]
    for i, layer in enumerate(layers):
        cells = [str(i), layer["name"]]
        for kind in ("mean", "var"):
            weights = dict(zip(layer["terms"], layer[kind]))
            cells += [f"{weights[t]:.3f}" if t in weights else "-" for t in SN_TERMS]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    align = lambda i, cell: cell.ljust(widths[i]) if i == 1 else cell.rjust(widths[i])
    lines = ["  ".join(align(i, cell) for i, cell in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_sn_png(path, layers: list[dict], title: str = "", xlabel: str = "SN layer (network order)",
                 tick_names: bool = False) -> None:
    """Stacked bars of the IN/LN/BN weights per SN layer, for the mean (top) and the variance (bottom);
    ``tick_names``: label each bar with its entry's ``name`` (e.g. one summary entry per setting)."""
    x = np.arange(len(layers))
    fig, axes = new_figure(2, 1, figsize=(max(6.0, 0.18 * len(layers) + 2), 6), sharex=True)
    for ax, kind in zip(axes, ("mean", "var")):
        bottom = np.zeros(len(layers))
        for term in SN_TERMS:
            values = np.array([dict(zip(layer["terms"], layer[kind])).get(term, 0.0) for layer in layers])
            ax.bar(x, values, bottom=bottom, color=SN_COLORS[term], label=term, width=0.85)
            bottom += values
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{kind} weight")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right")
    axes[0].set_title(title or "Switchable Normalization importance weights per layer")
    axes[1].set_xlabel(xlabel)
    if tick_names:
        axes[1].set_xticks(x, [layer["name"] for layer in layers])
    save_figure(fig, path, rect=(0, 0, 0.9, 1))
