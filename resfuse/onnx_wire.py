"""Two things the runtime does to a serialised ONNX model, on protobuf's wire format, since the
base install has no `onnx` package to parse it with (its 30 MB would be for these alone):
- which tensors keep their data in external files (such graphs are refused before a backend
  loads them);
- a float16 graph widened to float32 (`widen_float16`), for CPUs where ONNX Runtime would
  otherwise compute it in float16 arithmetic (runtime/backends/onnxrt.py says why).

Only the fields on the path to a tensor, a node attribute or a type are decoded (field numbers
from onnx.proto); every other field, raw tensor data included, is skipped or copied by its
length, so a model costs one pass over its few thousand fields.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# message: {field number: the message type it holds}, for the fields that lead to tensors
_PATHS: dict[str, dict[int, str]] = {
    "model": {7: "graph"},  # ModelProto.graph
    # GraphProto.node, .initializer, .sparse_initializer
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},  # NodeProto.attribute
    # AttributeProto.t, .g, .tensors, .graphs, .sparse_tensor, .sparse_tensors
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
_DATA_LOCATION = 14  # TensorProto.data_location
_NAME = 8  # TensorProto.name


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def external_tensors(model: bytes) -> list[str]:
    """The names of the tensors whose data_location is EXTERNAL, anywhere in the graph (node
    attributes and subgraphs too); WireError when `model` is not well-formed protobuf."""
    return list(_external(memoryview(model), "model"))


def _external(buf: memoryview, kind: str) -> Iterator[str]:
    if kind == "tensor":
        fields = {number: value for number, value in _fields(buf)}
        if fields.get(_DATA_LOCATION) == EXTERNAL:
            name = fields.get(_NAME)
            yield bytes(name).decode(errors="replace") if isinstance(name, memoryview) else "?"
        return
    paths = _PATHS[kind]
    for number, value in _fields(buf):
        if number in paths and isinstance(value, memoryview):
            yield from _external(value, paths[number])


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview | None]]:
    """(field number, value) of each field: an int (varint), a memoryview (length-delimited),
    None (fixed 32 or 64 bits, not needed here)."""
    for number, value, _ in _spans(buf):
        yield number, value


def _spans(buf: memoryview) -> Iterator[tuple[int, int | memoryview | None, memoryview]]:
    """(field number, value as _fields gives it, the field's whole encoding) of each field."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview | None = None
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) are not in onnx.proto; 6 and 7 do not exist
            raise WireError(f"wire type {wire} at byte {pos}")
        if number == 0 or pos > len(buf):
            raise WireError(f"a field runs past the end (byte {pos} of {len(buf)})")
        yield number, value, buf[start:pos]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf) and shift < 70:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise WireError(f"a varint runs past the end or over 10 bytes (byte {pos})")


# Widening float16 to float32

FLOAT, FLOAT16 = 1, 10  # TensorProto.DataType
# message: {field number: the message type it holds}, for the fields that lead to what carries a
# data type: tensors, node attributes ("to", "dtype") and graph inputs' and outputs' types
_WIDEN: dict[str, dict[int, str]] = {
    # ModelProto.graph, .functions
    "model": {7: "graph", 25: "function"},
    # GraphProto.node, .initializer, .input, .output, .sparse_initializer
    "graph": {1: "node", 5: "tensor", 11: "value", 12: "value", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},  # FunctionProto.node, .attribute_proto
    "node": {5: "attribute"},
    # AttributeProto.t, .g, .tensors, .graphs, .sparse_tensor(s), .tp, .type_protos
    "attribute": {
        5: "tensor",
        6: "graph",
        10: "tensor",
        11: "graph",
        22: "sparse",
        23: "sparse",
        14: "type",
        15: "type",
    },
    "sparse": {1: "tensor"},  # SparseTensorProto.values (its indices are integers)
    "value": {2: "type"},  # ValueInfoProto.type
    # TypeProto.tensor_type, .sequence_type (.elem_type), .map_type (.value_type),
    # .optional_type (.elem_type), .sparse_tensor_type
    "type": {1: "tensor_type", 4: "element", 5: "map", 9: "element", 8: "tensor_type"},
    "element": {1: "type"},
    "map": {2: "type"},
}
# Inferred types that widening makes stale: GraphProto.value_info, FunctionProto.value_info.
# ONNX Runtime infers them afresh.
_DROP = {"graph": {13}, "function": {12}}
_DTYPE_ATTRIBUTES = (b"to", b"dtype")  # Cast's, and EyeLike's, Random*'s, ...: a data type


def widen_float16(model: bytes) -> bytes:
    """`model` with every float16 tensor, type and data type attribute made float32: the same
    graph computed in float32 arithmetic on its float16-rounded weights. Value infos are
    dropped (ONNX Runtime infers them again); everything else is copied as it is."""
    return _widen(memoryview(model), "model")


def _widen(buf: memoryview, kind: str) -> bytes:
    if kind == "tensor":
        return _widen_tensor(buf)
    if kind == "attribute":
        return _widen_attribute(buf)
    if kind == "tensor_type":  # TypeProto.Tensor: elem_type is field 1
        return _replace_varint(buf, 1, FLOAT16, FLOAT)
    paths, drop = _WIDEN[kind], _DROP.get(kind, set())
    out = bytearray()
    for number, value, raw in _spans(buf):
        if number in drop:
            continue
        if number in paths and isinstance(value, memoryview):
            out += _field(number, _widen(value, paths[number]))
        else:
            out += raw
    return bytes(out)


def _widen_attribute(buf: memoryview) -> bytes:
    """An AttributeProto: a data type in `to` or `dtype` (an int, field 3) widened, tensors
    and subgraphs within it walked."""
    fields = list(_spans(buf))
    name = next((bytes(v) for n, v, _ in fields if n == 1 and isinstance(v, memoryview)), b"")
    if name in _DTYPE_ATTRIBUTES:
        return _replace_varint(buf, 3, FLOAT16, FLOAT)
    out = bytearray()
    paths = _WIDEN["attribute"]
    for number, value, raw in fields:
        if number in paths and isinstance(value, memoryview):
            out += _field(number, _widen(value, paths[number]))
        else:
            out += raw
    return bytes(out)


def _replace_varint(buf: memoryview, number: int, old: int, new: int) -> bytes:
    out = bytearray()
    for n, value, raw in _spans(buf):
        out += _key(n, 0) + _encode_varint(new) if n == number and value == old else raw
    return bytes(out)


_DATA_TYPE, _INT32_DATA, _RAW_DATA = 2, 5, 9  # TensorProto fields


def _widen_tensor(buf: memoryview) -> bytes:
    """A float16 TensorProto as float32: its values, from raw_data (little-endian) or from
    int32_data (one float16's bits in each), written as float32 raw_data."""
    fields = list(_spans(buf))
    if not any(n == _DATA_TYPE and v == FLOAT16 for n, v, _ in fields):
        return bytes(buf)
    raw = [v for n, v, _ in fields if n == _RAW_DATA and isinstance(v, memoryview)]
    if raw:
        values = np.frombuffer(raw[-1], dtype="<f2")
    else:
        bits = [v for n, v, _ in fields if n == _INT32_DATA]
        values = np.array(_int32_values(bits), dtype=np.uint16).view("<f2")
    out = bytearray()
    for number, _, encoded in fields:
        if number not in (_DATA_TYPE, _INT32_DATA, _RAW_DATA):
            out += encoded
    out += _key(_DATA_TYPE, 0) + _encode_varint(FLOAT)
    out += _field(_RAW_DATA, values.astype("<f4").tobytes())
    return bytes(out)


def _int32_values(fields: list[int | memoryview | None]) -> list[int]:
    """int32_data's values: packed (one length-delimited run of varints) or one field each."""
    values = []
    for value in fields:
        if isinstance(value, memoryview):
            pos = 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                values.append(item)
        elif value is not None:
            values.append(value)
    return values


def _field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
