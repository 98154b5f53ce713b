import pytest

from asymlora import AsymLoraConfig, ConfigError

TASKS = ["vqa", "ocr", "caption"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(r=0), "r:"),
        (dict(r=-4), "r:"),
        (dict(method="lorra"), "method:"),
        (dict(method="asymlora_moe", routing="softmax"), "routing:"),
        (dict(method="asymlora_moe", num_experts=0), "num_experts:"),
        (dict(method="lora_moe", routing="topk", num_experts=2, top_k=3), "top_k:"),
        (dict(method="asymlora", routing="task"), "tasks:"),
        (dict(method="asymlora", tasks=TASKS, num_experts=2), "num_experts:"),
        (dict(method="asymlora", tasks=TASKS, routing="dense"), "routing:"),
        (dict(method="lora", num_experts=3), "num_experts:"),
        (dict(alpha=0), "alpha:"),
        (dict(dropout=1.0), "dropout:"),
        (dict(target_parts=["decoder"]), "target_parts:"),
        (dict(tasks=["a", "a"]), "tasks:"),
        (dict(overrides={"mlp": {"rank": 4}}), "overrides"),
        (dict(overrides={"mlp": {"method": "nope"}}), "method:"),
        (dict(b_init_std=-1.0, router_init_std=0.0), "b_init_std:"),
        (dict(b_init_std=0.01), "b_init_std: needs router_init_std: 0"),
        (dict(method="asymlora_moe", routing="topk", b_init_std=0.01, router_init_std=0.0), "b_init_std:"),
        (dict(method="lora", b_init_std=0.01, router_init_std=0.0), "b_init_std:"),
    ],
)
def test_bad_config_raises_one_clear_error(kwargs, field):
    with pytest.raises(ConfigError) as info:
        AsymLoraConfig(**kwargs)
    assert field in str(info.value)


def test_error_lists_allowed_values_and_suggests():
    with pytest.raises(ConfigError, match=r"did you mean 'lora_moe'"):
        AsymLoraConfig(method="lora_mo")
    with pytest.raises(ConfigError, match=r"is not one of \('task', 'dense', 'topk', 'hybrid'\)"):
        AsymLoraConfig(routing="soft")


def test_defaults_per_method():
    assert AsymLoraConfig(method="lora").layer_spec().num_experts == 1
    spec = AsymLoraConfig(method="asymlora", tasks=TASKS).layer_spec()
    assert (spec.routing, spec.num_experts, spec.num_A) == ("task", 3, 1)
    spec = AsymLoraConfig(method="lora_moe", num_experts=3).layer_spec()
    assert (spec.routing, spec.num_A, spec.has_router) == ("dense", 3, True)
    assert AsymLoraConfig(r=16, alpha=32).layer_spec().scaling == 2.0
    assert AsymLoraConfig(r=16, alpha=32, use_rslora=True).layer_spec().scaling == 8.0


def test_unknown_task_name_and_id():
    config = AsymLoraConfig(method="asymlora", tasks=TASKS)
    assert config.task_id("ocr") == 1
    with pytest.raises(ConfigError, match="'ocrr' is not in tasks"):
        config.task_id("ocrr")
    with pytest.raises(ConfigError, match="out of range"):
        config.task_id(7)


def test_overrides_resolve_per_module():
    config = AsymLoraConfig(method="asymlora_moe", num_experts=3, r=32, alpha=64,
                            overrides={r"self_attn\.": {"method": "lora", "num_experts": None}})
    assert config.spec_for("model.layers.0.self_attn.q_proj").method == "lora"
    assert config.spec_for("model.layers.0.mlp.up_proj").num_experts == 3


def test_from_yaml_and_unknown_key(tmp_path):
    path = tmp_path / "adapter.yaml"
    path.write_text("adapter:\n  method: asymlora\n  tasks: [a, b]\n  r: 4\n")
    config = AsymLoraConfig.from_file(path)
    assert config.layer_spec().num_experts == 2
    path.write_text("method: asymlora\ntasks: [a, b]\nrank: 4\n")
    with pytest.raises(ConfigError, match=r"unknown field 'rank'.*"):
        AsymLoraConfig.from_file(path)
    path.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        AsymLoraConfig.from_file(path)


def test_rank_for_budget_takes_the_closest_count_ties_low_and_stops_past_the_budget():
    from asymlora.config import rank_for_budget

    asked = []

    def count(r: int) -> int:
        asked.append(r)
        return 10 * r

    assert rank_for_budget(count, 34, 16) == (3, 30)  # 30 is closer than 40
    assert asked == [1, 2, 3, 4]  # 40 is over the budget: no larger rank is counted
    assert rank_for_budget(count, 35, 16) == (3, 30)  # a tie goes to the lower rank
    assert rank_for_budget(count, 500, 16) == (16, 160)  # the budget out of reach: the largest rank
    assert rank_for_budget(count, 1, 16) == (1, 10)  # even rank 1 is over: rank 1
    with pytest.raises(ConfigError, match="max_rank"):
        rank_for_budget(count, 10, 0)


def test_from_json_reads_the_config_section_and_names_the_line_of_a_damaged_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"config": {"method": "asymlora", "tasks": ["a", "b"], "r": 4}}\n')
    assert AsymLoraConfig.from_file(path).layer_spec().num_experts == 2
    path.write_text('{"method": "asymlora",\n "r": 4,,\n}\n')
    with pytest.raises(ConfigError, match=rf"{path}, line 2, column \d+: not valid JSON"):
        AsymLoraConfig.from_file(path)
    path.write_bytes(b'{"method": "lora\xff"}\n')
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text"):
        AsymLoraConfig.from_file(path)
