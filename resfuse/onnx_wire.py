"""Which tensors of a serialised ONNX model keep their data in external files, read from
protobuf's wire format: the runtime refuses such graphs before a backend loads them, and the
base install has no `onnx` package to parse them with (its 30 MB would be for this one check).

Only the fields on the path to a tensor are decoded (field numbers from onnx.proto); every other
field, raw tensor data included, is skipped by its length, so a model costs one pass over its
few thousand fields, not over its bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

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
    pos = 0
    while pos < len(buf):
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
        yield number, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf) and shift < 70:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise WireError(f"a varint runs past the end or over 10 bytes (byte {pos})")
