"""A real Lightning ``Trainer.fit`` (automatic optimization, CPU) drives SAM exactly like a plain
loop: Lightning calls ``optimizer.step(closure)`` and SAM computes the first gradient itself. Under
``strategy="ddp"`` (2 processes) each sync mode keeps its semantics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_trainer_ddp_and_fsdp2_at_two_processes_keep_each_sync_semantics(tmp_path):
    """Lightning's DDP strategy under torchrun (2 gloo processes on CPU), each rank its own
    shard: ``sync="global"`` equals SAM on the concatenated batches; ``sync="local"`` with the
    DDP module as ``model=`` equals m-sharpness by hand; without it, it is refused (Lightning's
    DDP had averaged the gradient, which used to turn "local" into "global" silently).
    Lightning's FSDP2 (``ModelParallelStrategy``): ``"global"`` equals the same SAM,
    ``"local"`` is refused."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    script = Path(__file__).with_name("_lightning_torchrun.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cases = dict(re.findall(r"^case (\w+ model=\w+): (.*)$", out.stdout, re.M))
    for case in ("global model=False", "local model=True", "fsdp2_global model=False"):
        found = re.fullmatch(r"ranks agree (\w+), max error (\S+), distance to \w+ (\S+)",
                             cases[case])
        assert found, cases
        assert found[1] == "True"
        assert float(found[2]) < 1e-6  # float32 round-off
        assert float(found[3]) > 1e-4  # the two semantics are told apart
    assert cases["local model=False"].startswith(
        "refused: sync='local' needs the DistributedDataParallel module as model="
    ), cases
    assert cases["fsdp2_local model=False"].startswith(
        "refused: sync='local' (m-sharpness) is not supported with FSDP2-sharded parameters"
    ), cases
