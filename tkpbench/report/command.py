"""Tables 1-4 of the paper, published next to measured, the detail tables, and the figures.

    python -m tkpbench.report [RESULTS_DIR]      # prints the tables, writes RESULTS_DIR/TABLES.md
    python -m tkpbench.report --format latex     # booktabs tables to paste into a paper

After Tables 1-4 (and the demo's): the DeepLab evaluation ladder of every group, which images
change between each variant and max pooling, and per-class IoU, precision and recall; figures:
Fig. 4, Fig. 5, the seeds, per-class bars, training curves, the dataset confusion matrices and
the images whose pseudo masks gain and lose most.

Rows for methods this suite does not run are the paper's published figures, marked
"published". Rows the suite runs show the published figure, the measured one and the
difference, with the run, commit, date, device and dataset of each measured cell. Runs on
generated data (``synthetic = true``) are reported under their own heading, never as a
reproduction of the paper.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tkpbench import cli
from tkpbench.errors import DatasetError
from tkpbench.io import atomic_write_text
from tkpbench.report.fig5 import fig5_from_runs, fig_image_changes
from tkpbench.report.figures import confusion_figures, fig4_sweep, fig_curves, fig_per_class, fig_seeds
from tkpbench.report.formats import print_tables, to_csv, to_json, to_latex, to_markdown
from tkpbench.report.load import Group, load_results, make_groups
from tkpbench.report.tables import build_tables, change_pairs, detail_tables, per_class_tables
from tkpbench.runs import ResultsDir


def _fig5(groups: list[Group], results: Path, runs_dir: Path) -> list[Path]:
    """Fig. 5 of the first seed shared by the max-pooling and the TKP-PCL group, for real data and
    for the demo; one skipped with a line saying why when its images are not here."""
    figs = []
    for synthetic in (False, True):
        base = next((g for g in groups if g.synthetic == synthetic and g.variant == "max"), None)
        ours = next((g for g in groups if g.synthetic == synthetic and g.variant == "topk+pce"), None)
        shared = sorted(set(base.seeds) & set(ours.seeds)) if base and ours else []
        if not shared:
            continue
        a, b = (next(r["run"] for r in g.runs if r["seed"] == shared[0]) for g in (base, ours))
        try:
            figs.append(fig5_from_runs(results, runs_dir, a, b))
        except DatasetError as e:
            print(
                f"warning: Fig. 5 ({b} vs {a}) skipped: {e} (a relative data.root is read from the current folder, {Path.cwd()})",
                file=sys.stderr,
            )
    return figs


def _image_changes(groups: list[Group], results: Path, runs_dir: Path) -> list[Path]:
    """The images whose pseudo masks gain and lose most, for each variant against max pooling, on
    the first seed both ran (its masks are the ones shown); skipped with a line when the images are
    not here, silently when the run folders are not."""
    figs = []
    for a, b, stage, _, ch in change_pairs(groups, seeds="first"):
        if stage != "mask":
            continue
        seed = sorted(set(a.seeds) & set(b.seeds))[0]
        ra, rb = (next(r["run"] for r in g.runs if r["seed"] == seed) for g in (a, b))
        try:
            figs.append(fig_image_changes(results, runs_dir, ra, rb, ch))
        except DatasetError as e:
            print(
                f"warning: the image-change figure ({ra} vs {rb}) skipped: {e} "
                f"(a relative data.root is read from the current folder, {Path.cwd()})",
                file=sys.stderr,
            )
    return figs


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench report", __doc__)
    p.add_argument("results", nargs="?", type=Path, default=Path("results"))
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders (for Fig. 5 and the training curves)")
    p.add_argument(
        "--format",
        choices=["table", "md", "json", "csv", "latex"],
        default="table",
        help="what to print: rich tables (default), or Markdown / JSON / CSV / LaTeX (booktabs) to paste elsewhere; "
        "RESULTS/TABLES.md is always written whole",
    )
    args = p.parse_args(argv)
    runs = load_results(args.results)
    tables = build_tables(runs) + detail_tables(runs)
    if args.format == "table":
        print_tables(tables)
    else:
        writer = {"md": to_markdown, "json": to_json, "csv": to_csv, "latex": to_latex}[args.format]
        print(writer(tables + per_class_tables(runs)), end="")
    md = to_markdown(tables + per_class_tables(runs))
    groups = make_groups(runs)
    figs = [fig4_sweep(runs, args.results / "fig4_sweep.png"), *_fig5(groups, args.results, args.runs)]
    figs += [*confusion_figures(groups, args.results), *_image_changes(groups, args.results, args.runs)]
    figs.append(fig_seeds(groups, args.results / "fig_seeds.png"))
    figs.append(fig_per_class(runs, args.results / "fig_per_class.png"))
    for s in runs:  # the training curves of every run whose folder is here
        if (args.runs / s["run"] / "log.jsonl").is_file():
            figs.append(fig_curves(args.runs / s["run"], ResultsDir(args.results).curves(s["run"])))
    figs = [f for f in figs if f]
    if figs:
        md += "\n## Figures\n\n" + "\n".join(f"![{f.stem}]({f.relative_to(args.results)})" for f in figs) + "\n"
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ResultsDir(args.results).tables, md)
    print(
        f"wrote {ResultsDir(args.results).tables}" + "".join(f", {f}" for f in figs),
        file=sys.stderr if args.format != "table" else sys.stdout,
    )
    return 0


main = cli.entry(_main)
