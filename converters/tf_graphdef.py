"""Frozen TensorFlow GraphDef <-> IR.

Const nodes become constant values whose arrays are decoded only when a pass reads them; an
unchanged constant is written back from its original NodeDef, so weights that no fold touched are
never decoded or re-encoded. Every other node keeps its name, op, device, control inputs and
attributes. Attributes the IR does not map (shapes, tensors, functions) are kept opaque.
"""

from __future__ import annotations

import numpy as np

from fusion_ir.errors import InputError
from fusion_ir.ir import Graph, IRError, Node, Opaque, Value
from fusion_ir.tfimport import import_tensorflow


def tf():
    # Imported lazily: `import tensorflow` costs seconds, and the IR itself does not need it.
    return import_tensorflow()


def _graph_pb2():
    tf()
    from tensorflow.core.framework import graph_pb2

    return graph_pb2


# DataType enum <-> numpy dtype for the types whose numpy form is unambiguous.
_NUMPY_TYPE_NAMES = ["float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
                     "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128"]
_enum_to_numpy: dict[int, np.dtype] = {}
_numpy_to_enum: dict[np.dtype, int] = {}


def _load_type_maps() -> None:
    if _enum_to_numpy:
        return
    for name in _NUMPY_TYPE_NAMES:
        dtype = tf().dtypes.as_dtype(name)
        np_dtype = np.dtype(dtype.as_numpy_dtype)
        _enum_to_numpy[dtype.as_datatype_enum] = np_dtype
        _numpy_to_enum[np_dtype] = dtype.as_datatype_enum


def numpy_dtype(enum: int) -> np.dtype | None:
    _load_type_maps()
    return _enum_to_numpy.get(enum)


def datatype_enum(dtype: np.dtype) -> int:
    _load_type_maps()
    try:
        return _numpy_to_enum[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no TensorFlow DataType for numpy dtype {dtype}") from None


# -- attributes ------------------------------------------------------------------------------------


def _attr_from_proto(attr) -> object:
    kind = attr.WhichOneof("value")
    if kind == "s":
        try:
            return attr.s.decode("utf-8")
        except UnicodeDecodeError:
            return Opaque(attr)
    if kind == "i":
        return attr.i
    if kind == "f":
        return attr.f
    if kind == "b":
        return attr.b
    if kind == "type":
        dtype = numpy_dtype(attr.type)
        return dtype if dtype is not None else Opaque(attr)
    if kind == "list":
        lst = attr.list
        filled = [f for f in ("s", "i", "f", "b", "type") if len(getattr(lst, f))]
        if len(lst.shape) or len(lst.tensor) or len(lst.func) or len(filled) > 1:
            return Opaque(attr)
        if not filled:
            return []
        if filled[0] == "s":
            try:
                return [s.decode("utf-8") for s in lst.s]
            except UnicodeDecodeError:
                return Opaque(attr)
        if filled[0] == "type":
            dtypes = [numpy_dtype(t) for t in lst.type]
            return Opaque(attr) if any(d is None for d in dtypes) else dtypes
        return list(getattr(lst, filled[0]))
    return Opaque(attr)


def _attr_to_proto(value, out) -> None:
    if isinstance(value, Opaque):
        out.CopyFrom(value.payload)
    elif isinstance(value, bool):
        out.b = value
    elif isinstance(value, (int, np.integer)):
        out.i = int(value)
    elif isinstance(value, (float, np.floating)):
        out.f = float(value)
    elif isinstance(value, str):
        out.s = value.encode("utf-8")
    elif isinstance(value, bytes):
        out.s = value
    elif isinstance(value, (np.dtype, type)):
        out.type = datatype_enum(value)
    elif isinstance(value, (list, tuple)):
        out.list.SetInParent()
        for item in value:
            if isinstance(item, bool):
                out.list.b.append(item)
            elif isinstance(item, (int, np.integer)):
                out.list.i.append(int(item))
            elif isinstance(item, (float, np.floating)):
                out.list.f.append(float(item))
            elif isinstance(item, str):
                out.list.s.append(item.encode("utf-8"))
            elif isinstance(item, (np.dtype, type)):
                out.list.type.append(datatype_enum(item))
            else:
                raise TypeError(f"cannot write list item {item!r} as a TensorFlow attribute")
    else:
        raise TypeError(f"cannot write {value!r} as a TensorFlow attribute")


# -- constants -------------------------------------------------------------------------------------


def _tensor_loader(tensor_proto):
    def load() -> np.ndarray:
        dtype = numpy_dtype(tensor_proto.dtype)
        shape = [d.size for d in tensor_proto.tensor_shape.dim]
        if tensor_proto.tensor_content and dtype is not None:
            # A read-only view of the serialized bytes: folds never write into an input constant.
            array = np.frombuffer(tensor_proto.tensor_content, dtype=dtype)
            return array.reshape(shape)
        return tf().make_ndarray(tensor_proto)

    return load


def _make_tensor_proto(array: np.ndarray):
    tf()
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    proto = tensor_pb2.TensorProto()
    proto.dtype = datatype_enum(array.dtype)
    proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]))
    proto.tensor_content = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return proto


def _shape_from_attr(attr) -> tuple | None:
    shape = attr.shape
    if shape.unknown_rank:
        return None
    return tuple(None if d.size < 0 else d.size for d in shape.dim)


# -- reading ---------------------------------------------------------------------------------------


def parse_tensor_name(name: str) -> tuple[str, int]:
    """Split "node:1" into ("node", 1); a bare "node" is output 0."""
    if ":" in name:
        node, _, index = name.rpartition(":")
        if index.isdigit():
            return node, int(index)
    return name, 0


def graphdef_to_ir(graph_def, inputs: list[str] | None = None, outputs: list[str] | None = None) -> Graph:
    """Build an IR graph from a GraphDef.

    Graph inputs default to the Placeholders and outputs to the sinks (nodes whose outputs nothing
    consumes); `inputs` / `outputs` name tensors ("node" or "node:1") to use instead.
    """
    tf()
    from tensorflow.python.framework import op_def_registry

    graph = Graph("tf")
    for field in ("versions", "library", "debug_info"):
        graph.meta[field] = getattr(graph_def, field) if graph_def.HasField(field) else None
    graph.meta["order"] = [n.name for n in graph_def.node]

    names = set()
    for node_def in graph_def.node:
        if node_def.name in names:
            raise InputError(f"the graph has two nodes named {node_def.name!r}")
        names.add(node_def.name)

    pending: list[tuple[Node, list[str]]] = []
    for node_def in graph_def.node:
        if node_def.op == "Const" and "value" in node_def.attr:
            value = Value(f"{node_def.name}:0", numpy_dtype(node_def.attr["value"].tensor.dtype),
                          tuple(d.size for d in node_def.attr["value"].tensor.tensor_shape.dim),
                          const_loader=_tensor_loader(node_def.attr["value"].tensor))
            value.origin = node_def
            graph.constants[value.name] = value
            continue
        attrs = {key: _attr_from_proto(node_def.attr[key]) for key in sorted(node_def.attr.keys())}
        node = graph.add_node(node_def.op, node_def.name, attrs=attrs, num_outputs=0)
        if node_def.device:
            node.extra["device"] = node_def.device
        if node_def.HasField("experimental_debug_info"):
            node.extra["experimental_debug_info"] = node_def.experimental_debug_info
        if node_def.HasField("experimental_type"):
            node.extra["experimental_type"] = node_def.experimental_type
        op_def = op_def_registry.get(node_def.op)
        count = _num_outputs(op_def, node_def)
        if count is not None:
            node.extra["num_outputs"] = count
        if count == 0:
            node.extra["no_outputs"] = True
        elif op_def is not None and len(op_def.output_arg) == 1 and not (
                op_def.output_arg[0].number_attr or op_def.output_arg[0].type_list_attr):
            node.output(0)
        pending.append((node, list(node_def.input)))

    for node, refs in pending:
        for ref in refs:
            if ref.startswith("^"):
                target = ref[1:]
                if target not in names:
                    raise InputError(f"node {node.name!r} has a control input on {target!r}, which does not exist")
                node.control_inputs.append(target)
                continue
            node.inputs.append(None)
            graph.set_input(node, len(node.inputs) - 1, _lookup(graph, ref, node.name))

    for node in graph.nodes:
        if node.op in ("Placeholder", "PlaceholderV2"):
            value = node.output(0)
            value.dtype = node.attrs.get("dtype") if isinstance(node.attrs.get("dtype"), np.dtype) else None
            shape_attr = node.attrs.get("shape")
            if isinstance(shape_attr, Opaque):
                value.shape = _shape_from_attr(shape_attr.payload)

    try:
        graph.toposort()
    except IRError as err:
        raise InputError(f"the graph is invalid: {err}; only while loops (through Merge) may form cycles") from None

    if inputs:
        graph.inputs = [_lookup(graph, name, "--inputs") for name in inputs]
        for value in graph.inputs:
            if value.dtype is None and value.producer is not None:
                for key in ("T", "dtype", "out_type", "DstT"):
                    if isinstance(value.producer.attrs.get(key), np.dtype):
                        value.dtype = value.producer.attrs[key]
                        break
    else:
        graph.inputs = [n.output(0) for n in graph.nodes if n.op in ("Placeholder", "PlaceholderV2")]
    if outputs:
        graph.outputs = [_lookup(graph, name, "--outputs") for name in outputs]
    else:
        graph.outputs = [n.output(0) for n in graph.nodes
                         if not n.extra.get("no_outputs") and all(v.num_uses == 0 for v in n.outputs)
                         and n.op not in ("Placeholder", "PlaceholderV2")]
    graph.meta["keep_constants"] = {k for k, v in graph.constants.items() if v.num_uses == 0}
    graph.meta["keep_nodes"] = {n.name for n in graph.nodes if all(v.num_uses == 0 for v in n.outputs)}
    return graph


def _num_outputs(op_def, node_def) -> int | None:
    """Return how many outputs the node has according to its OpDef, or None when unknown."""
    if op_def is None:
        return None
    total = 0
    for arg in op_def.output_arg:
        if arg.number_attr:
            attr = node_def.attr.get(arg.number_attr)
            if attr is None:
                return None
            total += attr.i
        elif arg.type_list_attr:
            attr = node_def.attr.get(arg.type_list_attr)
            if attr is None:
                return None
            total += len(attr.list.type)
        else:
            total += 1
    return total


def _lookup(graph: Graph, ref: str, user: str) -> Value:
    node_name, index = parse_tensor_name(ref)
    node = graph.node(node_name)
    if node is not None:
        count = node.extra.get("num_outputs")
        if count is not None and index >= count:
            where = user if user in ("--inputs", "--outputs") else f"node {user!r}"
            raise InputError(f"{where} reads tensor {ref!r}, but {node.op} node {node_name!r} has "
                             f"{count} output{'s' if count != 1 else ''}")
        return node.output(index)
    const = graph.constants.get(f"{node_name}:0")
    if const is not None and index == 0:
        return const
    if user in ("--inputs", "--outputs"):
        raise InputError(f"{user} names tensor {ref!r}, but the graph has no such node or output")
    raise InputError(f"node {user!r} reads tensor {ref!r}, but the graph has no node {node_name!r} "
                     f"with that output; the GraphDef is incomplete or corrupt")


# -- writing ---------------------------------------------------------------------------------------


def _ref(value: Value) -> str:
    name, index = parse_tensor_name(value.name)
    return name if index == 0 else f"{name}:{index}"


def _ordered_items(graph: Graph):
    """Yield (node name, Node or constant Value) in the original node order, new ones last."""
    node_defs = {}
    for key, value in graph.constants.items():
        node_defs[parse_tensor_name(key)[0]] = value
    for node in graph.nodes:
        node_defs[node.name] = node
    order = [name for name in graph.meta.get("order", []) if name in node_defs]
    seen = set(order)
    order += [name for name in node_defs if name not in seen]
    for name in order:
        yield name, node_defs[name]


def _fill_node_def(name: str, item, out) -> None:
    if isinstance(item, Value):
        _write_const(name, item, out)
    else:
        _write_node(item, out)


def ir_to_graphdef(graph: Graph):
    """Write an IR graph back to a GraphDef, keeping the original node order where nodes survive."""
    graph_def = _graph_pb2().GraphDef()
    for field in ("versions", "library", "debug_info"):
        if graph.meta.get(field) is not None:
            getattr(graph_def, field).CopyFrom(graph.meta[field])
    for name, item in _ordered_items(graph):
        _fill_node_def(name, item, graph_def.node.add())
    return graph_def


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    key = (field_number << 3) | 2
    header = bytearray([key])
    length = len(payload)
    while length >= 0x80:
        header.append((length & 0x7F) | 0x80)
        length >>= 7
    header.append(length)
    return bytes(header)


def ir_to_graphdef_chunks(graph: Graph):
    """Yield the binary GraphDef of `graph` in pieces, one node at a time.

    The pieces parse to the same GraphDef as ir_to_graphdef(graph), without holding a second GraphDef
    and its full serialization in memory. Rebuilt nodes are serialized deterministically (attributes in
    key order); unchanged constants keep their original bytes. GraphDef fields: node 1, library 2,
    versions 4, debug_info 5, written in field-number order as protobuf does.
    """
    node_def_type = _graph_pb2().GraphDef().node.add().__class__
    for name, item in _ordered_items(graph):
        if isinstance(item, Value) and item.origin is not None and not item.const_changed:
            payload = item.origin.SerializeToString()
        else:
            node_def = node_def_type()
            _fill_node_def(name, item, node_def)
            payload = node_def.SerializeToString(deterministic=True)
        yield _length_delimited(1, payload)
        yield payload
    for number, field in ((2, "library"), (4, "versions"), (5, "debug_info")):
        message = graph.meta.get(field)
        if message is not None:
            payload = message.SerializeToString()
            yield _length_delimited(number, payload)
            yield payload


def _write_const(name: str, value: Value, out) -> None:
    if value.origin is not None and not value.const_changed:
        out.CopyFrom(value.origin)
        return
    out.name = name
    out.op = "Const"
    if value.origin is not None:
        out.device = value.origin.device
        out.input.extend(i for i in value.origin.input if i.startswith("^"))
    array = value.const
    out.attr["dtype"].type = datatype_enum(array.dtype)
    out.attr["value"].tensor.CopyFrom(_make_tensor_proto(array))


def _write_node(node: Node, out) -> None:
    out.name = node.name
    out.op = node.op
    for value in node.inputs:
        out.input.append(_ref(value))
    out.input.extend(f"^{name}" for name in node.control_inputs)
    if "device" in node.extra:
        out.device = node.extra["device"]
    for key, attr in node.attrs.items():
        _attr_to_proto(attr, out.attr[key])
    if "experimental_debug_info" in node.extra:
        out.experimental_debug_info.CopyFrom(node.extra["experimental_debug_info"])
    if "experimental_type" in node.extra:
        out.experimental_type.CopyFrom(node.extra["experimental_type"])


# -- files -----------------------------------------------------------------------------------------


def parse_graphdef(data: bytes, path: str, text: bool):
    """Parse GraphDef bytes (binary, or text format when `text`), raising InputError when invalid."""
    from google.protobuf import message, text_format

    tf()
    graph_def = _graph_pb2().GraphDef()
    try:
        if text:
            text_format.Parse(data.decode("utf-8"), graph_def)
        else:
            graph_def.ParseFromString(data)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as err:
        kind = "text-format" if text else "binary"
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: not a valid {kind} GraphDef ({detail}); pass a frozen GraphDef "
                         f"(.pb or .pbtxt)") from None
    return graph_def


def serialize_graphdef(graph_def, text: bool) -> bytes:
    from google.protobuf import text_format

    if text:
        return text_format.MessageToString(graph_def).encode("utf-8")
    return graph_def.SerializeToString()


# -- evaluation ------------------------------------------------------------------------------------


def evaluate_node(node: Node, arrays: list[np.ndarray], output_index: int) -> np.ndarray:
    """Run one TF node on constant inputs in TensorFlow and return output `output_index`.

    The node runs alone in a fresh graph, its inputs fed as Const nodes; control inputs are dropped.
    Raises ValueError when TensorFlow rejects or fails the node.
    """
    tf_module = tf()
    graph_def = _graph_pb2().GraphDef()
    for i, array in enumerate(arrays):
        const = graph_def.node.add()
        const.name = f"input_{i}"
        const.op = "Const"
        const.attr["dtype"].type = datatype_enum(array.dtype)
        const.attr["value"].tensor.CopyFrom(_make_tensor_proto(np.asarray(array)))
    out = graph_def.node.add()
    _write_node(node, out)
    out.name = "node"
    del out.input[:]
    out.input.extend(f"input_{i}" for i in range(len(arrays)))
    out.ClearField("device")
    graph = tf_module.Graph()
    try:
        with graph.as_default():
            tf_module.compat.v1.import_graph_def(graph_def, name="")
        with tf_module.compat.v1.Session(graph=graph) as session:
            return np.asarray(session.run(f"node:{output_index}"))
    except (ValueError, TypeError, tf_module.errors.OpError) as err:
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
