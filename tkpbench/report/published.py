"""The TKP-PCL paper's published figures, read from ``published.toml`` beside this file.

Every published number the report prints comes from that one file, each with the table it is
printed in, its row, what it measures and where it was taken from. A figure checked against its
method's own paper or repository also says what that source reports (split, stage, backbone,
post-processing, value) and, in ``mismatch``, how that differs from the TKP-PCL column it is
printed in; the report footnotes such a cell with ‡. A malformed entry stops the report with one
error line naming the file and the entry.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from tkpbench.errors import UserError

PUBLISHED_FILE = Path(__file__).with_name("published.toml")

# what a figure measures -> (stage, dataset) of the measured cells it is set beside
COLUMNS = {
    "voc train pseudo-mask mIoU (CRF)": ("mask", "voc"),
    "voc val DeepLab-v2 mIoU": ("seg", "voc"),
    "coco val2014 DeepLab-v2 mIoU": ("seg", "coco"),
}
# the columns of each of the paper's tables (Table 4: mask, then seg)
TABLE_COLUMNS = {
    1: ("voc train pseudo-mask mIoU (CRF)",),
    2: ("voc val DeepLab-v2 mIoU",),
    3: ("coco val2014 DeepLab-v2 mIoU",),
    4: ("voc train pseudo-mask mIoU (CRF)", "voc val DeepLab-v2 mIoU"),
}
# what ``source`` says: copied from TKP-PCL's table and not checked; copied and checked against the
# method's own source (then ``source_url`` names it); TKP-PCL's measurement of its own method
CITED = "as cited by TKP-PCL"
CHECKED = "as cited by TKP-PCL, checked against its own source"
OWN = "TKP-PCL's own result"
SOURCES = (CITED, CHECKED, OWN)
SOURCE_SPLITS = ("train", "val", "test")
SOURCE_STAGES = ("CAM seed", "pseudo mask", "DeepLab", "segmentation")
_REQUIRED = {"table": int, "method": str, "column": str, "value": float, "source": str}
# what the method's own source reports; only with ``source_url``, the page or file it was read from
_SOURCE_FIELDS = {
    "source_url": str,
    "source_split": str,
    "source_stage": str,
    "source_backbone": str,
    "source_post": str,
    "source_value": float,
    "source_note": str,
    "mismatch": str,
}
_OPTIONAL = {"venue": str, "backbone": str, "variant": str, "note": str, **_SOURCE_FIELDS}


class PublishedFiguresError(UserError, ValueError):
    """A published-figures file that is missing, not TOML, or has an entry that does not fit."""


@dataclass(frozen=True)
class Figure:
    """One published number: ``value`` (mIoU %) in row ``method`` of the paper's Table ``table``."""

    table: int
    method: str
    column: str
    value: float
    source: str
    venue: str = ""
    backbone: str = ""
    variant: str = ""  # Table 4: the config variant of the row
    note: str = ""  # why the figure is not like for like with the measured cell beside it
    source_url: str = ""  # the method's own paper page or repository file this figure was checked in
    source_split: str = ""  # what that source reports, where it says: split (SOURCE_SPLITS),
    source_stage: str = ""  # stage (SOURCE_STAGES),
    source_backbone: str = ""  # backbone,
    source_post: str = ""  # post-processing ("none", "CRF", "MS+CRF"),
    source_value: float | None = None  # and the number as it states it
    source_note: str = ""  # the source's row or sentence, quoted
    mismatch: str = ""  # how the source's figure differs from this figure's column (‡ in the report)

    @property
    def stage(self) -> str:
        return COLUMNS[self.column][0]

    @property
    def mark(self) -> str:
        """What follows the value in its cell: † for a ``note``, ‡ for a ``mismatch``."""
        marks = ("†" if self.note else "") + ("‡" if self.mismatch else "")
        return f" {marks}" if marks else ""

    @property
    def footnotes(self) -> list[str]:
        """The lines under the table that the cell's marks point to; the ‡ one cites the source."""
        out = [f"† {self.note}"] if self.note else []
        if self.mismatch:
            out.append(f"‡ {self.method} {self.value:.1f}: {self.mismatch} (source: {self.source_url})")
        return out

    @property
    def comparable(self) -> bool:
        """Whether a measured cell can be held against this figure: not when it is marked."""
        return not (self.note or self.mismatch)


def _figure(entry: object) -> Figure:
    """One ``[[figure]]`` entry, checked; the problem as a ValueError message otherwise."""
    if not isinstance(entry, dict):
        raise ValueError("not a table of keys")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; the keys are {sorted({**_REQUIRED, **_OPTIONAL})}")
    missing = sorted(set(_REQUIRED) - set(entry))
    if missing:
        raise ValueError(f"missing keys {missing}")
    for key, value in entry.items():
        kind = {**_REQUIRED, **_OPTIONAL}[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ValueError(f"{key} = {value!r} is not a {kind.__name__}")
    floats = {k: float(entry[k]) for k in ("value", "source_value") if k in entry}
    f = Figure(**{**entry, **floats})
    if f.table not in TABLE_COLUMNS:
        raise ValueError(f"table = {f.table}; the paper's tables are {sorted(TABLE_COLUMNS)}")
    if f.column not in TABLE_COLUMNS[f.table]:
        raise ValueError(f"column = {f.column!r} is not a column of Table {f.table}; its columns are {TABLE_COLUMNS[f.table]}")
    if not 0 <= f.value <= 100:
        raise ValueError(f"value = {f.value} is not an mIoU in %")
    if f.source not in SOURCES:
        raise ValueError(f"source = {f.source!r}; it is one of {list(SOURCES)}")
    given = sorted(k for k in _SOURCE_FIELDS if k in entry)
    if given and not f.source_url:
        raise ValueError(f"{given} without source_url; name the paper page or repository file they were read from")
    if (f.source == CHECKED) != bool(f.source_url):
        raise ValueError(f'source_url goes with source = "{CHECKED}" and only with it')
    if f.source_split and f.source_split not in SOURCE_SPLITS:
        raise ValueError(f"source_split = {f.source_split!r}; it is one of {list(SOURCE_SPLITS)}")
    if f.source_stage and f.source_stage not in SOURCE_STAGES:
        raise ValueError(f"source_stage = {f.source_stage!r}; it is one of {list(SOURCE_STAGES)}")
    if f.source_value is not None and not 0 <= f.source_value <= 100:
        raise ValueError(f"source_value = {f.source_value} is not an mIoU in %")
    if (f.table == 4) != bool(f.variant):
        raise ValueError(
            "no variant, which every Table 4 figure names" if f.table == 4 else "a variant, which only Table 4 figures have"
        )
    return f


def load(path: Path | None = None) -> tuple[Figure, ...]:
    """Every figure of ``path`` (default ``PUBLISHED_FILE``) in file order, the order of the paper's rows."""
    path = PUBLISHED_FILE if path is None else Path(path)
    try:
        entries = tomllib.loads(path.read_text()).get("figure")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PublishedFiguresError(f"{path}: not a readable TOML file of [[figure]] entries ({e})") from e
    if not isinstance(entries, list) or not entries:
        raise PublishedFiguresError(f"{path}: no [[figure]] entries; the file holds one per published number")
    figures = []
    for n, entry in enumerate(entries, 1):
        try:
            figures.append(_figure(entry))
        except ValueError as e:
            name = entry.get("method", "?") if isinstance(entry, dict) else "?"
            raise PublishedFiguresError(
                f"{path}: [[figure]] {n} ({name}): {e}. Fix: write it as the comment at the top of the file describes"
            ) from None
    seen, ablation_columns = set(), {}
    for f in figures:
        key = (f.table, f.variant or f.method, f.column)
        if key in seen:
            raise PublishedFiguresError(f"{path}: Table {f.table} has two figures for {key[1]}, {f.column}; keep one")
        seen.add(key)
        if f.table == 4:
            ablation_columns.setdefault(f.variant, set()).add(f.column)
    incomplete = [v for v, cols in ablation_columns.items() if len(cols) != len(TABLE_COLUMNS[4])]
    if incomplete:
        raise PublishedFiguresError(f"{path}: Table 4 rows {incomplete} need a figure in each of {TABLE_COLUMNS[4]}")
    if "max" not in ablation_columns:
        raise PublishedFiguresError(f'{path}: Table 4 has no variant = "max" row, the baseline of its differences')
    return tuple(figures)


def table(figures: tuple[Figure, ...], number: int) -> list[Figure]:
    """The figures of one of the paper's Tables 1-3, one per row, in the paper's order."""
    return [f for f in figures if f.table == number]


def ablation(figures: tuple[Figure, ...]) -> dict[str, tuple[float, float]]:
    """Table 4: variant -> (published mask, published seg), in the paper's order."""
    rows: dict[str, dict[str, float]] = {}
    for f in figures:
        if f.table == 4:
            rows.setdefault(f.variant, {})[f.stage] = f.value
    return {v: (r["mask"], r["seg"]) for v, r in rows.items()}
