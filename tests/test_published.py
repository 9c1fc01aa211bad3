"""Where every published number comes from: the source fields of published.toml, and the ‡ footnote
that a figure whose own source reports another kind of number carries in every report format."""

import csv
import io
import json

import pytest
from rich.console import Console

from tkpbench.config import Config, apply_overrides
from tkpbench.records import StageRecord, write_stage
from tkpbench.report import build_tables, load_results, published
from tkpbench.report.formats import print_tables, to_csv, to_json, to_latex, to_markdown

URL = "https://example.org/vit-pcm/README.md"
MISMATCH = "its README gives 50.0 as a val figure of another stage"
# Table 1 with one checked, mismatched figure, and the Table 4 rows every file needs
FILE = f"""
[[figure]]
table = 1
method = "ViT-PCM"
venue = "ECCV22"
backbone = "ViT-B/16"
column = "voc train pseudo-mask mIoU (CRF)"
value = 50.0
source = "{published.CHECKED}"
source_url = "{URL}"
source_split = "val"
source_stage = "segmentation"
source_value = 50.0
mismatch = "{MISMATCH}"
""" + "".join(
    f"""
[[figure]]
table = 4
method = "Max-Pooling"
backbone = "ViT-B/16"
variant = "max"
column = "{column}"
value = 60.0
source = "{published.OWN}"
"""
    for column in published.TABLE_COLUMNS[4]
)
FOOTNOTE = f"‡ ViT-PCM 50.0: {MISMATCH} (source: {URL})"


@pytest.fixture
def mismatched(tmp_path, monkeypatch):
    """The report's tables read from FILE, with a measured ViT-PCM run beside the marked figure."""
    path = tmp_path / "published.toml"
    path.write_text(FILE)
    monkeypatch.setattr(published, "PUBLISHED_FILE", path)
    cfg = Config()
    apply_overrides(cfg, ["model.pooling=max", "model.pce=false", "model.et=true", "model.reg=0.01"])
    rec = StageRecord(
        stage="mask", dataset="voc", split="train", miou=48.0, per_class={}, num_images=10, miou_crf=49.0, synthetic=False
    )
    write_stage(tmp_path / "results", "vit_pcm", rec, cfg.to_dict())
    return build_tables(load_results(tmp_path / "results"))


def test_a_mismatched_figure_is_marked_and_never_held_against_the_measured_cell(mismatched):
    t1 = mismatched[0]
    row = next(r for r in t1[2] if r[0] == "ViT-PCM")
    assert row[3] == "50.0 ‡" and row[-1] == "not comparable"  # 49.0 would otherwise be compared with 50.0
    assert t1[3].count(FOOTNOTE) == 1


@pytest.mark.parametrize("width", [200, 40])  # a grid, and one block per row in a narrow terminal
def test_the_printed_tables_carry_the_footnote(mismatched, width):
    con = Console(record=True, width=width)
    print_tables(mismatched, con)
    text = " ".join(con.export_text().split())  # folded lines joined again
    assert "50.0 ‡" in text and FOOTNOTE in text


def test_every_file_format_carries_the_footnote(mismatched):
    t1 = json.loads(to_json(mismatched))[0]
    assert [f for f in t1["footnotes"] if not f.startswith("§")] == [FOOTNOTE]
    assert ["ViT-PCM", "ECCV22", "ViT-B/16", "50.0 ‡"] == t1["rows"][0][:4]
    assert [FOOTNOTE] in list(csv.reader(io.StringIO(to_csv(mismatched))))
    assert f"- {FOOTNOTE}" in to_markdown(mismatched).splitlines()
    tex = to_latex(mismatched)
    assert "50.0 \\ddag{}" in tex and "{\\footnotesize \\ddag{} ViT-PCM 50.0: its README gives" in tex


def test_source_fields_without_a_source_url_are_refused_naming_the_file_and_the_entry(tmp_path):
    path = tmp_path / "published.toml"
    path.write_text(FILE.replace(f'source_url = "{URL}"\n', ""))
    with pytest.raises(published.PublishedFiguresError) as e:
        published.load(path)
    assert str(e.value).startswith(f"{path}: [[figure]] 1 (ViT-PCM): ")
    assert "['mismatch', 'source_split', 'source_stage', 'source_value'] without source_url" in str(e.value)


# what each column of the TKP-PCL paper's tables measures, in the source fields' words
_COLUMN_SPLIT = {"mask": "train", "seg": "val"}
_COLUMN_STAGE = {"mask": "pseudo mask", "seg": "DeepLab"}


def test_every_committed_figure_is_cited_checked_or_own_and_a_checked_one_that_differs_says_so():
    """A checked figure whose source gives another split, stage or value (beyond rounding) than its
    column carries a mismatch (‡) or a note (†); an unchecked one records nothing of a source."""
    figures = published.load()
    source_keys = [k for k in published.Figure.__dataclass_fields__ if k.startswith("source_") or k == "mismatch"]
    for f in figures:
        if f.source != published.CHECKED:
            assert f.source in (published.CITED, published.OWN) and not any(getattr(f, k) for k in source_keys), f
            continue
        assert f.source_url.startswith("https://"), f
        differs = (
            (f.source_split and f.source_split != _COLUMN_SPLIT[f.stage])
            or (f.source_stage and f.source_stage != _COLUMN_STAGE[f.stage])
            or (f.source_value is not None and abs(f.source_value - f.value) > 0.05 + 1e-9)
        )
        assert not differs or f.mismatch or f.note, f
    # the example: ToCo's 72.2 is its VOC test segmentation figure, not a train pseudo mask
    toco = next(f for f in figures if (f.table, f.method) == (1, "ToCo"))
    assert (toco.source_split, toco.source_stage, toco.source_post, toco.source_value) == ("test", "segmentation", "MS+CRF", 72.2)
    assert toco.mark == " ‡" and "rulixiang/ToCo" in toco.source_url
