"""Run under torchrun by test_parallel_bias.py: train CONFIG into OUT with the library's Trainer, then
each rank writes the router biases it holds in memory (not the checkpoint rank 0 saved) to
OUT/bias_rank<r>.pt, so the test can compare every rank's copy."""

import sys
from pathlib import Path

import torch

from levante.config import TrainConfig
from levante.model.moe import moe_layers
from levante.parallel.mesh import shutdown
from levante.train.trainer import Trainer

config, out = sys.argv[1], Path(sys.argv[2])
trainer = Trainer(TrainConfig.load(config), out)
trainer.fit()
# A buffer is replicated by FSDP, never a DTensor; to_local (if it ever became one) keeps this rank's copy.
biases = {f"layer{i}": getattr(b, "to_local", lambda b=b: b)().detach().clone()
          for i, b in enumerate(moe.gate.e_score_correction_bias for moe in moe_layers(trainer.model))}
torch.save(biases, out / f"bias_rank{trainer.dist.rank}.pt")
shutdown()
