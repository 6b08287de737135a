import math

import torch
import torch.nn.functional as F

from cliplab.train.losses import InfoNCELoss


def brute_infonce(img, txt, scale, ids=None):
    """Per-row log-softmax written out with python loops."""
    b = img.shape[0]
    total = 0.0
    for direction in (0, 1):
        for i in range(b):
            num = None
            denom = []
            for j in range(b):
                s = float(scale * (img[i] @ txt[j] if direction == 0 else txt[i] @ img[j]))
                if j != i and ids is not None and ids[i] == ids[j]:
                    continue  # same image: not a negative
                denom.append(s)
                if j == i:
                    num = s
            total += -(num - math.log(sum(math.exp(d) for d in denom)))
    return total / (2 * b)


def test_infonce_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    loss = InfoNCELoss()(img, txt, scale)
    assert abs(loss.item() - brute_infonce(img, txt, scale)) < 1e-5


def test_infonce_same_image_not_negative():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    img[3] = img[1]  # the same image twice in the batch
    ids = torch.tensor([0, 1, 2, 1, 4, 5])
    scale = torch.tensor(10.0)
    masked = InfoNCELoss()(img, txt, scale, image_ids=ids)
    assert abs(masked.item() - brute_infonce(img, txt, scale, ids)) < 1e-5
    unmasked = InfoNCELoss()(img, txt, scale)
    assert masked.item() < unmasked.item()
    # unique ids change nothing
    same = InfoNCELoss()(img, txt, scale, image_ids=torch.arange(6))
    assert torch.allclose(same, unmasked)


def test_infonce_gradient_flows_to_temperature():
    img = F.normalize(torch.randn(4, 3), dim=-1)
    txt = F.normalize(torch.randn(4, 3), dim=-1)
    log_scale = torch.tensor(2.0, requires_grad=True)
    InfoNCELoss()(img, txt, log_scale.exp()).backward()
    assert log_scale.grad is not None and log_scale.grad.abs() > 0


from cliplab.train.losses import NTXentLoss, SigmoidLoss, TripletLoss, create_loss  # noqa: E402


def _batch(seed, b=6, d=5, dup=True):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    ids = torch.arange(b)
    if dup:
        img[3] = img[1]
        ids[3] = 1
    return img, txt, ids


def brute_triplet(img, txt, ids, margin, mining):
    b = len(img)
    total = 0.0
    for a, c in ((img, txt), (txt, img)):
        per = []
        for i in range(b):
            pos = float(a[i] @ c[i])
            negs = [float(a[i] @ c[j]) for j in range(b) if j != i and ids[j] != ids[i]]
            if not negs:
                per.append(0.0)
                continue
            if mining == "all":
                per.append(sum(max(0.0, margin - pos + n) for n in negs) / len(negs))
                continue
            if mining == "hardest":
                n = max(negs)
            else:
                below = [n for n in negs if n < pos]
                n = max(below) if below else min(negs)
            per.append(max(0.0, margin - pos + n))
        total += sum(per) / b
    return total / 2


def test_triplet_matches_brute_force():
    for seed in range(3):
        img, txt, ids = _batch(seed)
        for mining in ("hardest", "semihard", "all"):
            got = TripletLoss(margin=0.3, mining=mining)(img, txt, None, image_ids=ids).item()
            assert abs(got - brute_triplet(img, txt, ids, 0.3, mining)) < 1e-6, mining


def brute_ntxent(img, txt, scale, ids):
    z = torch.cat([img, txt])
    b = len(img)
    ids2 = list(ids.tolist()) * 2
    total = 0.0
    for i in range(2 * b):
        p = i + b if i < b else i - b
        terms = []
        for j in range(2 * b):
            if j == i or (j != p and ids2[j] == ids2[i]):
                continue
            terms.append(float(scale * z[i] @ z[j]))
        total += -(float(scale * z[i] @ z[p]) - math.log(sum(math.exp(t) for t in terms)))
    return total / (2 * b)


def test_ntxent_matches_brute_force():
    for seed, dup in ((0, False), (1, True)):
        img, txt, ids = _batch(seed, dup=dup)
        got = NTXentLoss()(img, txt, torch.tensor(7.0), image_ids=ids).item()
        assert abs(got - brute_ntxent(img, txt, 7.0, ids)) < 1e-5


def brute_sigmoid(img, txt, scale, bias, ids):
    b = len(img)
    total = 0.0
    for i in range(b):
        for j in range(b):
            logit = scale * float(img[i] @ txt[j]) + bias
            sign = 1.0 if ids[i] == ids[j] else -1.0
            total += math.log1p(math.exp(-sign * logit))
    return total / b


def test_sigmoid_matches_brute_force_and_learns_bias():
    img, txt, ids = _batch(2)
    loss_fn = SigmoidLoss(init_bias=-3.0)
    loss = loss_fn(img, txt, torch.tensor(10.0), image_ids=ids)
    assert abs(loss.item() - brute_sigmoid(img, txt, 10.0, -3.0, ids)) < 1e-5
    loss.backward()
    assert loss_fn.bias.grad is not None


def test_create_loss_errors():
    assert isinstance(create_loss("NT-Xent"), NTXentLoss)
    assert isinstance(create_loss("triplet", margin=0.1, mining="semihard"), TripletLoss)
    import pytest

    from cliplab.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown loss"):
        create_loss("hinge")
    with pytest.raises(ConfigError, match="mining"):
        create_loss("triplet", mining="random")
