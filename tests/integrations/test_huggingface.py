"""SharpnessAwareTrainer: a real ``transformers.Trainer`` run with flatlab's SAM equals a plain
loop that applies flatlab's accumulation rule by hand (tiny model from a config, offline)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flatlab.integrations.huggingface import SharpnessAwareTrainer  # noqa: E402
from flatlab.optim import DGSAM, SAM  # noqa: E402

K, BATCH, STEPS = 2, 4, 3


def tiny_model():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


class Data(torch.utils.data.Dataset):
    def __init__(self, n=K * BATCH * STEPS):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 30, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class InOrder(SharpnessAwareTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def make_sam(model):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def run_trainer(tmp_path, model, opt, **extra):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=K, max_steps=STEPS, lr_scheduler_type="constant",
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
        disable_tqdm=True, **extra,
    )
    trainer = InOrder(model=model, args=args, train_dataset=Data(), optimizers=(opt, None))
    trainer.model_accepts_loss_kwargs = False  # the Trainer divides each loss by K
    trainer.train()
    return trainer


def test_trainer_with_accumulation_equals_the_plain_loop(tmp_path):
    model = tiny_model()
    trainer = run_trainer(tmp_path, model, make_sam(model), max_grad_norm=0.0)
    assert trainer.state.global_step == STEPS and trainer.sharpness_optimizer.steps == STEPS

    ref = tiny_model()
    opt = make_sam(ref)
    data = Data()
    ref.train()
    for t in range(STEPS):
        chunks = [slice((t * K + j) * BATCH, (t * K + j + 1) * BATCH) for j in range(K)]
        for sl in chunks[:-1]:  # carried micro-batches
            (ref(input_ids=data.ids[sl], labels=data.labels[sl]).loss / K).backward()

        def closure(sl=chunks[-1]):
            loss = ref(input_ids=data.ids[sl], labels=data.labels[sl]).loss / K
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_max_grad_norm_moves_to_the_optimizer_and_bad_optimizers_are_refused(tmp_path):
    model = tiny_model()
    trainer = run_trainer(tmp_path, model, make_sam(model), max_grad_norm=0.5)
    assert trainer.sharpness_optimizer.clip_grad_norm == 0.5 and trainer.args.max_grad_norm == 0
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="needs optimizers=\\(a flatlab"):
        SharpnessAwareTrainer(model=model, args=args, train_dataset=Data(),
                              optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="one closure per domain"):
        SharpnessAwareTrainer(model=model, args=args, train_dataset=Data(),
                              optimizers=(DGSAM(model.parameters(), torch.optim.SGD, lr=0.1), None))
