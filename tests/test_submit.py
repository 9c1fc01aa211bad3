"""``tkpbench submit voc-test``: the VOC 2012 test submission on a generated test split (images, no
masks): every PNG in the server's format at its image's size, a missing image or a broken PNG named,
the archive's exact contents, the server's figure recorded; ``data check`` and ``data download`` of
the test split."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from tests.helpers import tiny_config
from tkpbench.config import Config, apply_overrides, dumps
from tkpbench.data import download as dl
from tkpbench.data.check import check_dataset
from tkpbench.data.common import DatasetError, voc_palette
from tkpbench.data.synth import make_synthetic
from tkpbench.data.transforms import eval_transform
from tkpbench.data.voc import VOCSegmentation
from tkpbench.deeplab import IMAGENET_MEAN, IMAGENET_STD, DeepLabV2, predict_probs
from tkpbench.errors import DownloadError
from tkpbench.io import atomic_torch_save
from tkpbench.records import StageRecord, load_summary, write_stage
from tkpbench.report import build_tables, load_results
from tkpbench.runs import CHECKPOINT_FORMAT
from tkpbench.submit import PNG_FOLDER, SubmissionError, check_submission, main, png_problem

TEST_IDS = 5


@pytest.fixture()
def voc_test(tmp_path: Path):
    """(VOC2012 root with a test.txt of generated images, a run folder with a random-weight seg/final.pt,
    results folder, test ids)."""
    make_synthetic(tmp_path / "data", n=TEST_IDS * 2, seed=3, size=(40, 56))
    root = tmp_path / "data" / "VOC2012"
    ids = sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))[:TEST_IDS]
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("\n".join(ids) + "\n")
    cfg = tiny_config(root, train__amp="false")
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(dumps(cfg))
    torch.manual_seed(0)
    model = DeepLabV2(21, cfg.seg.backbone, output_stride=cfg.seg.output_stride)
    for conv in model.aspp.branches:  # a random head, so that predictions hold several classes
        torch.nn.init.normal_(conv.weight, std=0.3)
    atomic_torch_save(
        run / "seg" / "final.pt", {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": cfg.to_dict()}
    )
    return root, run, tmp_path / "results", ids


def _submit(run: Path, results: Path, *extra: str) -> int:
    return main(["voc-test", "--run-dir", str(run), "--results", str(results), "--device", "cpu", "--no-progress", *extra])


def test_submission_png_per_test_image_in_the_servers_format_and_archive(voc_test, capsys):
    root, run, results, ids = voc_test
    # the run's settings with multi-scale + flip evaluation: not the trivial protocol
    assert _submit(run, results, "--set", "seg.eval_scales=[0.5, 1.0]", "--set", "seg.eval_flip=true") == 0
    folder = results / "tiny" / "voc-test"
    pngs = folder / PNG_FOLDER
    assert sorted(p.name for p in pngs.iterdir()) == sorted(f"{i}.png" for i in ids)
    sizes = {i: Image.open(root / "JPEGImages" / f"{i}.jpg").size for i in ids}
    assert len(set(sizes.values())) > 1  # the images differ in size: each PNG must follow its own
    ds = VOCSegmentation(root, "test")
    ck = torch.load(run / "seg" / "final.pt", weights_only=True)
    model = DeepLabV2(21, "resnet18", output_stride=8)
    model.load_state_dict(ck["model"])
    model.eval()
    classes = set()
    for k, i in enumerate(ids):
        with Image.open(pngs / f"{i}.png") as im:
            assert (im.format, im.mode, im.size) == ("PNG", "P", sizes[i])
            assert im.getpalette() == voc_palette()[: len(im.getpalette())]
            got = np.asarray(im)
        classes |= set(np.unique(got).tolist())
        if k:
            continue  # the first image against segment eval's protocol
        img = eval_transform(None, IMAGENET_MEAN, IMAGENET_STD)(tv_tensors.Image(torch.from_numpy(ds.image(k)).permute(2, 0, 1)))
        np.testing.assert_array_equal(got, predict_probs(model, img[None], [0.5, 1.0], True, False).argmax(0).numpy())
    assert len(classes) > 1
    with tarfile.open(folder / "results.tar.gz") as tar:
        members = {m.name: m.isfile() for m in tar.getmembers()}
    dirs = ["results", "results/VOC2012", "results/VOC2012/Segmentation", "results/VOC2012/Segmentation/comp6_test_cls"]
    assert members == {**dict.fromkeys(dirs, False), **{f"{d}/{i}.png": True for d in dirs[-1:] for i in ids}}
    assert f"{len(ids)} PNGs predicted, 0 kept" in capsys.readouterr().out


def test_rerun_keeps_valid_pngs_and_remakes_a_wrong_size_one(voc_test, capsys):
    root, run, results, ids = voc_test
    assert _submit(run, results) == 0
    pngs = results / "tiny" / "voc-test" / PNG_FOLDER
    good = (pngs / f"{ids[1]}.png").read_bytes()
    broken = Image.fromarray(np.zeros((7, 9), np.uint8), mode="P")  # an earlier broken run's PNG
    broken.putpalette(voc_palette())
    broken.save(pngs / f"{ids[0]}.png")
    capsys.readouterr()
    assert _submit(run, results) == 0
    out = capsys.readouterr().out
    assert f"{ids[0]}.png: is 9x7, its image is" in out and f"1 PNGs predicted, {len(ids) - 1} kept" in out
    assert Image.open(pngs / f"{ids[0]}.png").size == Image.open(root / "JPEGImages" / f"{ids[0]}.jpg").size
    assert (pngs / f"{ids[1]}.png").read_bytes() == good


def test_a_missing_test_image_is_one_error_naming_it(voc_test, capsys):
    root, run, results, ids = voc_test
    (root / "JPEGImages" / f"{ids[2]}.jpg").unlink()
    assert _submit(run, results) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{ids[2]}.jpg" in err[0] and "download voc-test" in err[0]
    assert not (results / "tiny" / "voc-test" / "results.tar.gz").exists()


def _png(path: Path, size: tuple[int, int], mode: str = "P", palette: list[int] | None = None, value: int = 1) -> None:
    im = Image.new(mode, size, value if mode == "P" else (value,) * 3)
    if mode == "P":
        im.putpalette(palette or voc_palette())
    im.save(path)


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda d: _png(d / "a.png", (4, 3)), "a.png: is 4x3, its image is 5x3"),
        (lambda d: _png(d / "a.png", (5, 3), mode="RGB"), "a.png: a PNG of mode RGB"),
        (lambda d: _png(d / "a.png", (5, 3), palette=[255] * 768), "a.png: its palette is not VOC's"),
        (lambda d: _png(d / "a.png", (5, 3), value=21), "a.png: holds class index 21"),
        (lambda d: (d / "a.png").write_bytes(b"\x89PNG\r\n"), "a.png: cannot be read"),
        (lambda d: None, "a.png: missing"),
        (lambda d: _png(d / "c.png", (5, 3)), "c.png: not an id of test.txt"),
    ],
)
def test_check_names_each_kind_of_bad_submission(tmp_path, make, expect):
    _png(tmp_path / "a.png", (5, 3))
    _png(tmp_path / "b.png", (6, 2))
    check_submission(tmp_path, ["a", "b"], [(5, 3), (6, 2)])  # the good folder passes
    (tmp_path / "a.png").unlink()
    make(tmp_path)
    with pytest.raises(SubmissionError, match="problems") as e:
        check_submission(tmp_path, ["a", "b"], [(5, 3), (6, 2)])
    assert expect in str(e.value)
    assert png_problem(tmp_path / "b.png", (6, 2)) is None


def test_server_result_is_recorded_with_the_archive_it_scores(voc_test, capsys):
    root, run, results, ids = voc_test
    url = "http://host.robots.ox.ac.uk:8080/anonymous/ABCDEF.html"
    assert _submit(run, results, "--server-result", url, "--miou", "12.5") == 2  # no archive yet
    assert "does not exist" in capsys.readouterr().err
    assert _submit(run, results) == 0
    assert _submit(run, results, "--server-result", "ftp:/nope", "--miou", "12.5") == 2
    assert _submit(run, results, "--server-result", url, "--miou", "120") == 2
    assert _submit(run, results, "--server-result", url, "--miou", "12.5") == 0
    rec = load_summary(results / "tiny" / "summary.json")["stages"]["seg_test"]
    assert (rec["miou"], rec["split"], rec["num_images"], rec["protocol"]["server_result"]) == (12.5, "test", len(ids), url)
    seg_final = json.loads((results / "tiny" / "voc-test" / "STAMP_results.json").read_text())["model_sha256"]
    assert rec["model_sha256"] == seg_final and len(rec["protocol"]["archive_sha256"]) == 64
    assert rec["protocol"]["eval_scales"] == [1.0] and rec["date"]


def test_data_check_knows_the_test_split_has_no_masks(voc_test):
    root, _, _, ids = voc_test
    ok, lines = check_dataset("voc", root, ["test"], decode=True)
    assert ok and any(f"{len(ids)} images  ok, no masks" in ln for ln in lines)
    with pytest.raises(DatasetError, match="no masks"):
        VOCSegmentation(root, "test").mask(0)
    (root / "ImageSets" / "Segmentation" / "test.txt").unlink()
    ok, lines = check_dataset("voc", root, ["test"])
    assert not ok and any("download voc-test" in ln for ln in lines)


def test_voc_test_download_extracts_a_tar_and_refuses_a_login_page(tmp_path, monkeypatch):
    src = tmp_path / "src" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    src.mkdir(parents=True)
    (src / "test.txt").write_text("2008_000001\n")
    tar_path = tmp_path / "VOC2012test.tar"
    with tarfile.open(tar_path, "w") as t:
        t.add(tmp_path / "src" / "VOCdevkit", arcname="VOCdevkit")
    page = tmp_path / "page.html"
    page.write_text("<html>please log in</html>")
    served = {"file": page}

    def fake_fetch(url, dest, checksum=None):
        assert checksum is None and url.endswith("/VOC2012test.tar")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(served["file"].read_bytes())
        return dest

    monkeypatch.setattr(dl, "fetch", fake_fetch)
    with pytest.raises(DownloadError, match="not an archive"):
        dl.download("voc-test", tmp_path / "data")
    assert not (tmp_path / "data" / "downloads" / "VOC2012test.tar").exists()
    served["file"] = tar_path
    dl.download("voc-test", tmp_path / "data")
    assert (tmp_path / "data" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "test.txt").is_file()


def test_table2_shows_the_servers_test_figure_with_its_page_once_one_is_recorded(tmp_path):
    cfg = apply_overrides(Config(), ["model.pooling=topk", "model.pce=true"]).to_dict()
    url = "http://host.robots.ox.ac.uk:8080/anonymous/ABCDE{}.html"  # each seed's submission has its page
    for run in ("topk_pce-s0", "topk_pce-s1"):
        write_stage(tmp_path, run, StageRecord("seg", "voc", "val", 71.0, {}, 1449), cfg)
    assert "VOC test (server)" not in build_tables(load_results(tmp_path))[1][1]  # no empty column
    for seed, test in ((0, 71.5), (1, 72.5)):
        page = {"server_result": url.format(seed)}
        rec = StageRecord("seg_test", "voc", "test", test, {}, 1456, protocol=page, date="2026-12-01")
        write_stage(tmp_path, f"topk_pce-s{seed}", rec, cfg)
    t2 = build_tables(load_results(tmp_path))[1]
    assert t2[1][-1] == "VOC test (server)"
    row = next(r for r in t2[2] if r[0] == "TKP-PCL")
    assert row[-1] == "72.0 (n=2)" and all(len(r) == len(t2[1]) for r in t2[2])
    assert all(r[-1] == "" for r in t2[2] if r[0] != "TKP-PCL")
    assert all(any(url.format(seed) in n for n in t2[3]) for seed in (0, 1))
