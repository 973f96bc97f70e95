"""Exceptions the public API raises; the CLI maps each to an exit code."""


class FusionIRError(Exception):
    """Base class of fusion-ir's own errors."""

    exit_code = 2


class InputError(FusionIRError):
    """Bad usage or bad input: an unreadable model, an unknown tensor name, an unsupported suffix."""

    exit_code = 2


class VerificationError(FusionIRError):
    """The fused model's outputs differ from the original's beyond the tolerance."""

    exit_code = 1
