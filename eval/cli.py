"""``evaluate``: the papers' tables and figures from run folders."""
from __future__ import annotations

import os

import click

from extract.errors import UserError
from extract.metrics import AP_KINDS

from .formats import render, save_figure
from .reports import REPORTS, Options
from .runs import find_runs

DEFAULT_RUNS = os.path.join("data", "runs")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog="""\b
Examples:
  evaluate --report table1
  evaluate --report table1 --paper --format md
  evaluate --report online --runs data/runs/fcvid_fps1-max129 --plot online.png
  evaluate --report tradeoff --plot tradeoff.png
""")
@click.option("--report", type=click.Choice(sorted(REPORTS)), required=True,
              help="; ".join(f"{name}: {fn.__doc__.split('.')[0].split(':')[0]}"
                             for name, fn in sorted(REPORTS.items())))
@click.option("--runs", "run_dirs", multiple=True, metavar="DIR",
              help="Run folders, or folders holding them (searched recursively). Default: data/runs.")
@click.option("--format", "fmt", type=click.Choice(["md", "json", "csv"]), default="md", show_default=True)
@click.option("--plot", metavar="FILE.png", help="Also draw the report's figure (needs the plot extra).")
@click.option("--paper", is_flag=True, help="Put the papers' published numbers beside ours, labelled as published.")
@click.option("--ap", type=click.Choice(sorted(AP_KINDS)), default="sklearn", show_default=True,
              help="sklearn: non-interpolated AP (average_precision_score); interpolated: ActivityNet's evaluator; "
                   "arnet: AR-Net's cal_map (a class with no positive counts as AP 0).")
@click.option("--videos", type=click.IntRange(1), default=4, show_default=True, help="frames report: videos shown.")
def main(report, run_dirs, fmt, plot, paper, ap, videos) -> None:
    """Turn run folders into the papers' tables and figures: mAP and top-1 against GFLOPs."""
    try:
        runs = find_runs(list(run_dirs) or [DEFAULT_RUNS])
        result = REPORTS[report](runs, Options(ap=ap, paper=paper, videos=videos))
        click.echo(render(result, fmt), nl=False)
        if plot:
            save_figure(result, plot)
            click.echo(f"figure written to {plot}", err=True)
    except UserError as err:  # what evaluate refuses on purpose; anything else is a bug and keeps its traceback
        raise click.ClickException(str(err)) from None
    if result.empty:
        for note in result.notes:
            click.echo(note, err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
