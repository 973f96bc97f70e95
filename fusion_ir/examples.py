"""Example models: keras.applications networks with random weights and random BN statistics, frozen
to a GraphDef the way TF2 users freeze them (convert_variables_to_constants_v2)."""

from __future__ import annotations

import numpy as np

from fusion_ir.errors import InputError

# name -> (keras.applications constructor, input height and width)
EXAMPLES = {
    "resnet50": ("ResNet50", 224),
    "resnet50v2": ("ResNet50V2", 224),
    "resnet152v2": ("ResNet152V2", 224),
    "mobilenet": ("MobileNet", 224),
    "mobilenetv2": ("MobileNetV2", 224),
    "mobilenetv3small": ("MobileNetV3Small", 224),
    "densenet121": ("DenseNet121", 224),
    "efficientnetb0": ("EfficientNetB0", 224),
    "inceptionv3": ("InceptionV3", 299),
    "xception": ("Xception", 299),
    "nasnetmobile": ("NASNetMobile", 224),
}
# A name ending in this suffix builds the model with tf_keras, whose BatchNormalization writes
# FusedBatchNormV3 instead of Keras 3's small ops.
TF_KERAS_SUFFIX = "-tfkeras"


def randomize_batchnorm(model, seed: int) -> int:
    """Give every BatchNormalization layer random gamma, beta, moving mean and variance; return how many."""
    rng = np.random.default_rng(seed)
    count = 0
    for layer in _all_layers(model):
        if type(layer).__name__ != "BatchNormalization":
            continue
        new_weights = []
        for weight in layer.weights:
            shape = tuple(weight.shape)
            name = weight.name
            if "gamma" in name:
                new_weights.append(rng.uniform(0.5, 1.5, shape))
            elif "beta" in name:
                new_weights.append(rng.normal(0.0, 0.2, shape))
            elif "moving_mean" in name:
                new_weights.append(rng.normal(0.0, 0.2, shape))
            elif "moving_variance" in name:
                new_weights.append(rng.uniform(0.5, 2.0, shape))
            else:
                new_weights.append(weight.numpy())
        layer.set_weights([w.astype(np.float32) for w in new_weights])
        count += 1
    return count


def _all_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        yield layer


def freeze_keras_model(model, input_shape: tuple, input_name: str = "input"):
    """Freeze a Keras model called in inference mode to a GraphDef; return (graph_def, input, outputs)."""
    from fusion_ir.tfimport import import_tensorflow

    tf = import_tensorflow()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec(input_shape, tf.float32, name=input_name))
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    return graph_def, inputs, outputs


def build_example(name: str, seed: int = 0):
    """Build example `name` with Keras 3 (or tf_keras, for a NAME-tfkeras); return (graph_def, inputs, outputs)."""
    key = name.lower().replace("_", "")
    use_tf_keras = key.endswith(TF_KERAS_SUFFIX)
    key = key.removesuffix(TF_KERAS_SUFFIX).replace("-", "")
    if key not in EXAMPLES:
        raise InputError(f"unknown example {name!r}; choose one of {', '.join(sorted(EXAMPLES))}, optionally "
                         f"with the suffix {TF_KERAS_SUFFIX} for the tf_keras (FusedBatchNormV3) form")
    from fusion_ir.tfimport import import_tensorflow

    import_tensorflow()
    if use_tf_keras:
        try:
            import tf_keras as keras
        except ImportError:
            raise InputError(f"example {name!r} needs tf_keras; install it with pip install tf_keras") from None
    else:
        import keras

    constructor, size = EXAMPLES[key]
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, constructor)(weights=None, input_shape=(size, size, 3))
    randomize_batchnorm(model, seed)
    return freeze_keras_model(model, (None, size, size, 3))
