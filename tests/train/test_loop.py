"""fit(): the closure contract, pass counting, minibatches, per-domain mode, logging, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flatlab.train import Callback, Evaluate, FitState, Run, build_optimizer, fit
from flatlab.train.data import Sampler, as_domains


def _data(n: int = 32, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long()


class CallsClosure(torch.optim.SGD):
    """An SGD that calls the closure ``k`` times per step (like SAM / GAM do)."""

    def __init__(self, params, k: int, **kw):
        super().__init__(params, **kw)
        self.k = k

    def step(self, closure=None):
        for _ in range(self.k - 1):
            closure()
        return super().step(closure)


class PerDomain(torch.optim.SGD):
    per_domain = True

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.sizes: list[list[int]] = []

    def step(self, closures):
        losses = [c() for c in closures]
        return torch.stack(losses).mean()


def test_sgd_full_batch_matches_hand_written_gd() -> None:
    x, y = _data()
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    fit(a, torch.optim.SGD(a.parameters(), lr=0.5), (x, y), steps=3, progress=False)
    for _ in range(3):
        b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        with torch.no_grad():
            for p in b.parameters():
                p -= 0.5 * p.grad
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_passes_count_closure_calls(k: int) -> None:
    model = torch.nn.Linear(3, 2)
    res = fit(model, CallsClosure(model.parameters(), k, lr=0.1), _data(), steps=4,
              progress=False)
    assert res.passes_per_step == k
    assert [r["passes"] for r in res.history] == [k] * 4
    assert all(r["step_time"] > 0 for r in res.history)
    assert all(r["step_cpu_time"] >= 0 for r in res.history) and res.cpu_time_per_step > 0


def test_per_domain_optimizer_gets_one_closure_per_domain() -> None:
    domains = [_data(10, seed=i) for i in range(3)]
    seen: list[int] = []
    model = torch.nn.Linear(3, 2)
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    res = fit(model, PerDomain(model.parameters(), lr=0.1), domains, steps=2, batch_size=4,
              progress=False)
    assert seen == [4, 4, 4, 4, 4, 4]  # 3 domains x 2 steps, one minibatch each
    assert res.passes_per_step == 3


def test_per_domain_optimizer_gets_a_list_even_for_one_dataset() -> None:
    model = torch.nn.Linear(3, 2)
    res = fit(model, PerDomain(model.parameters(), lr=0.1), _data(), steps=2, progress=False)
    assert res.passes_per_step == 1


def test_ordinary_optimizer_gets_the_pooled_batch_of_all_domains() -> None:
    domains = [_data(10, seed=i) for i in range(3)]
    seen: list[int] = []
    model = torch.nn.Linear(3, 2)
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), domains, steps=2, batch_size=4,
        progress=False)
    assert seen == [12, 12]


def test_sampler_walks_permutations_without_repeats_within_an_epoch() -> None:
    s = Sampler(10, 3, torch.Generator().manual_seed(0))
    picks = [s.next() for _ in range(3)]  # 9 of 10 examples, the remainder dropped
    flat = torch.cat(picks).tolist()
    assert len(set(flat)) == 9
    assert Sampler(10, None, torch.Generator()).next() == slice(None)
    assert Sampler(10, 50, torch.Generator()).next() == slice(None)


def test_callbacks_merge_into_records_and_run_at_start_and_end() -> None:
    class Count(Callback):
        def on_step(self, state: FitState) -> dict:
            return {"seen_step": state.step}

    model = torch.nn.Linear(3, 2)
    res = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), steps=7,
              callbacks=[Count(every=3)], log_every=100, progress=False)
    assert [r["step"] for r in res.history] == [0, 3, 6, 7]
    assert all(r["seen_step"] == r["step"] for r in res.history)


def test_evaluate_logs_named_loss_and_accuracy() -> None:
    x, y = _data()
    model = torch.nn.Linear(3, 2)
    res = fit(model, torch.optim.SGD(model.parameters(), lr=0.5), (x, y), steps=20,
              callbacks=[Evaluate({"val": (x, y)}, every=10)], progress=False)
    final = res.history[-1]
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
        loss = F.cross_entropy(model(x), y).item()
    assert final["val_acc"] == pytest.approx(acc)
    assert final["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert res.last("val_acc") == final["val_acc"]


def test_nonfinite_loss_stops_training_and_marks_divergence(tmp_path) -> None:
    x, y = _data()
    model = torch.nn.Linear(3, 1)
    res = fit(model, torch.optim.SGD(model.parameters(), lr=1e6), (x, y.float()[:, None] * 1e3),
              steps=50, loss_fn=F.mse_loss, progress=False)
    assert res.diverged and res.steps < 50
    assert res.history[-1]["diverged"] is True
    assert not math.isfinite(res.history[-1]["loss"])


def test_logging_to_a_run_folder_tags_records(tmp_path) -> None:
    run = Run.create(tmp_path, "t", {"a": 1})
    model = torch.nn.Linear(3, 2)
    fit(model, build_optimizer("sgd", model.parameters(), lr=0.1), _data(), steps=3, run=run,
        tag="phase1", progress=False)
    recs = run.metrics("phase1")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert (run.checkpoints_dir / "phase1" / "latest.pt").is_file()


def test_tensor_dataset_and_domains_objects_are_accepted() -> None:
    x, y = _data()
    assert len(as_domains(torch.utils.data.TensorDataset(x, y))) == 1
    assert len(as_domains([(x, y), (x, y)])) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
        ({"steps": 2, "batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"steps": 2, "log_every": 1.5}, TypeError, "log_every must be an int"),
        ({"steps": 2, "train": "data"}, TypeError, "train must be an"),
        ({"steps": 2, "train": (torch.zeros(3, 2), torch.zeros(4))}, ValueError,
         "same length, got 3 and 4"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, error, match) -> None:
    model = torch.nn.Linear(3, 2)
    train = kwargs.pop("train", _data())
    with pytest.raises(error, match=match):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), train, progress=False, **kwargs)
