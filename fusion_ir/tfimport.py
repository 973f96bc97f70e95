"""Import TensorFlow once, lazily, without its start-up chatter on stderr.

TensorFlow 2.21 prints oneDNN and CUDA notices through absl before logging is initialized, where
TF_CPP_MIN_LOG_LEVEL does not reach them. File descriptor 2 is pointed at /dev/null while TensorFlow
imports and initializes its devices (set FUSION_IR_TF_LOGS=1 to see them). Errors still surface as
Python exceptions.
"""

from __future__ import annotations

import gc
import os

_tf = None


def import_tensorflow():
    """Return the tensorflow module, importing it quietly on first use."""
    global _tf
    if _tf is not None:
        return _tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("FUSION_IR_TF_LOGS"):
        import tensorflow

        _tf = tensorflow
        return _tf
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow

        tensorflow.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    _tf = tensorflow
    # TensorFlow leaves millions of long-lived objects. Moving them out of the collector's reach kept a
    # full collection during a ResNet152V2 fuse at about 0.1 s instead of 0.5-0.8 s (benchmarks/run.py).
    gc.freeze()
    return _tf
