"""A ClipCap-style captioner: frozen image tower -> visual tokens -> mapping network -> a prefix of embeddings in
a pretrained causal LM's input space (then an optional text prompt) -> the LM writes the caption.

Tuning modes (``tuning``): ``prefix`` (the mapping network only; the LM is frozen), ``lora`` (+ PEFT LoRA on
the LM's attention projections), ``adapter`` (+ bottleneck adapters after each LM block's MLP, zero-initialised
so training starts from the pretrained LM), ``full`` (every LM weight). Only tuned tensors are saved; the LM
and the image tower come back from their weight sources, verified by digest, and reloading is exact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cliplab.config import check_section, setting
from cliplab import rundir
from cliplab.errors import ConfigError
from cliplab.models.checkpoint import check_base_weights, load_checked
from cliplab.models.image_tower import ImageTowerConfig
from cliplab.models.pretrained import DEFAULT_LANGUAGE_MODEL, resolve_language_model
from cliplab.utils import atomic_write, fsync_dir, fsync_file, sha256_file, sha256_text, temp_sibling, write_json

CONFIG_NAME = rundir.CAPTIONER_CONFIG
WEIGHTS_NAME = rundir.CAPTIONER_WEIGHTS
TUNINGS = ("prefix", "lora", "adapter", "full")
MAPPERS = ("mlp", "transformer")
DEFAULT_LORA_TARGETS = (("q_proj", "v_proj"), ("c_attn",))  # Llama/Gemma/OPT-style, GPT-2
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on
# generation settings of an LM's own generation_config that Captioner.greedy does not apply: with any of them
# set, greedy decoding goes through transformers' generate
UNSUPPORTED_GENERATION = ("repetition_penalty", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                          "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "encoder_repetition_penalty",
                          "exponential_decay_length_penalty", "renormalize_logits", "min_length")
PREFILL_ROWS = 2048  # token rows per slice of a CPU prefill (Captioner._prefill)


@dataclass
class CaptionerConfig:
    lm: str = DEFAULT_LANGUAGE_MODEL  # registry name, folder, .gguf file or hub id (e.g. gpt2)
    image: dict = field(default_factory=lambda: ImageTowerConfig().to_dict())
    image_model: str | None = None  # a cliplab model (run/model folder) whose image tower, as tuned there, gives
    #                                 the visual tokens instead of the pretrained tower ``image`` describes
    grid: int = setting(4, min=1)  # visual tokens: grid x grid cells + 1 pooled token
    # mlp (per token, as ClipCap's MLP) | transformer (MLP then a small transformer)
    mapper: str = setting("mlp", choices=MAPPERS)
    mapper_hidden: int = setting(1024, min=1)
    mapper_layers: int = setting(2, min=1)  # transformer mapper depth
    prompt: str = ""  # text after the visual prefix, e.g. "A picture of"
    tuning: str = setting("prefix", choices=TUNINGS)  # prefix | lora | adapter | full
    lora_r: int = setting(8, min=1)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    adapter_dim: int = setting(64, min=1)
    max_caption_tokens: int = setting(40, min=4)

    def __post_init__(self) -> None:
        check_section(self, "model")

    def to_dict(self) -> dict:
        return asdict(self)


class VisualMapper(nn.Module):
    """Grid tokens ``[B, g*g, C]`` + pooled ``[B, D]`` -> ``[B, g*g + 1, d_lm]`` prefix embeddings: a per-token MLP
    (one for grid cells, one for the pooled token) with learned positions, optionally a transformer, then a
    LayerNorm whose gain starts at the LM's typical embedding scale."""

    def __init__(self, grid_dim: int, pooled_dim: int, n_grid: int, d_model: int, kind: str, hidden: int,
                 layers: int, embed_rms: float) -> None:
        super().__init__()
        self.grid_mlp = nn.Sequential(nn.Linear(grid_dim, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.pooled_mlp = nn.Sequential(nn.Linear(pooled_dim, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.position = nn.Parameter(torch.randn(n_grid + 1, d_model) * 0.02)
        self.transformer = None
        if kind == "transformer":
            heads = max(1, d_model // 64)
            layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                               batch_first=True, norm_first=True, activation="gelu")
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        with torch.no_grad():
            self.norm.weight.fill_(embed_rms)

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.grid_mlp(grid), self.pooled_mlp(pooled)[:, None]], dim=1) + self.position
        if self.transformer is not None:
            tokens = self.transformer(tokens)
        return self.norm(tokens)


class BottleneckAdapter(nn.Module):
    """``h + up(gelu(down(h)))`` after a block's MLP (Houlsby et al. 2019); ``up`` starts at zero."""

    def __init__(self, inner: nn.Module, d_model: int, dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.adapter_down = nn.Linear(d_model, dim)
        self.adapter_up = nn.Linear(dim, d_model)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, *args, **kwargs):
        h = self.inner(*args, **kwargs)
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (Llama/Gemma/Qwen ``model.layers``, GPT-2 ``transformer.h``)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = lm
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ConfigError(f"{type(lm).__name__}: cannot find its decoder blocks for adapters")


CONVERTED_MARKER = "cliplab-converted-gguf.json"  # names the GGUF file a converted LM folder was made from


def load_language_model(name: str):
    """``(model, tokenizer, base_id)`` of a causal LM from the registry, a folder/GGUF file or a hub id.

    A GGUF file is parsed and de-quantised once (tens of seconds on a CPU); the float32 result is kept as a
    safetensors folder in ``default_cache_dir()/lm`` and later loads read that (:func:`converted_gguf`). The
    base id of a GGUF model is its file's SHA-256 either way."""
    folder, gguf = resolve_language_model(name)
    if gguf is not None:
        path = Path(folder) / gguf
        digest = sha256_file(path)
        return (*_with_pad_token(*_load_converted_gguf(path, digest, name)), digest)
    lm, tokenizer = _with_pad_token(*_from_pretrained(folder, name))
    path = Path(folder)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    return lm, tokenizer, sha256_file(weights[0]) if weights else sha256_text("hub", name)


def _from_pretrained(folder: str | Path, name: str, gguf_file: str | None = None, safetensors_only: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = {"gguf_file": gguf_file} if gguf_file else {}
    weights = {"use_safetensors": True} if safetensors_only else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **source)
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **source, **weights)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"cannot load language model {name!r}: {str(exc).splitlines()[0]}") from None
    return lm, tokenizer


def _with_pad_token(lm: nn.Module, tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer


def converted_gguf(path: Path, digest: str) -> Path:
    """Where the float32 conversion of the GGUF file ``path`` (SHA-256 ``digest``) is cached."""
    from cliplab.utils import default_cache_dir

    return default_cache_dir() / "lm" / f"{path.stem}-{digest[:16]}"


def _load_converted_gguf(path: Path, digest: str, name: str):
    """The GGUF LM from its cached conversion, converting (and caching) it first when there is none."""
    import warnings

    folder = converted_gguf(path, digest)
    damaged = False
    if _read_marker(folder).get("gguf_sha256") == digest:
        try:
            return _from_pretrained(folder, name, safetensors_only=True)
        except ConfigError as exc:  # damaged after it was written: converted again, replacing it
            warnings.warn(f"{folder}: {exc}; converting {path.name} again", stacklevel=3)
            damaged = True
    from cliplab.extras import require

    require("gguf", "GGUF language models")
    lm, tokenizer = _from_pretrained(path.parent, name, gguf_file=path.name)
    try:
        _save_conversion(lm, tokenizer, folder, {"gguf_sha256": digest, "gguf_file": str(path)}, replace=damaged)
    except OSError as exc:  # a read-only cache costs time, not correctness
        warnings.warn(f"could not cache the converted {path.name} in {folder}: {exc}", stacklevel=3)
    return lm, tokenizer


def _read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / CONVERTED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _save_conversion(lm: nn.Module, tokenizer, folder: Path, marker: dict, replace: bool = False) -> None:
    """Write a converted LM folder atomically: a temp folder filled, fsynced and renamed into place (a folder
    another process finished first is kept unless ``replace``: ours, found damaged); the marker file names its
    source."""
    import shutil

    lm.hf_quantizer = None  # plain float32 tensors now: let transformers save them
    lm.config.__dict__.pop("quantization_config", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder)
    try:
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        for file in tmp.iterdir():
            fsync_file(file)
        fsync_dir(tmp)
        if folder.exists():
            if not replace and _read_marker(folder).get("gguf_sha256") == marker["gguf_sha256"]:
                return  # another process converted it meanwhile
            if not (folder / CONVERTED_MARKER).is_file():
                raise OSError(f"{folder} exists and is not a conversion cliplab made; left alone")
            shutil.rmtree(folder)  # ours (its marker says so) but damaged: replaced
        tmp.rename(folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Captioner(nn.Module):
    def __init__(self, config: CaptionerConfig, grid_dim: int, pooled_dim: int, image_weights: str = "") -> None:
        super().__init__()
        self.config = config
        self.lm, self.tokenizer, self.lm_base = load_language_model(config.lm)
        self.image_weights = image_weights
        d_model = int(self.lm.get_input_embeddings().weight.shape[1])
        with torch.no_grad():
            rms = float(self.lm.get_input_embeddings().weight.float().pow(2).mean().sqrt())
        self.mapper = VisualMapper(grid_dim, pooled_dim, config.grid ** 2, d_model, config.mapper,
                                   config.mapper_hidden, config.mapper_layers, rms)
        self.grid_dim, self.pooled_dim = grid_dim, pooled_dim
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.lora_targets: list[str] = []
        if config.tuning == "lora":
            from cliplab.models.tuning import inject_lora

            self.lora_targets = self._lora_targets()
            inject_lora(self.lm, self.lora_targets, config.lora_r, config.lora_alpha, config.lora_dropout)
            for n, p in self.lm.named_parameters():
                p.requires_grad_("lora_" in n)
        elif config.tuning == "adapter":
            for layer in decoder_layers(self.lm):
                layer.mlp = BottleneckAdapter(layer.mlp, d_model, config.adapter_dim)
        elif config.tuning == "full":
            for p in self.lm.parameters():
                p.requires_grad_(True)
        self.prompt_ids = (self.tokenizer(config.prompt, add_special_tokens=False)["input_ids"]
                           if config.prompt else [])

    def _lora_targets(self) -> list[str]:
        suffix_sets = [tuple(self.config.lora_targets)] if self.config.lora_targets else DEFAULT_LORA_TARGETS
        for suffixes in suffix_sets:
            names = [n for n, m in self.lm.named_modules() if n.split(".")[-1] in suffixes
                     and hasattr(m, "weight") and getattr(m.weight, "ndim", 0) == 2]
            if names:
                return names
        raise ConfigError("no LoRA target layers found in the language model; set model.lora_targets")

    # -- what trains and what is saved
    def trainable_keys(self) -> list[str]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return sorted(k for k in self.state_dict() if k in names or k.startswith("mapper."))

    def parameter_counts(self) -> dict:
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": sum(p.numel() for p in self.parameters() if p.requires_grad), "total": total,
                "mapper": sum(p.numel() for p in self.mapper.parameters())}

    def train(self, mode: bool = True) -> "Captioner":
        super().train(mode)
        if self.config.tuning == "prefix":
            self.lm.eval()  # frozen: no dropout
        return self

    def base_weights(self) -> dict[str, str]:
        return {"lm": self.lm_base, **({"image": self.image_weights} if self.image_weights else {})}

    def save(self, directory: str | Path) -> Path:
        if getattr(self, "_merged", False):
            raise ConfigError("a captioner merged for inference cannot be saved (its LoRA weights are folded in)")
        directory = Path(directory)
        keys = set(self.trainable_keys())
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items() if k in keys}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p)))
        write_json(directory / CONFIG_NAME, {"model_type": "cliplab.Captioner", **self.config.to_dict(),
                                              "grid_dim": self.grid_dim, "pooled_dim": self.pooled_dim,
                                              "base_weights": self.base_weights()})
        return directory

    def load_trained(self, directory: str | Path) -> None:
        directory = Path(directory)
        raw = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        check_base_weights(raw.get("base_weights"), self.base_weights(), str(directory))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(self.mapper.position.device))
        load_checked(self, state, where=str(directory / WEIGHTS_NAME), required=self.trainable_keys())

    @staticmethod
    def folder(directory: str | Path) -> Path:
        """The folder holding a caption run's selected captioner: ``RUN/best``, or ``RUN`` itself (a
        :class:`ConfigError` when neither holds a captioner's config and weights)."""
        directory = Path(directory)
        path = directory / rundir.BEST if (directory / rundir.BEST / CONFIG_NAME).is_file() else directory
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ConfigError(f"{directory}: not a captioner (no {CONFIG_NAME} and {WEIGHTS_NAME}); train one with "
                              "`cliplab caption train`")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Captioner":
        path = cls.folder(directory)
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        raw.pop("model_type", None)
        grid_dim, pooled_dim, base = raw.pop("grid_dim"), raw.pop("pooled_dim"), raw.pop("base_weights", {})
        model = cls(CaptionerConfig(**raw), grid_dim, pooled_dim, image_weights=base.get("image", ""))
        model.load_trained(path)
        return model.eval()

    # -- sequences
    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def prefix(self, grid: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Visual prefix + prompt embeddings ``[B, T_v + P, d]`` (same length for every image)."""
        emb = self.mapper(grid, pooled)
        if self.prompt_ids:
            ids = torch.as_tensor(self.prompt_ids, device=emb.device)[None].expand(len(emb), -1)
            emb = torch.cat([emb, self._embed_ids(ids).to(emb.dtype)], dim=1)
        return emb

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption + EOS, truncated to ``max_caption_tokens``."""
        eos = self.tokenizer.eos_token_id
        out = []
        for text in captions:
            ids = self.tokenizer(" " + text if self.prompt_ids else text, add_special_tokens=False)["input_ids"]
            out.append(ids[: self.config.max_caption_tokens - 1] + [eos])
        return out

    def loss(self, grid: torch.Tensor, pooled: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Teacher-forced cross-entropy on caption tokens only (prefix, prompt and padding are masked)."""
        ids = self.caption_ids(captions)
        prefix = self.prefix(grid, pooled)
        b, p = prefix.shape[:2]
        width = max(len(x) for x in ids)
        tok = torch.full((b, width), self.tokenizer.pad_token_id, dtype=torch.long, device=prefix.device)
        labels = torch.full((b, width), -100, dtype=torch.long, device=prefix.device)
        mask = torch.zeros((b, p + width), dtype=torch.long, device=prefix.device)
        mask[:, :p] = 1
        for i, x in enumerate(ids):
            tok[i, : len(x)] = torch.as_tensor(x, device=prefix.device)
            labels[i, : len(x)] = tok[i, : len(x)]
            mask[i, p: p + len(x)] = 1
        embeds = torch.cat([prefix, self._embed_ids(tok).to(prefix.dtype)], dim=1)
        # logits only where a caption token is predicted (positions p-1 .. p+width-2): the LM head over a
        # large vocabulary is a big share of the cost, and the prefix positions have no target
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                         logits_to_keep=width + 1).logits[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.inference_mode()
    def generate(self, grid: torch.Tensor, pooled: torch.Tensor, *, beam: int = 1, max_new_tokens: int = 30,
                 length_penalty: float = 1.0, no_repeat_ngram: int = 3, num_return: int = 1) -> list[list[int]]:
        """Greedy (``beam=1``) or beam search from the visual prefix; returns the new token ids up to EOS:
        ``num_return`` (<= ``beam``) best sequences per image, best first, image after image."""
        if not 1 <= num_return <= beam:
            raise ConfigError(f"num_return must be from 1 to the beam size {beam}, not {num_return}")
        if beam == 1 and self.plain_greedy():
            return self.greedy(grid, pooled, max_new_tokens=max_new_tokens, no_repeat_ngram=no_repeat_ngram)
        return self.hf_generate(grid, pooled, beam=beam, max_new_tokens=max_new_tokens,
                                length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram, num_return=num_return)

    @torch.inference_mode()
    def hf_generate(self, grid: torch.Tensor, pooled: torch.Tensor, *, beam: int = 1, max_new_tokens: int = 30,
                    length_penalty: float = 1.0, no_repeat_ngram: int = 3, num_return: int = 1) -> list[list[int]]:
        """:meth:`generate` through transformers' ``generate`` (beam search; greedy's reference)."""
        prefix = self.prefix(grid, pooled)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        stops = self.stop_ids()
        import warnings

        with warnings.catch_warnings():  # "n-gram constraints apply to new tokens only": what we want here
            warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
            out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   min_new_tokens=1,  # a caption never ends before its first token
                                   num_beams=beam, do_sample=False, length_penalty=length_penalty,
                                   no_repeat_ngram_size=no_repeat_ngram or 0, eos_token_id=sorted(stops),
                                   pad_token_id=self.tokenizer.pad_token_id, early_stopping=beam > 1,
                                   num_return_sequences=num_return)
        pad = self.tokenizer.pad_token_id
        rows = []
        for row in out.tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            rows.append(row[:end] if end is not None else [t for t in row if t != pad])
        return rows

    @torch.inference_mode()
    def greedy(self, grid: torch.Tensor, pooled: torch.Tensor, *, max_new_tokens: int = 30,
               no_repeat_ngram: int = 3) -> list[list[int]]:
        """Batched greedy decoding: the tokens of transformers' greedy ``generate`` (same stops, same n-gram
        blocking, at least one token; equal up to floating-point rounding, as the batch shrinks), faster: a
        caption that has ended leaves the batch, its cached keys and values too, so each step runs only the
        captions still being written (transformers' loop runs every row to the batch's longest caption).
        :meth:`generate` uses it unless the LM's generation config asks for more (:meth:`plain_greedy`)."""
        prefix = self.prefix(grid, pooled)
        if not len(prefix):
            return []
        stops = torch.as_tensor(sorted(self.stop_ids()), device=prefix.device)
        rows: list[list[int]] = [[] for _ in range(len(prefix))]
        seen: list[dict[tuple, set[int]]] = [{} for _ in rows]  # (n-1)-gram -> tokens that followed it
        alive = list(range(len(prefix)))
        logits, cache = self._prefill(prefix)
        for step in range(max_new_tokens):
            scores = logits.float()
            if step == 0:
                scores[:, stops] = float("-inf")  # a caption never ends before its first token
            if no_repeat_ngram:
                self._block_repeats(scores, [rows[r] for r in alive], [seen[r] for r in alive], no_repeat_ngram)
            nxt = scores.argmax(dim=-1)
            ended = torch.isin(nxt, stops)
            for r, token, done in zip(alive, nxt.tolist(), ended.tolist()):
                if not done:
                    rows[r].append(token)
            if bool(ended.all()) or step == max_new_tokens - 1:
                break
            if bool(ended.any()):  # the ended captions leave the batch
                keep = torch.nonzero(~ended).squeeze(1)
                cache.batch_select_indices(keep)
                alive = [alive[i] for i in keep.tolist()]
                nxt = nxt[keep]
            width = prefix.shape[1] + step + 1
            logits = self.lm(input_ids=nxt[:, None], attention_mask=torch.ones((len(alive), width), dtype=torch.long,
                             device=prefix.device), past_key_values=cache, use_cache=True).logits[:, -1]
        return rows

    def _prefill(self, prefix: torch.Tensor):
        """The LM over the whole prefix: (last-position logits ``[B, V]``, the KV cache). On CPU in slices of
        about :data:`PREFILL_ROWS` token rows, their caches joined after: a 512-image prefix in one pass makes
        matrices too large for the caches (the prefill, most of the decoding cost, ~15% faster sliced). A cache
        with layers it cannot join (left empty, as with layers that share another's keys and values) is
        recomputed in one pass."""
        from transformers.cache_utils import DynamicLayer

        step = len(prefix) if prefix.device.type != "cpu" else max(1, PREFILL_ROWS // prefix.shape[1])
        parts = [self._prefill_pass(prefix[:step])]
        if step < len(prefix) and not all(type(layer) is DynamicLayer and layer.is_initialized
                                          for layer in parts[0][1].layers):
            return self._prefill_pass(prefix)
        parts += [self._prefill_pass(prefix[s:s + step]) for s in range(step, len(prefix), step)]
        if len(parts) == 1:
            return parts[0]
        from transformers import DynamicCache

        joined, caches = DynamicCache(), [cache for _, cache in parts]
        for i in range(len(caches[0].layers)):
            keys = torch.cat([c.layers[i].keys for c in caches])
            values = torch.cat([c.layers[i].values for c in caches])
            for c in caches:  # the slices' copies go as soon as they are joined
                c.layers[i].reset()
            joined.update(keys, values, i)
        return torch.cat([logits for logits, _ in parts]), joined

    def _prefill_pass(self, prefix: torch.Tensor):
        """One LM pass over ``prefix``: (last-position logits, its new KV cache)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.lm(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long,
                      device=prefix.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache

    def merge_for_inference(self) -> "Captioner":
        """Fold LoRA adapters into the LM's weights (PEFT's ``merge``): the same captions, ~10% faster decoding;
        for a captioner that will only decode (it can no longer be trained or saved as a LoRA run)."""
        for module in self.lm.modules():
            if hasattr(module, "merge") and hasattr(module, "base_layer") and not getattr(module, "merged", True):
                module.merge()
        self._merged = True
        return self

    def plain_greedy(self) -> bool:
        """Whether the LM's generation config sets nothing :meth:`greedy` leaves out (a repetition penalty,
        banned or suppressed tokens, ...); when it does, :meth:`generate` decodes with transformers."""
        config = getattr(self.lm, "generation_config", None)
        if config is None:
            return True
        defaults = type(config)()
        return all(getattr(config, name, None) == getattr(defaults, name, None) for name in UNSUPPORTED_GENERATION)

    @staticmethod
    def _block_repeats(scores: torch.Tensor, rows: list[list[int]], seen: list[dict], n: int) -> None:
        """transformers' ``no_repeat_ngram_size``: a token that would repeat an n-gram of the caption so far is
        banned (``seen`` is updated with each caption's newest n-gram)."""
        for i, (row, grams) in enumerate(zip(rows, seen)):
            if len(row) >= n:
                grams.setdefault(tuple(row[-n:-1]), set()).add(row[-1])
            if len(row) >= n - 1:
                banned = grams.get(tuple(row[len(row) - n + 1:]) if n > 1 else ())
                if banned:
                    scores[i, list(banned)] = float("-inf")

    def stop_ids(self) -> set[int]:
        """Token ids that end a caption: EOS and every token whose text holds a line break (a caption is one
        line; a briefly trained LM otherwise rambles on over several)."""
        if getattr(self, "_stop_ids", None) is None:
            tok = self.tokenizer
            texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)
            breaks = {i for i, text in enumerate(texts) if any(c in text for c in LINE_BREAKS)}
            self._stop_ids = {tok.eos_token_id} | breaks
        return self._stop_ids

    def decode(self, ids: list[int]) -> str:
        """Caption text: special tokens dropped, cut at the first line break and the end of the first sentence."""
        text = (self.tokenizer.decode(ids, skip_special_tokens=True).strip().splitlines() or [""])[0].strip()
        cut = text.find(". ")
        return (text[: cut + 1] if cut >= 0 else text).strip()

    @torch.inference_mode()
    def attention(self, grid: torch.Tensor, pooled: torch.Tensor, ids: list[int],
                  layers: list[int] | None = None, per_layer: bool = False) -> torch.Tensor:
        """For each token of a caption, the attention of the position that generated it to the grid tokens,
        averaged over heads and ``layers`` (default: all): ``[len(ids), grid, grid]``, rows summing to <= 1;
        ``per_layer``: not averaged over layers, ``[layers, len(ids), grid, grid]``."""
        prefix = self.prefix(grid[:1], pooled[:1])
        p = prefix.shape[1]
        tok = torch.as_tensor([ids], device=prefix.device)
        embeds = torch.cat([prefix, self._embed_ids(tok).to(prefix.dtype)], dim=1)
        previous = self.lm.config._attn_implementation
        self.lm.set_attn_implementation("eager")  # fused kernels do not return attention weights
        try:
            out = self.lm(inputs_embeds=embeds, output_attentions=True, use_cache=False)
        finally:
            self.lm.set_attn_implementation(previous)
        chosen = layers if layers is not None else list(range(len(out.attentions)))
        att = torch.stack([out.attentions[i][0] for i in chosen]).float().mean(dim=1)  # [L, T, T]
        g = self.config.grid
        rows = att[:, p - 1: p - 1 + len(ids), : g * g]  # the query before each token produced it
        rows = rows.reshape(len(chosen), len(ids), g, g).cpu()
        return rows if per_layer else rows.mean(dim=0)
