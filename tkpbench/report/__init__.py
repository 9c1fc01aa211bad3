"""The report: Tables 1-4 of the paper, published next to measured with intervals, and the figures.

One module per job: ``published`` (the paper's figures, from ``published.toml``), ``load`` (the
records under ``results/``), ``tables`` (Tables 1-4, the demo, per-class and detail tables:
evaluation ladder, precision and recall, which images change), ``formats`` (terminal, Markdown,
JSON, CSV, LaTeX), ``figures`` (Fig. 4, seeds, per-class bars, training curves, confusion
matrices), ``fig5`` (Fig. 5 and the images that change most) and ``command`` (``python -m
tkpbench.report``, ``tkpbench report``).
"""

from tkpbench.report.command import main
from tkpbench.report.fig5 import fig5_from_runs, fig5_grid, fig_image_changes
from tkpbench.report.figures import (
    confusion_figures,
    fig4_sweep,
    fig_confusion,
    fig_curves,
    fig_per_class,
    fig_seeds,
    row_normalised,
)
from tkpbench.report.formats import latex_escape, print_tables, to_csv, to_json, to_latex, to_markdown
from tkpbench.report.load import Group, load_results, make_groups, variant
from tkpbench.report.tables import build_tables, change_pairs, detail_tables, per_class_tables

__all__ = [
    "Group",
    "change_pairs",
    "confusion_figures",
    "detail_tables",
    "fig_confusion",
    "fig_image_changes",
    "latex_escape",
    "row_normalised",
    "to_latex",
    "build_tables",
    "fig4_sweep",
    "fig5_from_runs",
    "fig5_grid",
    "fig_curves",
    "fig_per_class",
    "fig_seeds",
    "load_results",
    "main",
    "make_groups",
    "per_class_tables",
    "print_tables",
    "to_csv",
    "to_json",
    "to_markdown",
    "variant",
]
