"""The benchmark scripts of the README run and write their result files."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _run_tiny(script: str, out: Path, *args: str) -> None:
    """Run a benchmark script on its tiny preset, CPU, no warm-up, writing to ``out``."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--preset", "tiny", *args,
                           "--warmup", "0", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_layer_speed_script_writes_results(tmp_path):
    _run_tiny("layer_speed.py", tmp_path, "--iters", "1", "--profile", "3")
    data = json.loads((tmp_path / "layer_speed_tiny_cpu.json").read_text())
    impls = {(row["method"], row["impl"]) for row in data["rows"]}
    assert ("asymlora_moe (dense)", "loop") in impls and ("asymlora_moe (dense)", "fused") in impls
    md = (tmp_path / "layer_speed_tiny_cpu.md").read_text()
    assert "| lora | 1 | fused |" in md
    profiles = {(row["method"], row["impl"]): row["profile"] for row in data["rows"]}
    assert all(p["kernels"] is None and 1 <= len(p["top"]) <= 3 for p in profiles.values())  # CPU: no kernels
    # the loop formulation dispatches more operators than the fused layer, and LoRA fewer than either
    dense_fused, dense_loop = profiles[("asymlora_moe (dense)", "fused")], profiles[("asymlora_moe (dense)", "loop")]
    assert profiles[("lora", "fused")]["aten_ops"] < dense_fused["aten_ops"] < dense_loop["aten_ops"]
    assert "### One call under torch.profiler" in md


def test_layer_speed_compile_adds_a_compiled_row_per_fused_layer(tmp_path):
    _run_tiny("layer_speed.py", tmp_path, "--iters", "1", "--compile")
    data = json.loads((tmp_path / "layer_speed_tiny_cpu.json").read_text())
    assert data["compile"] == "default"
    fused = {(r["method"], r["E"]) for r in data["rows"] if r["impl"] == "fused"}
    assert fused == {(r["method"], r["E"]) for r in data["rows"] if r["impl"] == "compiled"}
    assert all(r["ms"] > 0 for r in data["rows"])
    md = (tmp_path / "layer_speed_tiny_cpu.md").read_text()
    assert "| x compiled LoRA |" in md and "| lora | 1 | compiled |" in md and "torch.compile (inductor" in md


def test_task_path_crossover_script_times_both_paths(tmp_path):
    _run_tiny("task_path_crossover.py", tmp_path, "--rounds", "1")
    data = json.loads((tmp_path / "task_path_crossover_tiny_cpu.json").read_text())
    from asymlora.layer import TASK_BMM_MIN_WORK

    assert data["task_bmm_min_work"] == TASK_BMM_MIN_WORK
    rows = data["rows"]
    assert [r["tokens_per_sample"] for r in rows] == [1, 4, 16, 64]
    assert all(r["per_sample_ms"] > 0 and r["gated_ms"] > 0 and r["lora_ms"] > 0 for r in rows)
    # E = 3: (E-1) * L = 2, 8, 32, 128 -> the layer picks the gated product below 64, the per-sample heads above
    assert [r["picked"] for r in rows] == ["gated", "gated", "gated", "per_sample"]
    assert "| 3 | 64 | 128 |" in (tmp_path / "task_path_crossover_tiny_cpu.md").read_text()


def test_inference_cache_script_times_kept_against_restacked(tmp_path):
    _run_tiny("inference_cache.py", tmp_path, "--rounds", "1", "--experts", "3", "--methods", "asymlora", "asymlora_moe")
    data = json.loads((tmp_path / "inference_cache_tiny_cpu.json").read_text())
    assert [(r["method"], r["E"]) for r in data["rows"]] == [("asymlora", 3), ("asymlora_moe", 3)]
    for row in data["rows"]:
        for part in ("prefill", "decode"):
            assert row[f"{part}_kept_ms"] > 0 and row[f"{part}_restacked_ms"] > 0
            assert row[f"{part}_q1"] <= row[f"{part}_ratio"] <= row[f"{part}_q3"]
    assert "| asymlora_moe | 3 |" in (tmp_path / "inference_cache_tiny_cpu.md").read_text()


def test_inference_cache_restacked_arm_is_the_training_path():
    """The benchmark's "restacked" arm switches the kept copy off, and only while it runs."""
    import torch
    from torch import nn

    from asymlora import AsymLoraConfig, AsymLoraLinear

    bench = _load_benchmark("inference_cache")
    config = AsymLoraConfig(method="asymlora_moe", num_experts=3, routing="dense", r=2)
    layer = AsymLoraLinear(nn.Linear(4, 5), config.layer_spec(), name="l").eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        with bench.restacking():
            layer(x)
            assert layer._stacked_cache is None
        layer(x)
        assert layer._stacked_cache is not None


def test_inference_cache_eval_mode_gives_the_same_answers_in_both_arms(tmp_path):
    """--adapter: asymlora eval's generation with a trained router-gated adapter, timed in both arms."""
    import yaml
    from train_fixtures import train_setup

    from asymlora.train import TrainConfig, run_training

    values = train_setup(tmp_path, method="asymlora_moe", max_steps=3, save_steps=100)
    for entry in values["data"]["mixture"]["datasets"]:
        entry["splits"] = {"test": entry["path"]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(values["data"]["mixture"]))
    values["data"]["mixture"] = str(tmp_path / "mix.yaml")
    run = run_training(TrainConfig.from_dict(values))
    bench = _load_benchmark("inference_cache")
    result = bench.main(["--adapter", str(run), "--mixture", str(tmp_path / "mix.yaml"), "--rounds", "1",
                         "--warmup", "0", "--max-samples", "3", "--max-new-tokens", "3", "--quiet",
                         "--out-dir", str(tmp_path / "out")])
    row = result["eval"]
    assert row["same_answers"] is True and row["items"] == 6 and row["kept_s"] > 0 and row["restacked_s"] > 0
    assert (row["method"], row["routing"], row["E"]) == ("asymlora_moe", "dense", 2)
    assert "| yes |" in (tmp_path / "out" / "inference_cache_eval.md").read_text()


def test_quality_benchmark_trains_evaluates_and_reports(tmp_path, isolated_cache, monkeypatch):
    """benchmarks/quality.py on the tiny model and tiny mixture: matched budgets, mixed and single-domain
    runs, a resumable results file and the RESULTS tables."""
    import pytest
    import torch

    from asymlora.assets import locate
    from asymlora.cli import main

    if locate("easyvqa") is None:
        pytest.skip("easy-VQA is not installed: asymlora setup --only easyvqa")
    assert main(["data", "build", "--only", "easyvqa", "ocr", "--max-per-split", "16"]) == 0
    quality = _load_benchmark("quality")
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--projector", "", "--mixture", "tiny", "--steps", "2", "--batch-size", "2",
            "--eval-samples", "1", "--max-new-tokens", "2", "--methods", "lora", "asymlora", "--seeds", "0",
            "--single-domain", "steps", "data", "--name", "t", "--out", str(tmp_path / "res")]
    assert quality.main(argv) == 0
    data = json.loads((tmp_path / "res" / "quality_t.json").read_text())
    ranks = data["ranks"]
    assert ranks["lora"]["r"] == 16 and ranks["asymlora"]["r"] < 16  # E = 2 heads: a smaller rank, same budget
    assert abs(ranks["asymlora"]["params"] - data["budget"]) / data["budget"] < 0.1
    settings = sorted((r["setting"], r["method"], tuple(r["tasks"]), r["steps"]) for r in data["runs"])
    # one task = one head: task-routed AsymLoRA's one-task adapter is LoRA's, trained once; the equal-data
    # design trains each one-task adapter on the task's share (1/2) of the steps
    assert settings == [("mixed", "asymlora", ("easyvqa", "ocr"), 2), ("mixed", "lora", ("easyvqa", "ocr"), 2),
                        ("single", "lora", ("easyvqa",), 2), ("single", "lora", ("ocr",), 2),
                        ("single_data", "lora", ("easyvqa",), 1), ("single_data", "lora", ("ocr",), 1)]
    single = next(r for r in data["runs"] if r["setting"] == "single_data" and r["tasks"] == ["ocr"])
    assert set(single["scores"]) == {"ocr"}
    mixed = next(r for r in data["runs"] if r["setting"] == "mixed" and r["method"] == "asymlora")
    assert mixed["adapter_params"] == ranks["asymlora"]["params"]  # the trained adapter has the counted size
    assert set(mixed["scores"]) == {"easyvqa", "ocr"} and mixed["train_seconds"] > 0
    assert mixed["machine"]["device"] == "cpu" and mixed["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert mixed["machine"]["cpu"] and mixed["machine"]["torch"] == torch.__version__
    report = (tmp_path / "res" / "quality_t.md").read_text()
    assert "Conflict cost, equal steps" in report and "Conflict cost, equal data" in report
    assert "| asymlora | lora |" in report  # asymlora's conflict cost is measured against LoRA's one-task runs
    assert (tmp_path / "res" / "quality_t.png").read_bytes()[:4] == b"\x89PNG"
    for run in data["runs"]:  # each run's per-item scores, as `asymlora eval --out` writes them
        rows = [json.loads(line) for line in (Path(run["eval_dir"]) / "predictions.jsonl").read_text().splitlines()]
        assert sorted(row["task"] for row in rows) == sorted(run["tasks"]) and all("score" in row for row in rows)
    # the per-seed comparison stays with the runs; the summary holds it pooled over seeds, and nothing else
    # than the summary goes to --out
    paired = json.loads((tmp_path / "runs" / "quality" / "t" / "paired" / "s0" / "paired.json").read_text())
    asym = f"mixed-asymlora-r{ranks['asymlora']['r']}"
    assert paired["reference"] == "mixed-lora-r16-s0" and list(paired["runs"]) == [f"{asym}-s0"]
    assert set(paired["tasks"]) == {"easyvqa", "ocr"}
    pooled = data["paired"]["mixed-lora-r16"]
    assert pooled["seeds"] == ["0"] and pooled["methods"][asym]["mean"] == paired["runs"][f"{asym}-s0"]["mean"]["diff"]
    assert f"| {asym} |" in report.split("### Paired differences to mixed-lora-r16, over seeds")[1]
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["quality_t.json", "quality_t.md", "quality_t.png"]
    before = (tmp_path / "res" / "quality_t.json").read_text()
    assert quality.main(argv) == 0  # every run is done: nothing retrains
    assert json.loads((tmp_path / "res" / "quality_t.json").read_text())["runs"] == json.loads(before)["runs"]
    _check_quality_keeps_what_a_stopped_run_trained(quality, argv, tmp_path / "res" / "quality_t.json")
    with pytest.raises(SystemExit, match=r"overrides=\[\]; these settings give overrides=\['loraplus_lr_ratio=2'\]"):
        quality.main([*argv, "--set", "loraplus_lr_ratio=2"])  # a variant must not join the plain runs' file
    assert data["setup"]["max_new_tokens"] == 2  # the decoding length is part of what makes runs comparable
    with pytest.raises(SystemExit, match=r"max_new_tokens=2; these settings give max_new_tokens=3"):
        quality.main([*argv, "--max-new-tokens", "3"])


def _check_quality_keeps_what_a_stopped_run_trained(quality, argv: list[str], results: Path) -> None:
    """A benchmark stopped during a run's evaluation, or during its training after a checkpoint: the rerun
    evaluates the finished training as it is, and continues the other from its checkpoint."""
    data = json.loads(results.read_text())
    runs = {r["method"]: r for r in data["runs"] if r["setting"] == "mixed"}
    data["runs"] = [r for r in data["runs"] if r["setting"] != "mixed"]  # neither result was written
    results.write_text(json.dumps(data))
    done_dir, stopped_dir = (Path(runs[m]["eval_dir"]).parent for m in ("asymlora", "lora"))
    weights = (done_dir / "adapter_model.safetensors").read_bytes()
    mtime = (done_dir / "adapter_model.safetensors").stat().st_mtime_ns
    (stopped_dir / "adapter_model.safetensors").unlink()  # stopped before its final save
    assert [p.name for p in stopped_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert quality.main(argv) == 0
    again = {r["method"]: r for r in json.loads(results.read_text())["runs"] if r["setting"] == "mixed"}
    reused = again["asymlora"]
    assert reused["training_reused"] is True and "resumed_from_step" not in reused
    assert (done_dir / "adapter_model.safetensors").stat().st_mtime_ns == mtime  # not trained again
    assert (done_dir / "adapter_model.safetensors").read_bytes() == weights
    runtime = json.loads((done_dir / "trainer_state.json").read_text())["log_history"][-1]["train_runtime"]
    assert reused["train_seconds"] == round(runtime, 1) and reused["scores"] == runs["asymlora"]["scores"]
    resumed = again["lora"]
    assert resumed["resumed_from_step"] == 2 and "training_reused" not in resumed
    assert (stopped_dir / "adapter_model.safetensors").is_file()
    assert resumed["scores"] == runs["lora"]["scores"]  # the checkpoint holds the finished adapter
    row = next(line for line in results.with_suffix(".md").read_text().splitlines() if line.startswith("| lora |"))
    assert row.endswith("|  |")  # only its last part was timed: no train time for that row


def _complete_checkpoint(path: Path, step: int) -> None:
    """The files of a complete checkpoint (asymlora.train.checkpoints), of an adapter with no layers."""
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_config.json").write_text(json.dumps({"layers": {}}))
    save_file({}, str(path / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, path / name)


def test_quality_prior_training_reads_what_a_run_dir_holds(tmp_path):
    import argparse

    import yaml

    quality = _load_benchmark("quality")
    args = argparse.Namespace(model="tiny", projector=None, projector_lr=1e-4, batch_size=2, lr=5e-4, set=[])
    config = quality.run_config(args, "lora", 4, 0, ["a"], "tiny", tmp_path, steps=300)
    assert config["training"]["save_steps"] == quality.CHECKPOINT_STEPS  # a long run saves along the way
    assert quality.prior_training(tmp_path, config) == ("new", None, None)  # nothing there
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({**config, "training": {
        **config["training"], "save_steps": 300}, "resume": True}))  # the same run, saved at another cadence
    assert quality.prior_training(tmp_path, config) == ("new", None, None)  # no checkpoint yet
    _complete_checkpoint(tmp_path / "checkpoint-200", 200)
    assert quality.prior_training(tmp_path, config) == ("resume", None, tmp_path / "checkpoint-200")
    _complete_checkpoint(tmp_path / "checkpoint-300", 300)
    (tmp_path / "checkpoint-300" / "trainer_state.json").write_text("")  # cut off while being written
    _complete_checkpoint(tmp_path / "checkpoint-1000-old", 1000)  # not a checkpoint name
    assert quality.prior_training(tmp_path, config) == ("resume", None, tmp_path / "checkpoint-200")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 300, "log_history": [
        {"loss": 1.0, "step": 300}, {"step": 300, "train_runtime": 12.5}]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert quality.prior_training(tmp_path, config) == ("done", 12.5, None)
    other = quality.run_config(args, "lora", 4, 1, ["a"], "tiny", tmp_path, steps=300)  # another seed
    assert quality.prior_training(tmp_path, other) == ("new", None, None)
    (tmp_path / "train_config.yaml").write_text("model: [")
    assert quality.prior_training(tmp_path, config) == ("new", None, None)


def test_quality_set_overrides_reach_every_run_config(tmp_path):
    import argparse

    quality = _load_benchmark("quality")
    args = argparse.Namespace(model="tiny", projector=None, projector_lr=1e-4, batch_size=2, lr=5e-4,
                              set=["loraplus_lr_ratio=4", "adapter.dropout=0.1"])
    values = quality.run_config(args, "asymlora", 4, 0, ["a", "b"], "tiny", tmp_path / "run", steps=3)
    assert values["loraplus_lr_ratio"] == 4 and values["adapter"]["dropout"] == 0.1
    assert values["adapter"]["method"] == "asymlora" and values["training"]["max_steps"] == 3


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_vision_probe_learns_what_the_features_hold():
    import torch

    probe = _load_benchmark("vision_probe")
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=gen)
    signal = torch.nn.functional.one_hot(labels, 3).float() * 4 + torch.randn(300, 3, generator=gen)
    features = torch.cat([signal, torch.randn(300, 20, generator=gen)], dim=1)
    assert probe.linear_probe(features[:200], labels[:200], features[200:], labels[200:]) > 0.95
    noise = torch.randn(300, 23, generator=gen)
    assert probe.linear_probe(noise[:200], labels[:200], noise[200:], labels[200:]) < 0.6  # chance is 1/3


def test_vision_probe_labels_easyvqa_images_from_their_questions():
    probe = _load_benchmark("vision_probe")

    def record(image, question, answer):
        return {"image": image, "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                  {"from": "gpt", "value": answer}]}

    labels = probe.easyvqa_labels([record("a.png", "What color is the circle?", "red"),
                                   record("b.png", "What shape is in the image?", "triangle"),
                                   record("c.png", "Is there a blue shape?", "yes")])
    assert labels == {"a.png": {"color": "red", "shape": "circle"}, "b.png": {"shape": "triangle"},
                      "c.png": {"color": "blue"}}


def test_vision_probe_script_on_pixels(tmp_path, isolated_cache):
    import pytest

    from asymlora.assets import locate
    from asymlora.cli import main

    if locate("easyvqa") is None or locate("fashion") is None:
        pytest.skip("easy-VQA / Fashion-MNIST are not installed: asymlora setup --only easyvqa fashion")
    assert main(["data", "build", "--only", "easyvqa", "fashion", "--max-per-split", "40"]) == 0
    probe = _load_benchmark("vision_probe")
    result = probe.main(["--encoders", "pixels", "--per-split", "40", "--out-dir", str(tmp_path)])
    assert set(result["accuracy"]["pixels"]) == {"easyvqa_color", "easyvqa_shape", "fashion"}
    assert all(0 <= v <= 1 for v in result["accuracy"]["pixels"].values())
    assert result["counts"]["fashion"] == {"train": 40, "test": 40}
    assert "| pixels |" in (tmp_path / "vision_probe_cpu.md").read_text()


def _paired_file(path: Path, seed: int, diffs: dict[str, float], items: int = 4) -> Path:
    tasks = {"vqa": {"metric": "vqa_match", "higher_is_better": True, "items": items},
             "ocr": {"metric": "character_error_rate", "higher_is_better": False, "items": items}}
    runs = {f"mixed-{method}-r4-s{seed}": {
        "mean": {"diff": diff, "low": diff - 0.01, "high": diff + 0.01, "p_ahead": 0.5},
        "tasks": {task: {"diff": 2 * diff if task == "vqa" else 0.0, "low": 0, "high": 0, "p_ahead": 0.5,
                         "ahead": 1, "behind": 1} for task in tasks}} for method, diff in diffs.items()}
    path.mkdir(parents=True)
    (path / "paired.json").write_text(json.dumps({"reference": f"mixed-lora-r16-s{seed}", "resamples": 10,
                                                  "confidence": 0.95, "seed": 0, "tasks": tasks, "runs": runs}))
    return path


def test_paired_seeds_pools_differences_over_seeds_and_refuses_other_items(tmp_path):
    pooling = _load_benchmark("paired_seeds")
    s0 = _paired_file(tmp_path / "s0", 0, {"asymlora": 0.01, "lora_moe": -0.02})
    s1 = _paired_file(tmp_path / "s1", 1, {"asymlora": 0.03, "lora_moe": 0.01})
    out = tmp_path / "out"
    assert pooling.main([str(s0), str(s1 / "paired.json"), "--out", str(out)]) == 0
    pooled = json.loads((out / "paired_seeds.json").read_text())
    assert pooled["reference"] == "mixed-lora-r16" and pooled["seeds"] == ["0", "1"]
    asym = pooled["methods"]["mixed-asymlora-r4"]
    assert abs(asym["mean"] - 0.02) < 1e-12 and abs(asym["std"] - 0.0141421356) < 1e-9 and asym["ahead"] == 2
    assert abs(asym["tasks"]["vqa"]["mean"] - 0.04) < 1e-12
    assert pooled["methods"]["mixed-lora_moe-r4"]["ahead"] == 1
    md = (out / "paired_seeds.md").read_text()
    assert "| mixed-asymlora-r4 | +0.010 [+0.000, +0.020] | +0.030 [+0.020, +0.040] | +0.020 ± 0.014 | 2/2 |" in md

    other = _paired_file(tmp_path / "s2", 2, {"asymlora": 0.0}, items=5)
    fresh = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_seeds.py"), str(s0), str(other),
                           "--out", str(fresh)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(other / "paired.json") in proc.stderr and "field 'tasks'" in proc.stderr
    assert not fresh.exists()


def test_analysis_summary_keeps_one_row_per_analysed_adapter(tmp_path, capsys):
    """benchmarks/analysis_summary.py on a real `asymlora analyze` output of a tiny hybrid-routed adapter."""
    from train_fixtures import train_setup

    from asymlora.cli import main
    from asymlora.train import TrainConfig, run_training

    values = train_setup(tmp_path, method="asymlora_moe", max_steps=2, save_steps=100, output_dir=str(tmp_path / "run"))
    values["adapter"]["routing"] = "hybrid"  # E = the 2 tasks, head t is task t's own
    run = run_training(TrainConfig.from_dict(values))
    analysed = tmp_path / "analysed"
    assert main(["analyze", "--adapter", str(run), "--samples-per-task", "4", "--batch-size", "4",
                 "--out", str(analysed)]) == 0
    result = json.loads((analysed / "analysis.json").read_text())
    summary = _load_benchmark("analysis_summary")
    out = tmp_path / "out"
    assert summary.main([f"hybrid={analysed}", str(analysed / "analysis.json"), "--out", str(out), "--name", "s"]) == 0
    adapters = json.loads((out / "s.json").read_text())["adapters"]
    assert list(adapters) == ["hybrid", "analysed"]  # LABEL=PATH, or a bare path labelled by its folder
    assert adapters["hybrid"] == adapters["analysed"]
    row = adapters["analysed"]
    assert (row["method"], row["routing"], row["num_experts"]) == ("asymlora_moe", "hybrid", 2)
    assert abs(row["mean_loss"] - sum(result["loss"].values()) / 2) < 1e-12
    load = result["routing_stats"]["expert_load"]
    assert row["router"]["own_head_load"] == {"color": load[0][0], "isred": load[1][1]}
    assert row["router"]["top_expert"]["color"]["load"] == max(load[0])
    assert row["gradient_cosine"]["A"] == result["gradient"]["A"]["mean_off_diagonal"]
    assert row["expert_similarity"] == result["expert_similarity"]["mean"]
    md = (out / "s.md").read_text()
    assert "| analysed | asymlora_moe (hybrid) | 2 | 4 |" in md and "(own)" in md
    (tmp_path / "other.json").write_text(json.dumps({"method": "lora"}))
    assert summary.main([str(tmp_path / "other.json"), "--out", str(tmp_path / "bad")]) == 2
    assert "no 'routing' field" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_quality_summary_renders_the_sections_beside_its_runs(tmp_path):
    """A quality summary may carry evals made by hand, pooled comparisons and caption tables beside its runs:
    its Markdown renders each with the script that made it."""
    quality, pooling, captions = (_load_benchmark(name) for name in ("quality", "paired_seeds", "caption_parts"))
    evals = {name: json.loads((_one_task_eval(tmp_path / name, "ocr", scores) / "results.json").read_text())
             for name, scores in (("by-hand-s0", [0.5, 1.0]), ("by-hand-s1", [0.25, 0.25]))}
    pooled = pooling.pool([pooling.load(_paired_file(tmp_path / f"s{seed}", seed, {"asymlora": diff}))
                           for seed, diff in ((0, 0.01), (1, 0.03))])
    table = {"run-a": {"items": 2, "rouge_l": 0.5, "format": 1.0, "category": 0.5, "subgroup": 0.0,
                       "name_rouge_l": 0.25, "loops": 0.0, "majority_category": 0.5,
                       "predicted_categories": {"Flags": 2}}}
    data = {"runs": [], "tasks": ["ocr"], "setup": {"steps": 2},
            "evals": {"description": "All items.", "runs": evals},
            "paired": {"mixed-lora-r16 (all items)": {**pooled, "description": "Retrained runs."}},
            "caption_parts": {"all items": {"runs": table}}}
    md = quality.to_markdown(data)
    assert "All items.\n\n| run | ocr | mean |" in md and "| by-hand-s0 | 0.750 ↓ | 0.000 |" in md
    assert "### Paired differences to mixed-lora-r16 (all items), over seeds\n\nRetrained runs." in md
    assert pooling.markdown(pooled) in md and captions.markdown(table) in md
    assert "### Emoji captions: all items" in md


def test_caption_parts_splits_emoji_captions_and_names_bad_lines(tmp_path, capsys):
    captions = _load_benchmark("caption_parts")
    ref = "A grinning face, a face-smiling emoji from the Smileys & Emotion category."
    flag = "A Peru flag, a country-flag emoji from the Flags category."
    rows = [{"task": "easyvqa", "id": "q", "prediction": "red", "reference": "red", "score": 1.0},
            {"task": "emoji", "id": 1, "prediction": "A smiling face, a face-smiling emoji from the Smileys & Emotion "
             "category.", "reference": ref, "score": 0.8},
            {"task": "emoji", "id": 2, "prediction": "A man, a person emoji from the Smileys & Emotion category.",
             "reference": flag, "score": 0.4},
            {"task": "emoji", "id": 3, "prediction": "A flag of the flag of the flag of the flag of the flag of",
             "reference": flag, "score": 0.2}]
    run = tmp_path / "run-a"
    run.mkdir()
    (run / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert captions.main([str(run), "--out", str(out)]) == 0
    row = json.loads((out / "caption_parts.json").read_text())["run-a"]
    assert row["items"] == 3 and abs(row["rouge_l"] - 1.4 / 3) < 1e-12
    assert row["format"] == 2 / 3 and row["category"] == 1 / 3 and row["subgroup"] == 1 / 3
    assert row["loops"] == 1 / 3 and row["majority_category"] == 2 / 3
    assert row["predicted_categories"] == {"Smileys & Emotion": 2}
    # names: "A smiling face" vs "A grinning face" (LCS 2 of 3 and 3: 2/3), "A man" vs "A Peru flag" (LCS 1:
    # P 1/2, R 1/3, F 0.4), the looping caption out of format: 0
    assert abs(row["name_rouge_l"] - (2 / 3 + 0.4) / 3) < 1e-12
    assert ("| run-a | 0.467 | 0.667 | 0.333 | 0.333 | 0.356 | 0.333 | Smileys & Emotion (0.67) |"
            in (out / "caption_parts.md").read_text())
    first = tmp_path / "first"  # the first 2 emoji items, as an eval with --max-samples 2 scores them
    assert captions.main([str(run), "--out", str(first), "--max-items-per-task", "2"]) == 0
    row = json.loads((first / "caption_parts.json").read_text())["run-a"]
    assert row["items"] == 2 and abs(row["rouge_l"] - 0.6) < 1e-12 and row["category"] == 0.5 and row["loops"] == 0.0
    assert captions.main([str(run), "--out", str(tmp_path / "none"), "--max-items-per-task", "0"]) == 2
    assert "--max-items-per-task: 0 must be at least 1" in capsys.readouterr().err

    (run / "predictions.jsonl").write_text(json.dumps(rows[1]) + "\n{not json\n")
    bad = tmp_path / "bad"
    assert captions.main([str(run), "--out", str(bad)]) == 2
    assert f"{run / 'predictions.jsonl'}, line 2:" in capsys.readouterr().err
    assert not bad.exists()


def test_repeat_check_counts_identical_answers_and_differing_tensors(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    check = _load_benchmark("repeat_check")
    rows = [{"task": "vqa", "id": i, "prediction": p, "reference": "a", "score": float(p == "a")}
            for i, p in enumerate(["a", "b", "a"])]
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    rows[1] = {**rows[1], "prediction": "a", "score": 1.0}  # one answer changed; item 2 only in the new eval
    (new / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert check.main(["answers", str(old), str(new), "--out", str(out)]) == 0
    result = json.loads((out / "repeat_check.json").read_text())
    assert result["items"] == 2 and result["identical"] == 1
    assert result["tasks"]["vqa"] == {"items": 2, "identical": 1, "score_old": 0.5, "score_new": 1.0}
    assert "**1 of 2 identical**" in (out / "repeat_check.md").read_text()

    (new / "predictions.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"task": "vqa", "id": 1}) + "\n")
    assert check.main(["answers", str(old), str(new), "--out", str(tmp_path / "bad")]) == 2
    assert f"{new / 'predictions.jsonl'}, line 2: no 'prediction' field" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    def run(name: str, bias: float, losses: list[float]) -> Path:
        path = tmp_path / name
        path.mkdir()
        save_file({"a": torch.ones(2, 2), "b": torch.full((2,), bias)}, path / "adapter_model.safetensors")
        history = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)] + [{"step": 3, "train_loss": 1.0}]
        (path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        return path

    first, same, moved = run("x", 0.5, [2.0, 1.5]), run("y", 0.5, [2.0, 1.5]), run("z", 0.5 + 2**-10, [2.0, 1.25])
    assert check.compare_adapters(first, same)["tensors_differing"] == 0
    assert check.compare_adapters(first, same)["first_step_loss_differs"] is None
    result = check.compare_adapters(first, moved)
    assert result["tensors_differing"] == 1 and result["max_abs_difference"] == 2**-10
    assert result["first_step_loss_differs"] == 2 and result["logged_steps"] == 2
    assert "**1 of 2 saved tensors differ**" in check.to_markdown(result)
    assert check.main(["adapters", str(first), str(tmp_path / "missing")]) == 2
    assert "adapter_model.safetensors: not found" in capsys.readouterr().err
    (moved / "trainer_state.json").write_text('{"log_history": [\n{"step": 1,}]}')
    assert check.main(["adapters", str(first), str(moved)]) == 2
    assert f"{moved / 'trainer_state.json'}, line 2, column 12: not valid JSON" in capsys.readouterr().err


def _one_task_eval(out: Path, task: str, scores: list[float], max_samples: int = 3) -> Path:
    from asymlora.evaluate.report import write_report

    metric, higher = ("character_error_rate", False) if task == "ocr" else ("vqa_match", True)
    rows = [{"task": task, "id": f"{task}-{i}", "prediction": "p", "reference": "r", "score": s}
            for i, s in enumerate(scores)]
    results = {"name": out.name, "tasks": {task: {"task": task, "metric": metric, metric: sum(scores) / len(scores),
                                                  "higher_is_better": higher, "count": len(scores)}},
               "mean": 0.0, "setup": {"adapter": f"runs/{out.name}", "split": "test", "max_samples": max_samples,
                                      "prompt_suffix": None, "decoding": "greedy, max_new_tokens=24"},
               "seconds": 1.5}
    write_report(out, results, rows)
    return out


def test_merge_evals_joins_one_task_evals_that_compare_pairs_with_a_mixture_eval(tmp_path, capsys):
    from asymlora.evaluate.report import compare

    merging = _load_benchmark("merge_evals")
    vqa = _one_task_eval(tmp_path / "single-vqa", "vqa", [1.0, 0.0, 1.0])
    ocr = _one_task_eval(tmp_path / "single-ocr", "ocr", [0.5, 0.5, 1.0])
    merged = tmp_path / "single-s0"
    assert merging.main([str(vqa), str(ocr / "results.json"), "--name", "single-s0", "--out", str(merged)]) == 0
    results = json.loads((merged / "results.json").read_text())
    assert list(results["tasks"]) == ["vqa", "ocr"] and abs(results["mean"] - (2 / 3 + 1 / 3) / 2) < 1e-12
    assert results["setup"]["merged_from"]["ocr"]["adapter"] == "runs/single-ocr" and results["seconds"] == 3.0
    rows = [json.loads(line) for line in (merged / "predictions.jsonl").read_text().splitlines()]
    assert [row["task"] for row in rows] == ["vqa"] * 3 + ["ocr"] * 3

    mixed = tmp_path / "mixed-s0"  # one mixture adapter's eval of both tasks on the same items
    _one_task_eval(mixed, "vqa", [1.0, 1.0, 1.0])
    (mixed / "predictions.jsonl").write_text((mixed / "predictions.jsonl").read_text() + "".join(
        json.dumps({"task": "ocr", "id": f"ocr-{i}", "prediction": "p", "reference": "r", "score": s}) + "\n"
        for i, s in enumerate([0.5, 0.5, 0.4])))
    mixed_results = json.loads((mixed / "results.json").read_text())
    mixed_results["tasks"]["ocr"] = {"task": "ocr", "metric": "character_error_rate", "character_error_rate": 1.4 / 3,
                                     "higher_is_better": False, "count": 3}
    (mixed / "results.json").write_text(json.dumps(mixed_results))
    paths = compare([merged, mixed], tmp_path / "paired", reference="single-s0", resamples=200)
    paired = json.loads(paths["paired_json"].read_text())
    entry = paired["runs"]["mixed-s0"]
    assert abs(entry["tasks"]["vqa"]["diff"] - 1 / 3) < 1e-12 and abs(entry["tasks"]["ocr"]["diff"] - 0.2) < 1e-12

    other = _one_task_eval(tmp_path / "single-vqa-100", "digits", [1.0], max_samples=100)
    for evals, message in [([vqa, vqa], "task 'vqa' is also in"),
                           ([vqa, other], "field 'setup.max_samples' is 100, but")]:
        fresh = tmp_path / "fresh"
        assert merging.main([*map(str, evals), "--name", "x", "--out", str(fresh)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(evals[1] / "results.json") in err
        assert not fresh.exists()


def test_pack_default_splits_and_rebuilds_a_checkpoint():
    """benchmarks/pack_default.py keeps only what the GGUF cannot give back, and puts the build together again:
    the same keys in the same order, exact except the vision tower's matrices (float16 once)."""
    import importlib.util

    import pytest
    import torch

    spec = importlib.util.spec_from_file_location("asymlora_bench_pack", ROOT / "benchmarks" / "pack_default.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    g = torch.Generator().manual_seed(0)
    emb, norm = "language_model.model.embed_tokens.weight", "language_model.model.norm.weight"
    fc1, scale = "vision_tower.encoder.layer.0.mlp.fc1.weight", "vision_tower.encoder.layer.0.layer_scale1.lambda1"
    proj = "multi_modal_projector.linear_1.weight"
    lm = {emb: torch.randn(10, 4, generator=g), norm: torch.randn(4, generator=g),
          "language_model.lm_head.weight": torch.randn(10, 4, generator=g)}  # tied: not in the build
    built = {emb: torch.cat([lm[emb], torch.randn(1, 4, generator=g)]),  # grown by one token
             norm: lm[norm].clone(), proj: torch.randn(4, 4, generator=g),
             fc1: torch.randn(8, 4, generator=g), scale: torch.full((4,), 1e-6)}

    rest, kept = pack.split_state(built, lm, torch.float16)
    assert kept == 1
    assert set(rest) == {emb + pack.ROWS_SUFFIX, proj, fc1, scale}
    assert rest[emb + pack.ROWS_SUFFIX].shape == (1, 4)
    assert rest[fc1].dtype == torch.float16 and rest[scale].dtype == torch.float32  # vectors stay exact

    merged = pack.merge_state(rest, lm, list(built))
    assert list(merged) == list(built)
    for key, value in built.items():
        assert merged[key].dtype == torch.float32
        if key == fc1:
            torch.testing.assert_close(merged[key], value, rtol=1e-3, atol=1e-4)
            assert not torch.equal(merged[key], value)
        else:
            assert torch.equal(merged[key], value), key
    with pytest.raises(SystemExit, match="lacks 1 tensor"):
        pack.merge_state(rest, lm, [*built, "vision_tower.missing"])


GPU_PARTS = ("layer_speed_7b", "speed_default_cuda", "speed_7b_cuda", "speed_budget_default_cuda", "speed_peft_default_cuda",
             "inference_cache_default_cuda",
             "compile_default_cuda", "compile_cg_default_cuda", "gpu_tests", "default_run")


def test_gpu_run_parts_are_commands_the_benchmarks_accept(tmp_path):
    """benchmarks/gpu_run.sh runs only where a GPU is lent, minutes at a time: its dry mode prints each part's
    command, and every benchmark command must parse with that script's own argument parser here."""
    import os
    import shlex

    env = {**os.environ, "GPU_RUN_DRY": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(tmp_path), *GPU_PARTS],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = {}
    for line in proc.stdout.splitlines():
        if line.startswith("DRY "):
            _, name, limit, *argv = shlex.split(line)
            assert int(limit) <= 600  # the device tool's limit for one command
            commands[name] = argv
    assert set(commands) == set(GPU_PARTS)
    parsers = {"benchmarks/speed.py": _load_benchmark("speed").parse_args,
               "benchmarks/layer_speed.py": _load_benchmark("layer_speed").parse_args,
               "benchmarks/inference_cache.py": _load_benchmark("inference_cache").parse_args}
    parsed = {}
    for name, argv in commands.items():
        if argv[:1] == ["python"] and argv[1] in parsers:
            parsed[name] = parsers[argv[1]](argv[2:])
        elif argv[:3] == ["python", "-m", "pytest"]:
            assert (ROOT / argv[3]).is_file()
    assert set(parsed) == set(GPU_PARTS) - {"gpu_tests", "default_run"}
    assert parsed["compile_default_cuda"].compile == "default"
    assert parsed["compile_cg_default_cuda"].compile == "reduce-overhead"
    assert parsed["speed_budget_default_cuda"].matched_budget and not parsed["speed_default_cuda"].matched_budget
    assert all(args.device == "cuda" for args in parsed.values())
    assert "peft_lora" in parsed["speed_peft_default_cuda"].methods and parsed["speed_peft_default_cuda"].paired
