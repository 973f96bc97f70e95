"""fusion-ir: fold inference-time BatchNorm, Mul, Add and BiasAdd into the weights of the conv or
matmul before them, and check with TensorFlow that the outputs did not change.

    import fusion_ir
    result = fusion_ir.fuse("model.pb", "fused.pb")
    print(result.report.summary_table())
"""

from fusion_ir.api import FuseResult, Model, VerifyResult, convert, example, fuse, load, save, verify
from fusion_ir.errors import FusionIRError, InputError, VerificationError
from fusion_ir.report import Candidate, Report

__version__ = "0.1.0"

__all__ = ["Candidate", "FuseResult", "FusionIRError", "InputError", "Model", "Report", "VerificationError",
           "VerifyResult", "__version__", "convert", "example", "fuse", "load", "save", "verify"]
