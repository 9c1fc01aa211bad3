"""The report: Tables 1-4 of the paper, published next to measured with intervals, and the figures.

One module per job: ``published`` (the paper's figures, from ``published.toml``), ``load`` (the
records under ``results/``), ``tables`` (Tables 1-4, the demo and per-class tables), ``formats``
(terminal, Markdown, JSON, CSV), ``figures`` (Fig. 4, seeds, per-class bars, training curves),
``fig5`` and ``command`` (``python -m tkpbench.report``, ``tkpbench report``).
"""

from tkpbench.report.command import main
from tkpbench.report.fig5 import fig5_from_runs, fig5_grid
from tkpbench.report.figures import fig4_sweep, fig_curves, fig_per_class, fig_seeds
from tkpbench.report.formats import print_tables, to_csv, to_json, to_markdown
from tkpbench.report.load import Group, load_results, make_groups, variant
from tkpbench.report.tables import build_tables, per_class_tables

__all__ = [
    "Group",
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
