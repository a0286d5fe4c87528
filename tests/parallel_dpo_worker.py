"""Run under torchrun by test_dpo.py: DPO-train CONFIG into OUT with the library's Trainer, then each
rank writes the share of the frozen reference's parameter elements it holds to OUT/ref_rank<r>.json."""

import json
import math
import sys
from pathlib import Path

from levante.config import TrainConfig
from levante.parallel.mesh import shutdown
from levante.train.trainer import Trainer

config, out = sys.argv[1], Path(sys.argv[2])
trainer = Trainer(TrainConfig.load(config), out)
trainer.fit()
params = list(trainer.task.reference.parameters())
held = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in params)
(out / f"ref_rank{trainer.dist.rank}.json").write_text(json.dumps(
    {"held": held, "total": sum(math.prod(p.shape) for p in params)}))  # shape: the whole tensor
shutdown()
