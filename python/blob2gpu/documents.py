"""JSON and YAML documents blob2gpu reads from files a user names (config files, the vLLM extra
config's `config`, a local model.safetensors.index.json, a manifest, a report to show) or from
Blob (an index, a manifest): input that may be anything, read bounded.

- A file is read only when it is a regular file (symlinks are followed: a Kubernetes ConfigMap
  mounts its files through them), never more than its cap: a FIFO, /dev/zero or a directory is
  refused at once, before any read (a FIFO is opened without waiting for a writer).
- JSON nests at most MAX_DEPTH arrays and objects, checked before it is parsed (100,000 nested
  '[' would otherwise end in RecursionError, or past a raised recursion limit, a crash); YAML
  that nests deeper than the parser can go is a typed error too.
- Every failure is the caller's typed error (ConfigError, InvalidIndex, InvalidManifest) with a
  message that quotes nothing of the document: a YAML error says the problem and where (line,
  column), never the offending line; values and names from a document are clipped (clip()).
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from array import array
from collections.abc import Callable
from itertools import accumulate
from typing import Any

from blob2gpu import _core
from blob2gpu.errors import Blob2GpuError

MiB = 1 << 20
# The most a document of each kind may hold: a config file is a few dozen settings; the largest
# checkpoints' indexes (~100k tensors) are ~10 MB; a manifest holds ~95 bytes per 4 MiB chunk, so
# 256 MiB covers a checkpoint of ~10 TB.
CONFIG_MAX_BYTES = 1 * MiB
INDEX_MAX_BYTES = 64 * MiB
INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's index, beside its shards
MANIFEST_MAX_BYTES = 256 * MiB
REPORT_MAX_BYTES = 64 * MiB  # a LoadReport as JSON: a few hundred bytes per shard
# Arrays and objects within one another: an index nests 2, a manifest 4, a config file 2.
MAX_DEPTH = 64
CLIP_CHARS = 80  # the most of a value or name from a document a message shows

ErrorType = Callable[[str], Blob2GpuError]

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes and all
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# '[' and '{' one level in (1), ']' and '}' one out (0xFF: -1 as a signed byte).
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """`value` as text of at most `limit` characters (cut ones end in '...')."""
    text = str(value)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def clipped_repr(value: object, limit: int = CLIP_CHARS) -> str:
    """repr(value), at most `limit` characters, made without turning a long value (a string of
    megabytes, a list of a million) into text whole."""
    shown = reprlib.Repr()
    shown.maxstring = shown.maxother = shown.maxlong = limit
    shown.maxlevel = 3
    return clip(shown.repr(value), limit)


def read_regular_file(
    path: str | os.PathLike[str],
    limit: int,
    error: ErrorType,
    what: str,
    unreadable: ErrorType | None = None,
) -> bytes:
    """The bytes of the regular file at `path`, at most `limit`. Raises error(message) for a file
    that is no regular file (a FIFO, a device, a directory) or holds more than `limit` bytes,
    unreadable(message) (else error) for one that cannot be opened or read; the message names
    `what` and the path, and quotes nothing of the file."""
    # The core opens, checks and reads it in one call: one return of the GIL, not one per call.
    file = _core.read_small_files([os.fsencode(path)], limit)[0]
    return file_bytes(file, path, limit, error, what, unreadable)


def file_bytes(
    file: _core.SmallFile,
    path: str | os.PathLike[str],
    limit: int,
    error: ErrorType,
    what: str,
    unreadable: ErrorType | None = None,
) -> bytes:
    """The bytes of `file`, what the core's read_small_files(limit) read of `path`, with the
    errors of read_regular_file()."""
    shown = clip(path, 200)
    if file.error:
        raise (unreadable or error)(f"cannot read {what} '{shown}': {os.strerror(file.error)}")
    if not file.regular:
        raise error(
            f"{what} '{shown}' is not a regular file (a FIFO, a device or a directory): name the "
            "file itself"
        )
    if file.over_limit:
        raise error(f"{what} '{shown}' is larger than {limit >> 20} MiB, more than a {what} holds")
    return file.data


def too_deep(data: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text `data` nests arrays and objects more than `limit` deep (brackets
    inside strings do not count). A scan at the speed of the regex and bytes machinery: no
    parser, no recursion."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    steps = brackets.translate(_STEPS)
    depth = 0
    for start in range(0, len(steps), MiB):  # by parts: a hostile document ends at its first
        running = list(accumulate(array("b", steps[start : start + MiB]), initial=depth))
        if max(running) > limit:
            return True
        depth = running[-1]
    return False


def parse_json(data: bytes | str, error: ErrorType, what: str) -> Any:
    """The JSON document `data` (UTF-8 bytes or text). Raises error(message) when it is not
    JSON or nests more than MAX_DEPTH deep; the message names `what` and quotes nothing of it."""
    if too_deep(data):
        raise error(f"{what} nests arrays or objects more than {MAX_DEPTH} deep: it is not one")
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise error(
            f"{what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    except UnicodeDecodeError as e:
        raise error(f"{what} is not UTF-8 text (byte {e.start} is not)") from None
    except (RecursionError, ValueError) as e:  # ValueError: a number too long to convert
        raise error(f"{what} is not valid JSON ({type(e).__name__})") from None


def parse_yaml(text: str, error: ErrorType, what: str) -> Any:
    """The YAML document `text` (safe_load: no Python objects). Raises error(message) when it is
    not YAML or nests deeper than the parser goes; the message says the problem and its line and
    column, never the line itself."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(
            f"{what} is not valid YAML: {clip(e.problem or 'a syntax error')}{where}"
        ) from None
    except yaml.YAMLError as e:
        raise error(f"{what} is not valid YAML ({type(e).__name__})") from None
    except RecursionError:
        raise error(
            f"{what} nests collections deeper than a YAML parser goes: it is not one"
        ) from None
