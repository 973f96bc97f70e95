"""ONNX ModelProto <-> IR.

Initializers and Constant nodes become constant values whose arrays are decoded only when a pass
reads them. An unchanged constant is written back from its original record, so an initializer
stays an initializer and a Constant node stays a Constant node, byte for byte. Every other node
keeps its name, op type, domain, inputs (omitted optional inputs included), outputs and attributes.
Attributes the IR does not map (tensors, subgraphs, type protos) are kept opaque, and the model
fields outside the IR (opsets, metadata, local functions, value_info) travel in `graph.meta`.

Subgraphs (If/Loop/Scan bodies) may read values of the outer graph by name. The importer adds those
values as extra inputs of the node that owns the subgraph, after its ONNX inputs, and lists their
names in `node.extra["subgraph_refs"]`. Passes therefore see every reader of a value, the
topological order puts producers first, and the exporter writes only the ONNX inputs. When a pass
rewires such an extra input to another value, the exporter renames the reference inside the
subgraph.

The input ModelProto is shared, not copied: constants keep their TensorProto (or Constant
NodeProto) as `value.origin` and opaque attributes keep their AttributeProto, so the caller must
not modify the model while the graph is in use.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from google.protobuf import message
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

from fusion_ir.errors import InputError
from fusion_ir.files import write_atomic
from fusion_ir.ir import Graph, IRError, Node, Opaque, Value

# Protobuf rejects messages of 2 GiB or more, so larger models keep their weights in a data file.
PROTOBUF_SIZE_LIMIT = 2**31 - 1
# Initializers with at least this many bytes go to the data file when one is written.
EXTERNAL_DATA_MIN_BYTES = 1024
# Offsets in the data file are multiples of this, so a runtime that memory-maps the file finds each
# tensor page-aligned on systems with 4 KiB pages. ONNX itself requires no alignment.
EXTERNAL_DATA_ALIGNMENT = 4096

_STANDARD_DOMAINS = ("", "ai.onnx")

# Element types whose raw_data is the little-endian numpy array itself, one item per element.
# Packed types (INT4, UINT4, INT2, UINT2, FLOAT4E2M1) and STRING are decoded by numpy_helper.
_RAW_DATA_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
    TensorProto.COMPLEX64, TensorProto.COMPLEX128,
})

# Constant node attributes that define a dense constant. A Constant node with `sparse_value` stays a node.
_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints", "value_string",
                   "value_strings")

_MODEL_SCALARS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")
_MODEL_FIELDS_IN_META = frozenset(_MODEL_SCALARS + ("opset_import", "graph", "metadata_props", "training_info",
                                                    "functions"))
_GRAPH_FIELDS_IN_META = frozenset({"node", "name", "initializer", "sparse_initializer", "doc_string", "input",
                                   "output", "value_info", "quantization_annotation"})
_NODE_FIELDS_IN_IR = frozenset({"input", "output", "name", "op_type", "domain", "attribute", "doc_string"})


# -- types -----------------------------------------------------------------------------------------


def numpy_dtype(elem_type: int) -> np.dtype | None:
    """Return the numpy dtype of an ONNX element type, or None for UNDEFINED and unknown types."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def elem_type(dtype: np.dtype | None) -> int | None:
    """Return the ONNX element type of a numpy dtype, or None when ONNX has none."""
    if dtype is None:
        return None
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


def _same_dtype(a: np.dtype | None, b: np.dtype | None) -> bool:
    # `np.dtype("float64") == None` is True, because numpy reads None as the default dtype.
    if a is None or b is None:
        return a is None and b is None
    return np.dtype(a) == np.dtype(b)


def _type_info(type_proto) -> tuple[np.dtype | None, tuple | None]:
    """Return (dtype, shape) of a dense tensor type. Sequences, maps and optionals give (None, None)."""
    if type_proto.WhichOneof("value") != "tensor_type":
        return None, None
    tensor_type = type_proto.tensor_type
    dtype = numpy_dtype(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return dtype, None
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return dtype, shape


def _make_value_info(name: str, dtype: np.dtype | None, shape: tuple | None) -> ValueInfoProto:
    element = elem_type(dtype)
    if element is None:
        return ValueInfoProto(name=name)
    return helper.make_tensor_value_info(name, element, None if shape is None else list(shape))


def _value_info_for(name: str, dtype, shape, original: ValueInfoProto | None) -> ValueInfoProto:
    """Return `original` while it still describes the value, else a ValueInfoProto built from dtype and shape."""
    if original is not None:
        old_dtype, old_shape = _type_info(original.type)
        if dtype is None or (_same_dtype(dtype, old_dtype) and shape == old_shape):
            if original.name == name:
                return original
            renamed = ValueInfoProto()
            renamed.CopyFrom(original)
            renamed.name = name
            return renamed
    return _make_value_info(name, dtype, shape)


# -- constants -------------------------------------------------------------------------------------


def _external_location(tensor: TensorProto) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def _tensor_loader(tensor: TensorProto) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if tensor.data_location == TensorProto.EXTERNAL:
            raise InputError(f"tensor {tensor.name!r} keeps its data in external file "
                             f"{_external_location(tensor)!r}, which was not loaded; read the model with "
                             f"load_onnx(path)")
        shape = tuple(tensor.dims)
        if tensor.data_type in _RAW_DATA_TYPES and tensor.HasField("raw_data"):
            dtype = numpy_dtype(tensor.data_type).newbyteorder("<")
            raw = tensor.raw_data
            if len(raw) == math.prod(shape) * dtype.itemsize:
                # A read-only view of the bytes protobuf returns for raw_data (its Python API returns
                # a copy), with no decode step. Folds never write into an input constant.
                return np.frombuffer(raw, dtype=dtype).reshape(shape)
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"tensor {tensor.name!r} is invalid and cannot be decoded ({detail})") from None

    return load


def _sparse_loader(sparse) -> Callable[[], np.ndarray]:
    """Return a loader that expands a SparseTensorProto into a dense array."""

    def load() -> np.ndarray:
        values = _tensor_loader(sparse.values)()
        indices = _tensor_loader(sparse.indices)().astype(np.int64)
        shape = tuple(sparse.dims)
        dense = np.zeros(math.prod(shape), dtype=values.dtype)
        if indices.ndim == 2:
            # Turn [NNZ, rank] coordinates into linear positions, which the 1-D form already contains.
            indices = np.ravel_multi_index(tuple(indices.T), shape)
        dense[indices.reshape(-1)] = values.reshape(-1)
        return dense.reshape(shape)

    return load


def _constant_node_value(node: NodeProto) -> Value | None:
    """Return the constant a Constant node defines, or None when the node stays a node.

    Nodes that stay: `sparse_value` constants, attribute references inside functions, and ops named
    Constant in a custom domain.
    """
    if node.op_type != "Constant" or node.domain not in _STANDARD_DOMAINS:
        return None
    if len(node.output) != 1 or not node.output[0] or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.ref_attr_name or attr.name not in _CONSTANT_ATTRS:
        return None
    name = node.output[0]
    if attr.name == "value":
        return Value(name, numpy_dtype(attr.t.data_type), tuple(attr.t.dims), const_loader=_tensor_loader(attr.t))
    if attr.name == "value_float":
        array = np.array(attr.f, dtype=np.float32)
    elif attr.name == "value_floats":
        array = np.array(list(attr.floats), dtype=np.float32)
    elif attr.name == "value_int":
        array = np.array(attr.i, dtype=np.int64)
    elif attr.name == "value_ints":
        array = np.array(list(attr.ints), dtype=np.int64)
    elif attr.name == "value_string":
        array = np.array(attr.s, dtype=object)
    else:
        array = np.array(list(attr.strings), dtype=object)
    return Value(name, array.dtype, array.shape, const_loader=lambda: array)


# -- attributes ------------------------------------------------------------------------------------


def _attr_from_proto(attr: AttributeProto) -> Any:
    if attr.ref_attr_name or attr.doc_string:
        return Opaque(attr)
    kind = attr.type
    if kind == AttributeProto.INT:
        return attr.i
    if kind == AttributeProto.FLOAT:
        return attr.f
    if kind == AttributeProto.INTS:
        return list(attr.ints)
    if kind == AttributeProto.FLOATS:
        return list(attr.floats)
    try:
        if kind == AttributeProto.STRING:
            return attr.s.decode("utf-8")
        if kind == AttributeProto.STRINGS:
            return [s.decode("utf-8") for s in attr.strings]
    except UnicodeDecodeError:
        return Opaque(attr)
    return Opaque(attr)


def _is_int(item) -> bool:
    return isinstance(item, (int, np.integer))


def _is_float(item) -> bool:
    return isinstance(item, (int, float, np.integer, np.floating))


def _attr_to_proto(name: str, value: Any, recorded_type: int | None, out: AttributeProto) -> None:
    """Write `value` as attribute `name`.

    The type comes from the Python value. `recorded_type` (the type at import) decides the cases the
    value leaves open: an empty list, and an int written where ONNX expects FLOAT or FLOATS.
    """
    if isinstance(value, Opaque):
        out.CopyFrom(value.payload)
        out.name = name
        return
    out.name = name
    if _is_int(value) and recorded_type != AttributeProto.FLOAT:
        out.type = AttributeProto.INT
        out.i = int(value)
    elif _is_float(value):
        out.type = AttributeProto.FLOAT
        out.f = float(value)
    elif isinstance(value, (str, bytes)):
        out.type = AttributeProto.STRING
        out.s = value.encode("utf-8") if isinstance(value, str) else value
    elif isinstance(value, np.ndarray):
        out.type = AttributeProto.TENSOR
        out.t.CopyFrom(numpy_helper.from_array(value))
    elif isinstance(value, (list, tuple)):
        _list_attr_to_proto(name, list(value), recorded_type, out)
    else:
        raise TypeError(f"cannot write {value!r} as ONNX attribute {name!r}")


def _list_attr_to_proto(name: str, items: list, recorded_type: int | None, out: AttributeProto) -> None:
    if not items:
        if recorded_type not in (AttributeProto.INTS, AttributeProto.FLOATS, AttributeProto.STRINGS):
            raise TypeError(f"cannot write an empty list as ONNX attribute {name!r} because its type is unknown")
        out.type = recorded_type
    elif all(_is_int(item) for item in items) and recorded_type != AttributeProto.FLOATS:
        out.type = AttributeProto.INTS
        out.ints.extend(int(item) for item in items)
    elif all(_is_float(item) for item in items):
        out.type = AttributeProto.FLOATS
        out.floats.extend(float(item) for item in items)
    elif all(isinstance(item, (str, bytes)) for item in items):
        out.type = AttributeProto.STRINGS
        out.strings.extend(item.encode("utf-8") if isinstance(item, str) else item for item in items)
    else:
        raise TypeError(f"cannot write list {items!r} as ONNX attribute {name!r}")


# -- protobuf helpers ------------------------------------------------------------------------------


def _fields_except(proto, skip: frozenset[str]):
    """Return a message of the same type with every set field of `proto` not in `skip`, or None if there is none.

    Reads field by field, so the skipped fields (a whole graph) are never copied.
    NOTE: fields unknown to the installed onnx package are not kept.
    """
    rest = type(proto)()
    for field, value in proto.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(rest, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(rest, field.name).CopyFrom(value)
        else:
            setattr(rest, field.name, value)
    return rest if rest.ListFields() else None


def _subgraphs(attr: AttributeProto) -> list[GraphProto]:
    graphs = [attr.g] if attr.HasField("g") else []
    return graphs + list(attr.graphs)


def _defined_names(graph_proto: GraphProto) -> set[str]:
    names = {vi.name for vi in graph_proto.input}
    names.update(t.name for t in graph_proto.initializer)
    names.update(s.values.name for s in graph_proto.sparse_initializer)
    for node in graph_proto.node:
        names.update(name for name in node.output if name)
    return names


def _free_names(graph_proto: GraphProto) -> list[str]:
    """Return the names a subgraph, or a subgraph nested in it, reads from enclosing scopes, in first-read order."""
    local = _defined_names(graph_proto)
    free: dict[str, None] = {}
    for node in graph_proto.node:
        for name in node.input:
            if name and name not in local:
                free[name] = None
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                for name in _free_names(sub):
                    if name not in local:
                        free[name] = None
    for vi in graph_proto.output:
        if vi.name not in local:
            free[vi.name] = None
    return list(free)


def _node_free_names(node: NodeProto) -> list[str]:
    free: dict[str, None] = {}
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            free.update(dict.fromkeys(_free_names(sub)))
    return list(free)


def _rename_free_names(graph_proto: GraphProto, renames: dict[str, str]) -> None:
    """Rename, in place, the reads of enclosing-scope names that `graph_proto` does not define itself."""
    local = _defined_names(graph_proto)
    active = {old: new for old, new in renames.items() if old not in local}
    if not active:
        return
    for node in graph_proto.node:
        for i, name in enumerate(node.input):
            if name in active:
                node.input[i] = active[name]
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _rename_free_names(sub, active)
    for vi in graph_proto.output:
        if vi.name in active:
            vi.name = active[vi.name]


def _graph_tensors(graph_proto: GraphProto) -> Iterator[TensorProto]:
    yield from graph_proto.initializer
    for sparse in graph_proto.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph_proto.node:
        yield from _node_tensors(node)


def _node_tensors(node: NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse_tensors = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
        for sparse in sparse_tensors:
            yield sparse.values
            yield sparse.indices
        for sub in _subgraphs(attr):
            yield from _graph_tensors(sub)


def _all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Yield every TensorProto in the model: initializers, attribute tensors, subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


# -- reading ---------------------------------------------------------------------------------------


def onnx_to_ir(model: ModelProto, inputs: list[str] | None = None, outputs: list[str] | None = None) -> Graph:
    """Build an IR graph from an ONNX model.

    Graph inputs default to the model's graph inputs that are not initializers, and outputs to the
    model's graph outputs. `inputs` / `outputs` name tensors to use instead. An initializer named in
    `inputs` that is also a graph input becomes a runtime input (not a constant), and its
    initializer is written back as the input's default value. Raises InputError when the model is
    invalid or a name is unknown.
    """
    if not model.HasField("graph"):
        raise InputError("the ModelProto has no graph; pass an ONNX model")
    graph = Graph("onnx")
    _read_model_meta(model, graph)
    graph_proto = model.graph
    values: dict[str, Value] = {}

    def define(name: str, value: Value) -> None:
        if name in values:
            raise InputError(f"tensor {name!r} is defined twice (as an initializer, graph input or node output); "
                             f"an ONNX graph must define each tensor once")
        values[name] = value

    _read_initializers(graph, graph_proto, set(inputs or ()), define)
    for vi in graph_proto.input:
        if vi.name not in values:
            define(vi.name, Value(vi.name))
    pending = _read_nodes(graph, graph_proto, define)
    _link_inputs(graph, pending, values)
    _read_value_infos(graph_proto, values)

    if inputs:
        graph.inputs = [_lookup(values, name, "input") for name in inputs]
    else:
        graph.inputs = [values[vi.name] for vi in graph_proto.input if vi.name not in graph.meta["initializer_inputs"]]
    if outputs:
        graph.outputs = [_lookup(values, name, "output") for name in outputs]
    else:
        graph.outputs = [_lookup(values, vi.name, "graph output") for vi in graph_proto.output]

    _mark_kept(graph)
    # New tensors created by passes must not reuse any name, including names defined inside subgraphs,
    # which share the model's single namespace.
    graph.value_names = set(values)
    for node in graph_proto.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                graph.value_names |= _defined_names(sub)
    return graph


def _read_model_meta(model: ModelProto, graph: Graph) -> None:
    meta = graph.meta
    for field in _MODEL_SCALARS:
        meta[field] = getattr(model, field) if model.HasField(field) else None
    meta["opset_import"] = {opset.domain: opset.version for opset in model.opset_import}
    meta["metadata_props"] = [(entry.key, entry.value) for entry in model.metadata_props]
    meta["functions"] = list(model.functions)
    meta["training_info"] = list(model.training_info)
    meta["model_fields"] = _fields_except(model, _MODEL_FIELDS_IN_META)

    graph_proto = model.graph
    meta["graph_name"] = graph_proto.name if graph_proto.HasField("name") else None
    meta["graph_doc_string"] = graph_proto.doc_string if graph_proto.HasField("doc_string") else None
    meta["graph_fields"] = _fields_except(graph_proto, _GRAPH_FIELDS_IN_META)
    meta["input_info"] = list(graph_proto.input)
    meta["output_info"] = list(graph_proto.output)
    meta["value_info"] = list(graph_proto.value_info)
    meta["quantization_annotation"] = list(graph_proto.quantization_annotation)
    meta["initializer_order"] = [t.name for t in graph_proto.initializer]
    meta["sparse_initializer_order"] = [s.values.name for s in graph_proto.sparse_initializer]


def _read_initializers(graph: Graph, graph_proto: GraphProto, requested_inputs: set[str],
                       define: Callable[[str, Value], None]) -> None:
    input_names = {vi.name for vi in graph_proto.input}
    graph.meta["initializer_inputs"] = set()
    # Initializers that are also graph inputs and were requested as inputs: fed at run time, with the
    # initializer as default.
    graph.meta["input_defaults"] = {}
    for tensor in graph_proto.initializer:
        if tensor.name in input_names:
            graph.meta["initializer_inputs"].add(tensor.name)
        if tensor.name in input_names and tensor.name in requested_inputs:
            value = Value(tensor.name, numpy_dtype(tensor.data_type), tuple(tensor.dims))
            graph.meta["input_defaults"][tensor.name] = tensor
        else:
            value = Value(tensor.name, numpy_dtype(tensor.data_type), tuple(tensor.dims),
                          const_loader=_tensor_loader(tensor))
            value.origin = tensor
            graph.constants[tensor.name] = value
        define(tensor.name, value)
    for sparse in graph_proto.sparse_initializer:
        name = sparse.values.name
        if name in input_names:
            graph.meta["initializer_inputs"].add(name)
        value = Value(name, numpy_dtype(sparse.values.data_type), tuple(sparse.dims),
                      const_loader=_sparse_loader(sparse))
        value.origin = sparse
        graph.constants[name] = value
        define(name, value)


def _generated_names(graph_proto: GraphProto, skip: set[int]) -> dict[int, str]:
    """Return IR names, by node position, for nodes whose ONNX name is empty or already taken.

    Positions in `skip` (Constant nodes, which do not become IR nodes) neither get nor take a name.
    """
    taken = {node.name for position, node in enumerate(graph_proto.node) if node.name and position not in skip}
    seen: set[str] = set()
    generated = {}
    counter = 0
    for position, node in enumerate(graph_proto.node):
        if position in skip:
            continue
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        while f"{node.op_type}_{counter}" in taken:
            counter += 1
        generated[position] = f"{node.op_type}_{counter}"
        taken.add(generated[position])
    return generated


def _read_nodes(graph: Graph, graph_proto: GraphProto,
                define: Callable[[str, Value], None]) -> list[tuple[Node, NodeProto]]:
    """Add every node to `graph`, Constant nodes as constants.

    Returns (node, proto) pairs whose inputs still need linking.
    """
    constants = {}
    for position, node_proto in enumerate(graph_proto.node):
        constant = _constant_node_value(node_proto)
        if constant is not None:
            constants[position] = constant
    generated = _generated_names(graph_proto, set(constants))
    # ("node", IR node name) or ("constant", tensor name) per ONNX node, in the model's order.
    order: list[tuple[str, str]] = []
    pending = []
    for position, node_proto in enumerate(graph_proto.node):
        constant = constants.get(position)
        if constant is not None:
            constant.origin = node_proto
            graph.constants[constant.name] = constant
            define(constant.name, constant)
            order.append(("constant", constant.name))
            continue

        name = generated.get(position, node_proto.name)
        attrs = {attr.name: _attr_from_proto(attr) for attr in node_proto.attribute}
        node = graph.add_node(node_proto.op_type, name, attrs=attrs, num_outputs=len(node_proto.output))
        for value, output_name in zip(node.outputs, node_proto.output):
            # An empty name is an omitted optional output.
            value.name = output_name
            if output_name:
                define(output_name, value)
        if position in generated:
            # None: the NodeProto had no name field at all.
            node.extra["onnx_name"] = node_proto.name if node_proto.HasField("name") else None
        if node_proto.HasField("domain"):
            node.extra["domain"] = node_proto.domain
        if node_proto.HasField("doc_string"):
            node.extra["doc_string"] = node_proto.doc_string
        node.extra["attr_types"] = {attr.name: attr.type for attr in node_proto.attribute}
        fields = _fields_except(node_proto, _NODE_FIELDS_IN_IR)
        if fields is not None:
            node.extra["fields"] = fields
        pending.append((node, node_proto))
        order.append(("node", name))
    graph.meta["order"] = order
    return pending


def _link_inputs(graph: Graph, pending: list[tuple[Node, NodeProto]], values: dict[str, Value]) -> None:
    graph.meta["subgraph_refs"] = {}
    for node, node_proto in pending:
        for input_name in node_proto.input:
            node.inputs.append(None)
            if input_name:
                value = values.get(input_name)
                if value is None:
                    raise InputError(f"node {node.name!r} reads tensor {input_name!r}, but no graph input, "
                                     f"initializer or node output has that name; the model is invalid")
                graph.set_input(node, len(node.inputs) - 1, value)
        refs = _node_free_names(node_proto)
        if not refs:
            continue
        for ref in refs:
            value = values.get(ref)
            if value is None:
                raise InputError(f"a subgraph of node {node.name!r} reads tensor {ref!r}, which the main graph "
                                 f"does not define; the model is invalid")
            node.inputs.append(None)
            graph.set_input(node, len(node.inputs) - 1, value)
        node.extra["subgraph_refs"] = refs
        graph.meta["subgraph_refs"][node.name] = refs


def _read_value_infos(graph_proto: GraphProto, values: dict[str, Value]) -> None:
    """Set dtype and shape of non-constant values. Graph outputs and inputs win over value_info."""
    for vi in list(graph_proto.value_info) + list(graph_proto.output) + list(graph_proto.input):
        value = values.get(vi.name)
        if value is None or value.is_const:
            continue
        value.dtype, value.shape = _type_info(vi.type)


def _lookup(values: dict[str, Value], name: str, role: str) -> Value:
    value = values.get(name)
    if value is None:
        raise InputError(f"{role} tensor {name!r} is not in the model: no graph input, initializer or node "
                         f"output has that name")
    return value


def _mark_kept(graph: Graph) -> None:
    """Protect what had no uses at import, and what subgraphs read, from `Graph.remove_dead`."""
    keep_constants = {key for key, value in graph.constants.items() if value.num_uses == 0}
    keep_nodes = {node.name for node in graph.nodes if all(v.num_uses == 0 for v in node.outputs)}
    for node in graph.nodes:
        refs = node.extra.get("subgraph_refs", ())
        for value in node.inputs[len(node.inputs) - len(refs):]:
            if value.producer is not None:
                keep_nodes.add(value.producer.name)
            elif value.is_const:
                keep_constants.add(value.name)
    graph.meta["keep_constants"] = keep_constants
    graph.meta["keep_nodes"] = keep_nodes


# -- writing ---------------------------------------------------------------------------------------


def ir_to_onnx(graph: Graph) -> ModelProto:
    """Write an IR graph back to an ONNX model.

    Nodes go out in topological order, which keeps the model's order where no pass changed it.
    Unchanged constants are written from their original record. Changed and new ones become
    initializers, except that a changed Constant node stays a Constant node. The written graph
    outputs are `graph.outputs`. The written graph inputs are the model's inputs that still exist,
    plus any value without a producer that a pass added to `graph.inputs`. Raises IRError when two
    values would get the same name.
    """
    if graph.dialect != "onnx":
        raise IRError(f"ir_to_onnx writes ONNX graphs, not {graph.dialect!r} graphs")
    meta = graph.meta
    model = ModelProto()
    _write_model_meta(meta, model)
    graph_proto = model.graph
    if meta.get("graph_name") is not None:
        graph_proto.name = meta["graph_name"]
    if meta.get("graph_doc_string") is not None:
        graph_proto.doc_string = meta["graph_doc_string"]
    if meta.get("graph_fields") is not None:
        graph_proto.MergeFrom(meta["graph_fields"])

    defined: set[str] = set()

    def define(name: str) -> None:
        if not name:
            return
        if name in defined:
            raise IRError(f"tensor name {name!r} is defined twice in the written graph; a pass must give new "
                          f"values unused names")
        defined.add(name)

    _write_nodes(graph, graph_proto, define)
    _write_initializers(graph, graph_proto, define)
    by_name = _values_by_name(graph)
    _write_inputs(graph, graph_proto, by_name, define)
    for value in graph.outputs:
        original = _find_info(meta.get("output_info", ()), value.name)
        if original is None:
            original = _find_info(meta.get("value_info", ()), value.name)
        dtype, shape = _current_type(value)
        graph_proto.output.append(_value_info_for(value.name, dtype, shape, original))
    for vi in meta.get("value_info", ()):
        value = by_name.get(vi.name)
        if vi.name in defined and value is not None:
            dtype, shape = _current_type(value)
            graph_proto.value_info.append(_value_info_for(vi.name, dtype, shape, vi))
    for annotation in meta.get("quantization_annotation", ()):
        if annotation.tensor_name in defined:
            graph_proto.quantization_annotation.append(annotation)
    return model


def _write_model_meta(meta: dict, model: ModelProto) -> None:
    if meta.get("model_fields") is not None:
        model.MergeFrom(meta["model_fields"])
    for field in _MODEL_SCALARS:
        if meta.get(field) is not None:
            setattr(model, field, meta[field])
    for domain, version in meta.get("opset_import", {}).items():
        model.opset_import.add(domain=domain, version=version)
    for key, value in meta.get("metadata_props", ()):
        model.metadata_props.add(key=key, value=value)
    model.training_info.extend(meta.get("training_info", ()))
    model.functions.extend(meta.get("functions", ()))


def _is_constant_node(value: Value) -> bool:
    return isinstance(value.origin, NodeProto)


def _write_nodes(graph: Graph, graph_proto: GraphProto, define: Callable[[str], None]) -> None:
    """Write the nodes in topological order, with each Constant node at its original position.

    A Constant node has no inputs, so any position before its first reader is valid. It goes out
    before the first node that followed it in the model, or before its first reader if that comes
    earlier. Constant nodes that nothing reads go out last.
    """
    position = {entry: i for i, entry in enumerate(graph.meta.get("order", ()))}
    constant_nodes = sorted((position.get(("constant", key), len(position)), key)
                            for key, value in graph.constants.items() if _is_constant_node(value))
    written: set[str] = set()

    def write_constant_node(key: str) -> None:
        if key not in written:
            written.add(key)
            _write_constant_node(graph.constants[key], graph_proto.node.add())
            define(key)

    next_constant = 0
    for node in graph.toposort():
        node_position = position.get(("node", node.name))
        if node_position is not None:
            while next_constant < len(constant_nodes) and constant_nodes[next_constant][0] < node_position:
                write_constant_node(constant_nodes[next_constant][1])
                next_constant += 1
        for value in node.inputs:
            if value is not None and value.producer is None and _is_constant_node(value) \
                    and graph.constants.get(value.name) is value:
                write_constant_node(value.name)
        _write_node(node, graph_proto.node.add())
        for value in node.outputs:
            define(value.name)
    for _, key in constant_nodes:
        write_constant_node(key)


def _write_constant_node(value: Value, out: NodeProto) -> None:
    origin = value.origin
    if not value.const_changed and origin.output[0] == value.name:
        out.CopyFrom(origin)
        return
    out.CopyFrom(_fields_except(origin, frozenset({"attribute", "output"})) or NodeProto())
    out.output.append(value.name)
    tensor = numpy_helper.from_array(np.asarray(value.const))
    if origin.attribute[0].name == "value":
        tensor.name = origin.attribute[0].t.name
    out.attribute.append(helper.make_attribute("value", tensor))


def _write_node(node: Node, out: NodeProto) -> None:
    if "fields" in node.extra:
        out.MergeFrom(node.extra["fields"])
    name = node.extra.get("onnx_name", node.name)
    if name is not None:
        out.name = name
    out.op_type = node.op
    if "domain" in node.extra:
        out.domain = node.extra["domain"]
    if "doc_string" in node.extra:
        out.doc_string = node.extra["doc_string"]

    refs = node.extra.get("subgraph_refs", [])
    onnx_inputs = node.inputs[:len(node.inputs) - len(refs)]
    out.input.extend("" if value is None else value.name for value in onnx_inputs)
    out.output.extend(value.name for value in node.outputs)

    renames = {}
    for ref, value in zip(refs, node.inputs[len(onnx_inputs):]):
        if value is None:
            raise IRError(f"node {node.name!r}: a subgraph reads {ref!r}, but that input was disconnected")
        if value.name != ref:
            renames[ref] = value.name
    attr_types = node.extra.get("attr_types", {})
    for key, attr in node.attrs.items():
        if renames and isinstance(attr, Opaque) and _subgraphs(attr.payload):
            renamed = AttributeProto()
            renamed.CopyFrom(attr.payload)
            for sub in _subgraphs(renamed):
                _rename_free_names(sub, renames)
            attr = Opaque(renamed)
        _attr_to_proto(key, attr, attr_types.get(key), out.attribute.add())


def _initializer_proto(value: Value) -> TensorProto:
    if isinstance(value.origin, TensorProto) and not value.const_changed:
        return value.origin
    return numpy_helper.from_array(np.asarray(value.const), value.name)


def _write_initializers(graph: Graph, graph_proto: GraphProto, define: Callable[[str], None]) -> None:
    """Write initializers and sparse initializers: surviving ones in the model's order, then new ones."""
    meta = graph.meta
    defaults = meta.get("input_defaults", {})
    written: set[str] = set()
    for name in meta.get("initializer_order", ()):
        value = graph.constants.get(name)
        if value is not None and not _is_constant_node(value) and not _is_sparse(value):
            graph_proto.initializer.append(_initializer_proto(value))
        elif name in defaults:
            graph_proto.initializer.append(defaults[name])
        else:
            continue
        written.add(name)
        define(name)
    for name in meta.get("sparse_initializer_order", ()):
        value = graph.constants.get(name)
        if value is not None and _is_sparse(value) and not value.const_changed:
            graph_proto.sparse_initializer.append(value.origin)
            written.add(name)
            define(name)
    for key, value in graph.constants.items():
        if key in written or _is_constant_node(value):
            continue
        graph_proto.initializer.append(_initializer_proto(value))
        define(key)


def _is_sparse(value: Value) -> bool:
    return isinstance(value.origin, onnx.SparseTensorProto)


def _current_type(value: Value) -> tuple[np.dtype | None, tuple | None]:
    """Return (dtype, shape), read from the array for a decoded constant because a pass may have replaced it."""
    if value.is_const and (value.const_changed or value.dtype is None):
        array = np.asarray(value.const)
        return array.dtype, tuple(array.shape)
    return value.dtype, value.shape


def _values_by_name(graph: Graph) -> dict[str, Value]:
    by_name: dict[str, Value] = {}
    for value in graph.inputs + graph.outputs:
        by_name.setdefault(value.name, value)
    for node in graph.nodes:
        for value in node.inputs:
            if value is not None:
                by_name.setdefault(value.name, value)
    for value in graph.iter_values():
        by_name[value.name] = value
    return by_name


def _find_info(infos, name: str) -> ValueInfoProto | None:
    return next((vi for vi in infos if vi.name == name), None)


def _write_inputs(graph: Graph, graph_proto: GraphProto, by_name: dict[str, Value],
                  define: Callable[[str], None]) -> None:
    meta = graph.meta
    initializer_inputs = meta.get("initializer_inputs", set())
    written: set[str] = set()
    for vi in meta.get("input_info", ()):
        value = by_name.get(vi.name)
        if vi.name in initializer_inputs:
            # Defined by its initializer: written only while that initializer is.
            if vi.name not in graph.constants and vi.name not in meta.get("input_defaults", {}):
                continue
        else:
            define(vi.name)
        if value is None:
            graph_proto.input.append(vi)
        else:
            dtype, shape = _current_type(value)
            graph_proto.input.append(_value_info_for(vi.name, dtype, shape, vi))
        written.add(vi.name)
    for value in graph.inputs:
        if value.name in written or value.producer is not None or value.is_const:
            continue
        define(value.name)
        graph_proto.input.append(_make_value_info(value.name, value.dtype, value.shape))
        written.add(value.name)


# -- files -----------------------------------------------------------------------------------------


def _parse_model(data: bytes) -> ModelProto | None:
    # A serialized ModelProto starts with field 1 (ir_version, a varint), whose tag byte is 0x08.
    if not data or data[0] != 0x08:
        return None
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except message.DecodeError:
        return None
    if model.ir_version <= 0 or not model.HasField("graph"):
        return None
    return model


def looks_like_onnx(data: bytes) -> bool:
    """Return whether `data` parses as an ONNX ModelProto with an ir_version and a graph."""
    return _parse_model(data) is not None


def load_onnx(path: str | os.PathLike) -> ModelProto:
    """Read an ONNX model and the external data files it names, from the model's folder.

    Raises InputError when the file is missing or not an ONNX model, or when an external data file
    is missing or invalid.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass an ONNX model file (.onnx)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    model = parse_onnx(data, path)
    if model is None:
        raise InputError(f"{path}: not an ONNX model (no ModelProto with an ir_version and a graph)")
    return model


def parse_onnx(data: bytes, path: str | os.PathLike) -> ModelProto | None:
    """Parse `data`, read from `path`, as an ONNX model and load its external data from path's folder.

    Returns None when `data` is not an ONNX model, so a caller that already read the file parses it
    only once. Raises InputError when an external data file is missing or invalid.
    """
    model = _parse_model(data)
    if model is None:
        return None
    path = Path(path)
    base_dir = path.parent
    external = [tensor for tensor in _all_tensors(model) if tensor.data_location == TensorProto.EXTERNAL]
    for tensor in external:
        location = _external_location(tensor)
        if not location:
            raise InputError(f"{path}: tensor {tensor.name!r} is marked as external data but names no file")
        if not (base_dir / location).is_file():
            raise InputError(f"{path}: external data file {location!r} of tensor {tensor.name!r} not found in "
                             f"{base_dir}; keep the data files beside the model")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    except (onnx.checker.ValidationError, ValueError, OSError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: cannot load external data ({detail})") from None
    for tensor in external:
        # The loader sets data_location to DEFAULT. Clearing it makes the model serialize as if it
        # had been saved in one file.
        tensor.ClearField("data_location")
    return model


def _serialized_size(model: ModelProto) -> int:
    try:
        return model.ByteSize()
    except message.EncodeError:
        # protobuf 7.36 (upb) raises EncodeError already when sizing a message of 2 GiB or more.
        return PROTOBUF_SIZE_LIMIT + 1


def save_onnx(model: ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically.

    With `external_data` None, a model of 2 GiB or more keeps its initializers of at least
    EXTERNAL_DATA_MIN_BYTES raw bytes in "<file name>.data" beside it; True forces that layout and
    False forbids it. Raises InputError when the folder does not exist or the model cannot be
    serialized.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist; create it first")
    if external_data is None:
        external_data = _serialized_size(model) > PROTOBUF_SIZE_LIMIT
    if not external_data:
        try:
            data = model.SerializeToString()
        except message.EncodeError:
            raise InputError(f"{path}: the model is 2 GiB or more and cannot be written as one file; "
                             f"write it with external data") from None
        write_atomic(path, data)
        return
    _save_with_external_data(model, path)


def _save_with_external_data(model: ModelProto, path: Path) -> None:
    data_name = f"{path.name}.data"
    data_path = path.parent / data_name
    tensors = [t for t in model.graph.initializer
               if t.data_location != TensorProto.EXTERNAL and t.HasField("raw_data")
               and len(t.raw_data) >= EXTERNAL_DATA_MIN_BYTES]
    # NOTE: only top-level initializers stored as raw_data move to the data file. Tensors in typed
    # fields (float_data, ...), Constant nodes and subgraphs stay in the model, which fails to
    # serialize if they alone reach 2 GiB.
    fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=path.parent)
    moved: list[tuple[TensorProto, bytes, bool]] = []
    try:
        with os.fdopen(fd, "wb") as handle:
            offset = 0
            for tensor in tensors:
                padding = -offset % EXTERNAL_DATA_ALIGNMENT
                handle.write(b"\0" * padding)
                offset += padding
                raw = tensor.raw_data
                handle.write(raw)
                # The model refers to the data file and is restored in `finally`, so the caller's
                # ModelProto is unchanged afterwards.
                moved.append((tensor, raw, tensor.HasField("data_location")))
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                for key, entry in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    tensor.external_data.add(key=key, value=entry)
                offset += len(raw)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            serialized = model.SerializeToString()
        except message.EncodeError:
            raise InputError(f"{path}: the model is 2 GiB or more even with its initializers in {data_name}; "
                             f"tensors in Constant nodes or subgraphs are too large") from None
        os.chmod(tmp_data, 0o666 & ~_umask())
        # TODO: the two renames are not one atomic step. A crash between them leaves the new data
        # file beside an older model file.
        os.replace(tmp_data, data_path)
        write_atomic(path, serialized)
    except BaseException:
        try:
            os.unlink(tmp_data)
        except FileNotFoundError:
            pass
        raise
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
            tensor.raw_data = raw


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
