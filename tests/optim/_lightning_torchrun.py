"""Run by tests/optim/test_lightning.py under torchrun at 2 processes (gloo on CPU): a Lightning
``Trainer`` drives flatlab's SAM, each rank on its own shard of the data.

``strategy="ddp"``:

- ``sync="global"``: equals SAM in one process on the two ranks' batches concatenated;
- ``sync="local"`` with ``model=self.trainer.strategy.model`` (the DDP module): equals
  m-sharpness computed by hand (each rank perturbs with its own gradient, the descent
  gradients are averaged);
- ``sync="local"`` without it: refused, since Lightning's DDP averaged the gradient.

``strategy=ModelParallelStrategy(data_parallel_size=2)``, Lightning's FSDP2 (``fully_shard`` in
``configure_model`` over the strategy's data-parallel mesh; ``strategy="fsdp"``, FSDP1, needs
CUDA):

- ``sync="global"``: equals SAM on the concatenated batches, as with DDP;
- ``sync="local"``: refused (FSDP2 reduces every pass).

Rank 0 prints one line per case; the test reads them.
"""

from __future__ import annotations

import os

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from flatlab.optim import SAM

STEPS, BATCH, RHO, LR = 4, 8, 0.05, 0.1
RANK = int(os.environ["RANK"])


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


g = torch.Generator().manual_seed(1)
N = 2 * STEPS * BATCH
X, Y = torch.randn(N, 4, generator=g), torch.randn(N, 1, generator=g)
SHARDS = list(zip(X.chunk(2), Y.chunk(2)))  # rank r trains on shard r, in order


class Module(L.LightningModule):
    def __init__(self, sync: str, give_model: bool):
        super().__init__()
        self.net = make_model()
        self.sync, self.give_model = sync, give_model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        model = self.trainer.strategy.model if self.give_model else None
        return SAM(self.net.parameters(), torch.optim.SGD, rho=RHO, sync=self.sync, model=model,
                   lr=LR)


class Sharded(Module):
    """The same module, sharded by FSDP2 when Lightning builds it."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fit(sync: str, give_model: bool, fsdp2: bool = False) -> torch.Tensor:
    module = (Sharded if fsdp2 else Module)(sync, give_model)
    if fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*SHARDS[RANK]),
                                         batch_size=BATCH)
    trainer.fit(module, loader)
    full = [p.full_tensor() if fsdp2 else p for p in module.net.parameters()]
    return torch.cat([p.detach().flatten() for p in full])


def reference(sync: str) -> torch.Tensor:
    model = make_model()
    params = list(model.parameters())

    def grad_at(x, y, shift):
        with torch.no_grad():
            torch._foreach_add_(params, shift)
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
        with torch.no_grad():
            torch._foreach_sub_(params, shift)
        return grads

    def ascent(grads):
        norm = torch.sqrt(sum((t ** 2).sum() for t in grads))
        return [RHO * t / (norm + 1e-12) for t in grads]

    zero = [torch.zeros_like(p) for p in params]
    for t in range(STEPS):
        batches = [(x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]) for x, y in SHARDS]
        if sync == "global":
            xs, ys = (torch.cat(parts) for parts in zip(*batches))
            d = grad_at(xs, ys, ascent(grad_at(xs, ys, zero)))
        else:
            per_rank = [grad_at(x, y, ascent(grad_at(x, y, zero))) for x, y in batches]
            d = [(a + b) / 2 for a, b in zip(*per_rank)]
        with torch.no_grad():
            torch._foreach_add_(params, list(d), alpha=-LR)
    return torch.cat([p.detach().flatten() for p in params])


def agree(w: torch.Tensor) -> bool:
    both = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(both, w)
    return torch.equal(both[0], both[1])


for sync, give_model, fsdp2 in [("global", False, False), ("local", True, False),
                                ("global", False, True)]:
    w = fit(sync, give_model, fsdp2)
    same = agree(w)
    if RANK == 0:
        other = "local" if sync == "global" else "global"
        err = float((w - reference(sync)).abs().max())
        off = float((w - reference(other)).abs().max())
        name = f"fsdp2_{sync}" if fsdp2 else sync
        print(f"case {name} model={give_model}: ranks agree {same}, max error {err:.3g}, "
              f"distance to {other} {off:.3g}", flush=True)
for name, fsdp2 in [("local", False), ("fsdp2_local", True)]:
    try:
        fit("local", False, fsdp2)
        outcome = "ran"
    except ValueError as e:
        outcome = f"refused: {e}"
    if RANK == 0:
        print(f"case {name} model=False: {outcome}", flush=True)
dist.barrier()
