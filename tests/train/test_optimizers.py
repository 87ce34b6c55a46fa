"""build_optimizer: every name maps to the right class with the right options."""

from __future__ import annotations

import pytest
import torch

from flatlab.train import OPTIMIZERS, build_optimizer, fit

EXPECTED = {
    "sgd": ("SGD", {}),
    "adamw": ("AdamW", {}),
    "signsgd": ("SignSGD", {}),
    "rmspropw": ("RMSpropW", {}),
    "sam": ("SAM", {"adaptive": False, "normalize": True}),
    "asam": ("SAM", {"adaptive": True}),
    "usam": ("SAM", {"normalize": False}),
    "gam": ("GAM", {}),
    "samgam": ("SAMGAM", {}),
    "gsam": ("GSAM", {}),
    "wsam": ("WSAM", {"decouple": True}),
    "looksam": ("LookSAM", {"k": 5}),
    "fsam": ("FriendlySAM", {}),
    "dgsam": ("DGSAM", {}),
    "sagm": ("SAGM", {}),
}


def test_every_documented_name_is_known() -> None:
    assert set(OPTIMIZERS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_optimizer_class_and_options(name: str) -> None:
    cls_name, attrs = EXPECTED[name]
    model = torch.nn.Linear(3, 2)
    kw = {"rho": 0.05} if name in ("sam", "asam", "usam") else {}
    opt = build_optimizer(name, model.parameters(), lr=0.1, **kw)
    assert type(opt).__name__ == cls_name
    assert opt.param_groups[0]["lr"] == 0.1
    for attr, value in attrs.items():
        assert getattr(opt, attr) == value
    if name in ("dgsam", "sagm"):  # SAGM takes the pooled batch unless per_domain=True
        assert getattr(opt, "per_domain", False) is (name == "dgsam")


@pytest.mark.parametrize(("name", "passes"), [("sgd", 1), ("adamw", 1), ("sam", 2), ("usam", 2)])
def test_fit_counts_the_passes_each_optimizer_makes(name: str, passes: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    res = fit(model, build_optimizer(name, model.parameters(), lr=0.1), (x, y), steps=2,
              progress=False)
    assert res.passes_per_step == passes


def test_sam_wraps_the_named_base_with_its_keywords() -> None:
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer("sam", model.parameters(), lr=0.1, base="adamw", weight_decay=0.01)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert "betas" in opt.param_groups[0]  # AdamW's defaults live in the shared groups


@pytest.mark.parametrize(
    ("name", "kw", "error", "match"),
    [
        ("lion", {"lr": 0.1}, ValueError, "optimizer must be one of 'sgd'"),
        ("sgd", {}, ValueError, "lr must be given for optimizer 'sgd'"),
        ("sgd", {"lr": -0.1}, ValueError, r"lr must be > 0, got -0.1"),
        ("sgd", {"lr": "fast"}, TypeError, "lr must be a real number"),
        ("sgd", {"lr": 0.1, "base": "adamw"}, ValueError, "base must not be given"),
        ("sam", {"lr": 0.1, "base": "lion"}, ValueError, "base must be one of"),
    ],
)
def test_bad_optimizer_requests(name, kw, error, match) -> None:
    with pytest.raises(error, match=match):
        build_optimizer(name, torch.nn.Linear(2, 1).parameters(), **kw)


@pytest.mark.parametrize("name", ["dgsam", "sagm"])
def test_dg_optimizers_train_on_domains_through_fit(name: str) -> None:
    torch.manual_seed(0)
    domains = [(torch.randn(12, 3), torch.randint(0, 2, (12,))) for _ in range(3)]
    model = torch.nn.Linear(3, 2)
    res = fit(model, build_optimizer(name, model.parameters(), lr=0.1), domains, steps=3,
              batch_size=4, progress=False)
    assert res.steps == 3 and not res.diverged
    if name == "dgsam":
        assert res.passes_per_step == 4  # S + 1 single-domain passes (S = 3 domains)
    else:
        assert res.passes_per_step == 2  # SAGM: two passes on the pooled batch by default
