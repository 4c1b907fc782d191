"""Lightning: ``Trainer.fit`` of a ternarized model with Chimera21 and a schedule, resumed from a
``ModelCheckpoint`` file, ends with the weights and optimizer state of the uninterrupted fit."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from integration_helpers import TinyClassifier, assert_same_optimizer_state, assert_same_tensors
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from chimera import Chimera21, ternarize
from chimera.nn import BitLinear


class TernaryModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = ternarize(TinyClassifier(), "chimera", skip=["net.4"], warmup_steps=4)
        assert isinstance(self.model.net[0], BitLinear)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.model(x, y)["loss"]

    def configure_optimizers(self):
        opt = Chimera21(self.parameters(), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=False)


def _fit(root, epochs: int, ckpt_path=None) -> pl.Trainer:
    checkpoints = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1,
                                  filename="{epoch}")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         callbacks=[checkpoints], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root)
    trainer.fit(TernaryModule(), _loader(), ckpt_path=ckpt_path)
    return trainer


def test_lightning_resume_from_model_checkpoint_matches_uninterrupted_fit(tmp_path):
    full = _fit(tmp_path / "full", epochs=3)
    resumed = _fit(tmp_path / "resumed", epochs=3, ckpt_path=tmp_path / "full" / "epoch=0.ckpt")
    assert full.global_step == resumed.global_step == 12
    a, b = full.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert_same_tensors(a, b, "weights")
    assert_same_optimizer_state(full.optimizers[0], resumed.optimizers[0])
    assert full.optimizers[0].param_groups[0]["lr"] == 1e-2 * 0.5**4  # the schedule resumed
    assert int(a["model.net.0.forward_step"]) == 12
