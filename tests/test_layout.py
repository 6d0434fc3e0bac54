"""The repository layout: the presets live in the top-level ``configs/`` and are installed as the
package ``sparse_unsloth.configs``, by an editable install and by a wheel."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sparse_unsloth
from sparse_unsloth.config import presets_dir

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def test_presets_live_in_the_top_level_configs():
    assert {"llama3-8b-math10k", "llama3-8b-csr", "smollm2-135m", "smollm2-135m-safe"} <= set(PRESETS)
    for folder in ("notebooks", "scripts", "tests", "configs"):
        assert (ROOT / folder).is_dir(), folder
    assert not (ROOT / "sparse_unsloth" / "configs").exists()
    assert sparse_unsloth.preset_names() == PRESETS
    assert presets_dir() == ROOT / "configs"


def test_pyproject_lists_every_package_and_maps_configs():
    tomllib = pytest.importorskip("tomllib")       # Python >= 3.11
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"sparse_unsloth.configs": "configs"}
    inits = (ROOT / "sparse_unsloth").rglob("__init__.py")
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in inits}
    assert set(tool["packages"]) == folders | {"sparse_unsloth.configs"}, "pyproject misses a package folder"
    assert tool["package-data"]["sparse_unsloth.configs"] == ["*.yaml"]


def test_editable_install_maps_configs():
    try:
        dist = importlib.metadata.distribution("sparse_unsloth")
        url = json.loads(dist.read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        url = {}
    if not (url.get("dir_info", {}).get("editable") and url.get("url") == ROOT.as_uri()):
        pytest.skip(f"sparse_unsloth is not installed editable from {ROOT} (pip install -e . does that)")
    spec = importlib.util.find_spec("sparse_unsloth.configs")
    assert [Path(p) for p in spec.submodule_search_locations] == [ROOT / "configs"]


def _source_copy(dest: Path) -> Path:
    # A copy, so that the build's build/ and *.egg-info stay out of the checkout.
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "outputs", "__pycache__",
                                  ".ruff_cache", ".pytest_cache")
    return Path(shutil.copytree(ROOT, dest, ignore=skip))


@pytest.mark.slow
def test_wheel_installs_the_presets(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    src = _source_copy(tmp_path / "src")
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w",
                    str(tmp_path / "whl")], check=True, timeout=300, capture_output=True)
    wheel = next((tmp_path / "whl").glob("sparse_unsloth-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"sparse_unsloth/configs/{name}.yaml" for name in PRESETS} <= names
    assert "sparse_unsloth/data/gsm8k/train.jsonl" in names
    assert not any(name.startswith("configs/") for name in names)       # no top-level "configs" package

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    check = ("import sparse_unsloth as su, json; from sparse_unsloth.config import presets_dir;"
             "print(json.dumps([su.__file__, str(presets_dir()), su.preset_names(),"
             " [su.load_config(n).name for n in su.preset_names()]]))")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", check], check=True, timeout=300, capture_output=True,
                         text=True, cwd=tmp_path, env=env).stdout
    module, folder, names_, loaded = json.loads(out)
    assert Path(module).is_relative_to(site) and Path(folder) == site / "sparse_unsloth" / "configs"
    assert names_ == PRESETS and len(loaded) == len(PRESETS)
