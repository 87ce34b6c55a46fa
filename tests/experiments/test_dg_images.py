"""DomainBed's image datasets: defaults, ResNet + pretrained file + augmentation end to end on
tiny image-folder fixtures named as PACS, VLCS, OfficeHome and TerraIncognita are."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flatlab.cli import main
from flatlab.experiments import launch, resolve_config
from flatlab.experiments.dg import (
    IMAGE_DEFAULTS,
    DomainCheckpoints,
    load_domains,
    make_model,
    sweep_defaults,
)
from flatlab.models import ImageNetResNet

LAYOUTS = {  # DomainBed's folder, and each dataset's real domain folder names
    "PACS": ("PACS", ("art_painting", "cartoon", "photo", "sketch")),
    "VLCS": ("VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "OfficeHome": ("office_home", ("Art", "Clipart", "Product", "Real World")),
    "TerraIncognita": ("terra_incognita", ("location_100", "location_38", "location_43",
                                           "location_46")),
}


def _fixture(root, dataset, per_class=3, size=12):
    from PIL import Image

    folder, domains = LAYOUTS[dataset]
    rng = np.random.default_rng(0)
    for d, dom in enumerate(domains):
        for c, cls in enumerate(("dog", "house")):
            path = root / folder / dom / cls
            path.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                img[..., c] += np.uint8(120 + 20 * d)  # the class is in one colour channel
                Image.fromarray(img).save(path / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An 'ImageNet' ResNet-18 checkpoint in torchvision's layout (1,000 classes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(ImageNetResNet((3, 224, 224), 1000, arch="resnet18").state_dict(), path)
    return path


def test_image_folders_default_to_domainbeds_image_hyperparameters(tmp_path):
    _fixture(tmp_path, "PACS")
    cfg = resolve_config("dg", overrides=["dataset=image_folder", f"data_dir={tmp_path}"])
    assert {k: getattr(cfg, k) for k in IMAGE_DEFAULTS} == IMAGE_DEFAULTS
    assert (cfg.model, cfg.image_size, cfg.lr, cfg.steps) == ("resnet50", 224, 5e-5, 5001)
    mine = resolve_config("dg", overrides=["dataset=image_folder", f"data_dir={tmp_path}",
                                           "lr=1e-4", "model=resnet18", "augment=false"])
    assert (mine.lr, mine.model, mine.augment, mine.steps) == (1e-4, "resnet18", False, 5001)
    small = resolve_config("dg", overrides=["dataset=rotated_mnist"])
    assert (small.model, small.lr, small.augment, small.image_size) == ("auto", 3e-3, False, 8)
    quick = resolve_config("dg", quick=True, overrides=["dataset=image_folder",
                                                        f"data_dir={tmp_path}"])
    assert (quick.model, quick.image_size, quick.steps) == ("resnet18", 8, 12)
    space = sweep_defaults(cfg)
    assert space["space"]["lr"] == "log:-5:-3.5" and "resnet_dropout" in space["space"]
    assert space["grid"]["test_domains"] == [0, 1, 2, 3]
    assert sweep_defaults(small)["space"]["lr"] == "log:-4.5:-2.5"


def test_pretrained_file_starts_the_resnet_with_frozen_batchnorm(tmp_path, weights):
    _fixture(tmp_path, "PACS")
    cfg = resolve_config("dg", overrides=[
        "dataset=image_folder", f"data_dir={tmp_path}", "model=resnet18",
        f"pretrained={weights}", "image_size=16"])
    domains = load_domains(cfg)
    assert domains.names == LAYOUTS["PACS"][1] and domains.input_shape == (3, 16, 16)
    model = make_model(cfg, domains)
    saved = torch.load(weights, weights_only=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 2 and model.freeze_bn
    assert not model.train().bn1.training
    scratch = make_model(cfg.model_copy(update={"pretrained": None}), domains)
    assert not scratch.freeze_bn and not torch.equal(scratch.conv1.weight, model.conv1.weight)


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_domainbed_image_dataset_end_to_end(dataset, tmp_path, weights):
    """ERM, SAGM, DGSAM (and the timing benchmark) on PACS; DGSAM alone on the others (CPU time:
    each sharpness measurement of a ResNet-18 is a few seconds here)."""
    _fixture(tmp_path / "data", dataset)
    methods = ["erm", "sagm", "dgsam"] if dataset == "PACS" else ["dgsam"]
    run = launch("dg", out=tmp_path / "runs", overrides=[
        "dataset=image_folder", f"data_dir={tmp_path / 'data'}", f"image_dataset={dataset}",
        "model=resnet18", f"pretrained={weights}", "image_size=16", "steps=4",
        "checkpoint_freq=2", "batch_size=2", f"methods=[{','.join(methods)}]",
        "test_domains=[3]", "seeds=[0]", f"timing_steps={1 if dataset == 'PACS' else 0}",
        "sharpness_examples=4", "sharpness_steps=1", "eval_batch_size=5"])
    recs = [json.loads(x) for x in (run.path / "dg_records.jsonl").read_text().splitlines()]
    assert [r["method"] for r in recs] == methods
    assert {r["test_domain"] for r in recs} == {LAYOUTS[dataset][1][3]}
    s = 3  # training domains
    passes = {"erm": 1, "sam": 2, "sagm": 2, "dgsam": s + 1}
    assert [r["passes_per_step"] for r in recs] == [passes[m] for m in methods]
    for r in recs:
        assert r["hparams"]["model"] == "resnet18" and r["hparams"]["pretrained"]
        assert r["hparams"]["augment"] and r["hparams"]["lr"] == 5e-5
        assert [c["step"] for c in r["checkpoints"]] == [0, 2, 4]
        assert all(0 <= c["test_in"] <= 1 for c in r["checkpoints"])
        assert np.isfinite(r["final"]["sharpness"]["max"])
    assert run.done and (run.path / "report.html").exists()


def test_checkpoint_evaluation_in_batches_equals_one_pass():
    torch.manual_seed(0)
    model = ImageNetResNet((3, 16, 16), 3, arch="resnet18").eval()
    x, y = torch.randn(23, 3, 16, 16), torch.arange(23) % 3
    whole = DomainCheckpoints(1, [(x, y)], (x, y), (x, y))
    parts = DomainCheckpoints(1, [(x, y)], (x, y), (x, y), batch_size=5)
    assert len(parts.test_in) == 5
    state = SimpleNamespace(model=model, loss_fn=torch.nn.functional.cross_entropy, step=1)
    assert whole.on_step(state) == parts.on_step(state)


def test_bad_image_settings_are_one_line_and_write_nothing(tmp_path, weights, capsys):
    _fixture(tmp_path / "data", "PACS")
    base = ["run", "dg", "--out", str(tmp_path / "runs"), "--set", "dataset=image_folder",
            "--set", f"data_dir={tmp_path / 'data'}"]
    torch.save(ImageNetResNet((3, 32, 32), 10, arch="resnet50").state_dict(),
               tmp_path / "r50.pth")
    cases = [
        (["--set", f"pretrained={tmp_path / 'nope.pth'}"], "pretrained must be an existing file"),
        (["--set", "model=resnet18", "--set", f"pretrained={tmp_path / 'r50.pth'}"],
         "does not fit resnet18: unexpected key"),
        (["--set", "data_dir=null"], "needs data_dir"),
        (["--set", "model=cnn", "--set", f"pretrained={weights}"], "pretrained needs model"),
        (["--set", "device=cuda:0"] if not torch.cuda.is_available() else
         ["--set", "device=tpu"], "device must be"),
        (["--set", "image_dataset=OfficeHome"], "dataset directory not found"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
    # known only once the data is read: refused before any training
    assert main(["run", "dg", "--out", str(tmp_path / "runs"), "--set",
                 "dataset=rotated_digits", "--set", "augment=true"]) == 2
    assert "augment needs RGB images" in capsys.readouterr().err
