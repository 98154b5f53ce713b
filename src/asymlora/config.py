"""`AsymLoraConfig`: which method, which layers, how many experts, how they are routed.

The four methods differ only by configuration; one layer class (:mod:`asymlora.layer`) serves all:

=============  ============================  ==============  ==============================
method         down-projection A             up-projection B  gate g(x)
=============  ============================  ==============  ==============================
lora           one A (r x d_in)              one B            1
lora_moe       E separate A_e                E heads B_e      router (dense/topk/hybrid) or task
asymlora       one shared A                  E heads B_e      task one-hot
asymlora_moe   one shared A                  E heads B_e      router (dense/topk) or hybrid
=============  ============================  ==============  ==============================
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymlora.errors import ConfigError, did_you_mean
from asymlora.io import read_json, read_yaml

# The image placeholder in prompts, records and chat templates (one per image).
IMAGE_TOKEN = "<image>"
METHODS = ("lora", "lora_moe", "asymlora", "asymlora_moe")
ROUTINGS = ("task", "dense", "topk", "hybrid")
# Routing modes each method accepts; the first is the default.
METHOD_ROUTINGS: dict[str, tuple[str, ...]] = {
    "lora": ("task",),
    "lora_moe": ("dense", "topk", "hybrid", "task"),
    "asymlora": ("task",),
    "asymlora_moe": ("dense", "topk", "hybrid"),
}
PARTS = ("language_model", "vision_tower", "projector")
ADAPTER_DTYPES = ("float32", "auto", "bfloat16", "float16")
# dtype names of configs (adapter_dtype, model.dtype, speed presets) -> torch dtypes
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields a per-module override may change (everything that shapes one layer).
LAYER_FIELDS = ("method", "r", "alpha", "dropout", "use_rslora", "num_experts", "routing", "top_k")


def _meta(help_text: str) -> dict[str, str]:
    return {"help": help_text}


@dataclass(frozen=True)
class LayerSpec:
    """The resolved settings of one adapted layer (after per-module overrides)."""

    method: str
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    num_experts: int
    routing: str
    top_k: int
    num_tasks: int

    @property
    def num_A(self) -> int:  # noqa: N802 - the paper's name
        """How many down-projections: E for lora_moe, otherwise 1 (shared)."""
        return self.num_experts if self.method == "lora_moe" else 1

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def has_router(self) -> bool:
        return self.routing in ("dense", "topk", "hybrid") and self.method != "lora"

    @property
    def has_task_bias(self) -> bool:
        return self.routing == "hybrid"

    @property
    def needs_task_ids(self) -> bool:
        return self.routing == "task" and self.num_experts > 1

    @property
    def initialises_B_apart(self) -> bool:  # noqa: N802 - B, the up-projections
        """Whether ``b_init_std`` applies: dense AsymLoRA-MoE with E >= 2 (uniform gates cancel centred heads)."""
        return self.method == "asymlora_moe" and self.routing == "dense" and self.num_experts >= 2

    @property
    def input_dependent(self) -> bool:
        """True when the gate depends on the token (no single merged weight exists)."""
        return self.has_router


@dataclass
class AsymLoraConfig:
    """Configuration of an asymlora adapter. Validated on construction; errors name the field."""

    method: str = field(default="asymlora_moe", metadata=_meta(f"one of {METHODS}"))
    r: int = field(default=8, metadata=_meta("rank of each low-rank update (> 0)"))
    alpha: float = field(default=16.0, metadata=_meta("scaling numerator: s = alpha / r (or alpha / sqrt(r))"))
    dropout: float = field(default=0.0, metadata=_meta("dropout on the adapter input, in [0, 1)"))
    use_rslora: bool = field(default=False, metadata=_meta("rank-stabilised scaling s = alpha / sqrt(r)"))
    num_experts: int | None = field(
        default=None,
        metadata=_meta("E, the number of B heads (and of A's for lora_moe). Default: len(tasks) for task "
                       "routing, 4 for learned routing, 1 for lora"),
    )
    routing: str | None = field(
        default=None,
        metadata=_meta(f"one of {ROUTINGS}; default per method: "
                       + ", ".join(f"{m}: {r[0]}" for m, r in METHOD_ROUTINGS.items())),
    )
    top_k: int = field(default=2, metadata=_meta("experts kept per token for routing=topk (1 <= top_k <= E)"))
    tasks: list[str] = field(
        default_factory=list,
        metadata=_meta("ordered task names; a sample's task id is its index here (required for task and "
                       "hybrid routing)"),
    )
    balance_loss_weight: float = field(
        default=0.01, metadata=_meta("weight of the Switch-style load-balancing loss (>= 0)")
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=_meta("'all-linear' (every nn.Linear of target_parts, never lm_head), a list of module "
                       "names matched as name suffixes inside target_parts, or a regex full-matched "
                       "against whole module names; [] with modules_to_save trains only those modules"),
    )
    target_parts: list[str] = field(
        default_factory=lambda: ["language_model"],
        metadata=_meta(f"model parts that 'all-linear' and name lists search, among {PARTS}"),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=_meta("modules trained fully and saved with the adapter, e.g. ['projector'] (family alias) "
                       "or module names such as 'multi_modal_projector'"),
    )
    overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata=_meta(f"regex (searched in the module name) -> overrides of {LAYER_FIELDS}; the first "
                       "matching regex wins, e.g. {'self_attn': {'method': 'lora', 'r': 32}}"),
    )
    adapter_dtype: str = field(
        default="float32",
        metadata=_meta(f"dtype of adapter parameters and trainable modules_to_save, one of {ADAPTER_DTYPES} "
                       "('auto' = the base layer's / the module's own)"),
    )
    router_init_std: float = field(
        default=0.02,
        metadata=_meta("std of the router's normal initialisation (default 0.02: routers start near uniform; a "
                       "larger std, e.g. 0.5, starts them routing by token; docs/RESULTS.md compares the two)"),
    )
    task_bias_init: float = field(
        default=4.0,
        metadata=_meta("hybrid routing: initial task bias toward expert (task id mod E); the task's head starts "
                       "with e^b / (e^b + E - 1) of the gate (b = 4, E = 5: 0.93); 0 = pure router "
                       "(docs/RESULTS.md compares priors)"),
    )
    b_init_std: float = field(
        default=0.0,
        metadata=_meta("dense AsymLoRA-MoE: std of each B head's initial values, centred over a layer's heads "
                       "(they sum to zero), so the heads start apart and, with router_init_std 0 (uniform gates), "
                       "the adapter is still exactly the base model; 0 = zeros, the LoRA init"),
    )

    def __post_init__(self) -> None:
        self._validate()

    # ----------------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        if isinstance(self.tasks, str) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"tasks: expected a list of non-empty task names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: duplicate task names in {self.tasks!r}")
        self.tasks = list(self.tasks)
        if not isinstance(self.balance_loss_weight, (int, float)) or self.balance_loss_weight < 0:
            raise ConfigError(f"balance_loss_weight: must be >= 0, got {self.balance_loss_weight!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"adapter_dtype: {self.adapter_dtype!r} is not one of {ADAPTER_DTYPES}")
        if isinstance(self.target_parts, str):
            self.target_parts = [self.target_parts]
        for part in self.target_parts:
            if part not in PARTS:
                raise ConfigError(f"target_parts: {part!r} is not one of {PARTS}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as err:
                    raise ConfigError(f"target_modules: invalid regex {self.target_modules!r}: {err}") from None
        elif not isinstance(self.target_modules, list) or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(
                f"target_modules: expected 'all-linear', a regex or a list of names, got {self.target_modules!r}"
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.target_modules == [] and not self.modules_to_save:
            raise ConfigError("target_modules: an empty list adapts no layer; it needs modules_to_save "
                              "(e.g. [projector] for stage-1 alignment)")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides: expected a mapping regex -> fields, got {self.overrides!r}")
        for pattern, values in self.overrides.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"overrides: invalid regex {pattern!r}: {err}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"overrides[{pattern!r}]: expected a mapping of fields, got {values!r}")
            for key in values:
                if key not in LAYER_FIELDS:
                    raise ConfigError(
                        f"overrides[{pattern!r}]: {key!r} cannot be overridden per module; "
                        f"allowed: {LAYER_FIELDS}{did_you_mean(key, LAYER_FIELDS)}"
                    )
        # Resolve the global layer spec now so that bad values fail at construction time.
        specs = [self.layer_spec()] + [self.layer_spec(pattern) for pattern in self.overrides]
        self._validate_b_init(specs)

    def _validate_b_init(self, specs: list[LayerSpec]) -> None:
        std = self.b_init_std
        if not isinstance(std, (int, float)) or isinstance(std, bool) or not math.isfinite(std) or std < 0:
            raise ConfigError(f"b_init_std: must be a number >= 0, got {std!r}")
        if std == 0:
            return
        if not any(spec.initialises_B_apart for spec in specs):
            raise ConfigError("b_init_std: applies to dense asymlora_moe layers with E >= 2 (method: asymlora_moe, "
                              "routing: dense), and no layer here is one")
        if self.router_init_std != 0:
            raise ConfigError(f"b_init_std: needs router_init_std: 0 (got {self.router_init_std!r}): only exactly "
                              "uniform gates make the centred B heads cancel, so that the adapter starts as the "
                              "base model")

    def layer_spec(self, override_pattern: str | None = None) -> LayerSpec:
        """Resolve the settings of a layer, applying ``overrides[override_pattern]`` if given."""
        values = {name: getattr(self, name) for name in LAYER_FIELDS}
        where = "" if override_pattern is None else f"overrides[{override_pattern!r}]."
        if override_pattern is not None:
            values.update(self.overrides[override_pattern])
        method = values["method"]
        if method not in METHODS:
            raise ConfigError(f"{where}method: {method!r} is not one of {METHODS}{did_you_mean(method, METHODS)}")
        allowed = METHOD_ROUTINGS[method]
        routing = values["routing"] if values["routing"] is not None else allowed[0]
        if routing not in ROUTINGS:
            raise ConfigError(f"{where}routing: {routing!r} is not one of {ROUTINGS}{did_you_mean(routing, ROUTINGS)}")
        if routing not in allowed:
            raise ConfigError(f"{where}routing: method {method!r} supports routing in {allowed}, got {routing!r}")
        r = values["r"]
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"{where}r: the rank must be an integer > 0, got {r!r}")
        alpha = values["alpha"]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise ConfigError(f"{where}alpha: must be a number > 0, got {alpha!r}")
        dropout = values["dropout"]
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"{where}dropout: must be in [0, 1), got {dropout!r}")
        num_tasks = len(self.tasks)
        experts = values["num_experts"]
        if experts is None:
            if method == "lora":
                experts = 1
            elif routing == "task":
                if not num_tasks:
                    raise ConfigError(f"{where}tasks: routing='task' needs the ordered task names (tasks: [...])")
                experts = num_tasks
            else:
                experts = 4
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
            raise ConfigError(f"{where}num_experts: E must be an integer >= 1, got {experts!r}")
        if method == "lora" and experts != 1:
            raise ConfigError(f"{where}num_experts: method 'lora' has exactly one expert, got {experts}")
        if routing == "task" and method != "lora" and experts != num_tasks:
            raise ConfigError(
                f"{where}num_experts: task routing needs one expert per task (E = len(tasks) = {num_tasks}), "
                f"got {experts}"
            )
        if routing == "hybrid" and not num_tasks:
            raise ConfigError(f"{where}tasks: routing='hybrid' needs the ordered task names (tasks: [...])")
        top_k = values["top_k"]
        if routing == "topk" and (not isinstance(top_k, int) or not 1 <= top_k <= experts):
            raise ConfigError(f"{where}top_k: must be an integer in [1, num_experts={experts}], got {top_k!r}")
        return LayerSpec(
            method=method, r=r, alpha=float(alpha), dropout=float(dropout), use_rslora=bool(values["use_rslora"]),
            num_experts=experts, routing=routing, top_k=int(top_k), num_tasks=num_tasks,
        )

    def spec_for(self, module_name: str) -> LayerSpec:
        """The layer spec for ``module_name``: the first override whose regex is found in it, else global."""
        for pattern in self.overrides:
            if re.search(pattern, module_name):
                return self.layer_spec(pattern)
        return self.layer_spec()

    def task_id(self, task: str | int) -> int:
        """Index of a task name in ``tasks`` (ints are range-checked and passed through)."""
        if isinstance(task, int):
            if not 0 <= task < max(len(self.tasks), 1):
                raise ConfigError(f"task id {task} is out of range for tasks {self.tasks!r}")
            return task
        if task not in self.tasks:
            raise ConfigError(f"task: {task!r} is not in tasks {self.tasks!r}{did_you_mean(task, self.tasks)}")
        return self.tasks.index(task)

    # ---------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> AsymLoraConfig:
        """Build from a mapping; unknown keys raise ConfigError naming the key and the closest field."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of AsymLoraConfig fields, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise ConfigError(f"{source}: unknown field {key!r}{did_you_mean(key, names)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> AsymLoraConfig:
        """Load from a YAML or JSON file: the whole file, its ``adapter:`` section (training configs) or
        its ``config:`` section (a saved ``adapter_config.json``)."""
        path = Path(path)
        if path.suffix == ".json":  # the project's JSON reader: file, line and column, or text that is not UTF-8
            values = read_json(path, "an AsymLoraConfig document", ConfigError)
        else:  # the project's YAML reader: the same file, line and column messages
            values = read_yaml(path, "an AsymLoraConfig document")
        if values is None:
            raise ConfigError(f"{path}: the file is empty; expected an AsymLoraConfig document (a mapping)")
        return cls.from_document(values, source=str(path))

    @classmethod
    def from_document(cls, values: Any, source: str = "config") -> AsymLoraConfig:
        """Build from a parsed config file: the whole mapping, its ``adapter:`` section (training configs) or its
        ``config:`` section (a saved ``adapter_config.json``)."""
        if isinstance(values, dict):
            for section in ("adapter", "config"):
                if isinstance(values.get(section), dict):
                    values = values[section]
                    break
        return cls.from_dict(values or {}, source=source)


def rank_for_budget(count: Callable[[int], int], budget: int, max_rank: int) -> tuple[int, int]:
    """(r, count(r)) for the rank r in 1..max_rank whose parameter count comes closest to ``budget`` (ties go to
    the lower rank): how a method is matched to another's trainable-parameter budget. ``count(r)`` gives the
    trainable parameters at rank r; it grows with r, so the search stops at the first rank over the budget."""
    best: tuple[int, int] | None = None
    for r in range(1, max_rank + 1):
        params = count(r)
        if best is None or abs(params - budget) < abs(best[1] - budget):
            best = (r, params)
        if params > budget:
            break
    if best is None:
        raise ConfigError(f"rank_for_budget: max_rank must be >= 1, got {max_rank}")
    return best
