"""Ask a model about an image: one call for one question, one for a batch, and the loader behind
``asymlora chat``, ``asymlora predict`` and ``asymlora web``.

Python::

    import asymlora
    from asymlora.inference import load_pipeline

    pipe = load_pipeline(adapter="runs/demo/adapter")          # base model + projector from its train_config.yaml
    asymlora.answer(pipe.model, pipe.processor, "cat.png", "What is it?", task="easyvqa")   # -> "a cat"
    asymlora.answer_batch(pipe.model, pipe.processor, [asymlora.Question("What is it?", "cat.png", "easyvqa")])

Prompts and decoding are those of :func:`asymlora.evaluate.generate.generate_answers` (the chat template with
the generation prompt; greedy unless ``temperature > 0``). A question about an image gets ``<image>\\n``
before it unless it already holds ``<image>``.

Tasks: a task-routed adapter with several experts (``routing="task"``) needs each question's task, one of
the adapter's tasks; a router-gated adapter (dense, top-k, hybrid) takes ``task=None`` (hybrid then routes by
its router alone); a model without an adapter (or a merged one) ignores the task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.config import IMAGE_TOKEN
from asymlora.errors import ConfigError

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class Question:
    """One question about an image (a file path or a PIL image; None for a text-only question), with the
    task that routes the adapter. It has the ``messages``/``images``/``task`` of a data sample, so
    :func:`answer_batch` takes it and :class:`~asymlora.data.reader.Sample` alike."""

    question: str
    image: Any = None
    task: str | None = None
    source: str = ""

    @property
    def messages(self) -> list[dict[str, str]]:
        text = self.question
        if self.image is not None and IMAGE_TOKEN not in text:
            text = f"{IMAGE_TOKEN}\n{text}"
        return [{"role": "user", "content": text}]

    @property
    def images(self) -> list[Any]:
        return [] if self.image is None else [self.image]


def adapter_layers(model: Any) -> list[Any]:
    """The asymlora layers of ``model`` (none for a plain Hugging Face model)."""
    return list(getattr(model, "adapter_layers", {}).values()) if _is_adapter_model(model) else []


def _is_adapter_model(model: Any) -> bool:
    from asymlora.model import AsymLoraModel

    return isinstance(model, AsymLoraModel)


def needs_task(model: Any) -> bool:
    """True when every question needs a task: some layer routes by task id among several experts."""
    return any(layer.spec.needs_task_ids for layer in adapter_layers(model))


def is_router_gated(model: Any) -> bool:
    """True when some adapter layer has a learned router (dense, top-k or hybrid routing)."""
    return any(layer.spec.has_router for layer in adapter_layers(model))


def task_choices(model: Any) -> list[str | None]:
    """The tasks a question to ``model`` may name: None (no task; the router decides where there is one)
    unless a task is required, then the adapter's tasks where they change the answer (task or hybrid routing)."""
    layers = adapter_layers(model)
    by_task = any(layer.spec.needs_task_ids or layer.spec.has_task_bias for layer in layers)
    choices: list[str | None] = [] if needs_task(model) else [None]
    return choices + (list(model.tasks) if by_task else [])


def check_task(model: Any, task: str | None, where: str = "task") -> None:
    """Raise ConfigError (naming ``where``) unless ``task`` can route a question to ``model``."""
    if not _is_adapter_model(model):
        return
    tasks = list(model.tasks)
    if task is None:
        if needs_task(model):
            raise ConfigError(f"{where}: this adapter routes by task; give one of {tasks}")
        return
    if task not in tasks:
        known = f"one of {tasks}" if tasks else "none (this adapter has no tasks; leave the task out)"
        raise ConfigError(f"{where}: {task!r} is not a task of this adapter; expected {known}")


def _decoding(temperature: float) -> dict[str, Any]:
    if temperature < 0:
        raise ConfigError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature}")
    return {"do_sample": True, "temperature": float(temperature)} if temperature > 0 else {}


def answer_batch(model: Any, processor: Any, questions: Sequence[Any], batch_size: int = 16,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                 progress: bool = False) -> list[str]:
    """The answer to each of ``questions``, in order, ``batch_size`` at a time; tasks may differ within a batch.

    Args:
        model: an :class:`~asymlora.model.AsymLoraModel` or a plain Hugging Face model.
        processor: its processor.
        questions: :class:`Question` objects or data samples (``messages`` whose last user turn is answered,
            ``images``, ``task``); each task is checked with :func:`check_task` first.
        batch_size: questions per ``generate`` call.
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 for greedy decoding, > 0 to sample at this temperature.
        progress: show a progress bar (one step per batch).
    """
    from asymlora.evaluate.generate import generate_answers

    decoding = _decoding(temperature)
    for item in questions:
        check_task(model, getattr(item, "task", None), f"{getattr(item, 'source', '') or 'question'}: task")
    tasks = list(model.tasks) if _is_adapter_model(model) else []
    return generate_answers(model, processor, questions, tasks=tasks, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=progress, **decoding)


def answer(model: Any, processor: Any, image: Any, question: str, task: str | None = None,
           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0) -> str:
    """The model's answer to ``question`` about ``image`` (a path, a PIL image, or None for no image).

    ``task`` routes a task-routed adapter (required there), biases a hybrid one and may be None for a
    router-gated one; greedy decoding unless ``temperature > 0``. Raises ConfigError for a task the
    adapter does not have, DataError for an image that cannot be read.
    """
    return answer_batch(model, processor, [Question(question, image, task)], batch_size=1,
                        max_new_tokens=max_new_tokens, temperature=temperature)[0]


def expert_load(model: Any, processor: Any, image: Any, question: str, reply: str,
                task: str | None = None) -> dict[str, Any] | None:
    """How a router-gated adapter spread the tokens of one exchange over its experts; None without a router.

    One forward pass over the prompt (image and question) followed by ``reply``; for each routed layer the
    tokens dispatched to each expert (the top-k experts, or the highest-gated one for dense and hybrid
    routing) are counted. Returns ``{"share": [fraction of dispatched tokens per expert, over all routed
    layers], "tokens": tokens per layer, "layers": routed layers}``.
    """
    import torch

    from asymlora.evaluate.generate import prompt_text, sample_images

    if not is_router_gated(model):
        return None
    check_task(model, task)
    item = Question(question, image, task)
    kwargs: dict[str, Any] = {"text": [prompt_text(processor, item.messages) + reply], "return_tensors": "pt"}
    images = sample_images(item)
    if images:
        kwargs["images"] = images
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor(**kwargs).items()}
    task_ids = model.task_ids_for([task if task is not None else -1], device) if model.tasks else None
    was_training = model.training
    model.eval()
    model.pop_routing_stats()
    try:
        with torch.no_grad(), model.collect_routing_stats():
            model(**inputs, task_ids=task_ids)
    finally:
        model.train(was_training)
    stats = model.pop_routing_stats()
    if not stats:
        return None
    load = torch.stack([entry["load"].float().cpu() for entry in stats.values()]).sum(0)
    tokens = float(next(iter(stats.values()))["tokens"])
    return {"share": (load / load.sum().clamp(min=1)).tolist(), "tokens": int(tokens), "layers": len(stats)}


@dataclass
class Pipeline:
    """A loaded model ready to answer: the model (with its adapter, if any), its processor, and the base
    values of the adapter's ``modules_to_save`` (kept by ``load_pipeline(keep_base=True)``) that
    :meth:`base_model` swaps back in."""

    model: Any
    processor: Any
    adapter: str | None = None
    base_modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """The adapter's task names (empty without an adapter)."""
        return list(self.model.tasks) if _is_adapter_model(self.model) else []

    @contextlib.contextmanager
    def base_model(self) -> Iterator[Any]:
        """Within this block ``self.model`` answers as the base model: the adapter layers are bypassed
        (:meth:`~asymlora.model.AsymLoraModel.disable_adapter`) and the trained ``modules_to_save`` (e.g. the
        projector) hold their base values again. Needs ``load_pipeline(keep_base=True)`` for an adapter
        that trains whole modules."""
        import torch

        if not _is_adapter_model(self.model):
            yield self.model
            return
        missing = [name for name in self.model.saved_modules if name not in self.base_modules]
        if missing:
            raise ConfigError(f"base_model: the base values of {missing} were not kept; load with keep_base=True")
        modules = dict(self.model.base_model.named_modules())
        trained = {name: {k: v.detach().clone() for k, v in modules[name].state_dict().items()}
                   for name in self.base_modules}
        try:
            with torch.no_grad():
                for name, state in self.base_modules.items():
                    modules[name].load_state_dict(state)
            with self.model.disable_adapter():
                yield self.model
        finally:
            with torch.no_grad():
                for name, state in trained.items():
                    modules[name].load_state_dict(state)


def load_pipeline(adapter: str | Path | None = None, model: str | None = None, projector: str | None = None,
                  dtype: str = "float32", keep_base: bool = False, quantization: Any = "auto") -> Pipeline:
    """Load a base model and processor, and the adapter in ``adapter`` (a run dir or a ``checkpoint-N`` dir)
    on top, in eval mode, on the GPU when there is one.

    ``model`` ('default', 'tiny' or a local Hugging Face dir) and ``projector`` (a safetensors file or
    ``"aligned"``) default to those of the adapter's ``train_config.yaml``
    (:func:`asymlora.evaluate.run.base_for_adapter`). ``keep_base`` keeps a copy of the base values of the
    modules the adapter trains whole, for :meth:`Pipeline.base_model`.
    """
    import torch

    from asymlora.config import AsymLoraConfig
    from asymlora.evaluate.run import base_for_adapter
    from asymlora.io import read_json
    from asymlora.loading import load_model_and_processor
    from asymlora.model import get_model, load
    from asymlora.persistence import CONFIG_NAME

    if adapter is not None and not (Path(adapter) / CONFIG_NAME).is_file():
        raise ConfigError(f"--adapter {adapter}: no {CONFIG_NAME} there; give the output dir of `asymlora train` "
                          "or one of its checkpoint-N dirs")
    model_path, projector, quantization = base_for_adapter(str(adapter) if adapter else None, model, projector,
                                                           quantization)
    base, processor = load_model_and_processor(model_path, dtype, projector, quantization)
    loaded: Any = base
    base_modules: dict[str, dict[str, Any]] = {}
    if adapter is not None:
        if keep_base:
            manifest = read_json(Path(adapter) / CONFIG_NAME, "an asymlora adapter config")
            config = AsymLoraConfig.from_document(manifest, source=str(Path(adapter) / CONFIG_NAME))
            wrapped = get_model(base, config)
            modules = dict(base.named_modules())
            base_modules = {name: {k: v.detach().clone() for k, v in modules[name].state_dict().items()}
                            for name in wrapped.saved_modules}
            loaded = load(wrapped, adapter, is_trainable=False)
        else:
            loaded = load(base, adapter, is_trainable=False)
    if not quantization:  # bitsandbytes placed a quantized base's weights when loading
        loaded = loaded.to("cuda" if torch.cuda.is_available() else "cpu")
    return Pipeline(loaded.eval(), processor, str(adapter) if adapter else None, base_modules)
