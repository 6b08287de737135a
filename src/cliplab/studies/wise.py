"""WiSE-FT (Wortsman et al. 2022): interpolate the weights of an initial model and its fine-tuned version,
``theta(alpha) = (1 - alpha) * theta_initial + alpha * theta_finetuned``, and evaluate every alpha in domain
(caption retrieval on the fine-tuning data's test split) and out of domain (zero-shot classification of a
labelled set, retrieval on a second caption set): the robustness / accuracy trade-off.

What is mixed: for a two-tower model, the tensors the fine-tuned model saved (heads, temperature, tuned
tower blocks, LoRA adapters); the initial model's value of a tower tensor it did not tune is its
pretrained weight, of an adapter it does not have zero (the identity). For a CLIP, the whole model.

``space="outputs"`` evaluates the output-space ensemble instead (the paper's comparison):
``score(alpha) = (1 - alpha) * cos_initial + alpha * cos_finetuned`` (:mod:`cliplab.models.ensemble`). It
needs no shared architecture, so it also combines ConSE with trained heads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from cliplab import rundir
from cliplab.data.captions import load_caption_dataset
from cliplab.embed.cache import FeatureCache
from cliplab.embed.pipeline import encode_dataset, encode_images
from cliplab.errors import ConfigError
from cliplab.eval.classification import classification_metrics
from cliplab.eval.retrieval import retrieval_metrics
from cliplab.eval.zeroshot import ZeroShotClassifier
from cliplab.models.base import InterpolableModel
from cliplab.models.ensemble import score_ensemble
from cliplab.models.factory import load_model
from cliplab.utils import write_json, write_text

WISE = rundir.WISE


def mixed_keys(initial, finetuned) -> list[str]:
    """The tensors that differ between the two models' definitions (see the module docstring): what the
    fine-tuned model declares (:class:`~cliplab.models.base.InterpolableModel`)."""
    if type(initial) is not type(finetuned):
        raise ConfigError(f"cannot interpolate a {type(initial).__name__} with a {type(finetuned).__name__}")
    if not isinstance(finetuned, InterpolableModel):
        raise ConfigError(f"{type(finetuned).__name__} has no trained weights to interpolate (give two-tower or "
                          "CLIP models, e.g. the initial and the fine-tuned run)")
    return finetuned.interpolation_keys()


def interpolate_state(initial, finetuned, alpha: float) -> dict[str, torch.Tensor]:
    keys = mixed_keys(initial, finetuned)
    a_state, b_state = initial.interpolation_state(), finetuned.interpolation_state()
    out = {}
    for k in keys:
        b = b_state[k]
        if k in a_state:
            a = a_state[k]
            if a.shape != b.shape:
                raise ConfigError(f"cannot interpolate {k}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        elif "lora_" in k:
            a = torch.zeros_like(b)  # the initial model has no adapter: the identity
        else:
            raise ConfigError(f"the initial model has no tensor {k}; interpolate models of one architecture")
        out[k] = (1.0 - alpha) * a.float() + alpha * b.float()
    return out


def model_at(initial, finetuned, alpha: float):
    """A copy of the fine-tuned model with the interpolated tensors (cache keys follow the mix)."""
    model = copy.deepcopy(finetuned)
    model.load_interpolated(interpolate_state(initial, finetuned, alpha), alpha)
    return model.eval()


def interpolate_run(initial_spec: str, finetuned_spec: str, alphas: list[float], *, data: str,
                    split: str = "test", image_root: str | None = None, classify: str | None = None,
                    classify_split: str | None = "test", classify_limit: int | None = 2000,
                    templates: str = "clip80", captions2: str | None = None, captions2_split: str = "all",
                    cache_dir=None, device="cpu", run_dir: str | Path, log=print, plots: bool = False,
                    space: str = "weights") -> dict:
    """Evaluate every alpha (weight or output space); writes ``wise.json`` and ``results.md`` into ``run_dir``."""
    from cliplab.data.labelled import load_labelled

    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ConfigError("alphas must be numbers in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    if space not in ("weights", "outputs"):
        raise ConfigError(f"space must be 'weights' (WiSE-FT) or 'outputs' (score ensemble), not {space!r}")
    rundir.claim_run_folder(run_dir, "wise")  # a folder of the user's is refused before any work
    initial, finetuned = load_model(initial_spec, device=device), load_model(finetuned_spec, device=device)
    keys = mixed_keys(initial, finetuned) if space == "weights" else []
    cache = FeatureCache(cache_dir)
    ds = load_caption_dataset(data, split, image_root=image_root)
    ds2 = load_caption_dataset(captions2, captions2_split) if captions2 else None
    labelled = None
    if classify:
        labelled = load_labelled(classify, split=classify_split)
        if classify_limit and len(labelled) > classify_limit:  # a fixed stratified-by-order subset
            rng = np.random.default_rng(0)
            labelled = labelled.subset(np.sort(rng.choice(len(labelled), classify_limit, replace=False)))
    rows = []
    for alpha in alphas:
        model = model_at(initial, finetuned, alpha) if space == "weights" else \
            score_ensemble([initial, finetuned], [1.0 - alpha, alpha]).to(device).eval()
        row = {"alpha": alpha}
        img, txt, used = encode_dataset(model, ds, cache=cache, device=device, progress=False)
        m = retrieval_metrics(img, txt, used.caption_image).metrics
        row.update({"in_t2i_r1": m["t2i_r1"], "in_i2t_r1": m["i2t_r1"], "in_rsum": m["rsum"]})
        if ds2 is not None:
            img, txt, used = encode_dataset(model, ds2, cache=cache, device=device, progress=False)
            m = retrieval_metrics(img, txt, used.caption_image).metrics
            row.update({"ood_t2i_r1": m["t2i_r1"], "ood_i2t_r1": m["i2t_r1"], "ood_rsum": m["rsum"]})
        if labelled is not None:
            emb = encode_images(model, labelled.images, cache=cache, device=device, progress=False)
            scores = ZeroShotClassifier(model, labelled.class_names, templates).scores(emb).cpu().numpy()
            row["ood_zeroshot_acc"] = classification_metrics(labelled.labels, scores, labelled.class_names)["accuracy"]
        rows.append(row)
        log("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    result = {"initial": initial_spec, "finetuned": finetuned_spec, "space": space, "mixed_tensors": len(keys),
              "mixed_examples": keys[:8], "in_domain": f"{data} ({split})",
              "ood_caption_set": f"{captions2} ({captions2_split})" if captions2 else None,
              "ood_classification": f"{classify} ({classify_split}, {len(labelled)} images, {templates} prompts)"
              if labelled is not None else None, "rows": rows, "provenance": rundir.provenance()}
    run_dir = Path(run_dir)  # claimed before the work
    write_json(run_dir / WISE, result)
    write_text(run_dir / rundir.RESULTS_MD, wise_markdown(result))
    if plots:
        from cliplab.viz.curves import tradeoff_curve

        tradeoff_curve(rows, rundir.plot_file(run_dir, "wise_tradeoff"),
                       title=f"{_title(space)}: {Path(initial_spec).name} → {Path(finetuned_spec).name}")
    return result


def _title(space: str) -> str:
    return "WiSE-FT" if space == "weights" else "Output ensemble"


def wise_markdown(result: dict) -> str:
    cols = [c for c in ("in_t2i_r1", "in_i2t_r1", "ood_t2i_r1", "ood_i2t_r1", "ood_zeroshot_acc")
            if c in result["rows"][0]]
    head = {"in_t2i_r1": "in-domain T→I R@1", "in_i2t_r1": "in-domain I→T R@1", "ood_t2i_r1": "2nd caption set T→I R@1",
            "ood_i2t_r1": "2nd caption set I→T R@1", "ood_zeroshot_acc": "zero-shot accuracy"}
    space = result.get("space", "weights")  # wise.json files written before output ensembles have none
    how = "weights mixed" if space == "weights" else "scores (1 - alpha) * A + alpha * B"
    lines = [f"### {_title(space)}: {result['initial']} (alpha 0) → {result['finetuned']} "
             f"(alpha 1), {how}", "",
             "| alpha | " + " | ".join(head[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + f"{r['alpha']:.2f} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for r in result["rows"]]
    extra = [f"in domain: {result['in_domain']}"] + ([f"out of domain: {result['ood_caption_set']}"]
                                                       if result["ood_caption_set"] else []) + \
        ([f"zero-shot: {result['ood_classification']}"] if result["ood_classification"] else [])
    return "\n".join(lines + ["", "; ".join(extra) + ".", ""])
