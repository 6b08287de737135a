"""Captions at index time (``cliplab index --captioner RUN``): the fast greedy decoder against transformers'
``generate``, the one-pass visual tokens against the two passes, and the index: captions stored, shown,
searchable, reused by content hash, resumed from the journal after a kill, dropped on request."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import COLOURS, SHAPES, make_image, tiny_causal_lm

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, towers):
    return tiny_causal_lm(tmp_path_factory.mktemp("lm"), towers[1].tokenizer)


def tiny_captioner(lm: Path, grid_dim: int = 320, pooled_dim: int = 1280, grid: int = 2, eos_boost: float = 4.0):
    """A random captioner whose LM ends captions at varied lengths (its EOS logit scaled up)."""
    from cliplab.caption.model import Captioner, CaptionerConfig

    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(lm=str(lm), grid=grid, mapper_hidden=16), grid_dim, pooled_dim).eval()
    with torch.no_grad():
        model.lm.lm_head.weight[model.tokenizer.eos_token_id] *= eos_boost
    return model


@pytest.fixture(scope="module")
def small_captioner(tiny_lm):
    return tiny_captioner(tiny_lm, 8, 12)


def test_greedy_gives_transformers_greedy_tokens(small_captioner):
    model = small_captioner
    gen = torch.Generator().manual_seed(1)
    grid, pooled = torch.randn(40, 4, 8, generator=gen) * 3, torch.randn(40, 12, generator=gen) * 3
    with torch.inference_mode():  # the first step's best token ends some captions: the one-token minimum matters
        first = model.lm(inputs_embeds=model.prefix(grid, pooled)).logits[:, -1].argmax(-1)
    assert any(int(t) in model.stop_ids() for t in first)
    runs = {}
    for no_repeat in (0, 1, 2, 3):
        fast = runs[no_repeat] = model.greedy(grid, pooled, max_new_tokens=12, no_repeat_ngram=no_repeat)
        assert fast == model.hf_generate(grid, pooled, beam=1, max_new_tokens=12, no_repeat_ngram=no_repeat)
        lengths = {len(x) for x in fast}
        assert min(lengths) >= 1 and len(lengths) > 3 and 12 in lengths  # ended early, at varied steps, and not
        if no_repeat:
            for row in fast:  # no n-gram twice
                grams = [tuple(row[i:i + no_repeat]) for i in range(len(row) - no_repeat + 1)]
                assert len(grams) == len(set(grams))
    assert runs[0] != runs[1]  # the ban changed some captions
    assert model.plain_greedy()
    assert model.generate(grid, pooled, beam=1, max_new_tokens=12) == runs[3]  # generate's greedy is this one


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_bans_match_transformers_processor(n):
    """The bookkeeping of Captioner._block_repeats (updated one token per step) bans what transformers'
    NoRepeatNGramLogitsProcessor bans, on rows that repeat a lot (a vocabulary of 4)."""
    from transformers import NoRepeatNGramLogitsProcessor

    from cliplab.caption.model import Captioner

    rows = torch.randint(0, 4, (6, 14), generator=torch.Generator().manual_seed(n)).tolist()
    seen = [{} for _ in rows]
    fired = 0
    for t in range(1, 15):
        prefix = [r[:t] for r in rows]
        ours = torch.zeros(len(rows), 4)
        Captioner._block_repeats(ours, prefix, seen, n)
        ref = NoRepeatNGramLogitsProcessor(n)(torch.tensor(prefix), torch.zeros(len(rows), 4))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (n, t)
        fired += int(torch.isinf(ours).sum())
    assert fired > 0


def test_lora_merged_for_inference_writes_the_same_captions(tiny_lm):
    from cliplab.caption.model import Captioner, CaptionerConfig
    from cliplab.errors import ConfigError

    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(lm=str(tiny_lm), grid=2, mapper_hidden=16, tuning="lora", lora_r=2), 8, 12)
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapters change the outputs
                param.normal_(0, 0.5)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    grid, pooled = torch.randn(12, 4, 8, generator=gen) * 3, torch.randn(12, 12, generator=gen) * 3
    before = model.greedy(grid, pooled, max_new_tokens=10)
    with torch.inference_mode():
        logits = model.lm(inputs_embeds=model.prefix(grid, pooled)).logits
    model.merge_for_inference()
    with torch.inference_mode():
        merged = model.lm(inputs_embeds=model.prefix(grid, pooled)).logits
    assert not any("lora_" in n and not getattr(m, "merged", True) for n, m in model.lm.named_modules())
    torch.testing.assert_close(merged, logits, rtol=1e-4, atol=1e-4)
    assert model.greedy(grid, pooled, max_new_tokens=10) == before
    with pytest.raises(ConfigError, match="merged"):
        model.save(Path("unused"))


def test_generation_config_extras_go_through_transformers(small_captioner, monkeypatch):
    model = small_captioner
    calls = []
    monkeypatch.setattr(model, "greedy", lambda *a, **k: calls.append("fast") or [[1]])
    monkeypatch.setattr(model, "hf_generate", lambda *a, **k: calls.append("hf") or [[2]])
    grid, pooled = torch.zeros(1, 4, 8), torch.zeros(1, 12)
    model.generate(grid, pooled, beam=1)
    monkeypatch.setattr(model.lm.generation_config, "repetition_penalty", 1.3)
    assert not model.plain_greedy()
    model.generate(grid, pooled, beam=1)
    assert calls == ["fast", "hf"]


def test_greedy_stops_at_a_line_break_token(small_captioner):
    model = small_captioner
    gen = torch.Generator().manual_seed(2)
    grid, pooled = torch.randn(16, 4, 8, generator=gen) * 3, torch.randn(16, 12, generator=gen) * 3
    first = model.greedy(grid, pooled, max_new_tokens=8)
    row = next(r for r in first if len(r) >= 3 and r[0] != r[1])
    stop = row[1]  # pretend the second token of a caption holds a line break
    stops = model.stop_ids()
    model._stop_ids = stops | {stop}
    try:
        again = model.greedy(grid, pooled, max_new_tokens=8)
        assert row[:1] in again and all(stop not in r for r in again)
        assert again == model.hf_generate(grid, pooled, beam=1, max_new_tokens=8)
    finally:
        model._stop_ids = stops


def test_visual_tokens_in_one_pass_equal_the_two_passes(towers):
    from cliplab.caption.visual import GridTower, VisualTokenTower

    image = towers[0]
    x = torch.randn(3, 3, 96, 96)
    one = VisualTokenTower(image, 2)
    with torch.inference_mode():
        out = one(x)
        cells = GridTower(image, 2)(x)
        pooled = image(x)
    assert out.shape == (3, one.output_dim) and one.output_dim == cells.shape[1] + pooled.shape[1]
    torch.testing.assert_close(out[:, :cells.shape[1]], cells, rtol=0, atol=0)
    torch.testing.assert_close(out[:, cells.shape[1]:], pooled, rtol=1e-5, atol=1e-6)
    assert one.fingerprint() != GridTower(image, 2).fingerprint()


def test_caption_journal_survives_a_torn_line(tmp_path):
    from cliplab.serve.captions import append_journal, read_journal

    journal = tmp_path / "captions.jsonl"
    append_journal(journal, {"a": "a dog", "b": "two cats"})
    with open(journal, "ab") as f:
        f.write('{"key": "c", "caption": "caf\u00e9'.encode("utf-8")[:-1])  # killed mid-write, mid-character
    assert read_journal(journal) == {"a": "a dog", "b": "two cats"}
    append_journal(journal, {"d": "a red ball"})
    assert read_journal(journal) == {"a": "a dog", "b": "two cats", "d": "a red ball"}
    assert read_journal(tmp_path / "missing.jsonl") == {}


@pytest.fixture(scope="module")
def captioner_run(tiny_lm, tmp_path_factory):
    run = tmp_path_factory.mktemp("caption-run")
    tiny_captioner(tiny_lm).save(run)
    return run


def photos(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (c, s) in enumerate([(c, s) for c in COLOURS for s in SHAPES][:n]):
        make_image(root / f"{c}_{s}.jpg", c, s, seed=i)
    return root


def items(index: Path) -> dict[str, dict]:
    from cliplab.serve.index import PhotoIndex

    return {it["path"]: it for it in PhotoIndex(index).all_items().values()}


@pytest.mark.slow
def test_index_writes_stores_and_searches_generated_captions(captioner_run, tmp_path, cli, monkeypatch):
    from cliplab.caption.files import caption_files
    from cliplab.serve import captions as captions_module
    from cliplab.serve.index import IndexBuilder, PhotoIndex

    folder = photos(tmp_path / "photos")
    shutil.copy(folder / "red_circle.jpg", folder / "same_bytes.jpg")  # one content, two files
    index = tmp_path / "index"
    calls = []
    original = captions_module.PhotoCaptioner._caption_files
    monkeypatch.setattr(captions_module.PhotoCaptioner, "_caption_files",
                        lambda self, paths, *a: calls.append(len(paths)) or original(self, paths, *a))
    report = IndexBuilder(index, "conse", captioner=captioner_run, log=lambda m: None,
                          progress=False).build([folder])
    got = items(index)
    assert report.captioned == 6 and sum(calls) == 6  # seven files, six contents
    assert got["same_bytes.jpg"]["generated"] == got["red_circle.jpg"]["generated"]
    direct = caption_files(captioner_run, [folder / p for p in sorted(got)], beam=1, device="cpu")
    assert {p: it["generated"] for p, it in got.items()} == {Path(f).name: c for f, c in direct.items()}
    assert all(it["generated"] and "\n" not in it["generated"] for it in got.values())

    # searchable as words, in the JSON of `cliplab search` and in the table
    pick = got["blue_square.jpg"]["generated"]
    word = max(pick.replace("#", " ").split(), key=len)
    hits = PhotoIndex(index).keyword_rank(word, 10)
    assert got["blue_square.jpg"]["id"] in {i for _, i in hits}
    res = cli("search", str(index), word, "--mode", "keyword", "--json")
    assert res.returncode == 0, res.stderr
    assert {h["path"]: h["generated"] for h in json.loads(res.stdout)}["blue_square.jpg"] == pick

    # an update keeps the captions of unchanged photos and writes only the new one's
    make_image(folder / "new_one.jpg", "green", "circle", seed=99)
    calls.clear()
    report = IndexBuilder(index, log=lambda m: None, progress=False).build([folder])
    got_new = items(index)["new_one.jpg"]["generated"]
    assert report.captioned == 1 and calls == [1] and got_new
    assert PhotoIndex(index).info["captioner"] == str(captioner_run.resolve())

    # --captioner none drops them; a gone captioner is a one-line error naming the way out
    IndexBuilder(index, captioner="none", log=lambda m: None, progress=False).build([folder])
    assert all(it["generated"] is None for it in items(index).values())
    assert PhotoIndex(index).info["captioner"] is None
    from cliplab.errors import ConfigError

    with pytest.raises(ConfigError, match="not a caption run"):
        IndexBuilder(tmp_path / "index2", captioner=tmp_path / "nowhere")
    moved = tmp_path / "moved-run"
    shutil.copytree(captioner_run, moved)
    IndexBuilder(index, captioner=moved, log=lambda m: None, progress=False).build([folder])
    calls.clear()
    report = IndexBuilder(index, "conse", rebuild=True, log=lambda m: None, progress=False).build([folder])
    assert report.captioned == 0 and calls == []  # a rebuild re-embeds, but the captions depend on the bytes only
    assert items(index)["new_one.jpg"]["generated"] == got_new
    shutil.rmtree(moved)
    with pytest.raises(ConfigError, match="is gone.*--captioner none"):
        IndexBuilder(index, log=lambda m: None, progress=False)


@pytest.mark.slow
def test_a_killed_captioning_build_resumes_from_its_journal(captioner_run, tmp_path, monkeypatch):
    from cliplab.serve import captions as captions_module
    from cliplab.serve.index import CURRENT, IndexBuilder

    folder = photos(tmp_path / "photos", n=6)
    index = tmp_path / "index"
    original = captions_module.PhotoCaptioner._caption_files
    seen = []

    def die_on_second_chunk(self, paths, *a):
        seen.append(len(paths))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, paths, *a)

    monkeypatch.setattr(captions_module.PhotoCaptioner, "_caption_files", die_on_second_chunk)
    builder = IndexBuilder(index, "conse", captioner=captioner_run, log=lambda m: None, progress=False)
    real_captions = captions_module.PhotoCaptioner.captions
    monkeypatch.setattr(captions_module.PhotoCaptioner, "captions",
                        lambda self, *a, **kw: real_captions(self, *a, **{**kw, "chunk": 4}))
    with pytest.raises(KeyboardInterrupt):
        builder.build([folder])
    assert not (index / CURRENT).exists()  # nothing committed
    journal = next((index / "cliplab-work").glob("captions-*.jsonl"))
    assert len(journal.read_text().splitlines()) == 4  # the first chunk's captions, durable

    monkeypatch.setattr(captions_module.PhotoCaptioner, "_caption_files",
                        lambda self, paths, *a: seen.append(len(paths)) or original(self, paths, *a))
    seen.clear()
    report = IndexBuilder(index, "conse", captioner=captioner_run, log=lambda m: None, progress=False).build([folder])
    assert seen == [2] and report.captioned == 6  # only the two the killed build had not written
    fresh = tmp_path / "fresh"
    IndexBuilder(fresh, "conse", captioner=captioner_run, log=lambda m: None, progress=False).build([folder])
    assert {p: it["generated"] for p, it in items(index).items()} == \
        {p: it["generated"] for p, it in items(fresh).items()}
    assert not (index / "cliplab-work").exists()
    assert np.all([it["generated"] for it in items(index).values()])


@pytest.mark.browser
def test_generated_captions_on_the_page_in_chromium(captioner_run, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from cliplab.serve.app import ServerSettings, create_app
    from cliplab.serve.index import IndexBuilder
    from tests.conftest import live_server, open_page

    folder = photos(tmp_path / "photos", n=4)
    index = tmp_path / "index"
    IndexBuilder(index, "conse", captioner=captioner_run, log=lambda m: None, progress=False).build([folder])
    written = {it["path"]: it["generated"] for it in items(index).values()}
    app = create_app(ServerSettings(index, thumb_dir=tmp_path / "thumbs"))
    errors = []
    with live_server(app) as base, sync_playwright() as p:
        browser, page = open_page(p, 1100, 800, errors)
        page.goto(base + "/")
        page.locator("#q").fill("a red circle")
        page.keyboard.press("Enter")
        expect(page.locator(".tile")).to_have_count(4)
        expect(page.locator(".tile .caption.generated")).to_have_count(4)
        shown = page.evaluate("Array.from(document.querySelectorAll('.tile')).map(t => "
                              "[t.querySelector('img').alt, t.querySelector('.caption').textContent])")
        assert sorted(text for _, text in shown) == sorted(written.values())
        assert all(alt == text for alt, text in shown)  # the generated caption is the image's text too
        page.locator(".tile .open").first.click()
        expect(page.locator("#lbcap")).to_contain_text(shown[0][1])
        browser.close()
    assert errors == []


@pytest.mark.slow
def test_an_index_written_before_generated_captions_still_serves_and_updates(captioner_run, tmp_path):
    import sqlite3

    from fastapi.testclient import TestClient

    from cliplab.serve.app import ServerSettings, create_app
    from cliplab.serve.index import CURRENT, IndexBuilder, PhotoIndex

    folder = photos(tmp_path / "photos", n=3)
    index = tmp_path / "index"
    IndexBuilder(index, "conse", log=lambda m: None, progress=False).build([folder])
    db = index / json.loads((index / CURRENT).read_text())["db"]
    with sqlite3.connect(db) as con:  # as the previous release wrote it
        con.execute("ALTER TABLE items DROP COLUMN generated")
    assert all(it["generated"] is None for it in items(index).values())
    client = TestClient(create_app(ServerSettings(index, thumb_dir=tmp_path / "thumbs")), base_url="http://localhost")
    res = client.get("/api/search", params={"q": "a red circle", "k": 3})
    assert res.status_code == 200 and [h["generated"] for h in res.json()["results"]] == [None] * 3
    res = client.post("/knn-service", json={"text": "a red circle", "num_images": 2})
    assert res.status_code == 200 and len(res.json()) == 2
    report = IndexBuilder(index, captioner=captioner_run, log=lambda m: None, progress=False).build([folder])
    assert report.captioned == 3 and report.embedded == 0
    assert all(it["generated"] for it in items(index).values()) and PhotoIndex(index).info["captioner"]
