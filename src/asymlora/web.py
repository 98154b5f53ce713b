"""The page of ``asymlora web`` (gradio): ask about an image, compare the base model with the adapter.

:func:`build_app` lays out an image (uploaded, or one of :func:`builtin_examples`), the task (the adapter's
tasks; ``router`` where a router-gated adapter may go without one), a question, and two answers side by side:
the base model's (inside :meth:`~asymlora.inference.Pipeline.base_model`) and the adapter's, both from
:func:`~asymlora.inference.answer`. For a router-gated adapter it also shows the expert load of the
adapter's answer (:func:`~asymlora.inference.expert_load`). Requests run one at a time (the base answer
swaps weights in place).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asymlora.inference import (
    DEFAULT_MAX_NEW_TOKENS,
    Pipeline,
    answer,
    expert_load,
    is_router_gated,
    task_choices,
)

NO_TASK = "router"  # the task choice that routes by the router alone
EMPTY_ANSWER = "(empty answer: the model ended its reply at once)"


def builtin_examples(per_task: int = 3) -> list[tuple[str, str, str]]:
    """(image path, question, task) of the first ``per_task`` test items of each built-in dataset that is built
    (none when no dataset is built)."""
    from asymlora.builtin_data import BUILDERS
    from asymlora.builtin_data.common import dataset_dir, load_records, question_of

    examples = []
    for name in BUILDERS:
        directory = dataset_dir(name)
        if per_task <= 0 or not (directory / "test.json").is_file():
            continue
        for record in load_records(name, "test")[:per_task]:
            examples.append((str(directory / record["image"]), question_of(record), record.get("task") or name))
    return examples


def shown(text: str) -> str:
    """An answer as the page shows it (an empty answer is said to be empty)."""
    return text if text else EMPTY_ANSWER


def format_load(load: dict[str, Any] | None) -> str:
    """The expert load as a Markdown table (one row per expert)."""
    if not load:
        return ""
    rows = "\n".join(f"| {i} | {share:.1%} |" for i, share in enumerate(load["share"]))
    return (f"**Expert load of the adapter's answer** ({load['tokens']} tokens of image, question and answer, "
            f"{load['layers']} routed layers)\n\n| expert | share of tokens |\n|---|---|\n{rows}")


def ask(pipe: Pipeline, image: str | None, task_label: str, question: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[str, str, str]:
    """(base model's answer, adapter's answer, expert load in Markdown) as the page shows them."""
    task = None if task_label == NO_TASK else task_label
    with pipe.base_model():
        base = answer(pipe.model, pipe.processor, image, question, task=task, max_new_tokens=max_new_tokens)
    adapted = answer(pipe.model, pipe.processor, image, question, task=task, max_new_tokens=max_new_tokens)
    load = expert_load(pipe.model, pipe.processor, image, question, adapted, task=task)
    return shown(base), shown(adapted), format_load(load)


def build_app(pipe: Pipeline, examples: list[tuple[str, str, str]] | None = None,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Any:
    """The gradio Blocks of the page (not launched)."""
    import gradio as gr

    from asymlora.errors import AsymLoraError

    labels = [NO_TASK if c is None else c for c in task_choices(pipe.model)]
    routed = is_router_gated(pipe.model)

    def on_ask(image: str | None, task_label: str, question: str) -> tuple[str, str, str]:
        if not question or not question.strip():
            raise gr.Error("Type a question first.")
        try:
            return ask(pipe, image, task_label, question.strip(), max_new_tokens)
        except AsymLoraError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="asymlora") as app:
        gr.Markdown(f"## asymlora: base model and adapter side by side\nAdapter `{pipe.adapter}`. Upload an image "
                    "(or pick a built-in test image), choose the task, ask a question.")
        with gr.Row():
            image = gr.Image(type="filepath", label="Image", sources=["upload"], elem_id="image", height=280)
            with gr.Column():
                task = gr.Dropdown(choices=labels, value=labels[0], label="Task" + (
                    f" ({NO_TASK}: the learned router alone)" if NO_TASK in labels else ""), elem_id="task")
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
        with gr.Row():
            base_answer = gr.Textbox(label="Base model (adapter off)", interactive=False, elem_id="base-answer")
            adapter_answer = gr.Textbox(label="With the adapter", interactive=False, elem_id="adapter-answer")
        load = gr.Markdown(visible=routed, elem_id="expert-load")
        if examples:
            gr.Examples(examples=[[path, text, example_task if example_task in labels else labels[0]]
                                  for path, text, example_task in examples],
                        inputs=[image, question, task], label="Built-in test images", examples_per_page=15,
                        elem_id="builtin-images")
        inputs, outputs = [image, task, question], [base_answer, adapter_answer, load]
        button.click(on_ask, inputs, outputs, concurrency_limit=1)
        question.submit(on_ask, inputs, outputs, concurrency_limit=1)
    return app


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve ``app`` on ``host:port`` (built-in images readable from the datasets' dir); ``block=False``
    returns once the server is up."""
    from asymlora.builtin_data.common import data_root

    app.launch(server_name=host, server_port=port, allowed_paths=[str(Path(data_root()))],
               prevent_thread_lock=not block, show_error=True)
