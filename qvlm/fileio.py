"""Atomic file writes, output paths checked before the work, and text files read line by line with a size
cap and one clear error per problem (light module: stdlib only)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from qvlm.errors import QVLMError

__all__ = [
    "MAX_LINE_BYTES",
    "atomic_write_text",
    "atomic_write_bytes",
    "check_output_file",
    "check_output_dir",
    "os_error",
    "read_lines",
    "read_text",
    "read_json",
]

# a prompt or sample line longer than this is refused (and never decoded or tokenised whole)
MAX_LINE_BYTES = 1 << 20


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see the old file or the new one, never half of one. The file gets mode 0644 (mkstemp
    makes 0600; outputs are meant to be shared).
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def os_error(path: str | os.PathLike | None, err: OSError, doing: str = "read") -> QVLMError:
    """One line for an OS error on ``path``: what failed, why (the OS's words) and what to do.

    ``path`` None: the error's own file name (an ``OSError`` that escaped a library call)."""
    if path is None:
        path = err.filename if err.filename is not None else "a file"
        if err.filename2 is not None:
            path = f"{path} -> {err.filename2}"
    reason = err.strerror or str(err) or type(err).__name__
    if isinstance(err, IsADirectoryError):
        return QVLMError(f"{path}: is a directory, not a file; give a file path")
    if isinstance(err, FileNotFoundError) and doing == "read":
        return QVLMError(f"{path}: no such file; check the path")
    if isinstance(err, FileExistsError):
        return QVLMError(
            f"{path}: cannot {doing}: a file is in the way ({reason}); give a path that is a directory or does not "
            "exist yet, or move that file away"
        )
    if isinstance(err, NotADirectoryError):
        return QVLMError(
            f"{path}: cannot {doing}: part of the path is a file, not a directory ({reason}); choose another path"
        )
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return QVLMError(f"{path}: cannot {doing}: {reason}; free some space or choose another location")
    if err.errno == errno.EROFS:
        return QVLMError(f"{path}: cannot {doing}: read-only file system; choose a writable location")
    return QVLMError(f"{path}: cannot {doing} ({reason}); check the path and its permissions")


def read_lines(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text)`` of each line of a UTF-8 text file, newline stripped.

    Reads at most ``max_line_bytes + 1`` bytes per line, so a file of one huge line is refused
    without being held in memory. OS errors, a line over the cap, invalid UTF-8 and NUL bytes (a
    binary file) raise :class:`QVLMError` naming the file and the line.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; open errors become one line)
    except OSError as err:
        raise os_error(path, err) from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline(max_line_bytes + 1)
            except OSError as err:
                raise os_error(path, err) from None
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise QVLMError(f"{path}:{lineno}: line longer than {max_line_bytes:,} bytes; split it or shorten it")
            yield lineno, _decode(raw, f"{path}:{lineno}").rstrip("\r\n")


def read_text(path: str | os.PathLike, max_bytes: int = 64 * MAX_LINE_BYTES) -> str:
    """A whole (small) UTF-8 text file; errors as in :func:`read_lines`, naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as err:
        raise os_error(path, err) from None
    if len(raw) > max_bytes:
        raise QVLMError(f"{path}: larger than {max_bytes:,} bytes; this is not the expected small text file")
    return _decode(raw, str(path))


def read_json(path: str | os.PathLike, what_to_do: str = "restore it or delete it", kind: type | tuple = dict):
    """A small JSON file qvlm wrote (a config, a cached result), checked: unreadable, not UTF-8, not
    JSON, or not a ``kind`` (a JSON object by default; ``(dict, list)``: either) is a
    :class:`QVLMError` naming the file and ending in ``what_to_do``."""
    import json

    try:
        value = json.loads(read_text(path))
    except QVLMError as err:
        raise QVLMError(f"{err}; {what_to_do}") from None
    except ValueError as err:  # json.JSONDecodeError
        where = f": line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        raise QVLMError(f"{path}: damaged, not valid JSON ({msg}{where}); {what_to_do}") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else "a JSON object or list"
        raise QVLMError(f"{path}: damaged, a JSON {type(value).__name__} where {expected} belongs; {what_to_do}")
    return value


def _decode(raw: bytes, where: str) -> str:
    if b"\x00" in raw:
        raise QVLMError(f"{where}: binary content (NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise QVLMError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the file as UTF-8"
        ) from None


def check_output_file(path: str | os.PathLike, flag: str, inputs: tuple = ()) -> None:
    """Refuse, before any work, an output file that cannot be written: a directory, a path under a
    file, an unwritable folder, one of ``inputs`` or an existing file inside an input directory (a
    model, a run: it would be overwritten). Creates nothing."""
    path = Path(path)
    for src in inputs:
        if src and (_same_file(path, Path(src)) or (path.is_file() and _inside(path, Path(src)))):
            raise QVLMError(
                f"{flag} {path} is also an input of this run ({src}); writing it would overwrite it, choose another"
            )
    if path.is_dir():
        raise QVLMError(f"{flag} {path} is a directory; give a file path")
    _check_writable_folder(path.parent, f"{flag} {path}")


def check_output_dir(path: str | os.PathLike, flag: str, inputs: tuple = ()) -> None:
    """Refuse, before any work, an output folder that is a file, lies under a file, cannot be written,
    or is one of ``inputs`` (a model or run directory the command reads: its files would be overwritten)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QVLMError(f"{flag} {path} is a file, not a directory; choose a directory path")
    for src in inputs:
        if src and _same_file(path, Path(src)):
            raise QVLMError(
                f"{flag} {path} is also an input of this run ({src}); writing there would overwrite its files, "
                "choose another directory"
            )
    _check_writable_folder(path, f"{flag} {path}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies inside the existing directory ``folder``."""
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def _check_writable_folder(folder: Path, what: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a directory we can create files in."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise QVLMError(f"{what}: {probe} is a file, not a directory; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qvlm-write-check.", dir=probe)
    except OSError as err:
        reason = "read-only file system" if err.errno == errno.EROFS else (err.strerror or type(err).__name__)
        raise QVLMError(f"{what}: cannot write in {probe} ({reason}); choose a writable location") from None
    os.close(fd)
    os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write_text` for bytes (an image, a binary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
