"""Benchmark models: build them once, frozen to a GraphDef, and cache them under benchmarks/.cache.

Keras models are keras.applications networks with random weights and randomized BatchNorm statistics
(fusion_ir.examples.randomize_batchnorm), frozen with fusion_ir.examples.freeze_keras_model. The
"keras3" form is built with Keras 3, whose BatchNormalization is written as small ops (Rsqrt, Mul,
AddV2); the "tfkeras" form is built with tf_keras, whose BatchNormalization is one FusedBatchNormV3.
The synthetic models are GraphDefs written directly: Conv2D -> FusedBatchNormV3 -> Relu chains whose
Const weights are filled by numpy.

Run as a script (`python benchmarks/models.py KEY`) to build one model into the cache; run.py does that
in a subprocess so that building a model costs the benchmark process no memory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_CACHE = BENCH_DIR / ".cache"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: a keras.applications network in one Keras form, or a synthetic chain."""

    key: str
    label: str
    kind: str  # "keras3", "tfkeras" or "synthetic"
    constructor: str = ""
    size: int = 224
    # Keyword arguments for the keras.applications constructor besides weights and input_shape.
    options: tuple = ()
    # Synthetic chains: channels, number of Conv2D -> FusedBatchNormV3 blocks, input height and width.
    channels: int = 0
    blocks: int = 0


def _keras_pair(constructor: str, size: int, options: tuple = ()) -> list[ModelSpec]:
    key = constructor.lower()
    return [ModelSpec(f"{key}-keras3", f"{constructor} (Keras 3)", "keras3", constructor, size, options),
            ModelSpec(f"{key}-tfkeras", f"{constructor} (tf_keras)", "tfkeras", constructor, size, options)]


# 30 blocks of 3x3x1024x1024 float32 kernels: 30 * 37.7 MB = 1.13 GB of conv weights.
SYNTHETIC_FULL = ModelSpec("synthetic-1gb", "synthetic 1.1 GB (Conv2D+FusedBatchNormV3 x30)", "synthetic",
                           channels=1024, blocks=30, size=4)
# 22 blocks of 3x3x256x256 float32 kernels: 22 * 2.36 MB = 52 MB.
SYNTHETIC_QUICK = ModelSpec("synthetic-50mb", "synthetic 52 MB (Conv2D+FusedBatchNormV3 x22)", "synthetic",
                            channels=256, blocks=22, size=8)

FULL_MODELS: list[ModelSpec] = (
    _keras_pair("ResNet152V2", 224)
    + _keras_pair("DenseNet201", 224)
    + _keras_pair("InceptionResNetV2", 299)
    # Logits instead of softmax: with random weights EfficientNetB7's softmax is one-hot (1.0 for one class,
    # exactly 0.0 elsewhere), so any rounding change can move the 1.0 and no comparison means anything.
    + _keras_pair("EfficientNetB7", 600, (("classifier_activation", None),))
    + [ModelSpec("convnextbase-keras3", "ConvNeXtBase (Keras 3, no BatchNorm)", "keras3", "ConvNeXtBase", 224),
       SYNTHETIC_FULL]
)
QUICK_MODELS: list[ModelSpec] = [
    ModelSpec("mobilenetv2-96-keras3", "MobileNetV2 96x96 (Keras 3)", "keras3", "MobileNetV2", 96),
    # Keras 3 form: grappler + optimize_for_inference takes about 40 s on the tf_keras form of ResNet50.
    ModelSpec("resnet50-64-keras3", "ResNet50 64x64 (Keras 3)", "keras3", "ResNet50", 64),
    SYNTHETIC_QUICK,
]
ALL_MODELS = {spec.key: spec for spec in FULL_MODELS + QUICK_MODELS}


@dataclass
class BuiltModel:
    """A cached frozen model: the .pb file, its graph input and output tensor names, and its size."""

    spec: ModelSpec
    path: Path
    inputs: list[str]
    outputs: list[str]
    file_bytes: int
    build_seconds: float

    @property
    def onnx_path(self) -> Path:
        """Where the tf2onnx conversion of this model is cached (the "ONNX form" of the benchmark)."""
        return self.path.with_suffix(".onnx")


def cache_paths(spec: ModelSpec, cache_dir: Path) -> tuple[Path, Path]:
    return cache_dir / f"{spec.key}.pb", cache_dir / f"{spec.key}.json"


def load_cached(spec: ModelSpec, cache_dir: Path) -> BuiltModel | None:
    """Return the cached model, or None when it has not been built (or its files are incomplete)."""
    pb_path, meta_path = cache_paths(spec, cache_dir)
    if not pb_path.exists() or not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("file_bytes") != pb_path.stat().st_size or meta.get("spec") != _spec_fields(spec):
        return None
    return BuiltModel(spec, pb_path, meta["inputs"], meta["outputs"], meta["file_bytes"], meta["build_seconds"])


def _spec_fields(spec: ModelSpec) -> dict:
    """Return the fields a model is built from; a cache entry built from other fields is rebuilt."""
    return {"kind": spec.kind, "constructor": spec.constructor, "size": spec.size,
            "options": [list(option) for option in spec.options], "channels": spec.channels, "blocks": spec.blocks}


def build_keras(spec: ModelSpec, seed: int = 0):
    """Build and freeze a keras.applications model; return (graph_def, inputs, outputs)."""
    from fusion_ir.examples import freeze_keras_model, randomize_batchnorm
    from fusion_ir.tfimport import import_tensorflow

    import_tensorflow()
    if spec.kind == "tfkeras":
        import tf_keras as keras
    else:
        import keras

    keras.utils.set_random_seed(seed)
    constructor = getattr(keras.applications, spec.constructor)
    model = constructor(weights=None, input_shape=(spec.size, spec.size, 3), **dict(spec.options))
    randomize_batchnorm(model, seed)
    return freeze_keras_model(model, (None, spec.size, spec.size, 3))


def build_synthetic(spec: ModelSpec, seed: int = 0):
    """Write a Conv2D -> FusedBatchNormV3 -> Relu chain as a GraphDef; return (graph_def, inputs, outputs).

    Kernels are He-scaled normal values and BN statistics are random, so activations stay in a
    moderate range over the whole chain and a float32 comparison of original and fused is meaningful.
    """
    from fusion_ir.tfimport import import_tensorflow

    import_tensorflow()
    from tensorflow.core.framework import graph_pb2, tensor_shape_pb2, types_pb2

    rng = np.random.default_rng(seed)
    channels = spec.channels
    graph_def = graph_pb2.GraphDef()

    def add_const(name: str, array: np.ndarray) -> None:
        node = graph_def.node.add()
        node.name = name
        node.op = "Const"
        node.attr["dtype"].type = types_pb2.DT_FLOAT
        tensor = node.attr["value"].tensor
        tensor.dtype = types_pb2.DT_FLOAT
        tensor.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]))
        tensor.tensor_content = np.ascontiguousarray(array, dtype="<f4").tobytes()

    placeholder = graph_def.node.add()
    placeholder.name = "input"
    placeholder.op = "Placeholder"
    placeholder.attr["dtype"].type = types_pb2.DT_FLOAT
    placeholder.attr["shape"].shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in (-1, spec.size, spec.size, channels)]))

    previous = "input"
    he_std = np.float32(np.sqrt(2.0 / (9 * channels)))
    for block in range(spec.blocks):
        prefix = f"block{block}"
        kernel = rng.standard_normal((3, 3, channels, channels), dtype=np.float32)
        kernel *= he_std
        add_const(f"{prefix}/kernel", kernel)
        del kernel
        conv = graph_def.node.add()
        conv.name = f"{prefix}/conv"
        conv.op = "Conv2D"
        conv.input.extend([previous, f"{prefix}/kernel"])
        conv.attr["T"].type = types_pb2.DT_FLOAT
        conv.attr["strides"].list.i.extend([1, 1, 1, 1])
        conv.attr["padding"].s = b"SAME"
        conv.attr["data_format"].s = b"NHWC"

        for stat, values in (("gamma", rng.uniform(0.5, 1.5, channels)), ("beta", rng.normal(0.0, 0.2, channels)),
                             ("mean", rng.normal(0.0, 0.2, channels)), ("variance", rng.uniform(0.5, 2.0, channels))):
            add_const(f"{prefix}/bn/{stat}", values.astype(np.float32))
        bn = graph_def.node.add()
        bn.name = f"{prefix}/bn"
        bn.op = "FusedBatchNormV3"
        bn.input.extend([conv.name] + [f"{prefix}/bn/{s}" for s in ("gamma", "beta", "mean", "variance")])
        bn.attr["T"].type = types_pb2.DT_FLOAT
        bn.attr["U"].type = types_pb2.DT_FLOAT
        bn.attr["epsilon"].f = 1e-3
        bn.attr["is_training"].b = False
        bn.attr["data_format"].s = b"NHWC"
        bn.attr["exponential_avg_factor"].f = 1.0

        relu = graph_def.node.add()
        relu.name = f"{prefix}/relu"
        relu.op = "Relu"
        relu.input.append(bn.name)
        relu.attr["T"].type = types_pb2.DT_FLOAT
        previous = relu.name

    output = graph_def.node.add()
    output.name = "output"
    output.op = "Identity"
    output.input.append(previous)
    output.attr["T"].type = types_pb2.DT_FLOAT
    graph_def.versions.producer = 1994
    return graph_def, ["input:0"], ["output:0"]


def build_and_cache(spec: ModelSpec, cache_dir: Path, seed: int = 0) -> BuiltModel:
    """Build `spec` in this process and write it (and its metadata) into `cache_dir`."""
    start = time.perf_counter()
    if spec.kind == "synthetic":
        graph_def, inputs, outputs = build_synthetic(spec, seed)
    else:
        graph_def, inputs, outputs = build_keras(spec, seed)
    data = graph_def.SerializeToString()
    del graph_def
    elapsed = time.perf_counter() - start
    pb_path, meta_path = cache_paths(spec, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = pb_path.with_suffix(".pb.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, pb_path)
    meta = {"inputs": inputs, "outputs": outputs, "file_bytes": len(data), "build_seconds": elapsed, "seed": seed,
            "spec": _spec_fields(spec)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return BuiltModel(spec, pb_path, inputs, outputs, len(data), elapsed)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ALL_MODELS:
        print(f"usage: python benchmarks/models.py KEY CACHE_DIR; KEY is one of {', '.join(ALL_MODELS)}",
              file=sys.stderr)
        return 2
    built = build_and_cache(ALL_MODELS[argv[0]], Path(argv[1]))
    print(json.dumps({"path": str(built.path), "file_bytes": built.file_bytes, "build_seconds": built.build_seconds}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_DIR))
    sys.exit(main(sys.argv[1:]))
