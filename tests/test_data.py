import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from tkpbench.config import DataConfig
from tkpbench.data import COCOSegmentation, DatasetError, VOCSegmentation, save_mask
from tkpbench.data.transforms import EvalSet, TKPTrainSet, eval_transform, seg_train_transform, tkp_train_transform
from tkpbench.data.voc import prepare_train_aug, train_aug_ids


# ---------------------------------------------------------------- real samples
def test_real_voc_masks_are_read_exactly_and_tags_equal_cls_labels(shared_data):
    root = shared_data / "voc2012-sample" / "VOC2012"
    ds = VOCSegmentation(root, "train")
    assert len(ds) == 50 and "split='train'" in repr(ds)
    cls_labels = np.load(shared_data / "voc2012-lists" / "cls_labels.npy", allow_pickle=True).item()
    seen_ignore = False
    for i in range(len(ds)):
        m = ds.mask(i)
        raw = np.array(Image.open(ds.mask_path(i)))
        assert np.array_equal(m, raw)
        seen_ignore |= bool((m == 255).any())
        fg = cls_labels[int(ds.ids[i].replace("_", ""))].astype(bool)
        assert np.array_equal(ds.tags(i)[1:], fg), ds.ids[i]
        assert ds.tags(i)[0]
        assert ds.image(i).shape[:2] == m.shape and ds.image(i).dtype == np.uint8
    assert seen_ignore


def test_real_coco_masks_agree_with_pycocotools_annToMask(shared_data, tmp_path):
    root = shared_data / "coco2017-sample"
    ds = COCOSegmentation(root, "train2017", mask_dir=tmp_path / "m")
    assert ds.num_classes == 81
    coco = ds.coco
    checked_crowd = False
    for i in range(12):
        m = ds.mask(i)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=ds.image_ids[i]))
        painted = np.zeros(m.shape, bool)
        for a in sorted(anns, key=lambda a: a["area"]):  # smallest first: those are never covered
            inst = coco.annToMask(a).astype(bool) & ~painted
            if a["iscrowd"]:
                checked_crowd = True
                assert np.all((m[inst] == 255) | (m[inst] > 0))
            else:
                # every pixel of an instance not covered by a smaller one carries its class
                assert np.all(m[inst] == ds.cat_to_class[a["category_id"]])
                painted |= inst
        assert np.array_equal(np.flatnonzero(ds.tags(i)[1:]) + 1, sorted({ds.cat_to_class[a["category_id"]] for a in anns}))
        assert (tmp_path / "m" / f"{ds.ids[i]}.png").is_file()
        assert np.array_equal(ds.mask(i), m)  # second read comes from the cached PNG
    assert ds.cat_to_class[1] == 1 and ds.cat_to_class[90] == 80
    del checked_crowd


def test_vit_pcm_coco_protocol_first_annotation_wins_crowd_keeps_its_class(shared_data, tmp_path):
    """data.coco_protocol = "vit_pcm" (its parse_coco.py): images under 256 px or without annotations
    are left out of every split; in annotation order each instance takes only unpainted pixels;
    crowd regions carry their class (never 255); the default protocol's cache is not reused."""
    root = shared_data / "coco2017-sample"
    ds = COCOSegmentation(root, "train2017", mask_dir=tmp_path / "v", protocol="vit_pcm")
    ours = COCOSegmentation(root, "train2017", mask_dir=tmp_path / "t")
    imgs = ds.coco.imgs
    assert all(min(imgs[i]["height"], imgs[i]["width"]) >= 256 and ds.coco.getAnnIds(imgIds=i) for i in ds.image_ids)
    assert set(ds.image_ids) <= set(ours.image_ids)
    differs = 0
    for i in range(min(len(ds), 12)):
        m = ds.mask(i)
        painted = np.zeros(m.shape, bool)
        for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=ds.image_ids[i])):
            inst = ds.coco.annToMask(a).astype(bool) & ~painted
            assert np.all(m[inst] == ds.cat_to_class[a["category_id"]])
            painted |= inst
        assert not (m == 255).any() and np.all(m[~painted] == 0)
        differs += not np.array_equal(m, ours.mask(ours.image_ids.index(ds.image_ids[i])))
    assert differs > 0  # the two protocols really differ on real overlapping annotations
    assert "protocol='vit_pcm'" in repr(ds)


# ---------------------------------------------------------------- generated data
def test_synthetic_voc_and_coco_twins_agree(synth_root):
    voc = VOCSegmentation(synth_root / "VOC2012", "train_aug")
    coco = COCOSegmentation(synth_root / "coco", "train2014", mask_dir=synth_root / "coco_masks")
    assert coco.num_unannotated == 1
    by_id = {int(i.split("_")[1]): n for n, i in enumerate(voc.ids)}
    for n in range(5):
        cid = coco.image_ids[n]
        v = by_id[cid - 1]
        vm, cm = voc.mask(v), coco.mask(n)
        inside = vm != 255
        assert np.array_equal(vm[inside], cm[inside])
        assert np.array_equal(voc.tags(v), coco.tags(n))
    xml = VOCSegmentation(synth_root / "VOC2012", "train_aug", tags="xml")
    assert np.array_equal(xml.all_tags(), voc.all_tags())


def test_synthetic_generation_is_deterministic_per_seed_with_or_without_the_coco_twin(tmp_path, monkeypatch):
    from tkpbench.data.synth import make_synthetic

    make_synthetic(tmp_path / "a", n=4, seed=7, size=(64, 64))
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # a machine without pycocotools (make gpu-check's)
    make_synthetic(tmp_path / "b", n=4, seed=7, size=(64, 64), coco=False)
    files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a" / "VOC2012").rglob("*") if f.is_file())
    assert len(files) > 4 * 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "coco").is_dir() and not (tmp_path / "b" / "coco").exists()


def test_train_aug_arithmetic():
    assert train_aug_ids(["a", "b"], ["c", "d"], ["b", "c", "e"], ["f", "d"]) == ["a", "b", "e", "f"]


def test_sbd_conversion_builds_train_aug_resumably(tmp_path, synth_root):
    from scipy.io import savemat

    voc = tmp_path / "VOC2012"
    shutil.copytree(synth_root / "VOC2012", voc)
    (voc / "ImageSets/Segmentation/train_aug.txt").unlink()
    shutil.rmtree(voc / "SegmentationClassAug")
    sbd = tmp_path / "sbd"
    (sbd / "cls").mkdir(parents=True)
    extra = "2026_999999"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(voc / "JPEGImages" / f"{extra}.jpg")
    seg = np.zeros((20, 30), np.uint8)
    seg[5:10, 5:20] = 7
    savemat(
        sbd / "cls" / f"{extra}.mat",
        {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1), "CategoriesPresent": np.array([7])}},
    )
    (sbd / "train.txt").write_text(extra + "\n")
    val_ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    (sbd / "val.txt").write_text(val_ids[0] + "\n")  # a VOC val id in SBD must not enter train_aug
    with pytest.raises(DatasetError, match="prepare-aug"):
        VOCSegmentation(voc, "train_aug")
    counts = prepare_train_aug(voc, sbd, workers=2)
    assert counts["sbd"] == 1 and counts["voc"] > 0
    ds = VOCSegmentation(voc, "train_aug")
    assert extra in ds.ids and val_ids[0] not in ds.ids
    assert np.array_equal(ds.mask(ds.ids.index(extra)), seg)
    again = prepare_train_aug(voc, sbd, workers=1)
    assert again["skipped"] == len(ds) and again["sbd"] == 0


# ---------------------------------------------------------------- transforms
def _striped(h=48, w=64):
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2 :] = 3
    img = np.zeros((h, w, 3), np.uint8)
    img[:, w // 2 :] = 255
    return img, mask


@pytest.mark.parametrize("seed", range(5))
def test_segmentation_transforms_keep_image_and_mask_aligned(seed):
    img, mask = _striped()
    torch.manual_seed(seed)
    tf = seg_train_transform(40, (0.5, 1.5), (0.5,) * 3, (0.5,) * 3)
    im, m = tf(tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask)))
    assert im.shape == (3, 40, 40) and m.shape == (40, 40)
    valid = m != 255
    bright = im[0] > 0.5
    assert torch.equal(bright[valid & (m == 3)].all().reshape(1), torch.tensor([True]))
    assert not bright[valid & (m == 0)].any()
    assert set(torch.unique(m).tolist()) <= {0, 3, 255}


def test_tkp_train_set_is_deterministic_per_key_and_carries_tags_only(synth_root, monkeypatch):
    base = VOCSegmentation(synth_root / "VOC2012", "train")
    tf = tkp_train_transform(DataConfig(), 32, (0.5,) * 3, (0.5,) * 3)
    ds = TKPTrainSet(base, tf)
    a, ta = ds[(1, 123)]
    b, _ = ds[(1, 123)]
    c, _ = ds[(1, 124)]
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ta, torch.from_numpy(base.tags(1)))
    cached = TKPTrainSet(base, tf, cache_size=32)
    assert cached.cache.shape == (len(base), 3, 32, 32)
    # a sample seeds the CPU generator only and leaves the caller's where it was: it does not reseed
    # the GPUs' generators (the training process's own, with data.workers = 0; before CUDA is
    # initialised, torch queues that call with a formatted traceback: 8% of a demo step)
    state, gpu_seeds = torch.get_rng_state(), []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpu_seeds.append)
    ds[(2, 7)]
    assert torch.equal(torch.get_rng_state(), state) and gpu_seeds == []


def test_eval_set_resizes_masks_with_nearest(synth_root):
    base = VOCSegmentation(synth_root / "VOC2012", "val")
    img, mask, tags, idx = EvalSet(base, eval_transform(64, (0.5,) * 3, (0.5,) * 3))[0]
    assert img.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert set(torch.unique(mask).tolist()) <= set(np.unique(base.mask(0)).tolist())


# ---------------------------------------------------------------- bad input
@pytest.fixture()
def voc_copy(tmp_path, synth_root):
    root = tmp_path / "VOC2012"
    shutil.copytree(synth_root / "VOC2012", root)
    return root


def test_missing_root_names_the_folder_and_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"nothere.*JPEGImages.*download voc"):
        VOCSegmentation(tmp_path / "nothere", "train")


def test_missing_split_list_and_empty_split(voc_copy):
    with pytest.raises(DatasetError, match=r"bogus\.txt does not exist"):
        VOCSegmentation(voc_copy, "bogus")
    (voc_copy / "ImageSets/Segmentation/train.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"train\.txt is empty"):
        VOCSegmentation(voc_copy, "train")


def test_listed_image_that_does_not_exist(voc_copy):
    first = (voc_copy / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    (voc_copy / "JPEGImages" / f"{first}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"1 images.*{first}\.jpg"):
        VOCSegmentation(voc_copy, "train")


def test_corrupt_jpeg_and_png_name_the_file(voc_copy):
    ds = VOCSegmentation(voc_copy, "train")
    ds.image_path(0).write_bytes(b"\xff\xd8not a jpeg")
    with pytest.raises(DatasetError, match=rf"{ds.ids[0]}\.jpg cannot be decoded"):
        ds.image(0)
    ds.mask_path(1).write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=rf"{ds.ids[1]}\.png cannot be decoded"):
        ds.mask(1)


def test_mask_value_out_of_range_that_is_not_ignore(voc_copy):
    ds = VOCSegmentation(voc_copy, "train")
    m = ds.mask(0).copy()
    m[0, 0] = 42
    save_mask(ds.mask_path(0), m)
    with pytest.raises(DatasetError, match=r"values \[42\] >= 21"):
        ds.mask(0)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(ds.mask_path(2))
    with pytest.raises(DatasetError, match="mode RGB"):
        ds.mask(2)


def test_coco_missing_annotation_file(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(DatasetError, match=r"instances_val2014\.json does not exist"):
        COCOSegmentation(tmp_path / "coco", "val2014")


def test_check_command_reports_missing_splits_with_fix(tmp_path, synth_root, capsys):
    from tkpbench.data.__main__ import main

    assert main(["check", "voc", "--root", str(synth_root / "VOC2012")]) == 0
    assert main(["check", "voc", "--root", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "python -m tkpbench.data download voc" in out
