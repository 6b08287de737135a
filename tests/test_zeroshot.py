"""Zero-shot classifier, metrics and probes on synthetic data with known answers."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torch import nn

from cliplab.data.labelled import load_labelled, read_image_folder
from cliplab.embed import FeatureCache
from cliplab.errors import ConfigError, DataError
from cliplab.embed.pipeline import encode_images
from cliplab.eval.classification import classification_metrics, top_k_accuracy
from cliplab.eval.probe import TorchProbeConfig, fit_logistic_probe, fit_torch_probe
from cliplab.eval.zeroshot import ZeroShotClassifier, resolve_templates, zeroshot_experiment
from tests.conftest import COLOURS, make_image

_YELLOW = np.array([0.4, 0.4, 0.0, 1.0]) / np.linalg.norm([0.4, 0.4, 0.0, 1.0])
DIRECTIONS = {"red": [1.0, 0, 0, 0], "green": [0, 1.0, 0, 0], "blue": [0, 0, 1.0, 0], "yellow": _YELLOW.tolist()}
REFERENCE = torch.tensor([COLOURS[c] for c in ("red", "green", "blue", "yellow")], dtype=torch.float32) / 255


class ColourModel(nn.Module):
    """Stub: an image embeds as the fraction of its pixels close to red, green, blue and yellow; a text embeds
    as the unit direction of the colour word it names (yellow overlaps red and green), scaled per class by
    ``text_norms`` (1 for all by default)."""

    def __init__(self, text_norms=None):
        super().__init__()
        self.text_norms = text_norms or {}

    def preprocess(self):
        return T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])

    def encode_image(self, images, normalize=True):
        pixels = images.flatten(2).transpose(1, 2)  # [N, P, 3]
        near = (pixels[:, :, None, :] - REFERENCE[None, None]).abs().amax(-1) < 0.2  # [N, P, 4]
        z = near.float().mean(1)
        return torch.nn.functional.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts, normalize=True):
        out = []
        for t in texts:
            v = torch.zeros(4)
            for word, d in DIRECTIONS.items():
                if word in t.split() or word + "." in t.split():
                    v = v + torch.tensor(d) * self.text_norms.get(word, 1.0)
            out.append(v)
        z = torch.stack(out)
        return torch.nn.functional.normalize(z, dim=-1) if normalize else z

    def fingerprint(self):
        return f"colour-stub-{sorted(self.text_norms.items())}"


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    for c in COLOURS:
        (root / c).mkdir()
        for i in range(6):
            make_image(root / c / f"{i}.png", c, "square" if i % 2 else "circle", seed=i)
    return root


def test_zeroshot_classifies_colours(colour_folder, tmp_path):
    ds = read_image_folder(colour_folder)
    assert ds.class_names == sorted(COLOURS) and len(ds) == 24
    model = ColourModel()
    emb = encode_images(model, ds.images, cache=FeatureCache(tmp_path), progress=False, num_workers=0)
    for templates in ("photo", "clip80", ["a {} thing", "the colour {}"]):
        clf = ZeroShotClassifier(model, ds.class_names, templates)
        pred = clf.predict(emb).numpy()
        assert (pred == ds.labels).all()
        probs = clf.predict_proba(emb)
        assert torch.allclose(probs.sum(-1), torch.ones(len(ds)))
    m = classification_metrics(ds.labels, clf.scores(emb).numpy(), ds.class_names)
    assert m["accuracy"] == 100 and m["macro_f1"] == 100 and np.trace(m["confusion"]) == 24


def test_cosine_and_dot_differ_exactly_when_norms_differ(colour_folder, tmp_path):
    ds = read_image_folder(colour_folder)
    cache = FeatureCache(tmp_path)
    equal = ColourModel()
    emb = encode_images(equal, ds.images, cache=cache, progress=False, num_workers=0)
    emb = emb * torch.linspace(0.2, 5, len(emb))[:, None]  # very different image norms change nothing
    cos = ZeroShotClassifier(equal, ds.class_names, "photo", "cosine")
    dot = ZeroShotClassifier(equal, ds.class_names, "photo", "dot")
    assert torch.equal(cos.predict(emb), dot.predict(emb))
    skewed = ColourModel({"yellow": 4.0})  # one long class vector
    cos = ZeroShotClassifier(skewed, ds.class_names, "photo", "cosine")
    dot = ZeroShotClassifier(skewed, ds.class_names, "photo", "dot")
    assert (cos.predict(emb).numpy() == ds.labels).all()
    differ = (cos.predict(emb) != dot.predict(emb)).numpy()
    assert differ.any()
    assert (dot.predict(emb)[torch.from_numpy(differ)] == ds.class_names.index("yellow")).all()


def test_zeroshot_experiment_and_templates(colour_folder, tmp_path):
    ds = read_image_folder(colour_folder)
    model = ColourModel({"yellow": 2.0})
    emb = encode_images(model, ds.images, cache=FeatureCache(tmp_path), progress=False, num_workers=0)
    out = zeroshot_experiment(model, emb, ds.labels, ds.class_names, variants=("photo", "prefixed", "negated"),
                              top_images=[0, 5])
    assert set(out["results"]) == {f"{v}|{s}" for v in ("photo", "prefixed", "negated") for s in ("cosine", "dot")}
    assert out["results"]["photo|cosine"]["accuracy"] == 100
    assert out["cosine_vs_dot"]["class_norm_max"] == pytest.approx(2.0)
    assert "differ exactly when class norms differ" in out["cosine_vs_dot"]["explanation"]
    top = out["top5"]["images"][0]
    assert top["classes"][0] == top["label"] and len(top["probabilities"]) == 4
    with pytest.raises(ConfigError, match="placeholder"):
        resolve_templates(["no placeholder"])
    assert len(resolve_templates("clip80")) == 80


def test_metrics_against_hand_computed():
    y = np.array([0, 0, 1, 2, 2, 2])
    scores = np.array([[3, 1, 0], [1, 3, 0], [0, 2, 1], [0, 0, 1], [1, 0, 0], [0, 1, 0.5]], dtype=float)
    m = classification_metrics(y, scores, ["a", "b", "c"], ks=(1, 2))
    assert m["accuracy"] == pytest.approx(100 * 3 / 6)
    # class a: P=1/2 R=1/2; b: P=1/3 R=1; c: P=1 R=1/3
    f = [0.5, 2 * (1 / 3) / (4 / 3), 2 * (1 / 3) / (4 / 3)]
    assert m["macro_f1"] == pytest.approx(100 * np.mean(f))
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 1, 1]]
    assert m["top2"] == pytest.approx(100 * 5 / 6)
    assert top_k_accuracy(np.array([0]), np.array([[1.0, 1.0, 1.0]]), 2) == 0.0  # ties against the model


def test_linear_probes_learn_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 20)) * 3
    y = rng.integers(0, 5, 600)
    x = (centres[y] + rng.normal(size=(600, 20))).astype(np.float32) * 7 + 3  # unstandardised on purpose
    yt = rng.integers(0, 5, 300)
    xt = (centres[yt] + rng.normal(size=(300, 20))).astype(np.float32) * 7 + 3
    lr = fit_logistic_probe(x, y, c_grid=(1e-3, 1e-1, 10.0), refine_steps=2)
    assert (lr.scores(xt).argmax(1) == yt).mean() > 0.95
    assert len(lr.search) >= 3 and lr.hyperparameters["C"] > 0
    tp = fit_torch_probe(x, y, TorchProbeConfig(epochs=40, lr=1e-2))
    assert (tp.scores(xt).argmax(1) == yt).mean() > 0.95
    assert tp.val_accuracy > 90


def test_labelled_readers(colour_folder, tmp_path):
    import pickle

    ds = load_labelled(colour_folder)
    assert ds.renamed({"red": "crimson"}).class_names[2] == "crimson"
    with pytest.raises(DataError, match="unknown class"):
        ds.renamed({"purple": "violet"})
    assert len(ds.few_shot(2)) == 8
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,label\n" + "".join(f"{colour_folder}/{c}/0.png,{c}\n" for c in COLOURS))
    assert len(load_labelled(csv_path)) == 4
    csv_path.write_text(f"image,label\n{colour_folder}/red/0.png,purple\n")
    with pytest.raises(DataError, match=r"labels.csv:2: unknown class 'purple'"):
        load_labelled(csv_path, class_names=sorted(COLOURS))
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    pickle.dump({b"label_names": [b"cat", b"dog"]}, open(cifar / "batches.meta", "wb"))
    data = np.random.default_rng(0).integers(0, 255, (4, 3072), dtype=np.uint8)
    pickle.dump({b"data": data, b"labels": [0, 1, 1, 0]}, open(cifar / "test_batch", "wb"))
    c = load_labelled(cifar, split="test")
    assert c.class_names == ["cat", "dog"] and len(c) == 4
    im = np.asarray(c.images.load(1))
    assert im.shape == (32, 32, 3) and im[0, 0, 0] == data[1, 0] and im[0, 0, 1] == data[1, 1024]


def test_power_norm_probe_and_mirrored_images(colour_folder, tmp_path):

    from cliplab.data.images import ImageFiles, MirroredImages
    from cliplab.eval.probe import power_normalize

    x = np.array([[4.0, -9.0, 0.0]])
    assert np.allclose(power_normalize(x), [[2.0, -3.0, 0.0]])
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    feats = np.abs(rng.normal(size=(300, 10)) + 3 * np.eye(10)[y])  # non-negative, like pooled activations
    fit = fit_logistic_probe(feats, y, c_grid=(0.01, 1.0), refine_steps=1, power_norm=True)
    assert fit.power_norm and (fit.scores(feats).argmax(1) == y).mean() > 0.9
    files = ImageFiles(sorted((colour_folder / "red").glob("*.png")))
    mirrored = MirroredImages(files)
    a, b = np.asarray(files.load(0)), np.asarray(mirrored.load(0))
    assert np.array_equal(a[:, ::-1], b) and mirrored.keys() != files.keys()


def _noisy_zeroshot(labels: np.ndarray, n_classes: int, accuracy: float, rng) -> np.ndarray:
    """Zero-shot-like probabilities: right with the given rate, else a wrong class, with a bias to class 0."""
    wrong = (labels + rng.integers(1, n_classes, len(labels))) % n_classes
    wrong = np.where(rng.random(len(labels)) < 0.3, 0, wrong)
    pred = np.where(rng.random(len(labels)) < accuracy, labels, wrong)
    logits = rng.normal(0, 0.5, (len(labels), n_classes))
    logits[np.arange(len(labels)), pred] += 2.0 + rng.random(len(labels))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_self_training_beats_its_zero_shot_teacher_without_labels():
    from cliplab.eval.self_training import SelfTrainingConfig, self_train

    rng = np.random.default_rng(0)
    n_classes, d = 6, 16
    centres = rng.normal(0, 3, (n_classes, d))
    y_pool, y_test = rng.integers(0, n_classes, 600), rng.integers(0, n_classes, 300)
    x_pool = centres[y_pool] + rng.normal(0, 1.5, (600, d))
    x_test = centres[y_test] + rng.normal(0, 1.5, (300, d))
    p_pool, p_test = (_noisy_zeroshot(y, n_classes, 0.45, rng) for y in (y_pool, y_test))
    teacher = (p_test.argmax(1) == y_test).mean() * 100
    fitted = self_train(x_pool, p_pool, SelfTrainingConfig(power_norm=False, c=1.0))
    student = (fitted.predict(x_test) == y_test).mean() * 100
    assert teacher < 60 and student > teacher + 25, (teacher, student)
    rounds = fitted.summary()["rounds"]
    assert [r["fraction"] for r in rounds] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert all(max(r["pseudo_labels_per_class"]) <= r["per_class_cap"] for r in rounds)  # class-balanced
    assert fitted.scores(x_test).shape == (300, n_classes) and np.isfinite(fitted.scores(x_test)).all()


def test_capped_pseudo_labels_against_brute_force():
    from cliplab.eval.self_training import capped_pseudo_labels

    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), 50)
    for caps in (3, [1, 2, 0, 50]):  # one cap for all classes, or one per class
        idx, lab = capped_pseudo_labels(p, caps)
        for c in range(4):
            cap = caps if isinstance(caps, int) else caps[c]
            mine = sorted(i for i in range(50) if p[i].argmax() == c)
            expect = sorted(mine, key=lambda i: -p[i, c])[:cap]
            assert sorted(idx[lab == c].tolist()) == sorted(expect)


def test_self_training_refuses_bad_input_and_keeps_unnamed_classes_finite():
    from cliplab.errors import ConfigError, NumericError
    from cliplab.eval.self_training import SelfTrainingConfig, self_train

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 5))
    p = np.zeros((40, 3))
    p[:20, 0], p[20:, 1] = 0.9, 0.9  # class 2 is never predicted
    p[:, 2] = 0.1
    fitted = self_train(x, p, SelfTrainingConfig(fractions=(0.5,)))
    assert fitted.scores(x).shape == (40, 3) and np.isfinite(fitted.scores(x)).all()
    assert fitted.summary()["rounds"][-1]["classes_without_pseudo_labels"] == [2]
    with pytest.raises(NumericError):
        self_train(np.full((40, 5), np.nan), p)
    with pytest.raises(ConfigError, match="same N"):
        self_train(x[:10], p)
    with pytest.raises(ConfigError, match="fractions"):
        SelfTrainingConfig(fractions=(0.0, 0.5))


def test_logistic_probe_on_two_views_splits_validation_by_image():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 2, (3, 8))
    y = np.repeat(np.arange(3), 30)
    a = centres[y] + rng.normal(0, 1, (90, 8))
    b = centres[y] + rng.normal(0, 1, (90, 8))
    avg = (a + b) / 2
    fit = fit_logistic_probe(avg, y, train_views=[a, b])
    assert fit.hyperparameters["train_views"] == 2 and fit.val_accuracy > 80
    assert fit.model.n_features_in_ == 8 and fit.scaler.n_samples_seen_ == 180  # refit on both views of all
    plain = fit_logistic_probe(avg, y)
    assert plain.hyperparameters["train_views"] == 0 and plain.scaler.n_samples_seen_ == 90
    with pytest.raises(ConfigError, match="shape"):
        fit_logistic_probe(avg, y, train_views=[a[:10], b])


def test_cross_validated_probe_accuracy_matches_brute_force_folds():
    """Every image is scored once, by a probe fitted without any view of it; equal to a hand-made fold loop."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from cliplab.eval.probe import cross_validated_accuracy

    rng = np.random.default_rng(4)
    centres = rng.normal(0, 1.0, (3, 6))
    y = np.repeat(np.arange(3), 40)
    a, b = (centres[y] + rng.normal(0, 1.5, (120, 6)) for _ in range(2))
    avg = (a + b) / 2
    for views in (None, [a, b]):
        got = cross_validated_accuracy(avg, y, 0.3, folds=4, seed=1, train_views=views)
        want = []
        for fit_idx, val_idx in StratifiedKFold(4, shuffle=True, random_state=1).split(avg, y):
            assert not set(fit_idx) & set(val_idx)
            x = np.concatenate([v[fit_idx] for v in (views or [avg])])
            sc = StandardScaler().fit(x)
            clf = LogisticRegression(C=0.3, max_iter=1000, random_state=1).fit(
                sc.transform(x), np.tile(y[fit_idx], len(views or [avg])))
            want.append((clf.predict(sc.transform(avg[val_idx])) == y[val_idx]).mean() * 100)
        assert len(got) == 4 and np.allclose(got, want)
        assert 50 < np.mean(got) < 100  # learnable but not trivial


def test_self_training_selection_modes_on_an_unbalanced_pool():
    """Balanced caps assume balanced classes: on a 70/10/10/10 pool they teach the minority classes with
    majority images; proportional caps keep the predicted balance and learn the clusters."""
    from cliplab.errors import ConfigError
    from cliplab.eval.self_training import SelfTrainingConfig, self_train

    rng = np.random.default_rng(5)
    n_classes, d = 4, 12
    centres = rng.normal(0, 2.0, (n_classes, d))
    share = np.array([0.7, 0.1, 0.1, 0.1])
    y_pool, y_test = rng.choice(n_classes, 1200, p=share), rng.choice(n_classes, 600, p=share)
    x_pool = centres[y_pool] + rng.normal(0, 1.6, (1200, d))
    x_test = centres[y_test] + rng.normal(0, 1.6, (600, d))
    p_pool = _noisy_zeroshot(y_pool, n_classes, 0.6, rng)
    acc = {}
    for selection in ("balanced", "proportional"):
        fitted = self_train(x_pool, p_pool, SelfTrainingConfig(selection=selection, power_norm=False, c=1.0))
        acc[selection] = (fitted.predict(x_test) == y_test).mean() * 100
        caps = fitted.summary()["rounds"][-1]["per_class_cap"]
        assert (np.ndim(caps) == 0) == (selection == "balanced")
    assert acc["proportional"] > 90 and acc["balanced"] < 70, acc
    with pytest.raises(ConfigError, match="selection"):
        SelfTrainingConfig(selection="uniform")
