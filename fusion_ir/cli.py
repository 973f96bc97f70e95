"""The fusion-ir command line: argument parsing, exit codes and terminal output over fusion_ir.api."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `error: ...` line and exit code 2."""

    def error(self, message: str):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _tensor_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no tensor")
    return names


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use a seed >= 0")
    return value


FAMILY_CHOICES = ("conv-bn", "group-conv", "small-bn", "mul-add")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by fuse and inspect: where the model comes from and which fusions may run."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("input", nargs="?", help="frozen GraphDef (.pb, .pbtxt), SavedModel folder, or Keras "
                                                 "file (.keras, .h5)")
    source.add_argument("--example", metavar="NAME",
                        help="build keras.applications NAME (resnet50, mobilenetv2, ...) with random weights "
                             "and BN statistics instead of reading INPUT; NAME-tfkeras builds it with tf_keras")
    parser.add_argument("--signature", metavar="NAME",
                        help="SavedModel signature to load (default: serving_default)")
    parser.add_argument("--mode", choices=("ptq", "qat"), default="ptq",
                        help="ptq folds everything; qat keeps BatchNorm written as small ops and per-channel "
                             "Mul/Add (default: ptq)")
    parser.add_argument("--inputs", type=_tensor_list, action="extend", metavar="T1,T2",
                        help="graph input tensors, comma-separated, e.g. x:0,mask:0 (default: Placeholders)")
    parser.add_argument("--outputs", type=_tensor_list, action="extend", metavar="T1,T2",
                        help="graph output tensors, comma-separated (default: nodes whose outputs nothing "
                             "consumes)")
    parser.add_argument("--skip", action="append", default=[], metavar="GLOB",
                        help="keep nodes whose name matches GLOB (fnmatch, e.g. 'model/conv1*') out of every "
                             "fusion (repeatable)")
    parser.add_argument("--disable", action="append", default=[], metavar="FAMILY", choices=FAMILY_CHOICES,
                        help="turn off a fusion family: conv-bn, group-conv, small-bn or mul-add (repeatable)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seed of --example weights and of the random verification inputs (default: 0)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no progress messages")
    parser.add_argument("--debug", action="store_true", help="log every rewrite and show tracebacks")


def _build_parser() -> argparse.ArgumentParser:
    from fusion_ir import __version__

    parser = _Parser(
        prog="fusion-ir",
        description="Fold inference-time BatchNorm, Mul, Add and BiasAdd into conv and matmul weights.")
    parser.add_argument("--version", action="version", version=f"fusion-ir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    fuse = sub.add_parser("fuse", help="fuse a model and write the result",
                          description="Fuse a model and write the result; outputs are checked against the "
                                      "original in TensorFlow unless --no-verify.")
    _add_model_options(fuse)
    fuse.add_argument("-o", "--output", required=True,
                      help="output: .pb (binary GraphDef), .pbtxt (text GraphDef) or a folder name (SavedModel)")
    fuse.add_argument("--report", metavar="FILE", help="write the JSON report (every candidate, fused or "
                                                       "skipped with the reason) to FILE")
    fuse.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                      help="shape of an input for verification, e.g. input:1,224,224,3; unknown dimensions "
                           "default to 1 (repeatable)")
    fuse.add_argument("--no-verify", action="store_true", help="skip the TensorFlow comparison")
    fuse.add_argument("--force", action="store_true", help="write the output even when verification fails "
                                                           "(the exit code is still 1)")

    verify = sub.add_parser("verify", help="compare a model with its fused form, or two models, numerically",
                            description="Run MODEL and its fused form (or REFERENCE and CANDIDATE) on the same "
                                        "seeded inputs in TensorFlow and onnxruntime and print, per output and "
                                        "backend, the max absolute and relative max error. Exit 0 within "
                                        "tolerance, 1 outside it, 2 on bad input.")
    verify.add_argument("reference", metavar="MODEL", help="model to check (or the reference of a pair)")
    verify.add_argument("candidate", metavar="CANDIDATE", nargs="?",
                        help="model to compare with MODEL; inputs and outputs pair by name, else by position")
    verify.add_argument("--rtol", type=float, help="relative max error allowed (default: 1e-5 for float32 and "
                                                   "float64, 2e-3 for float16 and bfloat16)")
    verify.add_argument("--atol", type=float, default=0.0,
                        help="an output also passes when its max absolute error is at most ATOL (default: 0)")
    verify.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default: 0)")
    verify.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                        help="shape of an input, e.g. input:1,224,224,3; unknown dimensions default to 1")
    verify.add_argument("--mode", choices=("ptq", "qat"), default="ptq", help="fusion mode for a single MODEL")
    verify.add_argument("--json", metavar="FILE", help="also write the checks as JSON to FILE")
    verify.add_argument("--debug", action="store_true", help="show tracebacks")
    verify.add_argument("-q", "--quiet", action="store_true", help="print no progress messages")

    convert = sub.add_parser("convert", help="convert a TensorFlow model to ONNX with tf2onnx, without fusing")
    convert.add_argument("input", help="frozen GraphDef, SavedModel folder or Keras file")
    convert.add_argument("-o", "--output", required=True, help="output .onnx file")
    convert.add_argument("--signature", metavar="NAME", help="SavedModel signature (default: serving_default)")
    convert.add_argument("--opset", type=int, help="ONNX opset (default: tf2onnx's)")
    convert.add_argument("--debug", action="store_true", help="show tracebacks")
    convert.add_argument("-q", "--quiet", action="store_true", help="print no progress messages")

    inspect = sub.add_parser("inspect", help="list what would fold and why each other candidate would not",
                             description="Run the fusion passes in memory and list every candidate; "
                                         "nothing is written.")
    _add_model_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return parser


def _progress(args):
    """Return a callback that shows the current step on a terminal, or None when quiet."""
    if args.quiet or not sys.stderr.isatty():
        return None

    def show(step: str) -> None:
        print(f"fusion-ir: {step}...", file=sys.stderr, flush=True)

    return show


def _load(args, progress):
    import fusion_ir

    if progress:
        progress(f"building example {args.example}" if args.example else f"loading {args.input}")
    if args.example:
        return fusion_ir.example(args.example, args.seed)
    return fusion_ir.load(args.input, signature=args.signature)


def _print_result(result, out) -> None:
    print(result.report.summary_table(), file=out)
    if result.checks:
        from fusion_ir.numerics import format_checks

        print(file=out)
        print(format_checks(result.checks), file=out)


def _run_fuse(args) -> int:
    import fusion_ir
    from fusion_ir.files import check_report_path
    from fusion_ir.numerics import parse_input_shapes

    shapes = parse_input_shapes(args.input_shape)
    if args.report:
        check_report_path(args.report, [args.input, args.output])
    progress = _progress(args)
    model = _load(args, progress)
    status = EXIT_OK
    try:
        result = fusion_ir.fuse(model, args.output, mode=args.mode, inputs=args.inputs, outputs=args.outputs,
                                input_shapes=shapes, verify=not args.no_verify, force=args.force, seed=args.seed,
                                skip=args.skip, disable=args.disable, progress=progress)
    except fusion_ir.VerificationError as err:
        result = err.result
        _print_result(result, sys.stdout)
        print(f"error: {err}", file=sys.stderr)
        status = EXIT_VERIFY_FAILED
    else:
        _print_result(result, sys.stdout)
    for warning in result.report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.report:
        from fusion_ir.files import write_atomic

        write_atomic(args.report, result.report.to_json().encode("utf-8"))
    if result.output:
        print(f"wrote {result.output}: {result.report.num_fused} folded, "
              f"{result.nodes_before} -> {result.nodes_after} nodes")
    return status


def _run_inspect(args) -> int:
    import fusion_ir

    progress = _progress(args)
    model = _load(args, progress)
    result = fusion_ir.fuse(model, mode=args.mode, inputs=args.inputs, outputs=args.outputs, verify=False,
                            skip=args.skip, disable=args.disable, progress=progress)
    if args.json:
        print(result.report.to_json())
    else:
        print(result.report.details_table())
    return EXIT_OK


def _run_verify(args) -> int:
    import json

    import fusion_ir
    from fusion_ir.files import check_report_path
    from fusion_ir.numerics import checks_to_dicts, format_checks, parse_input_shapes

    shapes = parse_input_shapes(args.input_shape)
    if args.json:
        check_report_path(args.json, [args.reference, args.candidate])
    result = fusion_ir.verify(args.reference, args.candidate, rtol=args.rtol, atol=args.atol, seed=args.seed,
                              input_shapes=shapes, mode=args.mode)
    print(format_checks(result.checks))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        from fusion_ir.files import write_atomic

        payload = {"ok": result.ok, "checks": checks_to_dicts(result.checks), "input_pairs": result.input_pairs,
                   "warnings": result.warnings}
        write_atomic(args.json, json.dumps(payload, indent=2).encode("utf-8"))
    if not result.ok:
        failed = [c.output for c in result.checks if not c.ok]
        print(f"error: {len(failed)} output check(s) outside tolerance: {', '.join(failed)}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    return EXIT_OK


def _run_convert(args) -> int:
    import fusion_ir

    model = fusion_ir.load(args.input, signature=args.signature)
    fusion_ir.convert(model, args.output, opset=args.opset)
    print(f"wrote {args.output}")
    return EXIT_OK


def _configure_logging(debug: bool) -> None:
    # Only this project's loggers: a handler on the root logger makes TensorFlow 2.21 print its C++
    # start-up messages even when TF_CPP_MIN_LOG_LEVEL hides them.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.set_name("fusion-ir-cli")
    for name in ("fusion_ir", "converters", "passes"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if debug else logging.WARNING)
        # main() may run several times in one process (tests, notebooks): one handler is enough.
        logger.handlers = [h for h in logger.handlers if h.get_name() != "fusion-ir-cli"] + [handler]
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as done:
        # --help, --version and usage errors end here; return their code so main() can run in-process.
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    _configure_logging(args.debug)
    from fusion_ir.errors import FusionIRError

    try:
        if args.command == "fuse":
            return _run_fuse(args)
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command == "verify":
            return _run_verify(args)
        if args.command == "convert":
            return _run_convert(args)
    except FusionIRError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (fusion-ir ... | head); nothing is left to report to.
        sys.stderr.close()
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - the last line of defence against a traceback
        if args.debug:
            raise
        print(f"error: internal error: {type(err).__name__}: {err}; rerun with --debug and report it",
              file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
