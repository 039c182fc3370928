"""AVA file formats: groundtruth/detection CSVs, label maps, excluded timestamps and results.csv.

This module owns every byte the official AVA evaluator reads or writes, and nothing else
(the metric itself is :mod:`stage_dist.evaluate`):

- :func:`read_groundtruth` (rows of 7 or 8 columns, or the 2-column ``video,ts`` rows that mark
  a keyframe without boxes) and :func:`read_detections` (exactly 8 columns: a missing score is
  an error, never 1.0) parse ``video,ts,x1,y1,x2,y2,action[,score|person]`` rows into numpy
  arrays, in file order, with vectorised parsing so that a full validation results file (~7M
  rows) reads in seconds; :func:`read_ava_csv` is the reader behind both. A leading UTF-8
  byte-order mark, ``\\r\\n`` line ends and blank lines read like a plain file. Keyframes are
  named by the official image key ``"<video>,<ts:.6f>"`` with the timestamp read as a decimal
  number, so ``0902``, ``902`` and ``902.0`` are one keyframe.
- :func:`read_labelmap` reads both pbtxt forms (``item { name id }`` and
  ``label { name label_id }``), :func:`read_label_types` the v2.2 ``label_type`` of each entry;
  :func:`read_exclusions` reads ``video,ts`` exclusion lists.
- :func:`write_results_csv` writes predictions in the AVA format, sorted and deterministic,
  through a temporary file renamed into place. :func:`results_rows` is its row selection and
  order as arrays, and :func:`results_as_read` what reading the written file would give, so
  predictions can be evaluated in memory with the file's exact numbers.

Every malformed input raises :class:`AvaFormatError` with ``"<file>:<line>: <what is wrong>"``.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from stage_dist.core.errors import UserInputError
from stage_dist.core.fileio import atomic_write

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

_READ_BLOCK_BYTES = 1 << 25  # parse CSVs in ~32 MiB blocks of whole lines (bounded memory)
_MAX_FIELD_BYTES = 64  # longer video ids or timestamps are malformed (AVA ids have 11 characters)
_WRITE_BLOCK_ROWS = 1 << 20  # results.csv rows formatted per block
_MAX_LINE_BYTES = 1 << 20  # an AVA row has ~60 bytes: a longer "line" is not an AVA CSV
_NEWLINE, _COMMA, _CR = 10, 44, 13
_UTF8_BOM = b"\xef\xbb\xbf"  # Excel writes one; the CSV standard and Python's utf-8-sig accept it
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")

GROUNDTRUTH_COLUMNS = (2, 7, 8)  # video,ts | video,ts,x1,y1,x2,y2,action[,person]
DETECTION_COLUMNS = (8,)  # video,ts,x1,y1,x2,y2,action,score
EXCLUSION_COLUMNS = (2,)  # video,ts


class AvaFormatError(UserInputError, ValueError):
    """A malformed AVA file; the message is ``"<file>:<line>: <what is wrong>"``."""

    def __init__(self, path: PathLike, line: int | None, what: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.what = what
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {what}")


def image_key(video_id: str, timestamp: str) -> str:
    """The official keyframe key ``"<video_id>,<timestamp:.6f>"``, timestamp read as a decimal.

    Raises ``ValueError`` if ``timestamp`` is not a finite decimal number.
    """
    try:
        value = Decimal(timestamp)
    except InvalidOperation:
        raise ValueError(f"timestamp {timestamp!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"timestamp {timestamp!r} is not a finite number")
    return "%s,%.6f" % (video_id, value)


@dataclass(frozen=True)
class AvaCsv:
    """The rows of one AVA CSV, in file order.

    ``keys[keyframe[i]]`` is the official image key of box row ``i``. ``boxes`` are
    ``x1, y1, x2, y2`` as written; ``scores`` is 1.0 where a row has no score column (and for
    groundtruth, whose 8th column is a person id). ``marked_keyframes`` lists the keyframes
    named by 2-column ``video,ts`` rows (a keyframe with no boxes).
    """

    path: str
    keys: list[str]
    keyframe: np.ndarray  # (N,) int64 index into keys
    boxes: np.ndarray  # (N, 4) float64
    actions: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float64
    marked_keyframes: np.ndarray  # (M,) int64 index into keys
    # the timestamp of each key as first written (``0902``, ``902.0``...); None: not known
    stamp_text: list[str] | None = field(default=None, repr=False, compare=False)
    # key index -> another spelling of its timestamp in the same file (``902`` on some rows of ``0902``)
    other_stamp_text: dict[int, str] | None = field(default=None, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return len(self.keyframe)


# ---------------------------------------------------------------------------------------------
# CSV reading
# ---------------------------------------------------------------------------------------------


def _iter_line_blocks(handle: BinaryIO, block_bytes: int) -> Iterator[bytes]:
    """Yield blocks of whole lines, each ending with a newline; a leading UTF-8 BOM is dropped.

    Raises :class:`_LineTooLong` when no newline comes within ``_MAX_LINE_BYTES`` (a binary
    file or a stream without line breaks would otherwise be buffered whole).
    """
    carry = b""
    first = True
    while True:
        chunk = handle.read(block_bytes)
        if not chunk:
            break
        chunk = carry + chunk
        if first and len(chunk) < len(_UTF8_BOM) and _UTF8_BOM.startswith(chunk):
            carry = chunk  # a BOM split across reads (tiny blocks or a pipe)
            continue
        if first:
            first = False
            if chunk.startswith(_UTF8_BOM):
                chunk = chunk[len(_UTF8_BOM):]
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            if len(chunk) > _MAX_LINE_BYTES:
                raise _LineTooLong()
            carry = chunk
            continue
        carry = chunk[cut:]
        yield chunk[:cut]
    if first and carry.startswith(_UTF8_BOM):  # a file that is only a BOM (and maybe a line)
        carry = carry[len(_UTF8_BOM):]
    if carry:
        yield carry + b"\n"


class _LineTooLong(Exception):
    """No line break within ``_MAX_LINE_BYTES``."""


def _gather_fields(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The byte ranges ``buf[starts[i]:ends[i]]`` as one fixed-width ``S`` array."""
    lengths = ends - starts
    width = max(int(lengths.max(initial=0)), 1)
    if width > _MAX_FIELD_BYTES:  # rare overlong numbers: slice instead of a huge matrix
        data = buf.tobytes()
        return np.array([data[lo:hi] for lo, hi in zip(starts.tolist(), ends.tolist())], dtype=f"S{width}")
    columns = np.arange(width)
    index = np.minimum(starts[:, None] + columns, buf.size - 1)
    matrix = buf[index]
    matrix[columns >= lengths[:, None]] = 0
    return matrix.view(f"S{width}").ravel()


def _last_byte_used(text: np.ndarray) -> bool:
    """Whether any value of an ``S`` array fills its width (it may have been cut)."""
    return bool(text.view(np.uint8).reshape(len(text), -1)[:, -1].any()) if len(text) else False


def _differs_from_previous(text: np.ndarray) -> np.ndarray:
    """Row-wise ``text[i] != text[i - 1]`` (True for the first row), on 8-byte words if possible."""
    changed = np.ones(len(text), dtype=bool)
    if text.dtype.itemsize % 8 == 0 and text.flags.c_contiguous:
        words = text.view(np.uint64).reshape(len(text), -1)
        changed[1:] = (words[1:] != words[:-1]).any(axis=1)
    else:
        changed[1:] = text[1:] != text[:-1]
    return changed


class _CsvBlockParser:
    """Parses blocks of an AVA CSV into column arrays, keeping keyframe names across blocks."""

    def __init__(self, path: PathLike, score_column: bool, allowed_columns: tuple[int, ...]) -> None:
        self.path = os.fspath(path)
        self.score_column = score_column
        self.allowed_columns = allowed_columns
        self.keys: list[str] = []
        self.stamp_text: list[str] = []
        self.other_stamp_text: dict[int, str] = {}
        self._key_ids: dict[str, int] = {}
        self._raw_key_ids: dict[tuple[bytes, bytes], int] = {}
        self.parts: dict[str, list[np.ndarray]] = {
            name: [] for name in ("keyframe", "boxes", "actions", "scores", "marked")
        }

    def error(self, line: int, what: str) -> AvaFormatError:
        return AvaFormatError(self.path, line, what)

    def parse(self, block: bytes, first_line: int) -> int:
        """Parse one block whose first line is ``first_line``; return the number of lines."""
        if first_line == 1 and block.startswith(_UTF16_BOMS):
            raise self.error(1, "the file is UTF-16 text; save it as UTF-8 (AVA CSVs are ASCII)")
        if not self._parse_uniform(block):
            self._parse_any(block, first_line)
        return block.count(b"\n")

    def _parse_uniform(self, block: bytes) -> bool:
        """Fast path for a block whose lines all have 7 or 8 well-formed columns.

        numpy's C reader parses it; any irregularity (other column counts, a bad number, an
        overlong field, a bad key) returns False with nothing recorded, and the general path
        then parses the block again and reports the error with its line number.
        """
        num_columns = block[: block.find(b"\n")].count(b",") + 1
        if num_columns not in (7, 8) or num_columns not in self.allowed_columns:
            return False
        fields = [("video", f"S{_MAX_FIELD_BYTES}"), ("stamp", "S16"), ("box", "f8", (4,)), ("action", "i8")]
        if num_columns == 8:
            fields.append(("score", "f8") if self.score_column else ("ignored", "S1"))
        try:
            table = np.loadtxt(io.BytesIO(block), delimiter=",", dtype=fields, comments=None, ndmin=1)
        except ValueError:
            return False
        videos, stamps = np.ascontiguousarray(table["video"]), np.ascontiguousarray(table["stamp"])
        boxes = table["box"]
        scores = table["score"] if num_columns == 8 and self.score_column else np.ones(len(table))
        may_be_cut = _last_byte_used(videos) or _last_byte_used(stamps)
        if may_be_cut or not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            return False
        try:
            keyframe = self._keyframe_ids(videos, stamps, np.zeros(len(table), dtype=np.int64))
        except AvaFormatError:
            return False
        self._append(keyframe, boxes, table["action"], scores)
        return True

    def _append(self, keyframe: np.ndarray, boxes: np.ndarray, actions: np.ndarray, scores: np.ndarray) -> None:
        self.parts["keyframe"].append(keyframe)
        self.parts["boxes"].append(boxes)
        self.parts["actions"].append(actions)
        self.parts["scores"].append(scores)

    def _parse_any(self, block: bytes, first_line: int) -> None:
        """General path: any column counts, errors reported with their line number."""
        buf = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(buf == _NEWLINE)
        starts = np.concatenate(([0], ends[:-1] + 1))
        line_numbers = first_line + np.arange(len(ends))
        has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == _CR)
        ends = ends - has_cr
        nonblank = ends > starts
        starts, ends, line_numbers = starts[nonblank], ends[nonblank], line_numbers[nonblank]
        if len(starts):
            self._parse_lines(buf, starts, ends, line_numbers)

    def _parse_lines(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, line_numbers: np.ndarray) -> None:
        commas = np.flatnonzero(buf == _COMMA)
        first_comma = np.searchsorted(commas, starts)
        num_columns = np.searchsorted(commas, ends) - first_comma + 1
        bad = ~np.isin(num_columns, self.allowed_columns)
        if bad.any():
            i = int(np.argmax(bad))
            *others, last = (str(n) for n in self.allowed_columns)
            expected = f"{', '.join(others)} or {last}" if others else last
            hint = " (video,ts,x1,y1,x2,y2,action,score)" if self.allowed_columns == DETECTION_COLUMNS else ""
            raise self.error(
                int(line_numbers[i]), f"expected {expected} comma-separated columns, found {num_columns[i]}{hint}"
            )

        def field(rows: np.ndarray, column: int) -> np.ndarray:
            comma = first_comma[rows] + column
            lo = starts[rows] if column == 0 else commas[comma - 1] + 1
            hi = ends[rows].copy()
            inner = num_columns[rows] - 1 > column
            hi[inner] = commas[comma[inner]]
            too_long = hi - lo > _MAX_FIELD_BYTES
            if column < 2 and too_long.any():
                i = int(np.argmax(too_long))
                name = "video id" if column == 0 else "timestamp"
                raise self.error(
                    int(line_numbers[rows[i]]), f"{name} is longer than {_MAX_FIELD_BYTES} characters"
                )
            return _gather_fields(buf, lo, hi)

        every = np.arange(len(starts))
        keyframe = self._keyframe_ids(field(every, 0), field(every, 1), line_numbers)
        box_rows = np.flatnonzero(num_columns >= 7)
        self.parts["marked"].append(keyframe[num_columns == 2])
        if not len(box_rows):
            return
        rows_lines = line_numbers[box_rows]
        names = ("x1", "y1", "x2", "y2")
        boxes = np.stack(
            [self._numbers(field(box_rows, 2 + j), rows_lines, names[j]) for j in range(4)],
            axis=1,
        )
        actions = self._integers(field(box_rows, 6), rows_lines, "action id")
        scores = np.ones(len(box_rows))
        if self.score_column:
            scored = np.flatnonzero(num_columns[box_rows] == 8)
            if len(scored):
                scores[scored] = self._numbers(
                    field(box_rows[scored], 7), rows_lines[scored], "score"
                )
        self._append(keyframe[box_rows], boxes, actions, scores)

    def _keyframe_ids(self, videos: np.ndarray, stamps: np.ndarray, lines: np.ndarray) -> np.ndarray:
        """Keyframe index of every line; Python work only where (video, ts) changes."""
        changed = _differs_from_previous(videos) | _differs_from_previous(stamps)
        heads = np.flatnonzero(changed)
        head_ids = np.empty(len(heads), dtype=np.int64)
        for n, (i, video, stamp) in enumerate(
            zip(heads.tolist(), videos[heads].tolist(), stamps[heads].tolist())
        ):
            head_ids[n] = self._key_id(video, stamp, int(lines[i]))
        return np.repeat(head_ids, np.diff(np.append(heads, len(videos))))

    def _key_id(self, video: bytes, stamp: bytes, line: int) -> int:
        raw = (video, stamp)
        found = self._raw_key_ids.get(raw)
        if found is not None:
            return found
        try:
            video_id, timestamp = video.decode(), stamp.decode()
        except UnicodeDecodeError:
            raise self.error(line, "video id or timestamp is not valid UTF-8") from None
        if not video_id.strip():
            raise self.error(line, "empty video id")
        if video_id.startswith("\ufeff"):
            raise self.error(line, "a byte-order mark inside the file (files concatenated?): remove it")
        try:
            key = image_key(video_id, timestamp)
        except ValueError as exc:
            raise self.error(line, str(exc)) from None
        key_id = self._key_ids.setdefault(key, len(self.keys))
        if key_id == len(self.keys):
            self.keys.append(key)
            self.stamp_text.append(timestamp)
        elif timestamp != self.stamp_text[key_id]:
            self.other_stamp_text.setdefault(key_id, timestamp)
        self._raw_key_ids[raw] = key_id
        return key_id

    def _numbers(self, text: np.ndarray, lines: np.ndarray, name: str) -> np.ndarray:
        try:
            values = text.astype(np.float64)
        except ValueError:
            self._raise_first_bad(text, lines, name, float)
            values = np.array([float(t) for t in text.tolist()])
        finite = np.isfinite(values)
        if not finite.all():
            i = int(np.argmin(finite))
            raise self.error(int(lines[i]), f"{name} {text[i].decode()!r} is not a finite number")
        return values

    def _integers(self, text: np.ndarray, lines: np.ndarray, name: str) -> np.ndarray:
        try:
            return text.astype(np.int64)
        except (ValueError, OverflowError):
            self._raise_first_bad(text, lines, name, int)
            return np.array([int(t) for t in text.tolist()], dtype=np.int64)

    def _raise_first_bad(self, text: np.ndarray, lines: np.ndarray, name: str, kind: type[int] | type[float]) -> None:
        for i, value in enumerate(text.tolist()):
            try:
                kind(value)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise self.error(
                    int(lines[i]), f"{name} {value.decode(errors='replace')!r} is not {what}"
                ) from None

    def result(self) -> AvaCsv:
        def joined(name: str, empty_shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
            parts = self.parts[name]
            return np.concatenate(parts) if parts else np.empty(empty_shape, dtype=dtype)

        return AvaCsv(
            path=self.path,
            keys=self.keys,
            keyframe=joined("keyframe", (0,), np.int64),
            boxes=joined("boxes", (0, 4), np.float64),
            actions=joined("actions", (0,), np.int64),
            scores=joined("scores", (0,), np.float64),
            marked_keyframes=joined("marked", (0,), np.int64),
            stamp_text=self.stamp_text,
            other_stamp_text=self.other_stamp_text,
        )


def read_ava_csv(
    path: PathLike, *, score_column: bool = True, allowed_columns: tuple[int, ...] = GROUNDTRUTH_COLUMNS
) -> AvaCsv:
    """Read an AVA groundtruth or detection CSV (no header) into arrays, in file order.

    Rows are ``video,ts`` (a keyframe with no boxes), ``video,ts,x1,y1,x2,y2,action`` or the
    same with an 8th column, read as the score when ``score_column`` (detections) and ignored
    otherwise (the person id of groundtruth). Blank lines are skipped; ``\\r\\n`` and a leading
    UTF-8 byte-order mark are accepted. Fields are not unquoted (AVA files never quote). Rows
    with a number of columns not in ``allowed_columns`` are errors. Prefer
    :func:`read_groundtruth` and :func:`read_detections`, which fix the columns.
    """
    parser = _CsvBlockParser(path, score_column, allowed_columns)
    line = 1
    try:
        with open(path, "rb") as handle:
            for block in _iter_line_blocks(handle, _READ_BLOCK_BYTES):
                line += parser.parse(block, line)
    except OSError as exc:
        raise AvaFormatError(path, None, f"cannot read: {exc.strerror or exc}") from None
    except _LineTooLong:
        raise AvaFormatError(
            path, line, f"no line break within {_MAX_LINE_BYTES} bytes: not an AVA CSV"
        ) from None
    return parser.result()


def read_groundtruth(path: PathLike) -> AvaCsv:
    """An AVA groundtruth CSV: rows of 7 or 8 columns (the 8th, a person id, kept as ``scores``)
    or 2 (``video,ts``: a keyframe without boxes)."""
    return read_ava_csv(path, score_column=True, allowed_columns=GROUNDTRUTH_COLUMNS)


def read_detections(path: PathLike) -> AvaCsv:
    """An AVA detections file (results.csv): every row ``video,ts,x1,y1,x2,y2,action,score``.

    A row without its score (7 columns) is an error, never a score of 1.0.
    """
    return read_ava_csv(path, score_column=True, allowed_columns=DETECTION_COLUMNS)


def read_exclusions(path: PathLike) -> set[str]:
    """Image keys listed in an excluded-timestamps CSV (``video,ts`` rows)."""
    rows = read_ava_csv(path, score_column=False, allowed_columns=EXCLUSION_COLUMNS)
    return {rows.keys[i] for i in rows.marked_keyframes.tolist()}


def excluded_keys(exclusions: PathLike | Iterable[str] | None) -> set[str]:
    """The excluded image keys: none, those of an excluded-timestamps CSV, or the keys given."""
    if exclusions is None:
        return set()
    if isinstance(exclusions, (str, os.PathLike)):
        return read_exclusions(exclusions)
    return set(exclusions)


# ---------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------

_PBTXT_TOKEN = re.compile(
    r"""(?P<space>[ \t\r\f\v]+|\#[^\n]*)|(?P<newline>\n)|(?P<punct>[{}:])"""
    r"""|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?P<word>[^\s{}:"'#]+)"""
)
_LABEL_BLOCKS = ("item", "label")
_ID_FIELDS = ("id", "label_id")


def _pbtxt_tokens(text: str, path: PathLike) -> list[tuple[str, str, int]]:
    """(kind, text, line) tokens of a protocol-buffer text file."""
    tokens: list[tuple[str, str, int]] = []
    line, pos = 1, 0
    while pos < len(text):
        match = _PBTXT_TOKEN.match(text, pos)
        if match is None:
            raise AvaFormatError(path, line, f"unexpected character {text[pos]!r}")
        kind = match.lastgroup
        assert kind is not None  # every alternative of the pattern is a named group
        if kind == "newline":
            line += 1
        elif kind != "space":
            tokens.append((kind, match.group(), line))
        pos = match.end()
    return tokens


def read_labelmap(path: PathLike) -> dict[int, str]:
    """Class id -> name from an AVA label map, in file order.

    Accepts ``item { name: "..." id: N }`` and ``label { name: "..." label_id: N ... }``
    blocks (other fields, e.g. ``label_type`` or ``display_name``, are ignored here; see
    :func:`read_label_types`).
    """
    return {class_id: name for class_id, name, _ in _read_labelmap_entries(path)}


def read_label_types(path: PathLike) -> dict[int, str]:
    """Class id -> ``label_type`` (e.g. ``PERSON_MOVEMENT``) of the entries that have one.

    The AVA v2.2 label map writes ``label { name: "..." label_id: 1 label_type: PERSON_MOVEMENT }``;
    older maps have no types and give ``{}``. Same checks and errors as :func:`read_labelmap`.
    """
    return {class_id: label_type for class_id, _, label_type in _read_labelmap_entries(path)
            if label_type is not None}


def _read_labelmap_entries(path: PathLike) -> list[tuple[int, str, str | None]]:
    """(class id, name, label_type or None) of every entry, in file order."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a leading BOM is not part of the text
    except OSError as exc:
        raise AvaFormatError(path, None, f"cannot read label map: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise AvaFormatError(path, line, f"not UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    tokens = _pbtxt_tokens(text, path)
    labelmap: dict[int, str] = {}
    label_types: dict[int, str | None] = {}
    names: dict[str, int] = {}
    pos = 0
    while pos < len(tokens):
        kind, word, line = tokens[pos]
        if kind != "word" or word not in _LABEL_BLOCKS:
            raise AvaFormatError(path, line, f"expected 'item {{' or 'label {{', found {word!r}")
        if pos + 1 >= len(tokens) or tokens[pos + 1][1] != "{":
            raise AvaFormatError(path, line, f"expected '{{' after {word!r}")
        fields, pos = _parse_block(tokens, pos + 2, path, line)
        class_id, name = _labelmap_entry(fields, path, line)
        if class_id in labelmap:
            raise AvaFormatError(path, line, f"class id {class_id} appears twice")
        if name in names:  # metrics are keyed by name: a second one would hide the first's AP
            raise AvaFormatError(path, line, f"class name {name!r} appears twice (ids {names[name]} and {class_id})")
        names[name] = class_id
        labelmap[class_id] = name
        type_field = fields.get("label_type")
        label_types[class_id] = None if type_field is None else type_field[1].strip("\"'")
    if not labelmap:
        raise AvaFormatError(path, None, "label map has no entries")
    return [(class_id, name, label_types[class_id]) for class_id, name in labelmap.items()]


def _parse_block(tokens: list[tuple[str, str, int]], pos: int, path: PathLike,
                 open_line: int) -> tuple[dict[str, tuple[str, str, int]], int]:
    """Fields ``name: value`` of a block up to its ``}``; nested blocks are skipped."""
    fields: dict[str, tuple[str, str, int]] = {}
    depth = 0
    while pos < len(tokens):
        kind, text, line = tokens[pos]
        if text == "}" and kind == "punct":
            if depth == 0:
                return fields, pos + 1
            depth -= 1
            pos += 1
        elif kind == "word" and pos + 1 < len(tokens) and tokens[pos + 1][1] == "{":
            depth += 1
            pos += 2
        elif kind == "word" and pos + 2 < len(tokens) and tokens[pos + 1][1] == ":":
            value_kind, value, _ = tokens[pos + 2]
            if value_kind not in ("word", "string"):
                raise AvaFormatError(path, line, f"field {text!r} has no value")
            if depth == 0:
                fields[text] = (value_kind, value, line)
            pos += 3
        else:
            raise AvaFormatError(path, line, f"unexpected {text!r} (expected 'field: value')")
    raise AvaFormatError(path, open_line, "block is not closed with '}'")


def _labelmap_entry(fields: dict[str, tuple[str, str, int]], path: PathLike, line: int) -> tuple[int, str]:
    id_field = next((f for f in _ID_FIELDS if f in fields), None)
    if id_field is None:
        raise AvaFormatError(path, line, "entry has no 'id' or 'label_id'")
    _, raw_id, id_line = fields[id_field]
    try:
        class_id = int(raw_id)
    except ValueError:
        raise AvaFormatError(path, id_line, f"{id_field} {raw_id!r} is not an integer") from None
    if class_id < 1:
        raise AvaFormatError(path, id_line, f"{id_field} {class_id} must be >= 1")
    if "name" not in fields:
        raise AvaFormatError(path, line, f"entry with {id_field} {class_id} has no 'name'")
    name_kind, raw_name, name_line = fields["name"]
    if name_kind != "string":
        raise AvaFormatError(path, name_line, f"name {raw_name!r} must be quoted")
    return class_id, re.sub(r"\\(.)", r"\1", raw_name[1:-1])


# ---------------------------------------------------------------------------------------------
# results.csv writing
# ---------------------------------------------------------------------------------------------


def _format_fixed(values: np.ndarray, decimals: int) -> np.ndarray:
    """``values`` as fixed-point text with ``decimals`` digits (``S`` array, vectorised).

    Rounds ``values * 10**decimals`` half to even; negative zero is written as zero.
    """
    scale = 10**decimals
    quanta = np.rint(values * scale).astype(np.int64)
    negative = quanta < 0
    whole, fraction = np.divmod(np.abs(quanta), scale)
    digits = np.array([str(d).encode() for d in range(10)])
    text = digits[np.minimum(whole, 9)]
    large = whole >= 10
    if large.any():
        text = text.astype(f"S{len(str(int(whole.max())))}")
        text[large] = whole[large].astype("S")
    if decimals:
        powers = 10 ** np.arange(decimals - 1, -1, -1, dtype=np.int64)
        fraction_digits = (fraction[:, None] // powers % 10 + ord("0")).astype(np.uint8)
        text = np.strings.add(np.strings.add(text, b"."), fraction_digits.view(f"S{decimals}").ravel())
    if negative.any():
        text = np.strings.add(np.where(negative, b"-", b""), text)
    return text


def _validate_results_inputs(video_ids: Sequence[str] | np.ndarray, timestamps: npt.ArrayLike, boxes: npt.ArrayLike,
                             scores: npt.ArrayLike) -> tuple[np.ndarray, ...]:
    num_boxes = len(video_ids)
    timestamps = np.asarray(timestamps)
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if timestamps.shape != (num_boxes,):
        raise ValueError(f"timestamps has shape {timestamps.shape}, expected ({num_boxes},)")
    if boxes.shape != (num_boxes, 4):
        raise ValueError(f"boxes has shape {boxes.shape}, expected ({num_boxes}, 4)")
    if scores.ndim != 2 or scores.shape[0] != num_boxes:
        raise ValueError(f"scores has shape {scores.shape}, expected ({num_boxes}, num_actions)")
    for name, array in (("timestamps", timestamps), ("boxes", boxes), ("scores", scores)):
        if array.size and not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    as_int = timestamps.astype(np.int64)
    if not (as_int == timestamps).all():
        raise ValueError("timestamps must be whole seconds")
    if (as_int < 0).any():
        raise ValueError("timestamps must be >= 0")
    for video_id in set(video_ids):
        if not video_id or any(c in video_id for c in ',"\r\n'):
            raise ValueError(f"video id {video_id!r} is empty or contains a comma, quote or newline")
    return as_int, boxes, scores


def _column_ids(scores: np.ndarray, column_ids: Sequence[int] | None) -> np.ndarray:
    """The class id of each score column: ``column_ids``, or ``j + 1`` (AVA) when None."""
    if column_ids is None:
        return np.arange(1, scores.shape[1] + 1, dtype=np.int64)
    ids = np.asarray(list(column_ids), dtype=np.int64)
    if ids.shape != (scores.shape[1],) or len(np.unique(ids)) != len(ids):
        raise ValueError(f"column_ids must be {scores.shape[1]} distinct class ids (one per score column), "
                         f"got {ids.tolist()}")
    return ids


def _selected_columns(scores: np.ndarray, class_ids: Iterable[int] | None, topk: int | None, min_score: float,
                      column_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Action columns to write (in class id order) and the (boxes, columns) mask of rows to write."""
    num_actions = scores.shape[1]
    if class_ids is None:
        columns = np.argsort(column_ids, kind="stable")
    else:
        ids = np.unique(np.fromiter(class_ids, dtype=np.int64))
        position = {int(c): j for j, c in enumerate(column_ids.tolist())}
        unknown = [int(i) for i in ids if int(i) not in position]
        if unknown:
            if np.array_equal(column_ids, np.arange(1, num_actions + 1)):
                raise ValueError(f"class ids must be in 1..{num_actions}, got {ids.tolist()}")
            raise ValueError(f"class ids {unknown} are not among the score columns' ids {column_ids.tolist()}")
        columns = np.array([position[int(i)] for i in ids], dtype=np.int64)
    selected = scores[:, columns]
    keep = selected >= min_score
    if topk is not None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        best = np.argsort(-selected, axis=1, kind="stable")[:, :topk]
        in_top = np.zeros_like(keep)
        np.put_along_axis(in_top, best, True, axis=1)
        keep &= in_top
    return columns, keep


@dataclass(frozen=True)
class ResultRows:
    """The rows of a results.csv before formatting, in file order (see :func:`write_results_csv`).

    Boxes are per predicted box (sorted); rows are (box, action) pairs: ``box_rows[r]`` indexes
    the boxes, ``columns[column_rows[r]]`` is the score column, whose class id is
    ``column_ids[column_rows[r]]`` (AVA: ``column + 1``).
    """

    names: np.ndarray  # (V,) str: the distinct video ids, sorted
    video_codes: np.ndarray  # (B,) int64 index into names, per box
    stamps: np.ndarray  # (B,) int64 whole seconds
    boxes: np.ndarray  # (B, 4) float64 x1, y1, x2, y2
    columns: np.ndarray  # (C,) int64 score columns written
    column_ids: np.ndarray  # (C,) int64 their class ids (the action_id written)
    box_rows: np.ndarray  # (R,) int64
    column_rows: np.ndarray  # (R,) int64 index into columns
    scores: np.ndarray  # (R,) float64

    @property
    def num_rows(self) -> int:
        return len(self.box_rows)


def results_rows(
    video_ids: Sequence[str] | np.ndarray,
    timestamps: npt.ArrayLike,
    boxes: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    class_ids: Iterable[int] | None = None,
    topk: int | None = None,
    min_score: float = 0.0,
    column_ids: Sequence[int] | None = None,
) -> ResultRows:
    """The rows :func:`write_results_csv` writes for these predictions, in its order (arrays only)."""
    stamps, boxes, scores = _validate_results_inputs(video_ids, timestamps, boxes, scores)
    ids_of_columns = _column_ids(scores, column_ids)
    columns, keep = _selected_columns(scores, class_ids, topk, min_score, ids_of_columns)
    if keep.size and not keep.any():  # an empty results file is almost never what was meant
        logger.warning("no score is >= min_score %g (the highest is %g): no rows selected",
                       min_score, float(scores[:, columns].max()))
    names, video_codes = np.unique(np.asarray(list(video_ids), dtype=str), return_inverse=True)
    order = np.lexsort(
        (np.arange(len(stamps)), boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], stamps, video_codes)
    )
    box_rows, column_rows = np.nonzero(keep[order])
    return ResultRows(
        names=names,
        video_codes=video_codes[order].astype(np.int64),
        stamps=stamps[order],
        boxes=boxes[order],
        columns=columns.astype(np.int64),
        column_ids=ids_of_columns[columns],
        box_rows=box_rows,
        column_rows=column_rows,
        scores=scores[order[box_rows], columns[column_rows]],
    )


def write_results_csv(
    path: PathLike,
    video_ids: Sequence[str] | np.ndarray,
    timestamps: npt.ArrayLike,
    boxes: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    class_ids: Iterable[int] | None = None,
    topk: int | None = None,
    min_score: float = 0.0,
    box_decimals: int = 3,
    score_decimals: int = 6,
    column_ids: Sequence[int] | None = None,
) -> int:
    """Write predictions as an AVA results.csv; return the number of rows written.

    One row ``video,ts,x1,y1,x2,y2,action,score`` per box and action, where score column ``j``
    is class id ``column_ids[j]`` (default ``j + 1``, AVA's); only ``class_ids`` if given, per box
    only its ``topk`` highest scores if given (ties: lower action id first), only scores
    ``>= min_score``. Rows are sorted
    by video id, timestamp, box (``x1, y1, x2, y2``, then input order) and action id, so the
    file does not depend on the order of the inputs. Timestamps are written 4-digit zero-padded
    (``0902``), boxes with ``box_decimals`` and scores with ``score_decimals`` decimals.

    The file is written to a temporary file in the same directory and renamed into place: a
    failure never leaves a partial ``path`` (an existing file is kept).
    """
    rows = results_rows(video_ids, timestamps, boxes, scores, class_ids=class_ids, topk=topk, min_score=min_score,
                        column_ids=column_ids)
    prefixes = _box_prefixes(rows.names, rows.video_codes, rows.stamps, rows.boxes, box_decimals)
    action_text = np.array([b",%d," % c for c in rows.column_ids.tolist()])

    def blocks() -> Iterator[bytes]:
        for lo in range(0, rows.num_rows, _WRITE_BLOCK_ROWS):
            part = slice(lo, lo + _WRITE_BLOCK_ROWS)
            lines = np.strings.add(prefixes[rows.box_rows[part]], action_text[rows.column_rows[part]])
            lines = np.strings.add(lines, _format_fixed(rows.scores[part], score_decimals))
            lines = np.strings.add(lines, b"\n")
            yield lines.tobytes().replace(b"\x00", b"")

    atomic_write(path, lambda handle: handle.writelines(blocks()))
    logger.info("wrote %d rows for %d boxes to %s", rows.num_rows, len(rows.stamps), path)
    return rows.num_rows


def results_as_read(
    rows: ResultRows, *, box_decimals: int = 3, score_decimals: int = 6, path: str = "<predictions>"
) -> AvaCsv:
    """What :func:`read_detections` returns for the file :func:`write_results_csv` writes.

    Same rows, order, keys and float64 values, without formatting or parsing: a number written
    with ``d`` decimals is the integer ``q = rint(x * 10**d)`` as text, and reading that text
    gives the double nearest to ``q / 10**d``, which is what the (correctly rounded) division
    gives. Keyframe keys are built once per keyframe; everything per row stays in arrays.
    """
    codes, stamps = rows.video_codes, rows.stamps
    changed = np.ones(len(stamps), dtype=bool)
    changed[1:] = (codes[1:] != codes[:-1]) | (stamps[1:] != stamps[:-1])
    heads = np.flatnonzero(changed)
    stamp_text = ["%04d" % t for t in stamps[heads].tolist()]
    keys = [image_key(str(rows.names[c]), text) for c, text in zip(codes[heads].tolist(), stamp_text)]
    box_keyframe = np.cumsum(changed) - 1
    return AvaCsv(
        path=path,
        keys=keys,
        keyframe=box_keyframe[rows.box_rows].astype(np.int64),
        boxes=_as_written(rows.boxes, box_decimals)[rows.box_rows],
        actions=rows.column_ids[rows.column_rows],
        scores=_as_written(rows.scores, score_decimals),
        marked_keyframes=np.empty(0, dtype=np.int64),
        stamp_text=stamp_text,
    )


def _as_written(values: np.ndarray, decimals: int) -> np.ndarray:
    """``values`` as read back after :func:`_format_fixed` wrote them (same rounding)."""
    return np.rint(values * 10**decimals).astype(np.int64) / 10**decimals


def _box_prefixes(names: np.ndarray, codes: np.ndarray, stamps: np.ndarray, boxes: np.ndarray,
                  box_decimals: int) -> np.ndarray:
    """``video,ts,x1,y1,x2,y2`` of every box, as an ``S`` array (timestamps zero-padded to 4)."""
    if not len(stamps):
        return np.empty(0, dtype="S1")
    text = np.array([name.encode() for name in names], dtype="S")[codes]
    text = np.strings.add(np.strings.add(text, b","), np.strings.zfill(stamps.astype("S"), 4))
    coordinates = _format_fixed(boxes.ravel(), box_decimals).reshape(-1, 4)
    for j in range(4):
        text = np.strings.add(np.strings.add(text, b","), coordinates[:, j])
    return text
