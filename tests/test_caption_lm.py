"""A GGUF language model is parsed and de-quantised once: the float32 conversion is cached as a safetensors
folder (with cliplab's marker) and later loads read it, giving the same weights, tokens and base id. A tiny
GGUF written here stands in for the packaged SmolLM2 (a slow test checks that one too)."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from cliplab.caption import model as caption_model  # noqa: E402
from cliplab.caption.model import CONVERTED_MARKER, converted_gguf, load_language_model  # noqa: E402
from cliplab.utils import sha256_file  # noqa: E402

TEXTS = ["the cab, ab.", "a thatch\nthe", "<|im_start|>abc", ""]


def write_tiny_gguf(path):
    """A 2-block random Llama in GGUF (float32) with a byte-pair tokenizer of 36 tokens."""
    rng = np.random.default_rng(0)
    tokens = ["<|endoftext|>", "<|im_start|>", *"abcdefghijklmnopqrstuvwxyz.,", "Ġ", "Ċ", "ab", "Ġa", "th", "the"]
    d, ff, layers = 16, 32, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(d // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["a b", "Ġ a", "t h", "th e"])
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    shapes = {"token_embd": (len(tokens), d), "output_norm": (d,), "output": (len(tokens), d)}
    for i in range(layers):
        shapes.update({f"blk.{i}.{n}": s for n, s in [
            ("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)),
            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]})
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    return write_tiny_gguf(tmp_path / "models" / "tiny.gguf")


def assert_same_lm(first, second):
    (lm1, tok1, base1), (lm2, tok2, base2) = first, second
    assert base1 == base2
    s1, s2 = lm1.state_dict(), lm2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    for text in TEXTS:
        assert tok1(text).input_ids == tok2(text).input_ids, text
        assert tok1.decode(tok1(text).input_ids) == tok2.decode(tok2(text).input_ids)
    assert (tok1.eos_token_id, tok1.pad_token_id, tok1.bos_token_id) == (tok2.eos_token_id, tok2.pad_token_id,
                                                                         tok2.bos_token_id)
    ids = torch.tensor([tok1("the cab").input_ids])
    with torch.no_grad():
        assert torch.equal(lm1(ids).logits, lm2(ids).logits)
    assert lm1.generation_config.eos_token_id == lm2.generation_config.eos_token_id


def test_a_gguf_is_converted_once_and_then_read_from_the_cache(tiny_gguf, monkeypatch):
    first = load_language_model(str(tiny_gguf))
    assert first[2] == sha256_file(tiny_gguf)  # the base id of run folders stays the GGUF's digest
    folder = converted_gguf(tiny_gguf, first[2])
    marker = json.loads((folder / CONVERTED_MARKER).read_text())
    assert marker["gguf_sha256"] == first[2]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left
    assert not list(folder.glob("*.bin")) and list(folder.glob("*.safetensors"))

    calls = []
    real = caption_model._from_pretrained
    monkeypatch.setattr(caption_model, "_from_pretrained", lambda *a, **k: calls.append(k) or real(*a, **k))
    second = load_language_model(str(tiny_gguf))
    assert calls == [{"safetensors_only": True}]  # the cached folder, not the GGUF
    assert_same_lm(first, second)


def test_a_folder_cliplab_did_not_make_is_left_alone(tiny_gguf):
    folder = converted_gguf(tiny_gguf, sha256_file(tiny_gguf))
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="not a conversion cliplab made"):
        lm, tokenizer, _ = load_language_model(str(tiny_gguf))
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert not [p for p in folder.parent.iterdir() if p != folder]  # the temp folder removed
    assert tokenizer("the").input_ids


def test_a_damaged_conversion_of_its_own_is_replaced(tiny_gguf):
    reference = load_language_model(str(tiny_gguf))
    folder = converted_gguf(tiny_gguf, reference[2])
    (folder / CONVERTED_MARKER).write_text("{not json")
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"torn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replaced without complaint
        again = load_language_model(str(tiny_gguf))
    assert json.loads((folder / CONVERTED_MARKER).read_text())["gguf_sha256"] == reference[2]
    assert_same_lm(reference, load_language_model(str(tiny_gguf)))
    assert_same_lm(reference, again)


def test_a_damaged_conversion_with_its_marker_is_converted_again(tiny_gguf):
    reference = load_language_model(str(tiny_gguf))
    folder = converted_gguf(tiny_gguf, reference[2])
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # torn by something outside cliplab
    with pytest.warns(UserWarning, match="converting tiny.gguf again"):
        again = load_language_model(str(tiny_gguf))
    assert_same_lm(reference, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: read without complaint
        assert_same_lm(reference, load_language_model(str(tiny_gguf)))


@pytest.mark.slow
def test_the_packaged_smollm2_loads_the_same_from_its_conversion():
    """The real tokenizer (special tokens, chat template) and weights survive the conversion. Uses the test
    session's cache, so later tests (notebook 04) read the conversion."""
    from cliplab.errors import ConfigError
    from cliplab.models.pretrained import resolve_language_model

    try:
        folder, name = resolve_language_model("smollm2-135m-instruct")
    except ConfigError as exc:
        pytest.skip(str(exc))
    path = Path(folder) / name
    shutil.rmtree(converted_gguf(path, sha256_file(path)), ignore_errors=True)
    first = load_language_model("smollm2-135m-instruct")  # parsed from the GGUF
    second = load_language_model("smollm2-135m-instruct")  # read from the conversion
    assert_same_lm(first, second)
    chat = [{"role": "user", "content": "Describe the photo."}]
    assert first[1].apply_chat_template(chat, tokenize=False) == second[1].apply_chat_template(chat, tokenize=False)
