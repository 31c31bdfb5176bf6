"""Writing a file so that it appears whole or not at all, and never over a file the caller was not told to replace.

Every file emakit writes goes through :func:`atomic_file` (or :func:`install` for a folder written elsewhere):

1. :func:`check_output_path` first: a parent that is a file, or an existing target without ``overwrite``, is an
   error naming the user's path and the argument that would allow it;
2. the bytes go to a hidden temporary beside the target (``.NAME.emakit-PID-HEX.tmp``), created with mode
   ``0o666`` so that the umask decides the permissions, as for ``open`` and ``torch.save`` (0644 under umask 022);
3. the temporary is synced and renamed onto the target: with ``overwrite`` by ``os.replace``; without it by a hard
   link, which fails if the target appeared meanwhile, so a file another process wrote in between is never
   replaced; then the folder is synced.

An error at any step removes the temporary; errors from the file system name the user's path, not the temporary.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_file",
    "check_output_path",
    "fsync_dir",
    "install",
    "is_temporary_of",
    "replace_symlink",
    "shared_temporary_path",
    "temporary_path",
    "write_bytes",
]

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.emakit-(\d+-[0-9a-f]+|shared)\.tmp$")


def temporary_path(path: Path) -> Path:
    """An unused hidden name beside ``path`` for writing it: ``.NAME.emakit-PID-HEX.tmp``."""
    return path.with_name(f".{path.name}.emakit-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def shared_temporary_path(path: Path) -> Path:
    """The hidden name beside ``path`` that every rank computes alike, for a folder they write together."""
    return path.with_name(f".{path.name}.emakit-shared.tmp")


def is_temporary_of(entry: Path, name: re.Pattern[str]) -> bool:
    """Whether ``entry`` is a temporary that :func:`temporary_path` made for a file whose name matches ``name``."""
    match = _TEMPORARY.match(entry.name)
    return match is not None and name.fullmatch(match.group("name")) is not None


def fsync_dir(folder: Path) -> None:
    """Sync ``folder``'s entries to disk (a rename in it is durable after this); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_path(path: Path, *, overwrite: bool, what: str = "path", hint: str = "pass overwrite=True") -> None:
    """Refuse ``path`` as an output, before any work, if it cannot be written or must not be replaced.

    ``what`` names the argument (``"out"``, ``"path"``); ``hint`` says how to allow replacing an existing file.

    Raises:
        ValueError: ``path`` is a folder, or one of its parents is a file.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {str(path)!r} cannot be written: {str(parent)!r} is a file, not a folder")
            break
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{what} {str(path)!r} exists; {hint} to replace it")


def _named(e: OSError, path: Path, what: str) -> OSError:
    """``e`` again, its message naming the user's ``path`` (not a temporary)."""
    return type(e)(e.errno, f"cannot write {what} {str(path)!r}: {e.strerror or e}")


def install(tmp: Path, path: Path, *, overwrite: bool, what: str = "path", hint: str = "pass overwrite=True") -> None:
    """Rename the finished file or folder ``tmp`` onto ``path``; without ``overwrite`` only if ``path`` is free.

    Raises:
        FileExistsError: ``path`` exists (it appeared after :func:`check_output_path`) and ``overwrite`` is false.
    """
    if overwrite:
        if path.is_dir() and not path.is_symlink() and tmp.is_dir():
            old = path.with_name(f".{path.name}.emakit-{os.getpid()}-{secrets.token_hex(4)}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    elif tmp.is_dir():
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{what} {str(path)!r} exists; {hint} to replace it")
        try:
            os.rename(tmp, path)  # onto an existing folder with entries this fails: nothing is replaced
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{what} {str(path)!r} exists; {hint} to replace it") from e
            raise
    else:
        try:
            os.link(tmp, path)  # fails if ``path`` exists: a file written meanwhile by another process stays
        except FileExistsError:
            raise FileExistsError(f"{what} {str(path)!r} exists; {hint} to replace it") from None
        except OSError:  # no hard links here (some network or FUSE file systems): check, then rename
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{what} {str(path)!r} exists; {hint} to replace it") from None
            os.replace(tmp, path)
        else:
            tmp.unlink()
    fsync_dir(path.parent)


@contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, overwrite: bool, what: str = "path", hint: str = "pass overwrite=True"
) -> Iterator[BinaryIO]:
    """Open a temporary beside ``path`` for writing bytes; on leaving the block it becomes ``path``, whole.

    The parent folders are created. See the module's docstring for the steps and errors; ``what`` and ``hint``
    are as for :func:`check_output_path`.
    """
    path = Path(path)
    check_output_path(path, overwrite=overwrite, what=what, hint=hint)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _named(e, path, what) from e
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        install(tmp, path, overwrite=overwrite, what=what, hint=hint)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(
    path: str | os.PathLike[str], data: bytes, *, overwrite: bool, what: str = "path", hint: str = "pass overwrite=True"
) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`; returns ``path``."""
    with atomic_file(path, overwrite=overwrite, what=what, hint=hint) as f:
        f.write(data)
    return Path(path)


def replace_symlink(link: Path, target: str) -> None:
    """Point the symbolic link ``link`` at ``target`` (relative to its folder) in one rename.

    Only a link (or nothing) at ``link`` is replaced: a file or folder there is refused.
    """
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{str(link)!r} exists and is not a symbolic link; emakit does not replace it")
    tmp = temporary_path(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
