import pytest

from asymlora import ConfigError
from asymlora.train import TrainConfig, apply_overrides
from asymlora.train.dataset import MixtureSampler
from asymlora.train.distributed import has_accelerator as _has_accelerator


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_overrides_and_sections(tmp_path):
    path = write(tmp_path, "model: {path: default}\nadapter: {method: asymlora_moe, num_experts: 2}\n"
                           "training: {learning_rate: 1.0e-4}\n")
    config = TrainConfig.load(path, ["training.learning_rate=3e-4", "adapter.r=16", "data.max_length=64",
                                     "projector_lr=2e-5"])
    assert config.training["learning_rate"] == 3e-4 and config.adapter["r"] == 16
    assert config.data.max_length == 64 and config.projector_lr == 2e-5
    args = TrainConfig.from_dict({"training": {"output_dir": str(tmp_path / "o"), "gradient_checkpointing": True,
                                               "use_cpu": True}}).training_arguments()
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False} and not args.remove_unused_columns
    # no pinning (and no torch warning on every dataloader) where there is no device, as use_cpu already does
    plain = TrainConfig.from_dict({"training": {"output_dir": str(tmp_path / "o")}})
    assert plain.training_arguments().dataloader_pin_memory is _has_accelerator()
    plain.training["dataloader_pin_memory"] = True
    assert plain.training_arguments().dataloader_pin_memory is True  # the user's setting wins
    adapter = config.adapter_config(["vqa", "ocr"])
    assert adapter.tasks == ["vqa", "ocr"] and adapter.r == 16


@pytest.mark.parametrize(("text", "overrides", "message"), [
    ("trainig: {}\n", [], r"unknown key trainig \(did you mean 'training'\?\)"),
    ("training: {learning_rat: 1}\n", [], r"unknown key training.learning_rat \(did you mean 'training.learning_rate'\?\)"),
    ("adapter: {rank: 4}\n", [], r"unknown key adapter.rank"),
    ("data: {max_len: 4}\n", [], r"unknown key data.max_len \(did you mean 'data.max_length'\?\)"),
    ("{}\n", ["modle.path=x"], r"unknown section 'modle' \(did you mean 'model'\?\)"),
    ("{}\n", ["training.learning_rate"], "expected key=value"),
    ("data: {on_error: ignore}\n", [], "data.on_error"),
    ("router_lr: -1\n", [], r"router_lr: -1 is not a learning rate"),
    ("{}\n", ["projector_lr=fast"], r"projector_lr: 'fast' is not a learning rate"),
    ("loraplus_lr_ratio: 0\n", [], r"loraplus_lr_ratio: 0 is not a ratio"),
    ("loss_average: sample\n", [], r"loss_average: 'sample' is not one of .* \(did you mean 'samples'\?\)"),
    ("{}\n", ["loraplus_lr_ratio=.nan"], r"loraplus_lr_ratio: nan is not a ratio"),
])
def test_config_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(write(tmp_path, text), overrides)


def test_adapter_tasks_must_cover_mixture():
    config = TrainConfig.from_dict({"adapter": {"method": "asymlora", "tasks": ["a"]}})
    with pytest.raises(ConfigError, match="lacks the mixture's tasks"):
        config.adapter_config(["a", "b"])


def test_apply_overrides_parses_yaml_values():
    values = apply_overrides({}, ["adapter.tasks=[a, b]", "resume=true", "training.bf16=false"])
    assert values == {"adapter": {"tasks": ["a", "b"]}, "resume": True, "training": {"bf16": False}}


def test_mixture_sampler_deterministic_weighted_and_grouped():
    weights = [1.0] * 10 + [9.0] * 10  # second half nine times as likely
    sampler = MixtureSampler(weights, 4000, seed=3)
    first = list(sampler)
    assert first == list(sampler)
    share = sum(i >= 10 for i in first) / len(first)
    assert 0.87 < share < 0.93
    sampler.set_epoch(1)
    assert list(sampler) != first
    grouped = MixtureSampler(weights, 40, seed=3, lengths=list(range(20)), group_size=8)
    order = list(grouped)
    for start in range(0, 40, 8):
        chunk = [order[i] for i in range(start, start + 8)]
        assert chunk == sorted(chunk, key=lambda j: -j)


def test_presets_are_valid(tmp_path):
    from pathlib import Path

    presets = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(presets) >= 6
    for path in presets:
        config = TrainConfig.load(path, [f"training.output_dir={tmp_path / path.stem}", "training.use_cpu=true",
                                         "training.bf16=false"])
        adapter = config.adapter_config(["easyvqa", "fashion", "digits", "emoji", "ocr"])
        config.training_arguments()
        if path.stem == "llava15_7b":
            assert adapter.spec_for("model.language_model.layers.0.self_attn.q_proj").method == "lora"
            mlp = adapter.spec_for("model.language_model.layers.0.mlp.up_proj")
            assert (mlp.method, mlp.num_experts, mlp.r, mlp.alpha) == ("asymlora_moe", 3, 32, 64.0)
            assert adapter.balance_loss_weight == 0.05 and config.projector_lr == 2e-5
