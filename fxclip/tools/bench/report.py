"""The benchmark's outputs: a markdown table, a JSON file and a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .methods import FLOOR, NAIVE
from .runner import Cell, cells_as_dicts

FLOOR_COMPILED = "floor_compiled"


def _by_group(cells: Sequence[Cell]) -> dict[tuple[str, int], dict[str, Cell]]:
    groups: dict[tuple[str, int], dict[str, Cell]] = {}
    for c in cells:
        groups.setdefault((c.model, c.batch), {})[c.method] = c
    return groups


def ratios(cells: Sequence[Cell]) -> list[dict]:
    """Per cell: time / the eager non-private step, naive time / time (speed-up over naive), and
    for compiled methods time / the compiled non-private step."""
    rows = []
    for (model, batch), group in _by_group(cells).items():
        floor, naive, floor_c = (group.get(k) for k in (FLOOR, NAIVE, FLOOR_COMPILED))
        for name, c in group.items():
            row = {"model": model, "batch": batch, "method": name}
            if c.seconds is not None:
                if floor and floor.seconds:
                    row["vs_floor"] = c.seconds / floor.seconds
                if floor_c and floor_c.seconds:
                    row["vs_floor_compiled"] = c.seconds / floor_c.seconds
                if naive and naive.seconds:
                    row["speedup_over_naive"] = naive.seconds / c.seconds
                if c.peak_bytes is not None and floor and floor.peak_bytes:
                    row["memory_vs_floor"] = c.peak_bytes / floor.peak_bytes
            rows.append(row)
    return rows


def _cell_text(c: Cell, row: dict) -> str:
    if c.skipped:
        return "skipped"
    text = f"{row['vs_floor']:.2f}x" if "vs_floor" in row else f"{c.seconds * 1e3:.1f} ms"
    if c.check.startswith("WRONG"):
        text += " WRONG"
    return text


def _memory_text(c: Cell, row: dict) -> str:
    if c.peak_bytes is None:
        return "-"
    ratio = f" ({row['memory_vs_floor']:.2f}x)" if "memory_vs_floor" in row else ""
    return f"{c.peak_bytes / 2**20:.1f} MB{ratio}"


def markdown(cells: Sequence[Cell], methods: Sequence[str]) -> str:
    """Three tables — step time / eager non-private step, speed-up over naive, peak memory /
    non-private step — and the reasons for skipped cells."""
    rows = {(r["model"], r["batch"], r["method"]): r for r in ratios(cells)}
    groups = _by_group(cells)
    header = "| model | batch | floor ms | " + " | ".join(methods) + " |"
    rule = "|" + "---|" * (len(methods) + 3)
    out = ["Step time relative to the eager non-private step (floor); WRONG marks a clipped sum that "
           "failed the check against torch.func.", "", header, rule]
    for (model, batch), group in groups.items():
        floor = group.get(FLOOR)
        floor_ms = f"{floor.seconds * 1e3:.2f}" if floor and floor.seconds else "-"
        cols = [_cell_text(group[m], rows[(model, batch, m)]) if m in group else "-" for m in methods]
        out.append(f"| {model} | {batch} | {floor_ms} | " + " | ".join(cols) + " |")
    private = [m for m in methods if not m.startswith(FLOOR) and m != NAIVE]
    out += ["", "Speed-up over the naive per-example loop (the paper's metric):", "",
            "| model | batch | " + " | ".join(private) + " |", "|" + "---|" * (len(private) + 2)]
    for (model, batch), group in groups.items():
        cols = [f"{rows[(model, batch, m)]['speedup_over_naive']:.1f}x"
                if m in group and "speedup_over_naive" in rows[(model, batch, m)] else "-" for m in private]
        out.append(f"| {model} | {batch} | " + " | ".join(cols) + " |")
    if any(c.peak_bytes is not None for c in cells):
        out += ["", "Peak memory of one step above what was held before it (and relative to the floor):", "",
                header.replace("floor ms", "floor MB"), rule]
        for (model, batch), group in groups.items():
            floor = group.get(FLOOR)
            floor_mb = f"{floor.peak_bytes / 2**20:.1f}" if floor and floor.peak_bytes else "-"
            cols = [_memory_text(group[m], rows[(model, batch, m)]) if m in group else "-" for m in methods]
            out.append(f"| {model} | {batch} | {floor_mb} | " + " | ".join(cols) + " |")
    skipped = [c for c in cells if c.skipped]
    if skipped:
        out += ["", "Skipped:", ""] + [f"- {c.model} / {c.method} at batch {c.batch}: {c.skipped}" for c in skipped]
    wrong = [c for c in cells if c.check.startswith("WRONG")]
    if wrong:
        out += ["", "Wrong clipped sums:", ""] + [f"- {c.model} / {c.method} at batch {c.batch}: {c.check}" for c in wrong]
    return "\n".join(out) + "\n"


def bar_chart(cells: Sequence[Cell], methods: Sequence[str], path: Path) -> None:
    """One panel per batch size: per model, a bar per method of time / floor (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(r["model"], r["batch"], r["method"]): r for r in ratios(cells)}
    batches = sorted({c.batch for c in cells})
    models = list(dict.fromkeys(c.model for c in cells))
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(6, 1.6 * len(models)), 3.5 * len(batches)), squeeze=False)
    width = 0.8 / len(methods)
    for ax, batch in zip(axes[:, 0], batches):
        for j, m in enumerate(methods):
            xs, ys = [], []
            for i, model in enumerate(models):
                r = rows.get((model, batch, m), {})
                if "vs_floor" in r:
                    xs.append(i + j * width - 0.4 + width / 2)
                    ys.append(r["vs_floor"])
            ax.bar(xs, ys, width, label=m, color=plt.get_cmap("tab20")(j % 20))
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel("step time / non-private step")
        ax.set_title(f"batch {batch}")
    axes[0, 0].legend(fontsize="small", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(cells: Sequence[Cell], methods: Sequence[str], out_dir: Path, meta: dict) -> dict[str, Path]:
    """benchmark.md, benchmark.json and benchmark.png in `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "benchmark.md", "json": out_dir / "benchmark.json", "png": out_dir / "benchmark.png"}
    table = markdown(cells, methods)
    paths["markdown"].write_text(f"{meta.get('header', '')}\n\n{table}" if meta.get("header") else table)
    paths["json"].write_text(json.dumps({"meta": meta, "cells": cells_as_dicts(cells), "ratios": ratios(cells)}, indent=1))
    bar_chart(cells, methods, paths["png"])
    return paths
