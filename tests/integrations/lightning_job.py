"""Lightning training on 2 CPU processes (ddp_spawn) with GradcompDDPStrategy; run by
tests/integrations/test_integrations.py as a script, so Lightning never re-executes pytest.

Usage: python lightning_job.py OUT_DIR MAX_STEPS [RESUME_CHECKPOINT]
Every rank writes OUT_DIR/rank{r}.pt: the State's step at train start, its stats, residual
count and the final weights. A checkpoint (and each rank's gradcomp side file) is written
into OUT_DIR/ckpt every 4 steps.
"""

import os
import sys

import lightning as L
import torch
import torch.nn as nn
from gradcomp.integrations.lightning import GradcompDDPStrategy
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self, out_dir: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
        self.out_dir = out_dir
        self.started_at = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_start(self):
        state = self.trainer.strategy.gradcomp_state
        self.started_at = {"step": state.step, "residuals": len(state.residuals), "seed": state.seed}

    def on_train_end(self):
        state = self.trainer.strategy.gradcomp_state
        torch.save({"started_at": self.started_at, "stats": dict(state.stats), "step": state.step,
                    "params": torch.cat([p.detach().reshape(-1) for p in self.parameters()]),
                    "world": self.trainer.world_size},
                   os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


def main():
    out_dir, max_steps = sys.argv[1], int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, strategy=GradcompDDPStrategy("int8", start_method="spawn",
                                                                 state_kwargs={"min_numel": 256}),
        callbacks=[ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"), every_n_train_steps=4, save_top_k=-1)])
    trainer.fit(Regressor(out_dir), DataLoader(data, batch_size=16), ckpt_path=resume)


if __name__ == "__main__":
    main()
