"""Reading model files by content and writing outputs atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fusion_ir.errors import InputError

OUTPUT_SUFFIXES = (".pb", ".pbtxt", ".onnx", "")


def read_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if not data:
        raise InputError(f"{path}: file is empty")
    return data


def looks_like_text(data: bytes) -> bool:
    """Return whether `data` reads as protobuf text format rather than binary wire format."""
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    stripped = text.lstrip()
    return stripped.startswith(("node", "versions", "library", "#")) or stripped == ""


def check_output_path(path: str | os.PathLike) -> Path:
    """Raise InputError unless `path` has a suffix fusion-ir writes and its folder exists."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"{path}: unsupported output suffix {path.suffix!r}; use .pb (binary GraphDef), "
                         f".pbtxt (text GraphDef), .onnx, or a folder name without a suffix (SavedModel)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: output folder {parent} does not exist; create it first")
    if path.suffix and path.is_dir():
        raise InputError(f"{path}: is a folder; choose a file name for the output")
    if not path.suffix and path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file; a SavedModel output is a folder, so choose a new name")
    if not path.suffix and path.is_dir() and any(path.iterdir()) and not (path / "saved_model.pb").exists():
        raise InputError(f"{path}: is a folder that is not a SavedModel; it would be replaced, so choose a new name")
    return path


def write_atomic(path: str | os.PathLike, data) -> None:
    """Write `data` (bytes, or an iterable of bytes pieces) to a temporary file beside `path` and
    rename it over `path`.

    A failure leaves any existing file at `path` (including the input, when OUTPUT equals INPUT)
    as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                for piece in data:
                    handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_report_path(path: str | os.PathLike, other_paths: list) -> Path:
    """Raise InputError unless the report can be written to `path` without replacing INPUT or OUTPUT."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"--report {path}: folder {parent} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"--report {path}: is a folder; choose a file name for the report")
    for other in other_paths:
        if other is not None and Path(other).exists() and path.exists() and path.samefile(other):
            raise InputError(f"--report {path}: is the model file itself; choose another file name")
        if other is not None and Path(other).resolve() == path.resolve():
            raise InputError(f"--report {path}: is the same path as the model; choose another file name")
    return path
