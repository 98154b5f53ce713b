"""`asymlora train CONFIG.yaml [key=value ...]`: multi-task visual instruction tuning on HF Trainer."""

from __future__ import annotations

import argparse
from typing import Any

from asymlora.errors import NonFiniteLossError

TRAIN_HELP = """One YAML file holds four sections and top-level keys::

    model:    {path: default | LOCAL_HF_DIR, dtype: float32, projector: null | FILE.safetensors}
    data:     {mixture: mix5 | FILE.yaml | {inline}, max_length: 1024, eval_split: val, ...}
    adapter:  AsymLoraConfig fields (tasks default to the mixture's task names)
    training: transformers.TrainingArguments fields (output_dir, learning_rate, bf16, ...)
    projector_lr: 2.0e-5      # learning rate of modules_to_save (e.g. the projector); null = same as lr
    router_lr: null           # learning rate of the routers and task biases; null = same as lr
    loraplus_lr_ratio: null   # LoRA+: the B banks learn at lr * ratio (A at lr); null = same as lr
    loss_average: tokens      # LM loss: mean over supervised tokens, or 'samples' (each sample's mean, then
                              # the mean over samples: a one-word answer weighs as much as a long caption)
    resume: false             # true = the newest complete checkpoint of this config in output_dir, or a path
    replace_run: false        # true = move another run found in output_dir to <output_dir>.replaced-N
                              # (otherwise a run of another config there is refused)

Loss = LM loss (mean over supervised tokens only, across gradient accumulation and ranks; or over
samples, with ``loss_average: samples``)
+ adapter.balance_loss_weight * aux loss. Per-task LM loss, router entropy and expert load are
logged every logging step. Every checkpoint holds the full adapter (asymlora's format), optimizer,
scheduler, RNG and data position; resuming continues exactly.
"""


def _cli_train(args: argparse.Namespace) -> int:
    from asymlora.train import TrainConfig, run_training
    from asymlora.train.distributed import end_processes, exit_without_teardown

    config = TrainConfig.load(args.config, args.overrides)
    finished, code = False, 1
    try:
        run_training(config, resume=args.resume)
        finished, code = True, 0
    except NonFiniteLossError as err:
        print(f"asymlora train: {err}")
    finally:
        ended = end_processes(finished)
    if ended:  # a rank of a distributed run: leave before interpreter finalization
        exit_without_teardown(code)
    return code


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train an adapter on a data mixture (HF Trainer; works under accelerate launch)",
        description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="training config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config values, e.g. training.max_steps=100 adapter.r=16")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="resume from the last checkpoint in output_dir, or from PATH")
    parser.set_defaults(func=_cli_train)
