"""SavedModel folders and Keras files to a frozen GraphDef, and a fused GraphDef back to a SavedModel.

Freezing uses convert_variables_to_constants_v2 without grappler, so fusion sees the BatchNorm structure
as the model wrote it (grappler would fold BN arithmetic into anonymous constants and rename nodes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fusion_ir.errors import InputError
from fusion_ir.tfimport import import_tensorflow

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class Frozen:
    """A frozen graph with its input and output tensor names and the signature keys they came from."""

    graph_def: object
    inputs: list[str]
    outputs: list[str]
    # signature key -> tensor name, so a SavedModel written back has the same signature.
    input_keys: dict[str, str] = field(default_factory=dict)
    output_keys: dict[str, str] = field(default_factory=dict)


def _freeze(concrete) -> tuple[object, list[str], list[str]]:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(concrete)
    return frozen.graph.as_graph_def(), [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]


def load_saved_model(path: str | os.PathLike, signature: str | None = None) -> Frozen:
    """Freeze signature `signature` (default serving_default) of the SavedModel folder at `path`."""
    tf = import_tensorflow()
    path = Path(path)
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        raise InputError(f"{path}: is a folder but not a SavedModel (no saved_model.pb); pass a SavedModel "
                         f"folder, a Keras file or a frozen GraphDef")
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise InputError(f"{path}: cannot load the SavedModel ({str(err).splitlines()[0]})") from None
    signatures = dict(loaded.signatures)
    if not signatures:
        raise InputError(f"{path}: the SavedModel has no signatures to freeze")
    key = signature or ("serving_default" if "serving_default" in signatures else next(iter(signatures)))
    if key not in signatures:
        raise InputError(f"{path}: no signature {key!r}; the SavedModel has {', '.join(sorted(signatures))}")
    function = signatures[key]
    graph_def, inputs, outputs = _freeze(function)
    input_names = sorted(function.structured_input_signature[1])
    # Outputs come in the order of the flattened output dict, which sorts by key.
    output_names = sorted(function.structured_outputs)
    specs = function.structured_input_signature[1]
    by_spec_name = {spec.name: key for key, spec in specs.items()}
    input_keys = {}
    for tensor in inputs:
        key_name = by_spec_name.get(tensor.rsplit(":", 1)[0])
        input_keys[key_name or input_names[len(input_keys)]] = tensor
    output_keys = dict(zip(output_names, outputs))
    return Frozen(graph_def, inputs, outputs, input_keys, output_keys)


def load_keras(path: str | os.PathLike) -> Frozen:
    """Freeze a Keras model file (.keras, or .h5 from tf_keras or Keras 3) called in inference mode."""
    tf = import_tensorflow()
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    model = None
    errors = []
    loaders = []
    if head.startswith(HDF5_MAGIC):
        loaders.append("tf_keras")
    loaders.append("keras")
    for library in loaders:
        try:
            module = __import__(library)
            model = module.models.load_model(str(path), compile=False)
            break
        except ImportError as err:
            errors.append(f"{library}: {err}")
        except Exception as err:  # noqa: BLE001 - Keras raises many types for a bad file
            errors.append(f"{library}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if model is None:
        raise InputError(f"{path}: cannot load the Keras model ({'; '.join(errors)})")

    specs = []
    for tensor in model.inputs:
        name = getattr(tensor, "name", None) or f"input_{len(specs)}"
        name = name.split(":")[0].replace("/", "_")
        specs.append(tf.TensorSpec(tensor.shape, tensor.dtype, name=name))

    def call(*args):
        return model(args[0] if len(args) == 1 else list(args), training=False)

    concrete = tf.function(call).get_concrete_function(*specs)
    graph_def, inputs, outputs = _freeze(concrete)
    input_keys = {spec.name: tensor for spec, tensor in zip(specs, inputs)}
    output_names = list(getattr(model, "output_names", None) or [])
    if len(output_names) != len(outputs):
        output_names = [f"output_{i}" for i in range(len(outputs))]
    return Frozen(graph_def, inputs, outputs, input_keys, dict(zip(output_names, outputs)))


def save_saved_model(graph_def, path: str | os.PathLike, input_keys: dict[str, str],
                     output_keys: dict[str, str]) -> None:
    """Write a frozen GraphDef as a SavedModel whose serving_default signature has the given keys.

    The folder is built beside `path` and renamed into place, so a failure leaves `path` as it was.
    """
    tf = import_tensorflow()
    path = Path(path)

    def import_graph():
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(import_graph, [])
    graph = wrapped.graph
    keys = list(input_keys)
    feeds = [graph.get_tensor_by_name(input_keys[k]) for k in keys]
    fetches = {k: graph.get_tensor_by_name(t) for k, t in output_keys.items()}
    pruned = wrapped.prune(feeds, fetches)
    signature = [tf.TensorSpec(t.shape, t.dtype, name=k) for k, t in zip(keys, feeds)]

    module = tf.Module()
    module.pruned = pruned

    @tf.function(input_signature=signature)
    def serve(*args):
        return module.pruned(*args)

    module.serve = serve
    parent = path.parent if str(path.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    try:
        tf.saved_model.save(module, str(staging), signatures={"serving_default": serve.get_concrete_function()})
        _replace_folder(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(staging: Path, path: Path) -> None:
    if not path.exists():
        os.replace(staging, path)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    backup.rmdir()
    os.replace(path, backup)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)
