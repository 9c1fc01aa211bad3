"""The one `tkpbench` command: its subcommands, their help, and the installed script."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tkpbench.__main__ import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, text) in COMMANDS.items():
        assert f"  {name}" in out and text in out


def test_an_unknown_subcommand_is_one_error_line(capsys):
    assert main(["tranin"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'tranin'")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_installed_script_runs():
    script = Path(sys.executable).parent / "tkpbench"
    exe = str(script) if script.is_file() else shutil.which("tkpbench")
    if exe is None:
        pytest.skip("the tkpbench script is not installed (pip install -e . installs it)")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and "reproduce" in r.stdout and "report" in r.stdout


def test_predict_writes_a_mask_of_each_images_size_and_an_overlay(tiny_run, synth_root, tmp_path):
    import numpy as np
    from PIL import Image

    from tkpbench.predict import main as predict

    src = sorted((synth_root / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    odd = tmp_path / "odd.png"  # another format and size than anything the run saw
    Image.open(src).convert("RGB").resize((77, 53)).save(odd)
    assert predict(["--run", str(tiny_run), str(src), str(odd), "--out", str(tmp_path / "out"), "--crf"]) == 0
    for img in (src, odd):
        mask = np.array(Image.open(tmp_path / "out" / f"{img.stem}.png"))
        assert mask.shape == np.array(Image.open(img)).shape[:2] and mask.max() < 21
        ov = Image.open(tmp_path / "out" / f"{img.stem}_overlay.jpg")
        assert ov.width == mask.shape[1] and ov.height > mask.shape[0]  # the legend strip below the picture
    assert predict(["--run", str(tiny_run), str(src), "--out", str(tmp_path / "t"), "--tags", "cat,dog"]) == 0
    tagged = np.unique(np.array(Image.open(tmp_path / "t" / f"{src.stem}.png")))
    assert set(tagged.tolist()) <= {0, 8, 12}  # only background and the given classes


def test_predict_refuses_a_non_image_and_an_unknown_tag_by_name(tiny_run, tmp_path, capsys):
    from tkpbench.predict import main as predict

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert predict(["--run", str(tiny_run), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "notes.txt is not an image" in capsys.readouterr().err
    assert predict(["--run", str(tiny_run), str(bad), "--out", str(tmp_path / "o"), "--tags", "unicorn"]) == 2
    assert "unknown class 'unicorn'" in capsys.readouterr().err
