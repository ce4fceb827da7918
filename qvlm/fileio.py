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
]

# a prompt or sample line longer than this is refused (and never decoded or tokenised whole)
MAX_LINE_BYTES = 1 << 20


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see the old file or the new one, never half of one. The file gets mode 0644 (mkstemp
    makes 0600; outputs are meant to be shared).
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def os_error(path: str | os.PathLike, err: OSError, doing: str = "read") -> QVLMError:
    """One line for an OS error on ``path``: what failed, why (the OS's words) and what to do."""
    reason = err.strerror or type(err).__name__
    if isinstance(err, IsADirectoryError):
        return QVLMError(f"{path}: is a directory, not a file; give a file path")
    if isinstance(err, FileNotFoundError) and doing == "read":
        return QVLMError(f"{path}: no such file; check the path")
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
    file, an unwritable folder, or one of ``inputs`` (it would be overwritten). Creates nothing."""
    path = Path(path)
    for src in inputs:
        if src and _same_file(path, Path(src)):
            raise QVLMError(
                f"{flag} {path} is also an input of this run; writing it would overwrite it, choose another"
            )
    if path.is_dir():
        raise QVLMError(f"{flag} {path} is a directory; give a file path")
    _check_writable_folder(path.parent, f"{flag} {path}")


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QVLMError(f"{flag} {path} is a file, not a directory; choose a directory path")
    _check_writable_folder(path, f"{flag} {path}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
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
