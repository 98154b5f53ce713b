"""`asymlora analyze`: gradient cosines on A / B, expert load, routing entropy, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from train_fixtures import train_setup, write_dataset

import asymlora
from asymlora.analyze.cosine import cosine_from_gram, cosine_matrix, mean_off_diagonal
from asymlora.analyze.experts import expert_similarity, task_expert_information
from asymlora.analyze.gradients import gradient_conflict, task_pass
from asymlora.analyze.run import load_for_analysis
from asymlora.cli import main
from asymlora.errors import ConfigError
from asymlora.train import TrainConfig, run_training

ROOT2 = math.sqrt(2.0)


def test_cosine_matrix_hand_computed():
    vectors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0], [0.0, 0.0]])
    cosine = cosine_matrix(vectors)
    expected = torch.tensor([[1.0, 1 / ROOT2, -1.0], [1 / ROOT2, 1.0, -1 / ROOT2], [-1.0, -1 / ROOT2, 1.0]],
                            dtype=torch.float64)
    assert torch.allclose(cosine[:3, :3], expected)
    assert torch.isnan(cosine[3]).all() and torch.isnan(cosine[:, 3]).all()  # a zero gradient has no direction
    gram = vectors.double() @ vectors.double().T
    assert torch.equal(cosine_from_gram(gram).isnan(), cosine.isnan())
    # off-diagonal mean over the finite pairs: (1/sqrt2 - 1 - 1/sqrt2) * 2 / 6
    assert mean_off_diagonal(cosine) == pytest.approx(-1 / 3)
    assert math.isnan(mean_off_diagonal(torch.ones(1, 1)))


def test_gradient_conflict_sums_layers_and_separates_heads():
    """Two tasks, two layers, E=2 heads; task t only reaches head t (task routing)."""
    a = {0: {"l1": torch.tensor([[1.0, 0.0]]), "l2": torch.tensor([[0.0, 3.0]])},
         1: {"l1": torch.tensor([[1.0, 1.0]]), "l2": torch.tensor([[0.0, -1.0]])}}
    zeros = torch.zeros(1, 2)
    b = {0: {"l1": torch.stack([torch.tensor([[2.0, 0.0]]), zeros]), "l2": torch.stack([torch.tensor([[0.0, 1.0]]), zeros])},
         1: {"l1": torch.stack([zeros, torch.tensor([[1.0, 0.0]])]), "l2": torch.stack([zeros, torch.tensor([[0.0, 1.0]])])}}
    passes = [{"A": a[t], "B": b[t]} for t in (0, 1)]
    result = gradient_conflict(passes)
    # A: g0 = (1,0,0,3), g1 = (1,1,0,-1): <g0,g1> = -2, |g0| = sqrt10, |g1| = sqrt3
    assert result["A"]["cosine"][0][1] == pytest.approx(-2 / math.sqrt(30))
    assert result["A"]["norm"] == pytest.approx([math.sqrt(10), math.sqrt(3)])
    assert result["B"]["cosine"][0][1] == 0.0  # disjoint heads
    # heads summed: s0 = (2,0,0,1), s1 = (1,0,0,1): 3 / (sqrt5 sqrt2)
    assert result["B_heads_summed"]["cosine"][0][1] == pytest.approx(3 / math.sqrt(10))
    head0 = result["B_per_expert"][0]
    assert head0["norm"] == pytest.approx([math.sqrt(5), 0.0]) and math.isnan(head0["cosine"][0][1])
    layers = {e["layer"]: e for e in result["per_layer"]}
    assert layers["l1"]["A"] == pytest.approx(1 / ROOT2) and layers["l2"]["A"] == pytest.approx(-1.0)


def test_task_gradient_is_the_mean_lm_loss_gradient(tmp_path):
    """Batched accumulation = the gradient of HF's own mean loss over all of a task's samples at once."""
    from asymlora.data.collator import Collator, SampleEncoder
    from asymlora.data.mixture import load_mixture
    from asymlora.tiny import tiny_llava, tiny_llava_processor

    mixture = load_mixture(write_dataset(tmp_path, n=5))
    samples = [s for s in mixture.load() if s.task == "color"]
    torch.manual_seed(0)
    model = asymlora.get_model(tiny_llava(), asymlora.AsymLoraConfig(method="asymlora_moe", r=2, num_experts=2,
                                                                     tasks=mixture.tasks)).eval()
    for layer in model.adapter_layers.values():
        torch.nn.init.normal_(layer.B_bank, std=0.1)  # B = 0 would make the A gradient zero
    processor = tiny_llava_processor()
    items = [SampleEncoder(processor, tasks=mixture.tasks, max_length=128)(s) for s in samples]
    collator = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    result = task_pass(model, items, collator, batch_size=2)
    batch = collator(items)
    task_ids = batch.pop("task_ids")
    model(**batch, task_ids=task_ids).loss.backward()
    for name, layer in model.adapter_layers.items():
        assert torch.allclose(result["A"][name], layer.A_bank.grad, atol=1e-6), name
        assert torch.allclose(result["B"][name], layer.B_bank.grad, atol=1e-6), name
    assert result["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert set(result["routing"]) == set(model.adapter_layers)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    runs = {}
    for method in ("asymlora_moe", "asymlora"):
        values = train_setup(tmp, method=method, max_steps=2, save_steps=100, output_dir=str(tmp / method))
        runs[method] = run_training(TrainConfig.from_dict(values))
    return tmp, runs


def check_cosines(matrix, size):
    assert len(matrix) == size and all(len(row) == size for row in matrix)
    for i, row in enumerate(matrix):
        assert row[i] == pytest.approx(1.0)
        assert all(-1.0 <= v <= 1.0 for v in row)
    assert matrix == [list(col) for col in zip(*matrix)]  # symmetric


def test_analyze_routed_adapter(adapters):
    tmp, runs = adapters
    out = tmp / "out_moe"
    assert main(["analyze", "--adapter", str(runs["asymlora_moe"]), "--samples-per-task", "4", "--batch-size", "4",
                 "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["tasks"] == ["color", "isred"] and result["method"] == "asymlora_moe"
    assert result["samples"] == {"color": 4, "isred": 4} and result["split"] == "train"  # no val split: train
    for group in ("A", "B", "B_heads_summed"):
        check_cosines(result["gradient"][group]["cosine"], 2)
    assert len(result["gradient"]["per_layer"]) == result["layers"] == 14
    assert len(result["gradient"]["B_per_expert"]) == 2
    routing = result["routing_stats"]
    assert len(routing["expert_load"]) == 2
    for row in routing["expert_load"]:
        assert len(row) == 2 and sum(row) == pytest.approx(1.0) and min(row) >= 0
    for per_layer in routing["expert_load_per_layer"].values():
        assert all(sum(row) == pytest.approx(1.0) for row in per_layer)
    assert all(0 <= h <= routing["max_entropy"] + 1e-6 for h in routing["entropy"])
    assert set(routing["task_expert_mi_per_layer"]) == set(routing["expert_load_per_layer"])
    assert all(-1e-12 <= v <= routing["max_task_expert_mi"] + 1e-9 for v in routing["task_expert_mi_per_layer"].values())
    for name in ("grad_cosine.png", "expert_load.png", "routing_entropy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "analysis.md").read_text()
    assert "## Expert load per task" in report and "## Gradient cosine: shared A" in report
    assert "## Task-expert mutual information" in report
    assert set(result["expert_similarity"]["per_layer"]) == set(routing["expert_load_per_layer"])
    assert "## Expert similarity" in report


@pytest.mark.parametrize("method", ["asymlora_moe", "lora_moe"])
def test_expert_similarity_matches_the_materialised_updates(method):
    from asymlora.tiny import tiny_llava

    model = asymlora.get_model(tiny_llava(), asymlora.AsymLoraConfig(method=method, num_experts=3, r=2))
    torch.manual_seed(0)
    layers = list(model.adapter_layers.values())
    with torch.no_grad():
        for layer in layers:
            layer.B_bank.normal_()
        layers[0].B_bank[1] = 2 * layers[0].B_bank[0]
        if method == "lora_moe":
            layers[0].A_bank[2:6] = layers[0].A_bank[0:2].repeat(2, 1)
        layers[0].B_bank[2] = -layers[0].B_bank[0]  # experts 0, 1 compute one update; expert 2 its opposite
    result = expert_similarity(model)
    for name, layer in model.adapter_layers.items():
        A = layer.A_bank.detach().double().view(layer.spec.num_A, 2, -1).expand(3, -1, -1)
        updates = torch.stack([layer.B_bank[e].double() @ A[e] for e in range(3)]).flatten(1)
        assert result["per_layer"][name] == pytest.approx(mean_off_diagonal(cosine_matrix(updates)), abs=1e-9)
    assert result["per_layer"][layers[0].name] == pytest.approx(-1 / 3, abs=1e-9)  # (1 - 1 - 1) / 3
    assert expert_similarity(asymlora.get_model(tiny_llava(), asymlora.AsymLoraConfig(method="lora"))) is None


def test_task_expert_information_bounds():
    import math

    assert task_expert_information([[0.5, 0.5], [0.5, 0.5]]) == 0.0  # every task routes alike
    assert task_expert_information([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(math.log(2))  # own experts
    assert 0 < task_expert_information([[0.7, 0.3], [0.3, 0.7]]) < math.log(2)


def test_analyze_task_routed_adapter(adapters):
    tmp, runs = adapters
    out = tmp / "out_task"
    checkpoint = runs["asymlora"] / "checkpoint-2"  # settings from the run's train_config.yaml one level up
    assert main(["analyze", "--adapter", str(checkpoint), "--samples-per-task", "4", "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["mixture"] == "tiny2" and result["tasks"] == ["color", "isred"]
    grad = result["gradient"]
    for group in ("A", "B", "B_heads_summed"):
        check_cosines(grad[group]["cosine"], 2)
    assert grad["B"]["cosine"][0][1] == 0.0  # task t's B gradient lives on head t only
    assert grad["B_heads_summed"]["cosine"][0][1] != 0.0 and grad["A"]["cosine"][0][1] != 0.0
    assert result["routing_stats"] is None and not (out / "expert_load.png").exists()
    assert any("by construction" in note for note in result["notes"])
    assert (out / "grad_cosine.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_fresh_config_and_errors(adapters, capsys):
    tmp, runs = adapters
    values = train_setup(tmp, method="asymlora_moe")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(values))
    out = tmp / "out_cfg"
    assert main(["analyze", "--config", str(tmp / "cfg.yaml"), "--samples-per-task", "2", "--tasks", "isred",
                 "color", "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["tasks"] == ["isred", "color"]
    assert result["gradient"]["A"]["cosine"] == [[None, None], [None, None]]  # B = 0 at init: no A gradient
    check_cosines(result["gradient"]["B"]["cosine"], 2)
    capsys.readouterr()
    assert main(["analyze", "--adapter", str(runs["asymlora"]), "--samples-per-task", "0", "--out", str(out)]) == 2
    assert "--samples-per-task" in capsys.readouterr().err
    assert main(["analyze", "--adapter", str(tmp / "nowhere"), "--out", str(out)]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert main(["analyze", "--adapter", str(runs["asymlora"]), "--tasks", "colour", "--out", str(out)]) == 2
    assert "--tasks" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="exactly one"):
        load_for_analysis()
