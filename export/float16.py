"""float16 variant of a verified float32 graph, with its numerically sensitive parts kept float32.

onnxconverter-common's converter does the rewriting (float16 initializers and activations, Casts
at the borders, float32 graph inputs and outputs); this module decides which nodes it leaves
alone. They are found by op type and position in the graph, not by name (the dynamo exporter
names nodes after ATen ops, node_cumsum_1, not after modules):
- shape and index arithmetic: every node that image data never reaches (it only follows Shape);
  it works on a few scalars, and float16 counts exactly only up to 2048;
- from each CumSum to the next learned layer: `spp`'s integral image, its corner lookups and the
  division by the bin area. Its running sums exceed float16's 65504 on large inputs, and their
  corner differences cancel. Measured at 1024x1024 (resnet18, ONNX Runtime CPU): rel L2 6.6e-4
  with these nodes float16 against 5.9e-4 float32, and CPU kernels round only the sums' results:
  a GPU summing in float16 loses more;
- from each Sigmoid to the next learned layer: `masked`'s gate, its resize and the blend
  image * (1 - m) | features * m (rel L2 5.1e-4 with them float16, 4.8e-4 float32, 257x311);
- each Concat that joins the image input to the features, up to the next learned layer. Measured
  (resnet18, 97x131 to 1024x1024): a float16 concat moves the image channels by up to 2e-3, so
  they no longer pass through exactly (resfuse-check's test for `upsample` and `spp`), and
  saves nothing, as the output is float32 anyway: it stays float32.

Beyond these, what no rule can know is measured (`range_hazards`): a node whose float32 output,
or input, exceeds float16's range (65504) on the sweep's inputs would give inf, and a learned
layer whose nonzero outputs mostly fall below float16's smallest normal (6.1e-5) would lose them
to zero; those nodes stay float32 too, and the manifest names them with the values measured.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from resfuse.export.onnx import copy_model

# Where a float32 region ends: the next learned layer runs in float16 again. A MatMul is one
# only with a weight (an initializer): the models' resize to H x W is a MatMul of computed
# interpolation weights, part of the region it sits in.
_LEARNED = frozenset({"Conv", "ConvTranspose", "Gemm"})
_SENSITIVE = frozenset({"CumSum", "Sigmoid"})
_METADATA = frozenset({"Shape", "Size"})  # their outputs are sizes, not image data
_FLOAT, _FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
_WRAPPED = "__resfuse_output"
FLOAT16_MAX = 65504.0
FLOAT16_TINY = 6.103515625e-05  # the smallest normal float16: below it precision fades to 0
_UNDERFLOW_SHARE = 0.5  # a learned layer losing most of its nonzero outputs is a hazard


def to_float16(model: onnx.ModelProto, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """The float16 form of `model`: float16 weights and activations, float32 inputs and outputs,
    and the nodes `float32_nodes` names, and those in `keep`, kept float32."""
    from onnxconverter_common.float16 import convert_float_to_float16

    named = _named(model)
    keep = float32_nodes(named.graph) | set(keep)
    _wrap_outputs(named.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight clipping warnings: the parity sweep judges
        half = convert_float_to_float16(
            named,
            keep_io_types=True,
            op_block_list=[],  # its default keeps every Resize float32; TensorRT needs none
            node_block_list=sorted(keep),
        )
    _unwrap_outputs(half.graph)
    _drop_round_trips(half.graph)
    del half.graph.value_info[:]  # stale after the rewrite (even duplicated): infer afresh
    return onnx.shape_inference.infer_shapes(half)


@dataclass(frozen=True)
class Hazard:
    """A node float16 cannot hold, with what was measured."""

    node: str
    why: str  # "overflow" (|x| > 65504) or "underflow" (nonzero |x| < 6.1e-5)
    value: float  # the largest |x| seen, or the share of nonzero outputs below the normal range

    def describe(self) -> str:
        if self.why == "overflow":
            return f"|x| up to {self.value:.4g} > 65504"
        return f"{self.value:.0%} of its nonzero outputs below float16's normal range"


def range_hazards(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> list[Hazard]:
    """Nodes of `model` (named as to_float16 names them) that float16 cannot hold, measured on
    `inputs` in float32 with ONNX Runtime: every node whose output or data input exceeds 65504,
    and learned layers most of whose nonzero outputs underflow."""
    named = _named(model)
    values = _float_values(named, inputs)
    data = _data_nodes(named.graph)
    found = []
    for node in named.graph.node:
        if node.name not in data:
            continue
        peak = max((values[t][0] for t in [*node.input, *node.output] if t in values), default=0)
        if peak > FLOAT16_MAX:
            found.append(Hazard(node.name, "overflow", peak))
        elif node.op_type in _LEARNED and node.output[0] in values:
            share = values[node.output[0]][1]
            if share > _UNDERFLOW_SHARE:
                found.append(Hazard(node.name, "underflow", share))
    return found


def _float_values(
    model: onnx.ModelProto, inputs: Sequence[np.ndarray]
) -> dict[str, tuple[float, float]]:
    """Every float tensor's largest |x| and the share of its nonzero values below float16's
    normal range, over `inputs`: each node output made a graph output, as ONNX Runtime's
    calibrators do."""
    import onnxruntime as ort

    probe = copy_model(model)
    inferred = onnx.shape_inference.infer_shapes(probe)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == _FLOAT}
    known = {o.name for o in probe.graph.output}
    names = [t for n in probe.graph.node for t in n.output if t in floats and t not in known]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs()]
    feed_name = session.get_inputs()[0].name
    stats: dict[str, tuple[float, float]] = {}
    for x in inputs:
        for name, value in zip(wanted, session.run(wanted, {feed_name: x}), strict=True):
            value = np.abs(np.asarray(value, dtype=np.float32))
            nonzero = value[value > 0]
            tiny = float(np.mean(nonzero < FLOAT16_TINY)) if nonzero.size else 0.0
            peak = float(value.max(initial=0.0))
            old = stats.get(name, (0.0, 0.0))
            stats[name] = (max(old[0], peak), max(old[1], tiny))
    return stats


def float32_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that stay float32 (see the module docstring)."""
    data = _data_nodes(graph)
    inputs = {i.name for i in graph.input}
    starts = [n for n in data.values() if n.op_type in _SENSITIVE]
    starts += [n for n in data.values() if n.op_type == "Concat" and inputs & set(n.input)]
    sensitive = _downstream(graph, starts)
    return {n.name for n in graph.node if n.name not in data} | sensitive


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have distinct names: the converter blocks nodes by name."""
    copy = copy_model(model)
    seen: set[str] = set()
    for i, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_{node.name}"
        seen.add(node.name)
    return copy


def _wrap_outputs(graph: onnx.GraphProto) -> None:
    """Put an Identity before each graph output. The converter mistypes, or fails on, a kept
    node that writes a graph output itself; behind an Identity it casts that node's output to
    float16 and back like any other, and _drop_round_trips removes the pair."""
    for output in graph.output:
        inner = output.name + _WRAPPED
        for node in graph.node:
            node.output[:] = [inner if name == output.name else name for name in node.output]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name], inner))


def _unwrap_outputs(graph: onnx.GraphProto) -> None:
    wrappers = [n for n in graph.node if n.op_type == "Identity" and n.name.endswith(_WRAPPED)]
    for wrapper in wrappers:
        _replace_uses(graph, wrapper.output[0], wrapper.input[0])
        graph.node.remove(wrapper)


def _replace_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _data_nodes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Nodes that image data reaches from the graph inputs (not through Shape or Size)."""
    users = _consumers(graph)
    found: dict[str, onnx.NodeProto] = {}
    frontier = [i.name for i in graph.input]
    while frontier:
        for node in users.get(frontier.pop(), []):
            if node.name not in found:
                found[node.name] = node
                if node.op_type not in _METADATA:
                    frontier.extend(node.output)
    return found


def _downstream(graph: onnx.GraphProto, starts: Iterable[onnx.NodeProto]) -> set[str]:
    """The start nodes and the data nodes after them, up to (not including) a learned layer."""
    users = _consumers(graph)
    weights = {t.name for t in graph.initializer}
    region: set[str] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        learned = node.op_type == "MatMul" and weights & set(node.input)
        if node.name in region or node.op_type in _LEARNED or learned:
            continue
        region.add(node.name)
        if node.op_type not in _METADATA:
            stack.extend(user for out in node.output for user in users.get(out, []))
    return region


def _drop_round_trips(graph: onnx.GraphProto) -> None:
    """Remove float32 -> float16 -> float32 Cast pairs. The converter casts every kept node's
    output to float16 and the next kept node's input back, and clears the pair only when the
    output has one consumer, so the integral image would pass through float16 where it fans
    out to its corner lookups; at a graph output it leaves the pair."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    for node in list(graph.node):
        first = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if first is None or first.op_type != "Cast" or _cast_to(first) != _FLOAT16:
            continue
        source = first.input[0]
        if _cast_to(node) != _FLOAT or types.get(source) != _FLOAT:
            continue
        if node.output[0] in outputs:  # the graph output keeps its name: its writer takes it
            writer = producer.get(source)
            if writer is None or source in outputs:
                continue
            writer.output[:] = [node.output[0] if o == source else o for o in writer.output]
            _replace_uses(graph, source, node.output[0])
        else:
            _replace_uses(graph, node.output[0], source)
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | outputs
    live = [n for n in graph.node if n.op_type != "Cast" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(live)


def _cast_to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), -1)
