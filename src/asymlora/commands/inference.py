"""`asymlora chat`, `asymlora predict`, `asymlora web`: ask a trained adapter (or the base model) about images.

All three load the model with :func:`asymlora.inference.load_pipeline` and answer with
:func:`asymlora.inference.answer_batch` (greedy unless ``--temperature`` > 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from asymlora.errors import AsymLoraError, ConfigError, DataError
from asymlora.quantization import add_quantization_argument, quantization_argument

CHAT_EXAMPLES = """\
commands in the interactive loop (a line that is not a command is a question about the current image):
  /image PATH   ask about another image (/image none: no image)
  /task NAME    route by another of the adapter's tasks (/task none: no task; router-gated adapters only)
  /task         show the current task and the adapter's tasks
  /help         show these commands
  /quit         leave (so does the end of input, Ctrl-D)

examples, after the set-up of docs/inference.md (runs/tiny: a tiny random model's adapter, whose answers are
noise; `./run demo` trains a real one in runs/demo/adapter):
  asymlora chat --adapter runs/tiny --image red.png --task easyvqa "What color is the shape?"
  asymlora chat --model tiny --image red.png "What color is the shape?"       # the base model
  printf 'What color is the shape?\n/task ocr\nWhat does the text say?\n/quit\n' | \
    asymlora chat --adapter runs/tiny --image red.png --task easyvqa
"""

PREDICT_EXAMPLES = """\
input: a JSON list or JSON Lines of LLaVA records ({"id", "image", "task", "conversations"}) or messages
records ({"id", "images", "task", "messages"}); the last user turn is answered (an assistant reply after it,
if any, is ignored). A record with one image and no <image> placeholder gets it before its question.

output: one JSON line per record, in input order: {"id": ..., "task": ..., "answer": ...}

example, after the set-up of docs/inference.md (which also writes questions.jsonl):
  asymlora predict --adapter runs/tiny --data questions.jsonl --out preds.jsonl --batch-size 8
"""

WEB_EXAMPLES = """\
Needs the web extra: pip install 'asymlora[web]'. The page shows the base model's answer (adapter off,
trained modules such as the projector back at their base values) beside the adapter's, and for router-gated
adapters the share of tokens each expert received. Built-in test images (datasets built with `asymlora data
build`) can be picked below the image.

example, after the set-up of docs/inference.md:
  asymlora web --adapter runs/tiny --port 7860     # then open http://127.0.0.1:7860
"""


def _add_model_arguments(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    parser.add_argument("--adapter", required=adapter_required,
                        help="a trained adapter: the output dir of `asymlora train` or one of its checkpoint-N dirs"
                        + ("" if adapter_required else " (omit it to ask the base model)"))
    parser.add_argument("--model", default=None,
                        help="base model: 'default', 'tiny' or a local Hugging Face model dir (default: the one in "
                        "the adapter's train_config.yaml, else 'default')")
    parser.add_argument("--projector", default=None,
                        help="'aligned' or a projector safetensors to load first (default: the one in the "
                        "adapter's train_config.yaml)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype to load the model in")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the longest answer, in tokens")
    add_quantization_argument(parser, "the adapter's training config's, else a float base")


def _check_image(path: str | None, where: str = "--image") -> str | None:
    if path is None or path.lower() == "none":
        return None
    if not Path(path).expanduser().is_file():
        raise DataError(f"{where} {path}: file not found")
    return str(Path(path).expanduser())


def _task_label(task: str | None) -> str:
    return "none" if task is None else repr(task)


def _chat(args: argparse.Namespace) -> int:
    from asymlora.inference import answer, check_task, load_pipeline

    image = _check_image(args.image)
    pipe = load_pipeline(args.adapter, args.model, args.projector, args.dtype, quantization=quantization_argument(args.quantization))
    task = args.task
    check_task(pipe.model, task, "--task")

    def ask(question: str) -> str:
        return answer(pipe.model, pipe.processor, image, question, task=task, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature)

    if args.question is not None:
        print(ask(args.question))
        return 0
    interactive = sys.stdin.isatty()
    print(f"asking about {image or 'no image'} (task: {_task_label(task)}); /help lists the commands",
          file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return 0
        if not line:
            continue
        command, _, value = line.partition(" ")
        value = value.strip()
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/help":
                print(CHAT_EXAMPLES.split("\n\n")[0])
            elif command == "/image":
                if not value:
                    raise ConfigError("/image: give a path (or none)")
                image = _check_image(value, "/image")
                print(f"image: {image or 'none'}", file=sys.stderr)
            elif command == "/task":
                if not value:
                    print(f"task: {_task_label(task)}; the adapter's tasks: {pipe.tasks or 'none'}")
                    continue
                chosen = None if value in ("none", "router") else value
                check_task(pipe.model, chosen, "/task")
                task = chosen
                print(f"task: {_task_label(task)}", file=sys.stderr)
            elif command.startswith("/"):
                raise ConfigError(f"{command}: unknown command; the commands are /image, /task, /help, /quit")
            else:
                print(ask(line), flush=True)
        except AsymLoraError as err:
            print(f"error: {err}", file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    from asymlora.data.reader import read_samples
    from asymlora.inference import answer_batch, check_task, load_pipeline, needs_task
    from asymlora.io import atomic_path

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    samples = read_samples(args.data, image_folder=args.image_folder, require_reply=False,
                           auto_insert_image_token=True)
    for sample in samples:
        if sample.task is None:
            sample.task = args.task
    pipe = load_pipeline(args.adapter, args.model, args.projector, args.dtype, quantization=quantization_argument(args.quantization))
    problems = []
    for sample in samples:
        if sample.task is None and needs_task(pipe.model):
            problems.append(f"{sample.source}: task: missing; this adapter routes by task: give the record a "
                            f"'task' (one of {pipe.tasks}) or pass --task")
            continue
        try:
            check_task(pipe.model, sample.task, f"{sample.source}: task")
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        listed = problems[:20] + ([f"and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DataError("\n".join([f"{len(problems)} of {len(samples)} records in {args.data} cannot be answered:",
                                   *listed]))
    answers = answer_batch(pipe.model, pipe.processor, samples, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for sample, text in zip(samples, answers):
            handle.write(json.dumps({"id": sample.id, "task": sample.task, "answer": text}, ensure_ascii=False)
                         + "\n")
    print(f"wrote {len(answers)} answers to {out}")
    return 0


def _web(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("asymlora web needs gradio: pip install 'asymlora[web]'") from None
    from asymlora.inference import load_pipeline
    from asymlora.web import build_app, builtin_examples, launch

    pipe = load_pipeline(args.adapter, args.model, args.projector, args.dtype, keep_base=True,
                         quantization=quantization_argument(args.quantization))
    examples = builtin_examples(per_task=args.examples_per_task)
    app = build_app(pipe, examples, max_new_tokens=args.max_new_tokens)
    launch(app, host=args.host, port=args.port)
    return 0


def register_cli(subparsers: Any) -> None:
    chat = subparsers.add_parser(
        "chat", help="answer a question about an image (one-shot, or an interactive loop without a question)",
        description="Answer QUESTION about --image with the adapter (or, without --adapter, the base model) and "
        "print the answer; without QUESTION, read questions and commands from standard input, one per line.",
        epilog=CHAT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("question", nargs="?", help="the question; omit it for the interactive loop")
    chat.add_argument("--image", help="the image to ask about (omit it for a text-only question)")
    chat.add_argument("--task", help="the adapter task that routes the answer: required by task-routed adapters "
                      "with several experts, optional for router-gated ones (hybrid routing then uses the router "
                      "alone), ignored without an adapter")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (default); > 0: sample "
                      "at this temperature")
    _add_model_arguments(chat)
    chat.set_defaults(func=_chat)

    predict = subparsers.add_parser(
        "predict", help="answer every record of an unlabeled data file; one JSON line per record",
        description="Answer the records of --data (LLaVA JSON/JSONL or messages format; no assistant reply "
        "needed) in batches that may mix tasks, and write --out atomically.",
        epilog=PREDICT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("--data", required=True, help="the records to answer (JSON list or JSON Lines)")
    predict.add_argument("--out", required=True, help="where the JSON Lines answers go (id, task, answer)")
    predict.add_argument("--task", help="the task of records without a 'task' field (required for them with a "
                         "task-routed adapter)")
    predict.add_argument("--image-folder", help="where relative image paths resolve (default: the data file's dir)")
    predict.add_argument("--batch-size", type=int, default=16, help="records per generate call")
    predict.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (default); > 0: "
                         "sample at this temperature")
    _add_model_arguments(predict)
    predict.set_defaults(func=_predict)

    web = subparsers.add_parser(
        "web", help="a web page: ask about an image, see the base model's and the adapter's answers side by side",
        description="Serve a page (gradio) on --host:--port where an uploaded or built-in test image is asked "
        "about, answered by the base model and by the adapter.",
        epilog=WEB_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(web, adapter_required=True)
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    web.add_argument("--port", type=int, default=7860, help="port to serve on")
    web.add_argument("--examples-per-task", type=int, default=3,
                     help="built-in test images offered per built dataset (0: none)")
    web.set_defaults(func=_web)
