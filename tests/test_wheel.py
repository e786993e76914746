"""The wheel is what users install: built from the checkout, installed in a fresh venv, run from elsewhere.

What the editable install cannot show: the configs travel inside the package (`conf/` as `ntt.conf`,
`experiments/` as `ntt.experiments`, the SAM2 model yamls in `ntt/backbones/configs/`), Hydra finds them
through pkg:// from any working directory, and no sub-package is missing from the wheel.

The new venv gets the project venv's third-party packages (torch, hydra, ...) through a .pth file that names
the project's site-packages directory. Python adds such a directory to sys.path without processing the .pth
files inside it, so the project's editable ntt stays out (checked: `ntt.__file__` is in the new venv).
Tiny RANDOM models and one test image per run: plumbing, never accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO
from omegaconf import OmegaConf
from PIL import Image

# what setuptools reads to build the wheel (pyproject.toml's readme, packages and their package-dir mapping)
BUILD_INPUTS = ("pyproject.toml", "README.md", "ntt", "conf", "experiments")
# one test image per run, a 2x2 prompt grid (4 prompts), every proposal kept
SMOKE = [
    "dataset=synthetic",
    "debug=smoke",
    "device=cpu",
    "dataset.synthetic.num_images=6",
    "dataset.max_test_images=1",
    "proposer.points_per_side=2",
    "proposer.points_batch_size=4",
]
GRID = ["proposer.points_per_side=2", "proposer.points_batch_size=4", "proposer.iou_thr=0.0"]
TIMEOUT = 300  # seconds per command; each takes ~5-25 s on 2 idle cores


def _run(cmd: list, *, cwd: Path, env: dict) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout, built from a copy of its build inputs (so the build leaves no `build/` or
    egg-info in the checkout, and no stale `build/lib` from an earlier build can slip into the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src]
    _run([*pip, *build], cwd=tmp, env=dict(os.environ))
    (found,) = (tmp / "dist").glob("ntt-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> SimpleNamespace:
    """A fresh venv outside the checkout with the wheel installed (`--no-deps`), plus a clean working folder."""
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True, timeout=TIMEOUT)
    python = root / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    _run([*pip, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp, env=env)
    site = Path(sysconfig.get_paths(vars={"base": str(root), "platbase": str(root)})["purelib"])
    (site / "ntt_project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "elsewhere"  # the working directory of every command: neither the checkout nor the venv
    work.mkdir()
    where = _run([python, "-c", "import ntt; print(ntt.__file__)"], cwd=work, env=env).strip()
    assert Path(where).is_relative_to(site), f"ntt imported from {where}, not from the new venv"
    return SimpleNamespace(python=python, ntt=root / "bin" / "ntt", env=env, work=work, tmp=tmp)


def _ntt(venv, *args) -> str:
    return _run([venv.ntt, *args], cwd=venv.work, env=venv.env)


@pytest.fixture(scope="module")
def smoke_out(venv) -> Path:
    """`ntt run dataset=synthetic debug=smoke` of the installed package; its output folder."""
    out = venv.tmp / "outputs"
    _ntt(venv, "run", *SMOKE, f"paths.output_dir={out}", f"paths.data={venv.tmp / 'data'}")
    return out


def test_package_list_is_every_package_folder():
    """pyproject lists the packages by hand (setuptools' find cannot see the mapped config roots): a new
    sub-package of ntt/ missing there would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = sorted(p.parent for p in (REPO / "ntt").rglob("__init__.py") if "__pycache__" not in p.parts)
    expected = {".".join(p.relative_to(REPO).parts) for p in folders} | {"ntt.conf", "ntt.experiments"}
    listed = setup["packages"]
    assert len(listed) == len(set(listed)), f"a package is listed twice: {sorted(listed)}"
    assert sorted(expected - set(listed)) == [], "sub-packages missing from pyproject's packages"
    assert sorted(set(listed) - expected) == [], "pyproject lists packages that do not exist"
    assert setup["package-dir"] == {"ntt.conf": "conf", "ntt.experiments": "experiments"}
    assert (REPO / "conf" / "__init__.py").is_file() and (REPO / "experiments" / "__init__.py").is_file()


def _on_disk(folder: str, pattern: str, prefix: str) -> set[str]:
    """The wheel paths (`prefix/...`) of the files under `REPO/folder` matching `pattern`."""
    root = REPO / folder
    return {
        f"{prefix}/{p.relative_to(root).as_posix()}"
        for p in root.rglob(pattern)
        if "__pycache__" not in p.parts
    }


def test_wheel_holds_the_code_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = (
        _on_disk("ntt", "*.py", "ntt")
        | _on_disk("ntt/backbones/configs", "*.yaml", "ntt/backbones/configs")
        | _on_disk("conf", "*.yaml", "ntt/conf")
        | _on_disk("experiments", "*.yaml", "ntt/experiments")
        | {"ntt/conf/__init__.py", "ntt/experiments/__init__.py", "ntt/experiments/README.md"}
    )
    assert {
        "ntt/conf/main.yaml",
        "ntt/conf/dataset/synthetic.yaml",
        "ntt/experiments/study/coco.yaml",
    } <= expected
    assert sorted(expected - names) == []


def test_installed_run_from_another_folder(venv, smoke_out):
    (metrics,) = smoke_out.glob("synthetic/*/2shot_seed33/smoke-*/metrics.json")
    m = json.loads(metrics.read_text())
    assert m["num_images"] == 1 and m["failed_images"] == [] and "bbox" in m and m["study"] == "adhoc"
    assert list(venv.work.iterdir()) == []  # nothing lands in the working directory


def test_installed_study_of_a_2x2_sweep(venv, smoke_out):
    out = venv.tmp / "study"
    dataset = next(smoke_out.glob("datasets/synthetic_*"))  # the images `ntt run` generated: not made twice
    _ntt(venv, "study", *SMOKE, f"paths.output_dir={out}", f"dataset.root={dataset}", "shots=1,2", "seed=1,2")
    runs = sorted(p.parent.parent.name for p in out.glob("synthetic/*/*/smoke-*/metrics.json"))
    assert runs == ["1shot_seed1", "1shot_seed2", "2shot_seed1", "2shot_seed2"]
    assert list(venv.work.iterdir()) == []


@pytest.fixture(scope="module")
def refs_and_images(venv, smoke_out) -> tuple[Path, Path]:
    """`refs/<class>/<name>.png` + `<name>.mask.png` (one reference of two classes, from the synthetic
    train set) and a folder with one synthetic test image."""
    from ntt.data.masks import ann_to_mask

    dataset = next(smoke_out.glob("datasets/synthetic_*"))
    train = json.loads((dataset / "train.json").read_text())
    images = {im["id"]: im for im in train["images"]}
    names = {c["id"]: c["name"] for c in train["categories"]}
    refs = venv.tmp / "refs"
    for cat in sorted({a["category_id"] for a in train["annotations"]})[:2]:
        ann = next(a for a in train["annotations"] if a["category_id"] == cat)
        im = images[ann["image_id"]]
        folder = refs / names[cat]
        folder.mkdir(parents=True)
        stem = f"ann{ann['id']}"
        shutil.copy(dataset / im["file_name"], folder / f"{stem}.png")
        mask = ann_to_mask(ann, im["height"], im["width"])
        Image.fromarray(mask.astype("uint8") * 255).save(folder / f"{stem}.mask.png")
    targets = venv.tmp / "targets"
    targets.mkdir()
    test = json.loads((dataset / "test.json").read_text())
    shutil.copy(dataset / test["images"][0]["file_name"], targets / "target.png")
    return refs, targets


def test_installed_segment_command(venv, refs_and_images):
    refs, targets = refs_and_images
    out = venv.tmp / "segment"
    models = ["--sam2", "tiny_random", "--dinov2", "tiny_random", "--device", "cpu"]
    _ntt(venv, "segment", "--refs", refs, "--images", targets, "--out", out, *models, *GRID)
    dataset = json.loads((out / "dataset.json").read_text())
    assert [c["name"] for c in dataset["categories"]] == sorted(p.name for p in refs.iterdir())
    assert isinstance(json.loads((out / "predictions.json").read_text()), list)
    assert (out / "bank.ntt").is_file() and (out / "overlays" / "target.png").is_file()
    assert list(venv.work.iterdir()) == []


def test_installed_segmenter_api(venv, refs_and_images):
    refs, targets = refs_and_images
    (folder,) = sorted(refs.iterdir())[:1]
    (image,) = [p for p in folder.glob("*.png") if not p.name.endswith(".mask.png")]
    code = f"""
import json, ntt
from ntt import Segmenter
seg = Segmenter.from_config(sam2="tiny_random", dinov2="tiny_random", proposer="cpu_fast", device="cpu",
                            overrides={GRID!r})
seg.add_reference({str(image)!r}, {folder.name!r}, masks={str(image.with_suffix(".mask.png"))!r})
result = seg.predict({str(targets / "target.png")!r})
print(json.dumps({{"file": ntt.__file__, "type": type(result).__name__, "names": result.names}}))
"""
    out = json.loads(_run([venv.python, "-c", code], cwd=venv.work, env=venv.env).strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(venv.tmp)
    assert out["type"] == "Instances" and out["names"] == [folder.name]


def test_installed_experiment_group_without_plus(venv):
    cfg = OmegaConf.create(_ntt(venv, "run", "paper=coco_30shot", "--cfg", "all"))
    assert cfg.hydra.runtime.choices.paper == "coco_30shot" and cfg.hydra.runtime.choices.study is None
    assert cfg.shots == 30 and cfg.seed == 33 and cfg.dataset.name == "coco_fewshot"
    assert cfg.backbone.sam2.name == "sam2_hiera_l" and cfg.backbone.dinov2.name == "dinov2_vitl14"
