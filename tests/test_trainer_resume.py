"""Pruning resumes exactly from the checkpoints of training frameworks that save the optimizer's state_dict.

``transformers.Trainer`` and Lightning save ``optimizer.state_dict()`` in each checkpoint and load it
when training resumes; the pruner's schedule travels inside that state_dict, so a run resumed from a
mid-schedule checkpoint (other initial weights, a new optimizer and Pruner) ends with the weights and
masks of the uninterrupted run, bit for bit.
"""

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain import methods

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS, SAVE = 12, 5  # the checkpoint at step 5 lies inside the pruning schedule (events at 2, 4, 6, 8)


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))

    def forward(self, x, y):
        return {"loss": nn.functional.mse_loss(self.net(x), y)}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(96, 6, generator=gen), torch.randn(96, 4, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _trainer(tmp, method, seed):
    torch.manual_seed(seed)
    model = Regression()
    opt = sparsetrain.optim.AdamW(model.parameters(), lr=1e-2, backend="torch", seed=11)
    pruner = sparsetrain.Pruner(model, opt, method(), coupled=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=STEPS, per_device_train_batch_size=8, save_steps=SAVE, save_strategy="steps",
        report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=5, dataloader_num_workers=0,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + 0.1 * step))
    return model, pruner, transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, sched))


@pytest.mark.parametrize(
    "method",
    [
        lambda: methods.Magnitude(0.6, schedule="linear", start=0, end=8, interval=2),
        lambda: methods.StochasticMagnitude(0.6, start=1, end=9, interval=2, temperature=0.5),
        lambda: methods.GReg1(0.5, update_interval=2, delta=0.05, ceiling=0.2, stabilize=2),
    ],
    ids=["magnitude", "stochastic", "greg1"],
)
def test_trainer_resume_from_mid_schedule_checkpoint_is_bit_identical(tmp_path, method):
    model_a, pruner_a, trainer_a = _trainer(tmp_path / "a", method, seed=0)
    trainer_a.train()
    # the resumed run starts from other weights: everything must come from checkpoint-5
    model_b, pruner_b, trainer_b = _trainer(tmp_path / "b", method, seed=99)
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{SAVE}"))
    assert pruner_a.step_count == pruner_b.step_count == STEPS
    for t_a, t_b in zip(pruner_a.targets, pruner_b.targets):
        assert torch.equal(pruner_a.mask(t_a.param), pruner_b.mask(t_b.param)), t_a.name
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert min(m["weight_sparsity"] for m in pruner_a.metrics().values()) >= 0.3  # the events did happen


def _lightning_run(tmp, method, seed, ckpt=None):
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.model = Regression()

        def training_step(self, batch, index):
            return self.model(batch["x"], batch["y"])["loss"]

        def configure_optimizers(self):
            opt = sparsetrain.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, backend="torch", seed=11)
            self.pruner = sparsetrain.Pruner(self.model, opt, method(), coupled=False)
            return opt

    module = Module()
    loader = torch.utils.data.DataLoader(Data(), batch_size=8, shuffle=False)  # 12 batches an epoch
    save = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp), every_n_epochs=1, save_top_k=-1)
    trainer = lightning.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[save],
    )  # fmt: skip
    trainer.fit(module, loader, ckpt_path=ckpt)
    return module


@pytest.mark.parametrize(
    "method",
    [
        lambda: methods.Magnitude(0.6, schedule="linear", start=4, end=28, interval=4),
        lambda: methods.GReg1(0.5, update_interval=3, delta=0.05, ceiling=0.2, stabilize=3),
    ],
    ids=["magnitude", "greg1"],
)
def test_lightning_resume_from_epoch_checkpoint_is_bit_identical(tmp_path, method):
    pytest.importorskip("lightning")
    straight = _lightning_run(tmp_path / "a", method, seed=0)
    resumed = _lightning_run(tmp_path / "b", method, seed=99, ckpt=str(tmp_path / "a" / "epoch=0-step=12.ckpt"))
    assert straight.pruner.step_count == resumed.pruner.step_count == 36
    for t_a, t_b in zip(straight.pruner.targets, resumed.pruner.targets):
        assert torch.equal(straight.pruner.mask(t_a.param), resumed.pruner.mask(t_b.param)), t_a.name
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert min(m["weight_sparsity"] for m in straight.pruner.metrics().values()) >= 0.3
