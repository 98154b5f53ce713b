"""Batched greedy generation with task ids; a merged task model answers exactly like the unmerged one."""

import copy
from dataclasses import dataclass, field

import torch
from PIL import Image
from tiny_models import tiny_llava, tiny_llava_processor

import asymlora
from asymlora.evaluate.generate import generate_answers, prompt_messages


@dataclass
class Item:
    messages: list
    images: list = field(default_factory=list)
    task: str | None = None
    source: str = "t:1"


def test_prompt_messages_drops_last_reply():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert prompt_messages(msgs) == (msgs[:1], "a")


def test_merged_task_model_generates_the_same_answers(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    items = []
    for i, color in enumerate(colors * 2):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (30 + i, 30), color).save(path)
        items.append(Item([{"role": "user", "content": "<image>\nwhat color" + "?" * i},
                           {"role": "assistant", "content": "x"}], [path], task=["a", "b"][i % 2]))
    model = asymlora.get_model(tiny_llava(), asymlora.AsymLoraConfig(method="asymlora", tasks=["a", "b"], r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.B_bank.normal_(std=0.5)
    processor = tiny_llava_processor()
    b_items = [it for it in items if it.task == "b"]
    answers = generate_answers(model, processor, b_items, tasks=["a", "b"], batch_size=2, max_new_tokens=6,
                               progress=False)
    assert len(answers) == 3
    merged = copy.deepcopy(model)
    merged.merge(task="b")
    plain = generate_answers(merged.base_model, processor, b_items, batch_size=3, max_new_tokens=6, progress=False)
    assert plain == answers
    other = generate_answers(model, processor, [Item(it.messages, it.images, "a") for it in b_items],
                             tasks=["a", "b"], batch_size=2, max_new_tokens=6, progress=False)
    assert other != answers  # the task id really routes
