"""Benchmark output: rows, the ratio to the best baseline, a table, CSV, JSON and PNG plots.

A row is a flat dict with the keys of :data:`COLUMNS`. ``vs_best_baseline`` is the best
baseline's median time over this row's median time (above 1: faster than every baseline),
where the baselines are the providers that are not llm_kernels' own (not ``lk-*``) measured on
the same op, mode, variant, dtype and shape.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Iterable, Optional

COLUMNS = ("op", "mode", "variant", "provider", "dtype", "shape", "x_name", "x", "ms", "ms_p20",
           "ms_p80", "tflops", "gbps", "peak_mb", "vs_best_baseline", "best_baseline", "note",
           "device", "torch", "triton", "commit", "date")
GROUP_KEYS = ("op", "mode", "variant", "dtype", "shape")
OWN_PREFIX = "lk-"


def is_baseline(provider: str) -> bool:
    return not provider.startswith(OWN_PREFIX)


def group_key(row: dict) -> tuple:
    return tuple(row[k] for k in GROUP_KEYS)


def add_ratios(rows: list[dict]) -> None:
    """Fill ``vs_best_baseline`` and ``best_baseline`` in place (None without a baseline)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if is_baseline(row["provider"]) and row["op"] != "copy":
            key = group_key(row)
            if key not in best or row["ms"] < best[key]["ms"]:
                best[key] = row
    for row in rows:
        base = best.get(group_key(row))
        row["best_baseline"] = base["provider"] if base else None
        row["vs_best_baseline"] = base["ms"] / row["ms"] if base else None


# ----------------------------------------------------------------------------- files

def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(rows: Iterable[dict], path: str) -> None:
    _parent(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in COLUMNS])


def read_csv(path: str) -> list[dict]:
    """Rows back from a CSV, numbers as floats (empty cells as None)."""
    numeric = {"x", "ms", "ms_p20", "ms_p80", "tflops", "gbps", "peak_mb", "vs_best_baseline"}
    with open(path, newline="") as f:
        return [{k: (float(v) if k in numeric and v != "" else (None if v == "" else v))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def write_json(results: dict, path: str) -> None:
    """``{"environment", "rows", "skipped", "checks", "excluded"}`` (see Runner)."""
    _parent(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, path)


def _parent(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def output_problem(path: str, folder: bool = False) -> Optional[str]:
    """Why ``path`` cannot be written as a file (``folder``: used as a folder of files), else
    None; missing parent folders are fine (the writers create them)."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a folder"
    if not folder and os.path.isdir(path):
        return "is a folder"
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{ancestor} is not a folder"
    target = path if os.path.exists(path) else ancestor
    if not os.access(target, os.W_OK):
        return f"{target} is not writable"
    return None


# ----------------------------------------------------------------------------- table

def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def format_rate(value: Optional[float]) -> str:
    """A rate with 3-4 significant digits: 1234, 56.7, 0.123."""
    if value is None:
        return "n/a"
    return format(value, ".0f" if value >= 100 else ".1f" if value >= 1 else ".3f")


def format_table(rows: list[dict]) -> str:
    """A fixed-width table, one block per op, rows in measurement order."""
    header = (f"{'mode':<8} {'variant':<10} {'shape':<34} {'provider':<15} {'ms':>9} "
              f"{'p20-p80':>17} {'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>8} {'vs best':>7}")
    lines = []
    by_op: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_op[row["op"]].append(row)
    for op, op_rows in by_op.items():
        lines += [f"== {op} ({op_rows[0]['dtype']}, {op_rows[0]['device']})", header]
        for r in op_rows:
            spread = f"{_fmt(r['ms_p20'], '.3f')}-{_fmt(r['ms_p80'], '.3f')}"
            ratio = _fmt(r.get("vs_best_baseline"), ".2f")
            lines.append(f"{r['mode']:<8} {r['variant'] or '-':<10} {r['shape']:<34} "
                         f"{r['provider']:<15} {_fmt(r['ms'], '.3f'):>9} {spread:>17} "
                         f"{format_rate(r['tflops']):>8} {format_rate(r['gbps']):>8} "
                         f"{_fmt(r['peak_mb'], '.0f'):>8} {ratio:>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def panel_metric(rows: list[dict]) -> str:
    """TFLOP/s for compute-bound rows, GB/s for memory-bound ones and for decode."""
    if rows[0]["mode"] != "decode" and all(r.get("tflops") is not None for r in rows):
        return "tflops"
    return "gbps"


def panels(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows per (op, mode, variant), the copy bandwidth left out."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["op"] != "copy":
            out[(row["op"], row["mode"], row["variant"])].append(row)
    return out


# One distinct color per provider the benchmarks produce: tab10 for the first ten, the light
# tab20 twin of its parent's color for a variant (in-place, torch SDPA), black for liger, the
# remaining light tab20 colors for the CUDA-graph training steps, tab20b's dark blue for the
# opt-in TMA reads.
PROVIDER_COLORS = {
    "lk-triton": "#1f77b4", "lk-cuda": "#ff7f0e", "torch": "#2ca02c", "torch-native": "#d62728",
    "torch-compile": "#9467bd", "sdpa-flash": "#8c564b", "sdpa-efficient": "#e377c2",
    "sdpa-cudnn": "#7f7f7f", "sdpa-math": "#bcbd22", "flash-attn": "#17becf", "liger": "#000000",
    "lk-triton-inplace": "#aec7e8", "lk-cuda-inplace": "#ffbb78", "torch-sdpa": "#98df8a",
    "lk-auto": "#ff9896", "lk-triton-graph": "#9edae5", "lk-cuda-graph": "#c49c94",
    "lk-auto-graph": "#f7b6d2", "torch-graph": "#dbdb8d", "torch-sdpa-graph": "#c5b0d5",
    "lk-triton-tma": "#393b79", "lk-triton-ws": "#637939",
}
UNKNOWN_PROVIDER_COLOR = "#c7c7c7"


def provider_color(provider: str) -> str:
    """The same color for a provider in every panel, a distinct one per known provider."""
    return PROVIDER_COLORS.get(provider, UNKNOWN_PROVIDER_COLOR)


def _draw_panel(ax, key: tuple, rows: list[dict]) -> None:
    metric = panel_metric(rows)
    label = {"tflops": "TFLOP/s", "gbps": "GB/s"}[metric]
    by_provider: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get(metric) is not None:
            by_provider[row["provider"]].append(row)
    xs = sorted({r["x"] for r in rows})
    if len(xs) == 1:
        names = list(by_provider)
        ax.bar(range(len(names)), [by_provider[n][0][metric] for n in names],
               color=[provider_color(n) for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(f"{rows[0]['x_name']} = {int(xs[0])}")
    else:
        for name, prov_rows in by_provider.items():
            prov_rows = sorted(prov_rows, key=lambda r: r["x"])
            ax.plot([r["x"] for r in prov_rows], [r[metric] for r in prov_rows], marker="o",
                    label=name, color=provider_color(name))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(rows[0]["x_name"])
        ax.legend(fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(" ".join(p for p in key if p), fontsize=9)
    ax.grid(True, alpha=0.3)


def _figure(groups: list[tuple[tuple, list[dict]]], title: str, ncols: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncols = max(1, min(ncols, len(groups)))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (key, rows) in zip(axes.flat, groups):
        _draw_panel(ax, key, rows)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.6 * nrows)))
    return fig, plt


def _title(rows: list[dict], what: str) -> str:
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    return f"{what} - {rows[0]['device']} - {dtypes}"


def plot_ops(rows: list[dict], folder: str) -> list[str]:
    """One PNG per op in ``folder`` (a panel per mode/variant); returns the paths written."""
    by_op: dict[str, list[tuple]] = defaultdict(list)
    for key, panel_rows in panels(rows).items():
        by_op[key[0]].append((key, panel_rows))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for op, groups in by_op.items():
        fig, plt = _figure(groups, _title([r for _, g in groups for r in g], op), ncols=3)
        path = os.path.join(folder, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_grid(rows: list[dict], path: str) -> Optional[str]:
    """Every op's panels in one PNG (for the GPU check's few result files)."""
    groups = list(panels(rows).items())
    if not groups:
        return None
    _parent(path)
    fig, plt = _figure(groups, _title([r for _, g in groups for r in g], "llm_kernels"), ncols=4)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
