"""A real Lightning ``Trainer.fit`` (automatic optimization, CPU) drives SAM exactly like a plain
loop: Lightning calls ``optimizer.step(closure)`` and SAM computes the first gradient itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.optim import SAM

L = pytest.importorskip("lightning")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def make_data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_optimizer(model):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return make_optimizer(self.net)


def test_trainer_fit_matches_plain_loop():
    data = make_data()
    module = Module()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16, shuffle=False))
    assert trainer.global_step == 6

    model = make_model()
    opt = make_optimizer(model)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    steps = 0
    while steps < 6:
        for x, y in loader:
            if steps == 6:
                break

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            steps += 1
    lit_state = module.net.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(lit_state[k], v, rtol=0, atol=0, msg=k)
    assert int(model[1].num_batches_tracked) == 6
