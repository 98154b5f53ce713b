"""`run_training`: one training run from a `TrainConfig` to the final adapter in its output dir."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.data.collator import Collator
from asymlora.data.mixture import load_mixture
from asymlora.errors import CheckpointError, ConfigError
from asymlora.loading import load_model_and_processor
from asymlora.model import format_param_report, get_model, param_report
from asymlora.quantization import prepare_for_kbit_training
from asymlora.train.checkpoints import checkpoint_problem, last_checkpoint
from asymlora.train.config import TrainConfig
from asymlora.train.dataset import build_datasets
from asymlora.train.distributed import match_deepspeed_dtype, set_up_processes


def run_training(config: TrainConfig, resume: str | bool | None = None, callbacks: Sequence[Any] = ()) -> Path:
    """Train as configured; returns the output dir holding the final adapter.

    ``resume``: None (the config's ``resume``), True (the newest checkpoint in the output dir that is complete,
    finite and of this config; each newer one skipped is printed with the reason) or a checkpoint path;
    ``callbacks``: extra ``transformers.TrainerCallback`` instances for the Trainer. The output dir holds one
    run (:mod:`asymlora.train.run_dir`): another run's dir is refused unless ``config.replace_run``.
    """
    import transformers

    from asymlora.train.run_dir import RunDir

    args = config.training_arguments()
    run_config = config.to_dict()
    run_dir = RunDir(args.output_dir, run_config, replace=config.replace_run, writes=args.should_save,
                     source=config.source)
    resume = config.resume if resume is None else resume
    checkpoint = _checkpoint_to_resume(resume, Path(args.output_dir), run_config, not args.save_only_model,
                                       replacing=run_dir.replace)
    set_up_processes(args)
    mixture_tasks = load_mixture(config.data.mixture).tasks
    adapter_config = config.adapter_config(mixture_tasks)
    base, processor = load_model_and_processor(config.model.path, config.model.dtype, config.model.projector,
                                               config.model.quantization)
    if config.model.quantization:
        checkpointing = getattr(args, "activation_checkpointing", None)
        prefix = "gradient" if checkpointing is None else "activation"
        prepare_for_kbit_training(base, bool(getattr(args, f"{prefix}_checkpointing", False)),
                                  getattr(args, f"{prefix}_checkpointing_kwargs", None))
    # Seeded after loading: the adapter's initial values must not depend on how the base model was
    # loaded (ZeRO-3's zero.Init draws random numbers while loading, a plain load does not).
    transformers.set_seed(args.seed)
    model = get_model(base, adapter_config)
    match_deepspeed_dtype(model, args)
    data = build_datasets(config, processor, adapter_config.tasks, args.seed)
    tokenizer = getattr(processor, "tokenizer", processor)
    collator = Collator(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                        else tokenizer.eos_token_id)
    if args.eval_strategy != "no" and data["eval"] is None:
        off = "or turn evaluation off: data.eval_split=null training.eval_strategy=no"
        if config.data.eval_split:
            raise ConfigError(f"{config.source}: data.eval_split: the mixture has no {config.data.eval_split!r} "
                              f"samples; give its datasets one (splits: {{{config.data.eval_split}: FILE}} in the "
                              f"mixture entry) {off}")
        raise ConfigError(f"{config.source}: training.eval_strategy={args.eval_strategy!r} needs data.eval_split, "
                          f"{off.removeprefix('or ')}")
    fsdp_requested = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if args.fsdp and args.parallel_mode.value != "distributed":
        raise ConfigError(f"{config.source}: training.fsdp: FSDP shards the model across processes; start this "
                          "under accelerate launch with 2 or more processes (on GPUs)")
    from asymlora.train.trainer import AsymLoraTrainer  # transformers' Trainer: imported when a run starts

    report = param_report(model)
    trainer = AsymLoraTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"], data_collator=collator,
        processing_class=processor, tasks=adapter_config.tasks, projector_lr=config.projector_lr,
        router_lr=config.router_lr, loraplus_lr_ratio=config.loraplus_lr_ratio, loss_average=config.loss_average,
        sampler_weights=data["weights"], sample_lengths=data["lengths"], num_samples=config.data.num_samples,
        group_by_length=config.data.group_by_length, callbacks=list(callbacks) or None,
        run_config=run_config, on_first_step=lambda: run_dir.record(report),
    )
    if fsdp_requested and not trainer.is_fsdp_enabled:
        # accelerate enables FSDP on GPU-like devices only; elsewhere it falls back to DDP without a word
        warnings.warn(f"{config.source}: FSDP was asked for (training.fsdp or accelerate's config) but accelerate "
                      f"enables it on GPUs only: this run on {args.device.type} is plain DDP, and every process "
                      "holds the whole model", stacklevel=2)
    if args.fp16 and not trainer.accelerator.native_amp and not trainer.is_deepspeed_enabled:
        # accelerate turns fp16 autocast and loss scaling on for GPU-like devices only, without a word
        warnings.warn(f"{config.source}: training.fp16 has no effect on {args.device.type}: accelerate runs "
                      "fp16 mixed precision on GPUs only, so this run trains in float32 (bf16 works on CPU)",
                      stacklevel=2)
    out = Path(args.output_dir)
    print(format_param_report(report))
    run_dir.begin()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException:
        if not trainer.first_step.done:
            run_dir.abandon()
        raise
    trainer.save_model(str(out))
    trainer.save_state()
    encoder = data["encoder"]
    if encoder.too_long:
        print(f"note: {encoder.too_long} sample(s) longer than data.max_length={config.data.max_length} could not be "
              f"cut after their image tokens and were skipped (e.g. {encoder.skipped_ids[:5]})")
    print(f"adapter saved to {out}")
    return out


def _checkpoint_to_resume(resume: str | bool, out: Path, run_config: dict[str, Any], optimizer: bool,
                          replacing: bool) -> str | None:
    """The checkpoint a run resumes from: None (start from scratch), the newest valid one of ``out`` for
    ``resume: true`` (printing each newer one skipped and why), or the path given, checked alike."""
    if resume is True:
        skipped: list[tuple[Path, str]] = []
        found = None if replacing else last_checkpoint(out, run_config, optimizer, skipped)
        for path, reason in skipped:
            print(f"resume: skipped {path}: {reason}")
        if found is None:
            print(f"resume: no checkpoint of this run in {out}; starting from scratch")
            return None
        print(f"resume: continuing from {found}")
        return str(found)
    if resume:
        problem = checkpoint_problem(resume, run_config, optimizer)
        if problem is not None:
            raise CheckpointError(f"resume: {resume}: {problem}")
        return str(resume)
    return None
