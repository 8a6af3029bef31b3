"""Render a report as Markdown, JSON or CSV, and draw its figure as a PNG."""
from __future__ import annotations

import csv
import io
import json

from .reports import Report
from .runs import RunError


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _public(row: dict, columns: list[str]) -> dict:
    return {c: row.get(c) for c in columns}


def render(report: Report, fmt: str) -> str:
    """``md``: a pipe table with the notes below it; ``json``: title, columns, rows, notes; ``csv``: the rows."""
    if fmt == "json":
        return json.dumps({"title": report.title, "columns": report.columns,
                           "rows": [_public(r, report.columns) for r in report.rows], "notes": report.notes}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=report.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_public(r, report.columns) for r in report.rows)
        return out.getvalue()
    lines = [f"### {report.title}", "", "| " + " | ".join(report.columns) + " |",
             "|" + "---|" * len(report.columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in report.columns) + " |" for r in report.rows]
    lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def save_figure(report: Report, path: str) -> None:
    """Draw the report's figure into a PNG (needs the ``plot`` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise RunError("--plot needs matplotlib: pip install 'framegate[plot]' (the plot extra)") from None
    if report.figure is None or report.empty:
        raise RunError(f"report {report.title!r} has nothing of ours to draw")
    fig = Figure(figsize=report.figure_size, dpi=120)
    report.figure(fig)
    fig.savefig(path)
