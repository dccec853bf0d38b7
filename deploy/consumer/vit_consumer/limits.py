"""What a request may cost, checked on its bytes before the work is done.

Each check reads only what a body declares about itself (a JSON document's brackets and
commas, a ``.npy`` header, a compressed stream's output as it inflates) and refuses with a
one-line ``InputError`` before anything large is allocated. ``/predict`` and the v2 protocol
(``vit_consumer.v2``) share them, so the same body costs the same on either path.
"""

from __future__ import annotations

import io
import json
import math
import zlib

import numpy as np

from vit_consumer.classifier import InputError, _plain

# Content-Encoding -> zlib's wbits (32 + 15: a gzip or a zlib header, detected). HTTP's "deflate" is the
# zlib format (RFC 9110 8.4.1.2); tritonclient's request_compression_algorithm sends either.
ENCODINGS = {"gzip": 32 + zlib.MAX_WBITS, "x-gzip": 32 + zlib.MAX_WBITS, "deflate": 32 + zlib.MAX_WBITS}


def json_shape_problem(body: bytes, max_depth: int, max_numbers: int) -> InputError | None:
    """Nesting depth and number count of a JSON body, from its bytes, before any parsing.

    Brackets and commas inside strings do not count (a request id of "]" let deeper nesting through, one of
    "[[" refused a valid request): escaped backslashes and quotes are blanked, then every quote left opens
    or closes a string.
    """
    plain = body.replace(b"\\\\", b"  ").replace(b'\\"', b"  ")
    raw = np.frombuffer(plain, np.uint8)
    outside = np.cumsum(raw == ord('"')) % 2 == 0  # a string's closing quote is outside: it is no bracket
    step = (raw == ord("[")).astype(np.int32) + (raw == ord("{")) - (raw == ord("]")) - (raw == ord("}"))
    depth = int(np.cumsum(step * outside).max(initial=0))
    if depth > max_depth:
        return InputError(f"JSON nested {depth} levels deep; at most {max_depth} are accepted")
    numbers = int(np.count_nonzero((raw == ord(",")) & outside)) + 1
    if numbers > max_numbers:
        return InputError(f"JSON holds about {numbers} values; at most {max_numbers} are accepted "
                          "(send .npy, binary tensors or images)", 413)  # fmt: skip
    return None


class InvalidJson(InputError):
    """A body that is not JSON at all (not UTF-8, or not parseable), as opposed to JSON over the limits."""


def parse_json(body: bytes, max_depth: int, max_numbers: int, what: str = "JSON") -> object:
    """A JSON body (UTF-8, RFC 8259) within the depth and value limits, parsed."""
    problem = json_shape_problem(body, max_depth, max_numbers)
    if problem is not None:
        raise problem
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidJson(f"Invalid {what}: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidJson(f"Invalid {what}: {str(exc).splitlines()[0][:200]}") from None


def header_int(text: str) -> int | None:
    """A header's non-negative decimal integer (``Content-Length``, ``Inference-Header-Content-Length``), or None
    if it is not one. Leading zeros are allowed; a value past 10**18 reads as 10**18 (beyond every limit):
    ``int()`` of a 5,000-digit string raises, and a header is the client's to make as long as it likes."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return 10**18 if len(digits) > 18 else int(digits)


_JSON_KINDS = {bool: "booleans", str: "strings", type(None): "nulls", dict: "objects"}


def _leaf_kinds(data: object) -> set[str]:
    """What the innermost values of nested JSON lists are, where they are not numbers (``np.asarray`` would read
    ``[true, 10.5]`` as ``[1.0, 10.5]``: a boolean among numbers is promoted, not refused)."""
    level = [data]
    while any(type(x) is list for x in level):
        level = [y for x in level for y in (x if type(x) is list else (x,))]
    return {_JSON_KINDS.get(type(x), type(x).__name__) for x in level if type(x) not in (int, float)}


def numbers(
    data: object, what: str, dtype: np.dtype | type = np.float32, booleans: bool = True
) -> np.ndarray:
    """JSON numbers (nested lists) -> an array of ``dtype``; strings, booleans, nulls and ragged rows are refused.

    ``np.asarray(data, dtype)`` alone would read ``"1"`` and ``true`` as numbers and truncate 1.5
    to an integer type: the values' own kind is checked first, and values out of the range of
    ``dtype`` are refused rather than turned into infinities.

    Args:
        booleans: Whether the document may hold a boolean (False: its bytes hold no ``true``/``false``), so the
            values are walked for one hidden among numbers (in pure Python: as long as ``np.asarray`` again).
    """
    dtype = np.dtype(dtype)
    allowed = "iu" if np.issubdtype(dtype, np.integer) else "iuf"
    expected = "integers" if allowed == "iu" else "numeric values"
    try:
        raw = np.asarray(data)
    except (ValueError, OverflowError):
        raw = np.empty(0, object)  # ragged rows
    if (raw.dtype.kind == "O" or (booleans and raw.dtype.kind in "iuf")) and (others := _leaf_kinds(data)):
        raise InputError(
            f"{what} must be {expected} in equal-length rows. Received: {', '.join(sorted(others))}"
        )
    if raw.size == 0 and raw.dtype != object:
        return raw.astype(dtype)
    if raw.dtype.kind not in allowed:
        kind = {"f": "fractions", "b": "booleans", "U": "strings", "O": "ragged rows or huge integers"}
        raise InputError(f"{what} must be {expected} in equal-length rows. "
                         f"Received: {kind.get(raw.dtype.kind, raw.dtype.name)}")  # fmt: skip
    with np.errstate(over="raise", invalid="raise"):
        try:
            out = raw.astype(dtype)
        except (FloatingPointError, OverflowError):
            out = None
    if out is None or (allowed == "iu" and not np.array_equal(out, raw)):  # int64 -> uint8 wraps silently
        raise InputError(f"{what} holds values out of the range of {dtype.name}")
    return out


def load_npy(body: bytes) -> np.ndarray:
    """A ``.npy`` body as an array, its header checked against the body's length first.

    ``np.load`` would allocate what the header declares (a 200-byte file may declare petabytes)
    and unpickle object arrays; here a header that does not match the bytes that follow, or
    an object dtype, is refused before any allocation.
    """
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is not accepted (1.0 or 2.0)")
    except (ValueError, EOFError, SyntaxError) as exc:
        raise InputError(f"Not a readable .npy array: {_plain(exc)}") from None
    if dtype.hasobject:
        raise InputError("Not a readable .npy array: object arrays (pickles) are refused")
    if dtype.subdtype is not None or any(d < 0 for d in shape):  # frombuffer + reshape would fail on either
        raise InputError(f"Not a readable .npy array: shape {list(shape)[:8]} of {str(dtype)[:40]}")
    declared, present = math.prod(shape) * dtype.itemsize, len(body) - fp.tell()
    if declared != present or dtype.itemsize == 0:
        raise InputError(f"The .npy header declares {list(shape)} of {dtype} ({declared} bytes); "
                         f"{present} bytes follow it")  # fmt: skip
    array = np.frombuffer(body, dtype, math.prod(shape), fp.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A body sent with ``Content-Encoding`` gzip or deflate, decompressed to at most ``limit`` bytes.

    Raises:
        InputError: 415 for another encoding, 413 beyond ``limit`` (a zip bomb stops there),
            400 for a stream that is not what it says.
    """
    wbits = ENCODINGS.get(encoding)
    if wbits is None:
        raise InputError(f"Content-Encoding {encoding[:40]!r} is not supported; use gzip or deflate", 415)
    stream = zlib.decompressobj(wbits)
    try:
        out = stream.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InputError(f"Not a {encoding} stream: {exc}") from None
    if len(out) > limit:
        raise InputError(f"Payload exceeds the limit of {limit} bytes once decompressed", 413)
    if not stream.eof or stream.unused_data:
        raise InputError(f"The {encoding} stream is truncated or followed by other bytes")
    return out
