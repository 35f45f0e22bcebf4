"""Input files: which directory entries are images to read, and how file names reach the outputs.

Every output of ``qrs`` is UTF-8 text (index.csv, skipped.csv, meta.json, coords, scores.jsonl/csv,
the xlsx of ``qrs extract``, service responses). A file name whose bytes are not valid UTF-8 (Python
holds them as lone surrogates, ``\\udcff`` for the byte ``\\xff``) cannot be written there as it is,
so such a file is one bad input among others: ``qrs prepare`` skips it and ``qrs score`` gives it an
error row, both with the reason :data:`NOT_UTF8`. Why skip rather than keep the image under an
escaped name: a kept name would travel on as an id, an index ``source``, an overlay name and a key
that split files, box CSVs and ROI files must match, each a place where the escape would have to be
the same; a skipped file is only named once, in its skipped/error row, by :func:`printable`
(undecodable bytes as backslash escapes: ``bad\\xffname.png``). Renaming the file makes it an input.

Special files are never opened: :func:`file_problem` looks at ``os.stat`` (following symlinks)
first, because opening a FIFO blocks and reading a device has no end. Directories whose names carry
an image suffix (``dir.png/``) are not inputs either; :func:`list_entries` counts them, so that the
summaries can say they were ignored.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_NAME_BYTES = 200
"""Longest name that ``qrs`` gives an output file after an input (prepared ids, overlays), suffix not
counted: a file name may have 255 bytes, and an atomic write adds to it in its temporary name."""
NOT_UTF8 = "file name is not valid UTF-8"
NO_SUCH_FILE = "no such file"
DANGLING_SYMLINK = "dangling symlink: its target does not exist"
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has one of the accepted image extensions."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def printable(name: str | os.PathLike[str]) -> str:
    """``name`` as text that any UTF-8 output accepts: bytes that are not UTF-8 as ``\\xNN`` escapes.

    Valid names come back unchanged. Used wherever a file that may have such a name is written or
    printed: its skipped.csv row, its error row, a message.
    """
    return os.fspath(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shorten(text: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` bytes of UTF-8, on a character boundary (bytes that are not
    UTF-8 are dropped)."""
    return text.encode("utf-8", "surrogateescape")[:max_bytes].decode("utf-8", "ignore")


def name_problem(name: str | os.PathLike[str]) -> str | None:
    """:data:`NOT_UTF8` when ``name`` (a path as Python decoded it from the file system) is not valid
    UTF-8, else None."""
    try:
        os.fspath(name).encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    return None


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an input file, or None when it is a regular file (or a symlink to one).

    Checked with ``os.stat`` before anything opens the file: a FIFO, a device, a socket, a directory,
    a dangling symlink or a symlink to any of them gets its reason and is never opened.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return DANGLING_SYMLINK if os.path.islink(path) else NO_SUCH_FILE
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kind = next((what for test, what in _KINDS if test(mode)), "a special file")
    link = "a symlink to " if os.path.islink(path) else ""
    return f"{link}{kind}, not a regular file"


@dataclass(frozen=True)
class Entries:
    """What :func:`list_entries` found under a directory."""

    files: list[Path]
    """Every entry that is not a directory (regular or special files, symlinks), sorted."""
    image_dirs: int
    """Directories whose names carry an image suffix (``dir.png/``): ignored, counted for the summary."""


def list_entries(directory: Path, *, recursive: bool = True) -> Entries:
    """The entries under ``directory`` (recursively like ``Path.rglob``, which does not follow
    symlinks to directories), with directories set apart."""
    found = directory.rglob("*") if recursive else directory.iterdir()
    files: list[Path] = []
    image_dirs = 0
    for path in found:
        if path.is_dir():
            image_dirs += is_image_file(path)
        else:
            files.append(path)
    return Entries(sorted(files), image_dirs)


def ignored_dirs_note(n: int) -> str:
    """The summaries' words for :attr:`Entries.image_dirs`; empty when there were none."""
    if not n:
        return ""
    return f"ignored {n} director{'y' if n == 1 else 'ies'} with an image suffix"
