"""Int8 captioning (``cliplab index --caption-precision``): SmoothQuant's migration is exact in float, the
calibration maxima equal an independent measurement, the quantised LM stays close to the float one, what it
refuses, and the index: auto picks int8 on CPU when the run's training images are there, keeps its calibration
once per captioner, and never mixes the captions of two precisions."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_causal_lm
from tests.test_index_captions import photos, tiny_captioner

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, towers):
    return tiny_causal_lm(tmp_path_factory.mktemp("lm"), towers[1].tokenizer)


def features(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 320, generator=g), torch.randn(n, 1280, generator=g)


def logits(model, grid, pooled):
    with torch.inference_mode():
        return model.lm(inputs_embeds=model.prefix(grid, pooled)).logits.float()


def test_smoothing_leaves_the_float_model_unchanged(tiny_lm):
    from cliplab.caption.quantize import activation_maxima, smooth

    model = tiny_captioner(tiny_lm)
    grid, pooled = features()
    before = logits(model, grid, pooled)
    maxima = activation_maxima(model, grid, pooled, max_new_tokens=5)
    norm = model.lm.model.layers[0].input_layernorm.weight.clone()
    smooth(model.lm, maxima, alpha=0.5)
    assert not torch.allclose(norm, model.lm.model.layers[0].input_layernorm.weight)  # it did move the range
    torch.testing.assert_close(logits(model, grid, pooled), before, rtol=1e-4, atol=1e-4)


def test_calibration_maxima_equal_an_independent_measurement(tiny_lm):
    """The maxima entering q_proj / gate_proj / down_proj, measured at the norms' and the MLP's outputs."""
    from cliplab.caption.quantize import activation_maxima, maxima_keys

    model = tiny_captioner(tiny_lm)
    grid, pooled = features()
    seen: dict[str, torch.Tensor] = {}

    def keep(name, fn=lambda out: out):
        def hook(_m, _inp, out):
            x = fn(out).detach().reshape(-1, fn(out).shape[-1]).abs().amax(0)
            seen[name] = torch.maximum(seen[name], x) if name in seen else x
        return hook

    hooks = []
    for i, layer in enumerate(model.lm.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(keep(f"{i}.self_attn.q_proj")))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(keep(f"{i}.mlp.gate_proj")))
        mlp = layer.mlp
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            keep(f"{i}.mlp.down_proj", lambda out, mlp=mlp: mlp.act_fn(mlp.gate_proj(out)) * mlp.up_proj(out))))
    maxima = activation_maxima(model, grid, pooled, max_new_tokens=5)
    for h in hooks:
        h.remove()
    assert set(maxima) == set(seen) == maxima_keys(model.lm) and len(maxima) == 3 * len(model.lm.model.layers)
    for name in maxima:
        torch.testing.assert_close(maxima[name], seen[name].float())


def test_row_int8_linear_equals_integer_arithmetic():
    """Each output row is the integer product of that row's 7-bit activations (scaled to its own largest value)
    and the per-channel int8 weights, dequantised, plus the bias: checked against that computation written out."""
    from cliplab.caption.quantize import RowInt8Linear

    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(24, 10)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(10, 24, generator=g) * torch.linspace(0.1, 3, 10)[:, None])
    x = torch.randn(2, 5, 24, generator=g) * torch.logspace(-2, 2, 5)[:, None]  # rows of very different ranges
    layer = RowInt8Linear(linear)
    step = x.abs().amax(-1, keepdim=True) / 63
    xq = torch.round(x / step)
    w_step = linear.weight.detach().abs().amax(1) / 127
    wq = torch.round(linear.weight.detach() / w_step[:, None])
    expected = (xq.double() @ wq.double().T) * step.double() * w_step.double() + linear.bias.detach().double()
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (2, 5, 10) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, linear(x).detach(), rtol=0.05, atol=0.05 * float(linear(x).detach().abs().max()))


def test_int8_layers_replace_every_linear_and_stay_close(tiny_lm):
    from cliplab.caption.quantize import RowInt8Linear, activation_maxima, quantize_int8

    model = tiny_captioner(tiny_lm).merge_for_inference()
    grid, pooled = features(16)
    before = logits(model, grid, pooled)
    quantize_int8(model, activation_maxima(model, grid, pooled, max_new_tokens=5))
    assert not [n for n, m in model.lm.named_modules() if type(m) is torch.nn.Linear]
    assert isinstance(model.lm.get_output_embeddings(), RowInt8Linear)
    after = logits(model, grid, pooled)
    cos = torch.nn.functional.cosine_similarity(after.flatten(1), before.flatten(1))
    assert cos.min() > 0.99
    assert model.int8 and model.greedy(grid, pooled, max_new_tokens=4)  # it decodes
    from cliplab.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be saved"):
        model.save("/nonexistent")


def test_a_row_int8_product_does_not_depend_on_the_other_rows():
    """A row's output is bit for bit the same alone and beside a row 1,000x larger; with one activation scale per
    call (PyTorch's dynamic int8 layer, the scheme this replaced) it is not."""
    import warnings

    from cliplab.caption.quantize import RowInt8Linear

    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(6, 64, generator=g)
    loud = torch.cat([x[:1] * 1000, x[1:]])
    with torch.inference_mode():
        layer = RowInt8Linear(linear)
        assert torch.equal(layer(loud)[1:], layer(x[1:]))
        assert torch.equal(layer(loud)[3], layer(x[3:4])[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_call = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                              dtype=torch.qint8)
        assert not torch.allclose(per_call(loud)[1:], per_call(x[1:]), atol=1e-3)


def test_an_int8_caption_is_the_same_alone_in_a_batch_or_with_the_prefill_sliced(tiny_lm, monkeypatch):
    from cliplab.caption import model as caption_model
    from cliplab.caption.quantize import activation_maxima, quantize_int8

    model = tiny_captioner(tiny_lm).merge_for_inference()
    grid, pooled = features(12, seed=5)
    quantize_int8(model, activation_maxima(model, grid[:6], pooled[:6], max_new_tokens=5))
    together = logits(model, grid, pooled)
    for i in (1, 7):
        torch.testing.assert_close(logits(model, grid[i:i + 1], pooled[i:i + 1])[0], together[i], rtol=0, atol=1e-5)
    tokens = model.greedy(grid, pooled, max_new_tokens=6)
    assert [model.greedy(grid[i:i + 1], pooled[i:i + 1], max_new_tokens=6)[0] for i in range(12)] == tokens
    monkeypatch.setattr(caption_model, "PREFILL_ROWS", 2 * model.prefix(grid[:1], pooled[:1]).shape[1])
    assert model.greedy(grid, pooled, max_new_tokens=6) == tokens
    assert model.greedy(grid[:0], pooled[:0]) == []


def test_int8_of_a_merged_lora_captioner_and_a_tied_head(tiny_lm):
    """The production path: LoRA folded in, the wrappers' base layers become int8 (the unused adapter matrices
    stay); a head tied to the embedding becomes int8 while the embedding stays float and unchanged."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from cliplab.caption.model import Captioner, CaptionerConfig
    from cliplab.caption.quantize import RowInt8Linear, activation_maxima, maxima_keys, quantize_int8

    lora = Captioner(CaptionerConfig(lm=str(tiny_lm), grid=2, mapper_hidden=16, tuning="lora", lora_r=2), 320, 1280)
    with torch.no_grad():
        for name, p in lora.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: merging changes the base weights
    lora.eval().merge_for_inference()
    grid, pooled = torch.randn(5, 4, 320), torch.randn(5, 1280)
    before = logits(lora, grid, pooled)
    quantize_int8(lora, activation_maxima(lora, grid, pooled, max_new_tokens=4))
    wrapped = [m for n, m in lora.lm.named_modules() if hasattr(m, "base_layer")]
    assert wrapped and all(isinstance(m.base_layer, RowInt8Linear) for m in wrapped)
    left = {n for n, m in lora.lm.named_modules() if type(m) is torch.nn.Linear}
    assert left and all(".lora_A." in n or ".lora_B." in n for n in left)
    cos = torch.nn.functional.cosine_similarity(logits(lora, grid, pooled).flatten(1), before.flatten(1))
    assert cos.min() > 0.99

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    embedding = lm.model.embed_tokens.weight.detach().clone()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        before = lm(inputs_embeds=x).logits
    maxima = {k: torch.rand(48 if "down" in k else 32) + 0.5 for k in maxima_keys(lm)}
    quantize_int8(SimpleNamespace(lm=lm), maxima)
    assert isinstance(lm.lm_head, RowInt8Linear) and not lm.config.tie_word_embeddings
    assert torch.equal(lm.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        after = lm(inputs_embeds=x).logits
    assert torch.nn.functional.cosine_similarity(after.flatten(1), before.flatten(1)).min() > 0.99


def engine_without_fbgemm() -> str:
    """A quantized engine of this PyTorch build without fbgemm's kernels (qnnpack: ARM's), or skip."""
    other = [e for e in torch.backends.quantized.supported_engines if e not in ("x86", "fbgemm", "none")]
    if not other:
        pytest.skip("this PyTorch build has only fbgemm-based quantized engines")
    return other[0]


def test_int8_is_refused_where_fbgemm_kernels_are_not(tiny_lm, monkeypatch):
    """On ARM (qnnpack) or onednn the int8 product has no kernel: a ConfigError before the LM is touched (so
    ``--caption-precision auto`` falls back to float32), not a crash at the first photo."""
    from cliplab.caption.quantize import activation_maxima, quantize_int8
    from cliplab.errors import ConfigError

    model = tiny_captioner(tiny_lm).merge_for_inference()
    grid, pooled = features()
    maxima = activation_maxima(model, grid, pooled, max_new_tokens=3)
    before = logits(model, grid, pooled)
    monkeypatch.setattr(torch.backends.quantized, "engine", engine_without_fbgemm())
    with pytest.raises(ConfigError, match="fbgemm"):
        quantize_int8(model, maxima)
    torch.testing.assert_close(logits(model, grid, pooled), before, rtol=0, atol=0)


def test_without_fbgemm_auto_captions_in_float32_without_calibrating(trained_run, tmp_path, monkeypatch):
    from cliplab.errors import ConfigError
    from cliplab.serve.captions import PhotoCaptioner

    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.backends.quantized, "engine", engine_without_fbgemm())
    said = []
    captioner = PhotoCaptioner(trained_run, log=said.append)
    assert captioner.precision == "float32" and not getattr(captioner.model, "int8", False)
    assert len(said) == 1 and "fbgemm" in said[0]
    assert not (tmp_path / "caption-int8").exists()  # refused before the ~20 s calibration, nothing kept
    with pytest.raises(ConfigError, match="fbgemm"):
        PhotoCaptioner(trained_run, precision="int8")


def test_a_sliced_prefill_decodes_as_one_pass(tiny_lm, monkeypatch):
    """On CPU the prefill runs in slices whose caches are joined: the same tokens as one pass (float32)."""
    from cliplab.caption import model as caption_model

    model = tiny_captioner(tiny_lm)
    grid, pooled = features(9, seed=2)
    whole = model.greedy(grid, pooled, max_new_tokens=8)
    width = model.prefix(grid[:1], pooled[:1]).shape[1]
    passes, one_pass = [], model._prefill_pass

    def counted(prefix):
        passes.append(len(prefix))
        return one_pass(prefix)

    monkeypatch.setattr(model, "_prefill_pass", counted)
    for images, slices in ((1, [1] * 9), (4, [4, 4, 1])):
        monkeypatch.setattr(caption_model, "PREFILL_ROWS", images * width)
        passes.clear()
        assert model.greedy(grid, pooled, max_new_tokens=8) == whole
        assert passes == slices


def test_int8_refuses_what_it_cannot_do(tiny_lm, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cliplab.caption.model import Captioner, CaptionerConfig
    from cliplab.caption.quantize import quantize_int8, smoothable
    from cliplab.errors import ConfigError

    lora = Captioner(CaptionerConfig(lm=str(tiny_lm), grid=2, mapper_hidden=16, tuning="lora", lora_r=2), 320, 1280)
    with pytest.raises(ConfigError, match="LoRA"):
        quantize_int8(lora, {})
    lora.merge_for_inference()
    with pytest.raises(ConfigError, match="calibrate again"):  # maxima of another LM's layers
        quantize_int8(lora, {"0.self_attn.q_proj": torch.ones(32)})
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    assert not smoothable(gpt2) and smoothable(lora.lm)
    lora.lm = gpt2
    with pytest.raises(ConfigError, match="Llama-style"):
        quantize_int8(lora, {})


@pytest.fixture(scope="module")
def trained_run(tiny_lm, tmp_path_factory, caption_dir):
    """A caption run folder as ``cliplab caption train`` leaves it: ``config.json`` naming its data + ``best/``."""
    from cliplab.caption.train import CaptionRunConfig

    run = tmp_path_factory.mktemp("int8-run")
    tiny_captioner(tiny_lm).save(run / "best")
    config = CaptionRunConfig.from_dict({"model": {"lm": str(tiny_lm), "grid": 2, "mapper_hidden": 16},
                                         "data": {"path": str(caption_dir / "captions.csv")}})
    (run / "config.json").write_text(json.dumps({"kind": "caption", **config.to_dict()}))
    return run


@pytest.mark.slow
def test_index_captions_in_int8_on_cpu_and_keeps_precisions_apart(trained_run, tiny_lm, tmp_path, monkeypatch,
                                                                   caption_dir):
    from cliplab.caption import quantize
    from cliplab.errors import ConfigError
    from cliplab.serve.captions import CALIBRATION_IMAGES, calibration_images, captioner_id
    from cliplab.serve.index import IndexBuilder, PhotoIndex

    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache"))
    rows = list(csv.DictReader(open(caption_dir / "captions.csv")))
    train = list(dict.fromkeys(r["image"] for r in rows if r["split"] == "train"))
    assert calibration_images(trained_run) == [caption_dir / p for p in train[:CALIBRATION_IMAGES]]

    folder = photos(tmp_path / "photos")
    index = tmp_path / "index"
    quiet = {"log": lambda m: None, "progress": False}
    IndexBuilder(index, "conse", captioner=trained_run, **quiet).build([folder])
    info = PhotoIndex(index).info
    assert info["caption_precision"] == "int8" and info["captioner_id"] == captioner_id(trained_run, "int8")
    assert captioner_id(trained_run, "int8") != captioner_id(trained_run, "float32")
    kept = list((tmp_path / "cache" / "caption-int8").glob("*.safetensors"))
    assert len(kept) == 1
    int8_captions = {p: it["generated"] for p, it in _items(index).items()}
    assert all(int8_captions.values())

    # a later build reads the kept calibration (no decoding of the training images again) and keeps int8
    monkeypatch.setattr(quantize, "activation_maxima", lambda *a, **k: pytest.fail("calibrated twice"))
    from tests.conftest import make_image

    make_image(folder / "later.jpg", "green", "circle", seed=7)
    report = IndexBuilder(index, **quiet).build([folder])
    assert report.captioned == 1 and PhotoIndex(index).info["caption_precision"] == "int8"

    # the training data moved away: the kept calibration is enough for the next update
    hidden = caption_dir.parent / (caption_dir.name + "-away")
    caption_dir.rename(hidden)
    try:
        make_image(folder / "later2.jpg", "red", "square", seed=8)
        report = IndexBuilder(index, **quiet).build([folder])
        assert report.captioned == 1 and PhotoIndex(index).info["caption_precision"] == "int8"
    finally:
        hidden.rename(caption_dir)

    # float32 on request: every caption written again by the float decoder, as `caption generate` writes them
    report = IndexBuilder(index, caption_precision="float32", **quiet).build([folder])
    assert report.captioned == 8 and PhotoIndex(index).info["caption_precision"] == "float32"
    from cliplab.caption.files import caption_files

    got = _items(index)
    direct = caption_files(trained_run, [folder / p for p in sorted(got)], beam=1, device="cpu")
    assert {p: it["generated"] for p, it in got.items()} == {Path(f).name: c for f, c in direct.items()}
    # ... and it stays float32 on the next update without the flag
    assert IndexBuilder(index, **quiet).caption_precision == "float32"

    # int8 asked for where it cannot run: one line naming the reason, before any work
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "empty-cache"))  # nothing kept: calibration needs the data
    moved = tmp_path / "no-data-run"
    shutil.copytree(trained_run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["path"] = str(tmp_path / "gone.csv")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="training data .*gone.csv"):
        IndexBuilder(tmp_path / "i2", "conse", captioner=moved, caption_precision="int8", **quiet).build([folder])
    with pytest.raises(ConfigError, match="caption-precision must be one of"):
        IndexBuilder(tmp_path / "i3", "conse", captioner=moved, caption_precision="int4")
    logs = []
    IndexBuilder(tmp_path / "i4", "conse", captioner=moved, log=logs.append, progress=False).build([folder])
    assert PhotoIndex(tmp_path / "i4").info["caption_precision"] == "float32"
    assert any("captions in float32" in m for m in logs)
    # another captioner on an index does not inherit its precision: auto again
    assert IndexBuilder(tmp_path / "i4", captioner=trained_run, **quiet).caption_precision == "auto"
    assert IndexBuilder(tmp_path / "i4", **quiet).caption_precision == "float32"


def _items(index: Path) -> dict[str, dict]:
    from cliplab.serve.index import PhotoIndex

    return {it["path"]: it for it in PhotoIndex(index).all_items().values()}


def test_a_damaged_or_foreign_calibration_file_is_left_alone(trained_run, tmp_path, monkeypatch):
    from cliplab.serve.captions import PhotoCaptioner, captioner_id

    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path))
    captioner = PhotoCaptioner(trained_run, log=lambda m: None)
    assert captioner.precision == "int8" and captioner.model.int8
    kept = tmp_path / "caption-int8" / f"{captioner.id[:32]}.safetensors"
    assert kept.is_file()  # calibrated when made, before any photo
    good = kept.read_bytes()
    kept.write_bytes(b"a user's file")
    float_captioner = PhotoCaptioner(trained_run, precision="float32")
    with pytest.warns(UserWarning, match="calibrating again"):
        maxima = float_captioner._maxima(captioner_id(trained_run, "int8"), trained_run)
    assert kept.read_bytes() == b"a user's file" and len(maxima) == 3 * len(captioner.model.lm.model.layers)
    kept.unlink()
    again = float_captioner._maxima(captioner_id(trained_run, "int8"), trained_run)
    import safetensors.torch

    assert kept.is_file()  # kept this time: the same maxima (up to the tower's float rounding between passes)
    torch.testing.assert_close(safetensors.torch.load(kept.read_bytes()), safetensors.torch.load(good),
                               rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(again, maxima, rtol=1e-3, atol=1e-5)


def test_smoothing_is_exact_with_grouped_kv_tied_head_and_real_norm_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    from cliplab.caption.quantize import smooth, smoothable

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        before = lm(inputs_embeds=x).logits
    maxima = {f"{i}.{n}": torch.rand(48 if "down" in n else 32) * 50 + 0.1 for i in range(2)
              for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert smoothable(lm)
    smooth(lm, maxima, alpha=0.7)
    with torch.no_grad():
        torch.testing.assert_close(lm(inputs_embeds=x).logits, before, rtol=1e-4, atol=1e-4)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # the tied head is not touched


def test_gemma_blocks_are_not_smoothable_and_a_wrong_smoothing_is_refused(tiny_lm, monkeypatch):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from cliplab.caption import quantize
    from cliplab.errors import ConfigError

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=16))
    assert not quantize.smoothable(gemma)  # norm gain 1 + w, and norms around the MLP
    model = tiny_captioner(tiny_lm)
    grid, pooled = features()
    maxima = quantize.activation_maxima(model, grid, pooled, max_new_tokens=3)
    original = quantize.smooth

    def wrong(lm, maxima, alpha):  # what Gemma's norms would do: the gain not divided as assumed
        original(lm, maxima, alpha)
        lm.model.layers[0].input_layernorm.weight.data.add_(1.0)

    monkeypatch.setattr(quantize, "smooth", wrong)
    with pytest.raises(ConfigError, match="changed .* float outputs"):
        quantize.quantize_int8(model, maxima)
