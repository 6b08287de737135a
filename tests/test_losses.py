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
