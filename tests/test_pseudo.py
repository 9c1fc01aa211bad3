import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

from tkpbench import distributed as D
from tkpbench.data import DatasetError, VOCSegmentation, save_mask
from tkpbench.engine import fit
from tkpbench.evaluate import evaluate_folder, score_pseudo_masks
from tkpbench.model import merge_with_tags
from tkpbench.pseudo import generate
from tkpbench.pseudo import main as pseudo_main
from tkpbench.records import load_summary
from tkpbench.refine import refine_folder
from tkpbench.runs import load_probs
from tkpbench.train import TKPTask


@pytest.fixture(scope="module")
def trained_run(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = tiny_config(synth_root / "VOC2012", train__epochs="2", data__mask_split="train")
    fit(TKPTask(cfg), cfg.to_dict(), run, D.DistInfo(), progress=False)
    return run, cfg


def test_merge_with_a_single_tag_gives_background_or_that_class():
    z = torch.rand(1, 5, 6, 6).softmax(1)
    tags = torch.tensor([[1, 0, 0, 1, 0]], dtype=torch.bool)
    pred = merge_with_tags(z, tags).argmax(1)
    assert set(pred.unique().tolist()) <= {0, 3}


def test_merge_never_predicts_absent_classes_and_divides_by_the_class_maximum():
    z = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.4]], [[0.0, 0.4]]]])  # (1, C=3, 1, 2)
    m = merge_with_tags(z, torch.tensor([[1, 1, 0]], dtype=torch.bool))
    assert torch.all(m[:, 2] == 0)
    # after division by the maxima (0.9 and 0.4): bg = [1, 2/9], class 1 = [1/4, 1]
    torch.testing.assert_close(m[0, :, 0, 1], torch.tensor([(2 / 9) / (2 / 9 + 1), 1 / (2 / 9 + 1), 0.0]))


def test_pseudo_masks_have_the_image_sizes_and_palette_then_resume_skips(trained_run):
    run, cfg = trained_run
    n = generate(run, "train", D.DistInfo(), progress=False)
    ds = VOCSegmentation(cfg.data.root, "train")
    assert n == len(ds)
    for i in range(len(ds)):
        png = Image.open(run / "pseudo" / "masks" / f"{ds.ids[i]}.png")
        assert png.mode == "P" and png.size == (ds.image(i).shape[1], ds.image(i).shape[0])
        m = np.array(png)
        assert set(np.unique(m)) <= set(np.flatnonzero(ds.tags(i)))
        probs = load_probs(run / "pseudo" / "probs" / f"{ds.ids[i]}.npz", 21)
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
        # stored on the patch grid and upsampled as the mask was made: the mask is exactly their argmax
        assert np.array_equal(probs.argmax(0), m)
        with np.load(run / "pseudo" / "probs" / f"{ds.ids[i]}.npz") as f:  # grid-sized, not image-sized
            assert f["grid"].shape[1:] == (cfg.pseudo.infer_size // 16,) * 2 and f["size"].tolist() == list(m.shape)
    assert generate(run, "train", D.DistInfo(), progress=False) == 0
    # a damaged probabilities file is recomputed, not trusted
    (run / "pseudo" / "probs" / f"{ds.ids[0]}.npz").write_bytes(b"garbage")
    assert generate(run, "train", D.DistInfo(), progress=False) == 1
    load_probs(run / "pseudo" / "probs" / f"{ds.ids[0]}.npz", 21)


def test_probabilities_of_the_older_full_size_format_still_load(tmp_path):
    import io

    probs = np.random.default_rng(0).dirichlet(np.ones(2), size=(6, 5)).transpose(2, 0, 1).astype(np.float16)
    buf = io.BytesIO()
    np.savez_compressed(buf, probs=probs, classes=np.array([0, 7], dtype=np.int16))
    (tmp_path / "old.npz").write_bytes(buf.getvalue())
    full = load_probs(tmp_path / "old.npz", 21)
    assert full.shape == (21, 6, 5) and np.array_equal(full[7], probs[1].astype(np.float32)) and full[3].max() == 0


def test_crf_folder_stage_and_mask_record(trained_run, tmp_path):
    run, cfg = trained_run
    generate(run, "train", D.DistInfo(), progress=False)
    counts = refine_folder(run, "train", cfg.crf, cfg.data, progress=False)
    ds = VOCSegmentation(cfg.data.root, "train")
    assert counts["done"] + counts["skipped"] == len(ds)
    again = refine_folder(run, "train", cfg.crf, cfg.data, progress=False)
    assert again == {"done": 0, "skipped": len(ds)}
    r = score_pseudo_masks(run, cfg, tmp_path)
    rec = load_summary(tmp_path / "tiny" / "summary.json")["stages"]["mask"]
    assert rec["split"] == "train" and rec["num_images"] == len(ds) and rec["synthetic"]
    assert rec["miou"] == pytest.approx(100 * r["miou"], abs=1e-3) and rec["miou_crf"] is not None
    assert rec["protocol"]["crf"]["bi_sxy"] == 67 and rec["commit"] and rec["device"]


def test_torch_crf_backend_on_a_folder_matches_pydensecrf(trained_run, tmp_path):
    import shutil

    run, cfg = trained_run
    generate(run, "train", D.DistInfo(), progress=False)
    refine_folder(run, "train", cfg.crf, cfg.data, progress=False)
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    shutil.rmtree(other / "pseudo" / "crf")
    cfg.crf.backend, cfg.crf.device = "torch", "cpu"
    try:
        counts = refine_folder(other, "train", cfg.crf, cfg.data, progress=False)
    finally:
        cfg.crf.backend = "pydensecrf"
    ds = VOCSegmentation(cfg.data.root, "train")
    assert counts["done"] == len(ds)
    agree = [
        (
            np.array(Image.open(run / "pseudo" / "crf" / f"{i}.png"))
            == np.array(Image.open(other / "pseudo" / "crf" / f"{i}.png"))
        ).mean()
        for i in ds.ids
    ]
    assert np.mean(agree) > 0.995


def test_torch_crf_with_loader_workers_equals_in_process_loading_and_names_a_damaged_file(trained_run, tmp_path):
    """The device path's DataLoader workers and PNG writer thread change nothing but the timing."""
    import shutil
    from dataclasses import replace

    from tkpbench.data.transforms import build_dataset
    from tkpbench.refine import _refine_on_device

    run, cfg = trained_run
    generate(run, "train", D.DistInfo(), progress=False)
    ds = build_dataset(cfg.data, "train")
    crf_cfg = replace(cfg.crf, backend="torch", device="cpu")
    outs = {}
    for loaders in (0, 2):
        pseudo = tmp_path / f"loaders{loaders}"
        shutil.copytree(run / "pseudo" / "probs", pseudo / "probs")
        (pseudo / "crf").mkdir()
        (pseudo / "probs" / f"{ds.ids[1]}.npz").write_bytes(b"garbage")
        results = list(_refine_on_device(ds, pseudo, list(range(len(ds))), crf_cfg, loaders))
        errors = [r for r in results if r != "done"]
        assert len(results) == len(ds) and len(errors) == 1
        assert f"{ds.ids[1]}.npz" in errors[0] and "python -m tkpbench.pseudo" in errors[0]
        outs[loaders] = {i: np.array(Image.open(pseudo / "crf" / f"{i}.png")) for i in ds.ids if i != ds.ids[1]}
        assert len(outs[loaders]) == len(ds) - 1 and not (pseudo / "crf" / f"{ds.ids[1]}.png").exists()
    for i, mask in outs[0].items():
        assert np.array_equal(mask, outs[2][i]), i


def test_evaluate_folder_errors_name_the_file(synth_root, tmp_path):
    ds = VOCSegmentation(synth_root / "VOC2012", "val")
    with pytest.raises(DatasetError, match=rf"missing.*{ds.ids[0]}\.png"):
        evaluate_folder(tmp_path, ds)
    for i in range(len(ds)):
        save_mask(tmp_path / f"{ds.ids[i]}.png", np.where(ds.mask(i) == 255, 0, ds.mask(i)))
    assert evaluate_folder(tmp_path, ds).cm.miou() > 0.9
    save_mask(tmp_path / f"{ds.ids[1]}.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=rf"{ds.ids[1]}\.png is 5x5"):
        evaluate_folder(tmp_path, ds)
    bad = np.where(ds.mask(1) == 255, 0, ds.mask(1))
    bad[0, 0] = 30
    save_mask(tmp_path / f"{ds.ids[1]}.png", bad)
    with pytest.raises(DatasetError, match=rf"{ds.ids[1]}\.png holds values \[30\]"):
        evaluate_folder(tmp_path, ds)


def test_evaluate_command_prints_a_per_class_table(synth_root, tmp_path, capsys):
    from tkpbench.evaluate import main

    ds = VOCSegmentation(synth_root / "VOC2012", "val")
    for i in range(len(ds)):
        save_mask(tmp_path / f"{ds.ids[i]}.png", np.where(ds.mask(i) == 255, 0, ds.mask(i)))
    assert main(["--pred", str(tmp_path), "--split", "val", "--root", str(synth_root / "VOC2012")]) == 0
    out = capsys.readouterr().out
    assert "background" in out and "mIoU" in out and "100.0" in out
    assert main(["--pred", str(tmp_path / "none"), "--split", "val", "--root", str(synth_root / "VOC2012")]) == 2


def test_align_corners_is_stored_with_the_probabilities_and_used_when_they_load(trained_run, tmp_path):
    """pseudo.align_corners = true (ViT-PCM's resize): the masks and the stored probabilities agree."""
    import copy
    import shutil

    run, cfg = trained_run
    other = tmp_path / "run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("pseudo"))
    cfg2 = copy.deepcopy(cfg)
    cfg2.pseudo.align_corners = True
    generate(other, "train", D.DistInfo(), cfg2, progress=False)
    ds = VOCSegmentation(cfg.data.root, "train")
    for i in range(len(ds)):
        m = np.array(Image.open(other / "pseudo" / "masks" / f"{ds.ids[i]}.png"))
        assert np.array_equal(load_probs(other / "pseudo" / "probs" / f"{ds.ids[i]}.npz", 21).argmax(0), m)


def test_an_inference_size_off_the_patch_grid_is_one_error_line(trained_run, capsys):
    run, _ = trained_run
    assert pseudo_main(["--run-dir", str(run), "--set", "pseudo.infer_size=70", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pseudo.infer_size = 70 is not a multiple of the encoder's patch size 16" in err
