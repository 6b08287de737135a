"""The one config loader (cliplab.config): types coerced, choices and minimums checked, unknown keys refused,
``section.field`` named in every error; every packaged config loads through it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cliplab.config import check_section, load_section, setting
from cliplab.errors import ConfigError


@dataclass
class Inner:
    size: int = setting(2, min=1)


@dataclass
class Section:
    count: int = setting(1, min=0)
    rate: float = setting(0.5, above=0)
    mode: str = setting("a", choices=("a", "b"))
    flag: bool = True
    name: str = "x"
    limit: int | None = None
    tags: list[str] = field(default_factory=list)
    mean: tuple[float, float] | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        check_section(self, "demo")


def test_values_are_coerced_to_the_field_types():
    s = load_section(Section, {"count": "3", "rate": "1e-5", "flag": "false", "name": 2014, "limit": 7.0,
                               "tags": ["p", 3], "mean": [1, 2], "inner": {"size": "4"}}, "demo")
    assert (s.count, s.rate, s.flag, s.name, s.limit) == (3, 1e-5, False, "2014", 7)
    assert type(s.count) is int and type(s.rate) is float and type(s.limit) is int
    assert s.tags == ["p", "3"] and s.mean == (1.0, 2.0) and s.inner == Inner(4)
    assert load_section(Section, None, "demo") == Section()
    assert load_section(Section, {"limit": None}, "demo").limit is None
    assert Section(count="5").count == 5  # built in Python: the same coercion and checks


@pytest.mark.parametrize("values,message", [
    ({"bogus": 1, "count": 2}, r"unknown keys in demo: demo.bogus \(valid: count, rate, mode, flag, name, limit"),
    ({"mode": "c"}, "demo.mode must be one of a, b, not 'c'"),
    ({"count": -1}, "demo.count must be >= 0, not -1"),
    ({"rate": 0}, "demo.rate must be > 0, not 0.0"),
    ({"count": "many"}, "demo.count: expected an integer, got 'many'"),
    ({"count": 1.5}, "demo.count: expected an integer, got 1.5"),
    ({"count": True}, "demo.count: expected an integer, got True"),
    ({"rate": "fast"}, "demo.rate: expected a number, got 'fast'"),
    ({"flag": "maybe"}, "demo.flag: expected true or false, got 'maybe'"),
    ({"name": ["a"]}, r"demo.name: expected a string, got \['a'\]"),
    ({"tags": "p"}, "demo.tags: expected a list, got 'p'"),
    ({"mean": [1, 2, 3]}, r"demo.mean: expected 2 values, got 3"),
    ({"inner": {"size": 0}}, "demo.inner.size must be >= 1, not 0"),
    ({"inner": {"nope": 1}}, r"unknown keys in demo.inner: demo.inner.nope \(valid: size\)"),
    ({"inner": 3}, "demo.inner must be a mapping of settings, not 3"),
])
def test_errors_name_section_and_field(values, message):
    with pytest.raises(ConfigError, match=message):
        load_section(Section, values, "demo")


def test_required_settings_and_whole_files():
    @dataclass
    class Needs:
        source: str

    with pytest.raises(ConfigError, match="model.source: required, not given"):
        load_section(Needs, {}, "model")
    with pytest.raises(ConfigError, match=r"unknown config sections: nope \(valid: count"):
        load_section(Section, {"nope": {}}, "")
    with pytest.raises(ConfigError, match="a config must be a mapping"):
        load_section(Section, ["count"], "")


def test_every_packaged_config_loads_and_round_trips():
    from cliplab.caption.train import CaptionRunConfig
    from cliplab.configs import packaged_configs
    from cliplab.train.config import RunConfig
    from cliplab.train.sweep import load_sweep

    names = packaged_configs()
    kinds = {"sweep": 0, "caption": 0, "run": 0}
    for name, path in names.items():
        if name.startswith("sweep"):
            base, grid, fixed, kind = load_sweep(path)
            assert grid and kind in ("grid", "vary") and base.with_overrides(fixed)
            kinds["sweep"] += 1
            continue
        cls = CaptionRunConfig if "caption" in name else RunConfig
        cfg = cls.load(path)
        assert cls.from_dict(cfg.to_dict()) == cfg, name
        kinds["caption" if cls is CaptionRunConfig else "run"] += 1
    assert min(kinds.values()) >= 2, kinds


def test_run_config_sections_use_the_loader():
    from cliplab.train.config import DataConfig, DatasetConfig, RunConfig

    cfg = RunConfig.from_dict({"train": {"epochs": "3", "lr": "2e-4", "amp": "no"}, "data": {"num_workers": "2"},
                               "model": {"head": {"embed_dim": "64"}, "init_temperature": "0.05"}, "baseline": "false"})
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.amp, cfg.data.num_workers) == (3, 2e-4, False, 2)
    assert cfg.model.head.embed_dim == 64 and cfg.model.init_temperature == 0.05 and cfg.baseline is False
    assert issubclass(DataConfig, DatasetConfig)
    with pytest.raises(ConfigError, match=r"unknown keys in train: train.epoch \(valid: epochs"):
        RunConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="model.init_temperature must be > 0"):
        RunConfig.from_dict({"model": {"init_temperature": 0}})
    with pytest.raises(ConfigError, match="train.image_tower.mode must be one of frozen"):
        RunConfig.from_dict({"train": {"image_tower": {"mode": "some"}}})
    with pytest.raises(ConfigError, match="train.text_tower.last_n: expected an integer"):
        RunConfig.from_dict({"train": {"text_tower": {"mode": "last_n", "last_n": "two"}}})
    # runs started before train.evaluator existed record none: their checkpoints still resume
    assert "train.evaluator" not in RunConfig().training_record()


def test_caption_sections_use_the_loader_and_share_the_data_section():
    from cliplab.caption.train import CaptionDataConfig, CaptionRunConfig
    from cliplab.train.config import DatasetConfig

    cfg = CaptionRunConfig.from_dict({"train": {"epochs": "3", "dev_images": "20"}, "decode": {"beam": "5"},
                                      "model": {"grid": "2"}})
    assert (cfg.train.epochs, cfg.train.dev_images, cfg.decode.beam, cfg.model.grid) == (3, 20, 5, 2)
    assert type(cfg.train.epochs) is int and issubclass(CaptionDataConfig, DatasetConfig)
    for values, message in (({"data": {"backend": "tensorrt"}}, "data.backend must be one of auto, torch"),
                            ({"data": {"dev_split": ""}}, "data.dev_split must be a split name"),
                            ({"data": {"on_error": "skip"}}, r"unknown keys in data: data.on_error"),
                            ({"decode": {"beam": 0}}, "decode.beam must be >= 1, not 0"),
                            ({"train": {"sampling": "every"}}, "train.sampling must be one of all_captions"),
                            ({"model": {"tuning": "half"}}, "model.tuning must be one of prefix, lora"),
                            ({"trainer": {}}, r"unknown config sections: trainer \(valid: model, train")):
        with pytest.raises(ConfigError, match=message):
            CaptionRunConfig.from_dict(values)


def test_sweep_files_use_the_loader(tmp_path):
    from cliplab.train.sweep import load_sweep

    (tmp_path / "s.yaml").write_text("grid: {train.lr: [1.0e-4]}\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"s.yaml: unknown keys in sweep: sweep.bogus \(valid: base, set, grid"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("vary: {train.lr: []}\n")
    with pytest.raises(ConfigError, match="sweep.vary must map config keys to non-empty lists"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("set: [1]\ngrid: {train.lr: [1]}\n")
    with pytest.raises(ConfigError, match="sweep.set: expected a mapping"):
        load_sweep(tmp_path / "s.yaml")


def test_the_clip_model_section_uses_the_loader():
    from cliplab.models.clip import CLIPSource
    from cliplab.train.config import RunConfig

    assert RunConfig.from_dict({"model": {"kind": "clip", "source": "clip:ViT-B-32/openai"}}).model.source \
        == "ViT-B-32/openai"
    for model, message in (({"kind": "clip"}, "model.source: required, not given"),
                           ({"kind": "clip", "source": " "}, "model.source must name the CLIP"),
                           ({"kind": "clip", "source": "clip:"}, "model.source must name the CLIP"),
                           ({"kind": "clip", "source": ["a"]}, "model.source: expected a string"),
                           ({"kind": "clip", "source": "x", "head": {}}, r"unknown keys in model: model.head")):
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_dict({"model": model})
    assert CLIPSource.from_dict({"source": "runs/clip-lora"}).to_dict() == {"source": "runs/clip-lora"}
