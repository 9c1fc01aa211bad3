"""``pip install .`` (not editable) carries what ``tkpbench reproduce`` reads: the target configs
(baselines/, configs/) and the published figures, and every package of the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "tkpbench").rglob("__init__.py")}
    assert found <= listed and listed - found == {"tkpbench.baselines", "tkpbench.configs"}


@pytest.mark.slow
def test_a_non_editable_install_plans_every_target_from_anywhere(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True, timeout=600)
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True, timeout=600
    )
    code = (
        "import tkpbench.pipeline as p, tkpbench.config as c, pathlib\n"
        "assert not str(p.REPO / 'baselines').startswith(" + repr(str(REPO)) + ")\n"
        "for t in p.TARGETS:\n"
        "    chains, _ = p.target_chains(t, [], pathlib.Path('runs'), pathlib.Path('demo'))\n"
        "    print(t, [c.load_config(f, ov).name for f, ov in chains][:2])\n"
        "from tkpbench.report import published\n"
        "print(len(published.load()))\n"
    )
    work = tmp_path / "elsewhere"
    (work / "demo").mkdir(parents=True)
    (work / "demo" / "SYNTHETIC.json").write_text("{}")  # the demo's data need not be generated here
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "voc ['topk_pce', 'vit_pcm']" in r.stdout and "demo ['demo', 'demo_max']" in r.stdout


def test_the_stages_import_where_pydensecrf_and_pycocotools_are_missing():
    """A GPU machine that can install nothing may lack them: the torch CRF and VOC still work there."""
    code = (
        "import sys; sys.modules['pycocotools'] = sys.modules['pydensecrf'] = None\n"
        "import tkpbench.pipeline, tkpbench.refine, tkpbench.segment, tkpbench.train, tkpbench.pseudo, tkpbench.data.coco\n"
        "import numpy as np; from tkpbench.crf import dense_crf; from tkpbench.config import CRFConfig\n"
        "img = np.zeros((8, 8, 3), np.uint8); p = np.full((2, 8, 8), 0.5, np.float32)\n"
        "print(dense_crf(img, p, CRFConfig(backend='torch', device='cpu')).shape)\n"
        "dense_crf(img, p, CRFConfig())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert "(2, 8, 8)" in r.stdout and "ConfigError" in r.stderr and "pip install pydensecrf2" in r.stderr, r.stderr[-2000:]


def test_a_stage_process_starts_without_scipy():
    """Every stage process (4-8 per torchrun launch) imports its module; scipy.stats and scipy.io
    cost about 0.65 s of its 4 s start, for the intervals that only rank 0 computes at the end and
    the SBD conversion. They are imported where used."""
    code = (
        "import sys\n"
        "import tkpbench.train, tkpbench.pseudo, tkpbench.refine, tkpbench.evaluate, tkpbench.segment\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
