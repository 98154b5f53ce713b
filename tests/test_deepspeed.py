"""`asymlora train` under DeepSpeed ZeRO-2/3: two CPU processes (gloo) via `accelerate launch`.

Skipped where DeepSpeed is not installed (`./run tests` installs it). Each case is compared with a plain
2-process DDP run of the same config: the same loss curve, the same final adapter; and a ZeRO checkpoint
resumes to bit-identical tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import launch_two_processes, losses, train_setup

pytest.importorskip("deepspeed")

from asymlora.default_model import find_projector, save_projector  # noqa: E402
from asymlora.errors import ConfigError  # noqa: E402
from asymlora.tiny import tiny_llava  # noqa: E402
from asymlora.train import TrainConfig  # noqa: E402

ZERO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto"}


def _launch(config: dict, path: Path, *overrides: str) -> None:
    path.write_text(yaml.safe_dump(config))
    launch_two_processes(path, *overrides, timeout=900)


def _projector(tmp_path: Path) -> Path:
    """A projector file unlike the tiny model's own weights (so a load that is skipped shows)."""
    path = tmp_path / "projector.safetensors"
    if not path.exists():
        model = tiny_llava()
        with torch.no_grad():
            for param in find_projector(model).parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
        save_projector(model, path)
    return path


def _config(tmp_path: Path, name: str, stage: int | None) -> dict:
    values = train_setup(tmp_path, method="asymlora_moe", max_steps=6, save_steps=3, logging_steps=1,
                         per_device_train_batch_size=2)
    values["training"]["output_dir"] = str(tmp_path / name)
    values["model"]["projector"] = str(_projector(tmp_path))  # loaded into a model ZeRO-3 has partitioned
    if stage is not None:
        values["training"]["deepspeed"] = {**ZERO, "zero_optimization": {
            "stage": stage, "stage3_gather_16bit_weights_on_model_save": True}}
    return values


def _assert_resumes_exactly(config: dict, tmp_path: Path, name: str) -> None:
    """Resume run ``name`` from its step-3 checkpoint: the same tensors at step 6, bit for bit."""
    run, resumed = tmp_path / name, tmp_path / f"{name}_resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoint-3", resumed / "checkpoint-3")
    _launch(config, tmp_path / f"{name}_resumed.yaml", f"training.output_dir={resumed}", "--resume")
    final, again = load_file(run / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert again.keys() == final.keys()
    for key in final:
        assert torch.equal(again[key], final[key]), (name, key)
    assert losses(resumed)[-3:] == losses(run)[-3:]


def test_zero2_and_zero3_match_ddp_and_resume_exactly(tmp_path):
    _launch(_config(tmp_path, "ddp", None), tmp_path / "ddp.yaml")
    reference = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    for stage in (2, 3):
        name = f"zero{stage}"
        config = _config(tmp_path, name, stage)
        _launch(config, tmp_path / f"{name}.yaml")
        run = tmp_path / name
        assert losses(run) == pytest.approx(losses(tmp_path / "ddp"), rel=1e-4, abs=1e-5), name
        final = load_file(run / "adapter_model.safetensors")
        assert final.keys() == reference.keys()
        for key in final:  # every trainable tensor: A, B bank, routers, projector
            torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)

        # DeepSpeed's own checkpoint holds the trainable tensors only, not a copy of the frozen model.
        adapter = set(load_file(run / "checkpoint-3" / "adapter_model.safetensors"))
        files = sorted((run / "checkpoint-3" / "global_step3").glob("*model_states.pt"))
        assert files
        for file in files:  # ZeRO-2: one file; ZeRO-3: one per rank
            states = torch.load(file, map_location="cpu", weights_only=False)
            assert {k.removeprefix("base_model.") for k in states["module"]} == adapter, file.name
            assert states["frozen_param_fragments"] is None and states["frozen_param_shapes"] is None

        _assert_resumes_exactly(config, tmp_path, name)


def test_zero3_bf16_trains_like_ddp_bf16(tmp_path):
    """DeepSpeed's bf16 mode casts the model to bf16: the float32 adapter must follow (ZeRO-3 refuses
    trainable parameters of two dtypes), and the routing statistics must accept bf16 router outputs."""
    runs = {}
    for name, stage in (("ddp_bf16", None), ("zero3_bf16", 3)):
        config = _config(tmp_path, name, stage)
        config["training"]["bf16"] = True
        if stage is not None:
            config["training"]["deepspeed"]["bf16"] = {"enabled": "auto"}
        _launch(config, tmp_path / f"{name}.yaml")
        runs[name] = losses(tmp_path / name)
    # bf16 weights (DeepSpeed) against float32 weights under bf16 autocast (DDP): close, not equal
    assert runs["zero3_bf16"] == pytest.approx(runs["ddp_bf16"], rel=2e-3)
    final = load_file(tmp_path / "zero3_bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert all(torch.isfinite(t.float()).all() for t in final.values())


def test_deepspeed_optimizer_section_is_refused(tmp_path):
    values = _config(tmp_path, "run", 2)
    values["training"]["deepspeed"]["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    with pytest.raises(ConfigError, match=r"training\.deepspeed: remove the 'optimizer' section"):
        TrainConfig.from_dict(values).training_arguments()


def test_zero_offload_matches_ddp_and_resumes_exactly(tmp_path):
    """ZeRO-Offload: optimizer state (ZeRO-2, ZeRO-3) and parameters (ZeRO-3) on the CPU. accelerate swaps
    asymlora's AdamW for DeepSpeed's CPU Adam with the same parameter groups (adapter, routers, projector
    at their own rates): the same loss curve and adapter as DDP with torch's AdamW."""
    _launch(_config(tmp_path, "ddp", None), tmp_path / "ddp.yaml")
    reference = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    offloads = {2: {"offload_optimizer": {"device": "cpu"}},
                3: {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    for stage, offload in offloads.items():
        name = f"zero{stage}_offload"
        config = _config(tmp_path, name, stage)
        config["training"]["deepspeed"]["zero_optimization"].update(offload)
        _launch(config, tmp_path / f"{name}.yaml")
        run = tmp_path / name
        assert losses(run) == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5), name
        final = load_file(run / "adapter_model.safetensors")
        assert final.keys() == reference.keys()
        for key in final:
            torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
        if stage == 3:  # the optimizer state on the CPU is in the checkpoint: resuming is exact
            _assert_resumes_exactly(config, tmp_path, name)


def test_zero_offload_refuses_an_optimizer_without_a_cpu_version(tmp_path):
    values = _config(tmp_path, "run", 2)
    values["training"]["deepspeed"]["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    values["training"]["optim"] = "sgd"
    with pytest.raises(ConfigError, match=r"training\.optim: 'sgd' has no DeepSpeed CPU version"):
        TrainConfig.from_dict(values).training_arguments()
    values["training"]["deepspeed"]["zero_force_ds_cpu_optimizer"] = False  # the user's own choice: allowed
    TrainConfig.from_dict(values).training_arguments()
