"""Multi-process plumbing: process-group set-up and teardown, DeepSpeed's config and dtype, ZeRO-Offload."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

# training.optim values that ZeRO-Offload keeps: accelerate swaps the optimizer for DeepSpeed's CPU version
# (param groups kept), AdamW -> DeepSpeedCPUAdam in AdamW mode, Adagrad -> DeepSpeedCPUAdagrad; any other
# optimizer it would silently replace by Adam.
CPU_OFFLOAD_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adagrad")


def has_accelerator() -> bool:
    """Whether torch sees a device that pinned host memory would feed (CUDA, XPU, MPS, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed (its config; {} without DeepSpeed) steps the optimizer on the CPU (ZeRO-Offload)
    with its own CPU optimizer."""
    device = (ds_config.get("zero_optimization") or {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme") and ds_config.get("zero_force_ds_cpu_optimizer", True) is not False


def set_up_processes(args: Any) -> None:
    """Start the process group before the model is built, and fill DeepSpeed's "auto" values for it.

    ZeRO-3 partitions the model while ``from_pretrained`` loads it, with the DeepSpeed config that
    ``TrainingArguments`` filled in when it was created, before any process group existed: with world
    size 1, so its ``train_batch_size`` is wrong under ``accelerate launch`` and zero.Init refuses it.
    """
    _ = args.device  # sets up the process group (accelerate's PartialState)
    if not args.deepspeed or args.world_size == 1:
        return
    import deepspeed
    import torch.distributed as dist
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    if dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)  # also what zero.Init reads
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


def match_deepspeed_dtype(model: torch.nn.Module, args: Any) -> None:
    """Under DeepSpeed's bf16/fp16 modes every parameter trains in that dtype (the optimizer holds fp32
    master weights), and ZeRO-3 needs the trainable ones to share it: the float32 adapter (and routers)
    are moved to it here. ZeRO-3's partitioned parameters are already in it."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if not args.deepspeed or ds_config is None:
        return
    dtype = (torch.bfloat16 if ds_config.is_true("bf16.enabled")
             else torch.float16 if ds_config.is_true("fp16.enabled") else None)
    if dtype is None:
        return
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype \
                and getattr(param, "ds_id", None) is None:
            param.data = param.data.to(dtype)


def end_processes(finished: bool) -> bool:
    """Tear down the process group this run started (under ``accelerate launch``), as PyTorch asks a run to;
    True when there was one.

    A finished run first waits for every rank, so that none tears the group down while another still uses
    it; a failed one does not wait (the other ranks may never get there).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    return True


def exit_without_teardown(code: int) -> None:
    """End a distributed rank now, skipping interpreter finalization (``os._exit``), once all is on disk.

    Even after ``destroy_process_group``, gloo's C++ worker threads can still hold finished work whose
    tensors reference Python objects (DeepSpeed and DDP keep their groups referenced); when the
    interpreter finalizes, freeing them needs the GIL and the rank aborts ("terminate called without an
    active exception", SIGABRT), failing a run that finished and saved everything (seen in CI under DDP
    and ZeRO-2/3). Every file this run writes is complete by now (atomic writes, the Trainer's callbacks
    closed at train end), so the rank flushes its logs and streams and leaves with its exit code.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
