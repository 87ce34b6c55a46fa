import math

import pytest
import torch
import torch.nn as nn

from flatlab.models import (
    MNISTCNN,
    MODELS,
    CNN1d,
    Mixer,
    Patchify,
    ResNet,
    SelfAttention,
    SmallCNN,
    ViT,
    build,
)

CASES = [
    ("mlp", (1, 8, 8), {"width": 8, "depth": 2}),
    ("residual_mlp", (40,), {"width": 8, "depth": 2}),
    ("mnist_cnn", (2, 12, 12), {"channels": (8, 8, 16, 16)}),
    ("small_cnn", (1, 8, 8), {"channels": (4, 8)}),
    ("cnn1d", (40,), {"channels": (4, 4, 4)}),
    ("resnet", (3, 8, 8), {"depth": 8, "width": 4}),
    ("vit", (40,), {"dim": 8, "depth": 1, "heads": 2}),
    ("mixer", (40,), {"dim": 8, "depth": 1}),
    ("resnet18", (3, 32, 32), {}),
    ("resnet34", (3, 32, 32), {}),
    ("resnet50", (3, 32, 32), {}),
    ("resnet101", (3, 32, 32), {}),
]


@pytest.mark.parametrize("name, shape, kw", CASES, ids=[c[0] for c in CASES])
def test_every_model_forward_backward_and_activation_modules(name, shape, kw):
    torch.manual_seed(0)
    model = build(name, shape, 3, activation="gelu", **kw)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 3)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    acts = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert acts and len({id(a) for a in acts}) == len(acts)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())  # activation honoured


def test_registry_is_complete_and_validates():
    assert set(MODELS) == {c[0] for c in CASES}
    with pytest.raises(ValueError, match="model must be one of 'mlp', .*got 'lenet'"):
        build("lenet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="input_shape must be a non-empty tuple"):
        build("mlp", (0, 8), 10)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        build("mlp", (4,), 0)


def test_mnist_cnn_is_domainbeds_architecture():
    model = MNISTCNN((1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 128]
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (1, 1), (1, 1)]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and all(n.num_groups == 8 for n in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # GroupNorm: an example's output does not depend on the rest of the batch
    small = MNISTCNN((1, 10, 10), 2, channels=(8, 8, 8, 8)).train()
    x = torch.randn(3, 1, 10, 10)
    assert torch.allclose(small(x)[:1], small(x[:1]), atol=1e-6)
    with pytest.raises(ValueError, match="groups must divide every channel count"):
        MNISTCNN(channels=(12, 16, 16, 16), groups=8)
    with pytest.raises(ValueError, match="channels must have 4 entries"):
        MNISTCNN(channels=(8, 8))


def test_small_cnn_and_cnn1d_inputs():
    assert SmallCNN((1, 8, 8), 10)(torch.randn(2, 8, 8)).shape == (2, 10)
    m = CNN1d((40,), 10)
    assert m(torch.randn(2, 40)).shape == (2, 10)
    assert CNN1d((2, 40), 10)(torch.randn(2, 2, 40)).shape == (2, 10)
    assert m.classifier.in_features == 32 * 5  # 40 -> 20 -> 10 -> 5
    with pytest.raises(ValueError, match="kernel_size must be odd, got 4"):
        CNN1d(kernel_size=4)
    with pytest.raises(ValueError, match=r"input_shape must be \(L,\) or \(C, L\)"):
        CNN1d((1, 2, 3))


def test_resnet_depth_and_batchnorm():
    for depth, blocks in ((8, 3), (14, 6), (20, 9)):
        m = ResNet((3, 16, 16), 10, depth=depth, width=4)
        assert len(m.blocks) == blocks
    m = ResNet((3, 16, 16), 10, depth=8, width=4)
    assert [b.conv1.out_channels for b in m.blocks] == [4, 8, 16]
    assert isinstance(m.blocks[1].shortcut, nn.Sequential)
    assert isinstance(m.blocks[0].shortcut, nn.Identity)
    x = torch.randn(4, 3, 16, 16)
    m.train()
    m(x)
    assert float(m.stem[1].running_mean.abs().sum()) > 0  # BatchNorm statistics updated
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        ResNet(depth=10)


def test_patchify_images_and_sequences():
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    p = Patchify((2, 4, 4), 2)
    tokens = p(img)
    assert p.num_tokens == 4 and tokens.shape == (1, 4, 8)
    assert torch.equal(tokens[0, 0], img[0, :, :2, :2].reshape(-1))  # top-left patch
    assert torch.equal(tokens[0, 1], img[0, :, :2, 2:].reshape(-1))  # row-major grid
    seq = torch.arange(12.0).view(1, 12)
    s = Patchify((12,), 3)
    assert s.num_tokens == 4 and torch.equal(s(seq)[0, 1], torch.tensor([3.0, 4.0, 5.0]))
    with pytest.raises(ValueError, match="patch_size must divide"):
        Patchify((40,), 3)


def test_self_attention_matches_manual_softmax():
    torch.manual_seed(0)
    att = SelfAttention(4, heads=2).double()
    z = torch.randn(2, 5, 4, dtype=torch.float64)
    q, k, v = att.qkv(z).split(4, dim=2)
    outs = []
    for h in range(2):
        sl = slice(2 * h, 2 * h + 2)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(2), dim=-1)
        outs.append(w @ v[..., sl])
    assert torch.allclose(att(z), att.proj(torch.cat(outs, -1)))
    with pytest.raises(ValueError, match="heads must divide dim"):
        SelfAttention(6, heads=4)


@pytest.mark.parametrize("cls", [ViT, Mixer])
def test_token_models_on_mnist1d_have_enough_tokens_and_hookable_mlps(cls):
    model = cls((40,), 10)
    assert model.num_tokens >= 8
    acts = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    modules = dict(model.named_modules())
    for name, act in acts:  # each activation sits between two Linear siblings
        parent = modules[name.rsplit(".", 1)[0]]
        kids = list(parent.children())
        i = next(j for j, k in enumerate(kids) if k is act)
        assert isinstance(kids[i - 1], nn.Linear) and isinstance(kids[i + 1], nn.Linear)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape)) for _, m in acts]
    model(torch.randn(3, 40))
    for h in hooks:
        h.remove()
    assert len(seen) == len(acts) and all(s[0] == 3 for s in seen)


def test_mixer_token_mixing_acts_across_tokens():
    torch.manual_seed(0)
    model = Mixer((8,), 2, patch_size=1, dim=4, depth=1).double().eval()
    x = torch.randn(1, 8, dtype=torch.float64)
    y = x.clone()
    y[0, 7] += 1.0  # changing the last token changes the output through token mixing
    assert not torch.allclose(model(x), model(y))
    tok = model.blocks[0].token
    z = torch.randn(2, 8, 4, dtype=torch.float64)
    manual = z + tok.fc2(tok.act(tok.fc1(tok.ln(z).transpose(1, 2)))).transpose(1, 2)
    assert torch.allclose(tok(z), manual)


@pytest.mark.parametrize("name, shape, kw", CASES, ids=[c[0] for c in CASES])
def test_every_model_supports_hessian_vector_products(name, shape, kw):
    """Double backward (what curvature measurements need) works and is symmetric: u.Hv = v.Hu."""
    torch.manual_seed(0)
    model = build(name, shape, 3, **kw).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(4, *shape, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    u = [torch.randn_like(p) for p in params]
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, v, retain_graph=True)
    hu = torch.autograd.grad(grads, params, u)
    uhv = sum((a * b).sum() for a, b in zip(u, hv))
    vhu = sum((a * b).sum() for a, b in zip(v, hu))
    assert torch.isfinite(uhv) and torch.allclose(uhv, vhu, rtol=1e-8, atol=1e-10)
