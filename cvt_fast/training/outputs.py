"""Errors writing the run's outputs (read-only folder, full disk, a path through a file), as
one line that names the path and says what to do.

Every write of the trainer goes through `writing(path)`: an OSError inside becomes an
OutputError, which the command line prints as `error: ...` with exit code 2. The writes
themselves are atomic or append-only (cvt_fast.checkpoint.atomic_save, logs.MetricsWriter),
so a failed one leaves the earlier files as they were.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_NO_FOLDER = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


class OutputError(Exception):
    """A file of the run could not be written; the message names it and says what to do."""


def describe_write_error(path: str | os.PathLike, err: OSError) -> str:
    code = err.errno
    what = err.strerror or str(err)
    name = errno.errorcode.get(code, "") if code is not None else ""
    if code in _NO_SPACE:
        advice = ("free space there (or raise the file size limit), or set OUTPUT_DIR to a disk with room; "
                  "the files written before are intact and a rerun resumes from the newest checkpoint")
    elif code in _NOT_WRITABLE:
        advice = "make that folder writable, or set OUTPUT_DIR to a folder you can write"
    elif code in _NO_FOLDER:
        advice = "a folder on that path is missing or is a file: set OUTPUT_DIR to a folder path"
    else:
        advice = "check that disk, or set OUTPUT_DIR elsewhere"
    detail = f"{what} ({name})" if name else what
    return f"cannot write {os.fspath(path)}: {detail}; {advice}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into an OutputError naming it."""
    try:
        yield
    except OSError as err:
        raise OutputError(describe_write_error(path, err)) from err
