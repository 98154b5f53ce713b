"""Multi-task training on HF Trainer: config → data → model → `AsymLoraTrainer` → checkpoints.

* ``config``: `TrainConfig` (the YAML schema, validation, ``key=value`` overrides);
* ``dataset``: samples encoded on access and the weighted multi-task sampler;
* ``loss``: next-token cross entropy over supervised tokens;
* ``trainer``: `AsymLoraTrainer` (optimizer groups, loss + balance loss, per-task logging, adapter
  checkpoints); imports transformers' Trainer, so it is imported when a run starts;
* ``checkpoints``: which ``checkpoint-N`` dirs are complete, finite and of the run's config;
* ``run_dir``: one run per output dir (another run's dir refused unless ``replace_run``);
* ``distributed``: process groups, DeepSpeed and FSDP plumbing;
* ``run``: `run_training`, one run from config to final adapter.
"""

from asymlora.train.checkpoints import last_checkpoint
from asymlora.train.config import DataSection, ModelSection, TrainConfig, apply_overrides
from asymlora.train.loss import next_token_loss
from asymlora.train.run import run_training

__all__ = ["DataSection", "ModelSection", "TrainConfig", "apply_overrides", "last_checkpoint", "next_token_loss",
           "run_training"]
