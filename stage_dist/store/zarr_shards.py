"""Zarr v3 arrays on local disk read and written directly, without zarr-python's per-call cost.

The store's row arrays use the ``sharding_indexed`` layout: one file per shard holding encoded
chunks (``bytes`` [+ ``zstd``]) followed by an index of (offset, size) per chunk and its crc32c.
:class:`ArrayReader` reads rows from those files (the index, then the chunks a read touches,
decoded with numcodecs) and returns what zarr returns; :func:`open_reader` falls back to zarr
for a layout it does not know. :class:`ShardStreamWriter` writes whole shards a chunk at a time
(memory: one chunk, not one shard) in the layout zarr reads; :func:`row_writer` falls back to
buffered zarr writes for other layouts. Every layout decision both make comes from the array's
zarr.json alone (:class:`ShardLayout`, the zarr v3 spec), never from zarr-python's objects, whose
attribute types change between zarr versions; a layout it does not know is handed to zarr with a
warning. Damaged files raise :class:`~stage_dist.store.schema.StoreError` naming the array and shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import google_crc32c  # zarr's own dependency (its crc32c codec) since zarr 3.1
import numpy as np
import zarr
from numcodecs import Zstd

from stage_dist.store.schema import StoreError

log = logging.getLogger(__name__)


class UnknownLayout(Exception):
    """An array whose zarr metadata :class:`ArrayReader` does not read (zarr reads it instead)."""


MAX_OPEN_FILES = 64  # per array and process
_NO_CHUNK = 2**64 - 1  # shard index entry of a chunk that was never written (all fill value)

# The zarr v3 core spec's data types this module reads (numpy names them alike) and the keys of
# an array's zarr.json; any other key must be an extension marked ``"must_understand": false``.
_DATA_TYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                         "float16", "float32", "float64"})
_ARRAY_KEYS = frozenset({"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                         "fill_value", "codecs", "attributes", "storage_transformers", "dimension_names"})
_FLOAT_FILLS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _extension(entry: Any, what: str) -> tuple[str, dict[str, Any]]:
    """(name, configuration) of a zarr v3 extension entry: ``{"name": ..., "configuration": {...}}``
    (configuration optional, other keys ignored) or its name-only short form, a string."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        config = entry.get("configuration")
        if config is None:
            return entry["name"], {}
        if isinstance(config, dict):
            return entry["name"], config
    raise UnknownLayout(f"{what} {entry!r}")


def _bytes_dtype(entry: Any, dtype: np.dtype, what: str) -> np.dtype:
    """``dtype`` in the byte order of a ``bytes`` codec entry (no ``endian``: little, as zarr)."""
    name, config = _extension(entry, what)
    if name != "bytes":
        raise UnknownLayout(f"{what} {entry!r}")
    endian = config.get("endian", "little")
    if endian not in ("little", "big"):
        raise UnknownLayout(f"{what}: endian {endian!r}")
    return dtype.newbyteorder("<" if endian == "little" else ">")


def _fill_value(fill: Any, dtype: np.dtype) -> int | float | bool:
    """The fill value of the spec's JSON forms for ``dtype``: a number (a bool for ``bool``), and
    for floats "NaN", "Infinity", "-Infinity" or the hex string of the value's bytes."""
    if dtype.kind == "b":
        if isinstance(fill, bool):
            return fill
    elif isinstance(fill, bool):
        pass
    elif dtype.kind in "iu" and isinstance(fill, int):
        if np.iinfo(dtype).min <= fill <= np.iinfo(dtype).max:
            return fill
    elif dtype.kind == "f" and isinstance(fill, (int, float)):
        return float(fill)
    elif dtype.kind == "f" and fill in _FLOAT_FILLS:
        return _FLOAT_FILLS[fill]
    elif dtype.kind == "f" and isinstance(fill, str) and fill.startswith("0x") and len(fill) == 2 + 2 * dtype.itemsize:
        try:
            return float(np.frombuffer(bytes.fromhex(fill[2:]), dtype=dtype.newbyteorder(">"))[0])
        except ValueError:
            pass
    raise UnknownLayout(f"fill value {fill!r} for {dtype}")


@dataclass(frozen=True)
class ShardLayout:
    """Every layout decision the direct reader and writer make, from an array's zarr.json.

    Built by :meth:`from_zarr_json` from the JSON document alone (the zarr v3 core spec and its
    ``sharding_indexed`` codec spec), never from zarr-python's objects, whose attribute types
    change between versions. It covers regular-grid arrays whose chunks span whole rows, with a
    ``bytes`` codec (either byte order) and optionally ``zstd``, plain or inside
    ``sharding_indexed`` shards (index at the end or the start, ``bytes`` [+ ``crc32c``]), with
    the ``default`` or ``v2`` chunk key encoding.
    """

    shape: tuple[int, ...]
    dtype: np.dtype  # in the byte order of the stored chunks
    fill_value: int | float | bool
    shard_rows: int  # rows per file: a shard, or one chunk when not sharded
    chunk_rows: int
    sharded: bool
    zstd: dict[str, Any] | None  # the zstd codec's configuration (level, checksum); None: raw bytes
    index_dtype: np.dtype  # of the shard index's offsets and sizes (uint64, either byte order)
    index_at_end: bool = True
    index_crc: bool = True
    key_prefix: str = "c"  # "c" for the default chunk key encoding, "" for v2
    separator: str = "/"

    @classmethod
    def from_zarr_json(cls, doc: Any) -> ShardLayout:
        """The layout of the array described by ``doc`` (a parsed zarr.json); :class:`UnknownLayout`
        for anything else, naming what it does not know."""
        if not isinstance(doc, dict):
            raise UnknownLayout("zarr.json is not an object")
        if doc.get("zarr_format") != 3 or doc.get("node_type") != "array" or doc.get("storage_transformers"):
            raise UnknownLayout("not a plain zarr v3 array")
        extra = [k for k in doc if k not in _ARRAY_KEYS
                 and not (isinstance(doc[k], dict) and doc[k].get("must_understand") is False)]
        if extra:
            raise UnknownLayout(f"metadata keys {sorted(extra)} (without \"must_understand\": false)")
        try:
            shape = tuple(int(n) for n in doc["shape"])
            data_type, data_config = _extension(doc["data_type"], "data type")
            if data_type not in _DATA_TYPES or data_config:
                raise UnknownLayout(f"data type {doc['data_type']!r}")
            dtype = np.dtype(data_type)
            grid_name, grid = _extension(doc["chunk_grid"], "chunk grid")
            if grid_name != "regular" or not shape:
                raise UnknownLayout(f"chunk grid {doc['chunk_grid']!r} of shape {shape}")
            outer = tuple(int(n) for n in grid["chunk_shape"])
            key_name, keys = _extension(doc.get("chunk_key_encoding", "default"), "chunk key encoding")
            if key_name not in ("default", "v2"):
                raise UnknownLayout(f"chunk key encoding {key_name!r}")
            separator = keys.get("separator", "/" if key_name == "default" else ".")
            if separator not in ("/", "."):
                raise UnknownLayout(f"chunk key separator {separator!r}")
            codecs = doc["codecs"]
            if not isinstance(codecs, list) or not codecs:
                raise UnknownLayout(f"codecs {codecs!r}")
            name, sharding = _extension(codecs[0], "codec")
            layout: dict[str, Any] = {"index_dtype": np.dtype("<u8")}
            if name == "sharding_indexed":
                if len(codecs) != 1:
                    raise UnknownLayout(f"codecs after sharding_indexed: {codecs[1:]!r}")
                inner = tuple(int(n) for n in sharding["chunk_shape"])
                location = sharding.get("index_location", "end")
                if location not in ("end", "start"):
                    raise UnknownLayout(f"index_location {location!r}")
                index_codecs = sharding["index_codecs"]
                if not isinstance(index_codecs, list) or len(index_codecs) not in (1, 2) or \
                        (len(index_codecs) == 2 and _extension(index_codecs[1], "index codec")[0] != "crc32c"):
                    raise UnknownLayout(f"index codecs {index_codecs!r}")
                layout.update(index_dtype=_bytes_dtype(index_codecs[0], np.dtype("u8"), "index codec"),
                              index_at_end=location == "end", index_crc=len(index_codecs) == 2)
                codecs = sharding["codecs"]
                if not isinstance(codecs, list) or not codecs:
                    raise UnknownLayout(f"inner codecs {codecs!r}")
                if len(inner) != len(shape) or inner[0] <= 0 or outer[0] % inner[0]:
                    raise UnknownLayout(f"shard rows {outer[0]} not a multiple of chunk rows {inner}")
            else:
                inner = outer
            stored = _bytes_dtype(codecs[0], dtype, "codecs")
            rest = [_extension(c, "codec") for c in codecs[1:]]
            if [n for n, _ in rest] not in ([], ["zstd"]):
                raise UnknownLayout(f"codecs {[n for n, _ in rest]} after bytes")
            if len(outer) != len(shape) or outer[1:] != shape[1:] or inner[1:] != shape[1:] or outer[0] <= 0:
                raise UnknownLayout(f"chunks {inner} / {outer} do not span whole rows of {shape}")
            return cls(shape=shape, dtype=stored, fill_value=_fill_value(doc.get("fill_value", 0), dtype),
                       shard_rows=outer[0], chunk_rows=inner[0], sharded=name == "sharding_indexed",
                       zstd=dict(rest[0][1]) if rest else None, key_prefix="c" if key_name == "default" else "",
                       separator=separator, **layout)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UnknownLayout(f"metadata {e!r}") from None

    @classmethod
    def read(cls, array_dir: Path) -> ShardLayout:
        """The layout of the array stored in ``array_dir``; KeyError if it has no zarr.json,
        StoreError if it cannot be read."""
        meta_path = Path(array_dir) / "zarr.json"
        try:
            doc = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise KeyError(Path(array_dir).name) from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{meta_path}: unreadable array metadata: {e}") from None
        return cls.from_zarr_json(doc)

    @property
    def chunks_per_file(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def index_nbytes(self) -> int:
        """Bytes of a shard's index: (offset, size) per chunk, then its crc32c."""
        return 16 * self.chunks_per_file + 4 * self.index_crc

    def file_key(self, file_index: int) -> str:
        """The key (path below the array) of shard (or chunk) ``file_index``."""
        coords = [str(file_index), *["0"] * (len(self.shape) - 1)]
        return self.separator.join([self.key_prefix, *coords] if self.key_prefix else coords)

    def zstd_codec(self) -> Zstd | None:
        if self.zstd is None:
            return None
        return Zstd(level=int(self.zstd.get("level", 0)), checksum=bool(self.zstd.get("checksum", False)))


class ArrayReader:
    """Rows of one zarr v3 array of a local store, read from its files without zarr-python.

    Reads the layouts :class:`ShardLayout` describes (the shard index's crc32c checked); chunks
    never written read as the fill value, as in zarr. Anything else raises :class:`UnknownLayout`.
    A reader holds open file descriptors: one per process (see :class:`FeatureStore`).
    """

    def __init__(self, root: Path, name: str, layout: ShardLayout) -> None:
        self.name = name
        self.dir = Path(root) / name
        self.layout = layout
        self.shape = layout.shape
        self.sharded = layout.sharded
        self.index_at_end, self.index_crc = layout.index_at_end, layout.index_crc
        self.dtype, self.zstd = layout.dtype, layout.zstd is not None
        self.fill_value = layout.fill_value
        self.chunk_rows = layout.chunk_rows
        self.chunks_per_file = layout.chunks_per_file  # a file is a shard, or one chunk
        self.row_shape = self.shape[1:]
        self._chunk_items = self.chunk_rows * math.prod(self.row_shape)
        self._codec = layout.zstd_codec()
        self._fds: OrderedDict[int, int | None] = OrderedDict()  # file index -> descriptor (None: no file)
        self._indexes: dict[int, np.ndarray | None] = {}  # shard index -> (chunks, 2) offsets, sizes

    @classmethod
    def open(cls, root: Path, name: str) -> "ArrayReader":
        """The reader of array ``name``; KeyError if the store has no such array,
        :class:`UnknownLayout` if its zarr.json describes a layout it does not read."""
        try:
            layout = ShardLayout.read(Path(root) / name)
        except KeyError:
            raise KeyError(name) from None
        return cls(root, name, layout)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def _fd(self, file_index: int) -> int | None:
        """The open file of shard (or chunk) ``file_index``, None if there is none; at most
        :data:`MAX_OPEN_FILES` stay open (``actors/spatial`` has thousands of small shards)."""
        if file_index in self._fds:
            self._fds.move_to_end(file_index)
            return self._fds[file_index]
        try:
            fd: int | None = os.open(self.dir / self.layout.file_key(file_index), os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        self._fds[file_index] = fd
        if len(self._fds) > MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            if old is not None:
                os.close(old)
        return fd

    def _index(self, shard: int) -> np.ndarray | None:
        """(chunks per shard, 2) uint64 offsets and sizes of shard ``shard``; None: no shard file."""
        if shard not in self._indexes:
            fd = self._fd(shard)
            index = None
            if fd is not None:
                size = self.layout.index_nbytes
                file_size = os.fstat(fd).st_size
                if file_size < size:
                    raise StoreError(f"{self.dir}: shard {shard} is truncated; reconvert the store")
                raw = os.pread(fd, size, file_size - size if self.index_at_end else 0)
                if self.index_crc and google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise StoreError(f"{self.dir}: shard {shard} index fails its checksum; reconvert the store")
                index = np.frombuffer(raw[: 16 * self.chunks_per_file], dtype=self.layout.index_dtype).reshape(-1, 2)
            self._indexes[shard] = index
        return self._indexes[shard]

    def _encoded(self, chunk: int) -> bytes | None:
        """The stored bytes of chunk ``chunk``; None if it was never written."""
        file_index = chunk // self.chunks_per_file
        if not self.sharded:
            fd = self._fd(file_index)
            return None if fd is None else os.pread(fd, os.fstat(fd).st_size, 0)
        index = self._index(file_index)
        if index is None:
            return None
        offset, nbytes = (int(v) for v in index[chunk % self.chunks_per_file])
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            return None
        data = os.pread(self._fd(file_index), nbytes, offset)  # type: ignore[arg-type]
        if len(data) != nbytes:
            raise StoreError(f"{self.dir}: shard {file_index} is truncated; reconvert the store")
        return data

    def read(self, start: int, stop: int, cache: ChunkCache | None = None) -> np.ndarray:
        """Rows ``start:stop`` (a new array), decoding each chunk they touch once (or taking it
        from ``cache``)."""
        out = np.empty((max(0, stop - start), *self.row_shape), dtype=self.dtype.newbyteorder("="))
        rows = self.chunk_rows
        for c in range(start // rows, (stop - 1) // rows + 1 if stop > start else 0):
            chunk = cache.get((self.name, c)) if cache is not None else None
            if chunk is None:
                chunk = self.chunk(c)
                if cache is not None:
                    cache.put((self.name, c), chunk)
            lo, hi = max(start, c * rows), min(stop, c * rows + len(chunk))
            out[lo - start: hi - start] = chunk[lo - c * rows: hi - c * rows]
        return out

    def chunk(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk`` decoded: rows ``chunk * chunk_rows`` up to the next chunk or the end."""
        rows = min(self.chunk_rows, self.shape[0] - chunk * self.chunk_rows)
        return self._decode(chunk, self._encoded(chunk))[:rows]

    def _decode(self, chunk: int, encoded: bytes | None) -> np.ndarray:
        """Every decoded chunk passes here (``tests/counting.py`` counts the calls)."""
        if encoded is None:
            return np.full((self.chunk_rows, *self.row_shape), self.fill_value, dtype=self.dtype)
        raw = encoded
        if self._codec is not None:
            try:
                raw = self._codec.decode(encoded)
            except RuntimeError as e:  # numcodecs' error for bytes that are not a zstd frame
                raise StoreError(f"{self.dir}: chunk {chunk} does not decode ({e}); reconvert the store") from None
        values = np.frombuffer(raw, dtype=self.dtype)
        if values.size != self._chunk_items:
            raise StoreError(f"{self.dir}: chunk {chunk} holds {values.size} values, expected "
                             f"{self._chunk_items}; reconvert the store")
        return values.reshape(self.chunk_rows, *self.row_shape)


class ZarrRows:
    """Rows of an array :class:`ArrayReader` does not read, through zarr (one call per read)."""

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.shape: tuple[int, ...] = array.shape
        self.dtype = array.dtype
        self.row_shape = self.shape[1:]
        self.chunk_rows: int = array.chunks[0]
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def read(self, start: int, stop: int, cache: ChunkCache | None = None) -> np.ndarray:
        return cast(np.ndarray, self.array[start:stop])  # a slice: always an array, never zarr's scalar case

    def close(self) -> None:
        pass


class ChunkCache:
    """Decoded chunks keyed by (array, chunk index): an LRU bounded in bytes, or unbounded
    (``max_bytes=None``, for the per-row tables, which stay decoded once touched)."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        chunk = self._chunks.get(key)
        if chunk is not None and self.max_bytes is not None:
            self._chunks.move_to_end(key)
        return chunk

    def put(self, key: tuple[str, int], chunk: np.ndarray) -> None:
        if self.max_bytes == 0 or key in self._chunks:
            return
        self._chunks[key] = chunk
        self.bytes += chunk.nbytes
        while self.max_bytes is not None and self.bytes > self.max_bytes and self._chunks:
            _, old = self._chunks.popitem(last=False)
            self.bytes -= old.nbytes


def open_reader(path: Path, name: str) -> ArrayReader | ZarrRows:
    """The direct reader of array ``name``, or zarr's when its layout is not one it reads."""
    try:
        return ArrayReader.open(path, name)
    except UnknownLayout as e:
        log.warning("%s: array %s is read through zarr (slower): %s", path, name, e)
        return ZarrRows(zarr.open_array(Path(path) / name, mode="r"))


# ----------------------------------------------------------------------------- writing


class BufferedRowWriter:
    """Buffers rows of one array and writes each of its shards in one zarr call (for arrays the
    streaming writer does not handle, e.g. unsharded ones)."""

    def __init__(self, array: Any, start: int, stop: int, shard_rows: int) -> None:
        self.array, self.stop, self.shard_rows = array, stop, shard_rows
        self.block_start, self.fill = start, 0
        self.buffer = np.empty((min(shard_rows, stop - start), *array.shape[1:]), dtype=array.dtype)

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), len(self.buffer) - self.fill)
            self.buffer[self.fill: self.fill + take] = rows[:take]
            self.fill, rows = self.fill + take, rows[take:]
            if self.fill == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        self.array[self.block_start: self.block_start + self.fill] = self.buffer[: self.fill]
        self.block_start += self.fill
        self.fill = 0
        remaining = min(self.shard_rows, self.stop - self.block_start)
        if 0 < remaining < len(self.buffer):
            self.buffer = self.buffer[:remaining]

    def close(self, where: str) -> None:
        if self.fill or self.block_start != self.stop:
            raise RuntimeError(f"{where}: wrote rows up to {self.block_start + self.fill}, expected {self.stop}")


_NO_CHUNK_INDEX = np.uint64(2**64 - 1)  # offset and size of an absent chunk in a shard index


class ShardStreamWriter:
    """Writes rows ``start:stop`` (whole shards) of one sharded zarr v3 array, a chunk at a time.

    Each chunk is encoded (bytes in the array's byte order, then zstd if the array has it) as
    soon as its rows are in and appended to its shard's file; the shard index (offset, size per
    chunk) and its crc32c go at the end (or, for ``index_location`` "start", into the room left
    for it at the start), then the file is renamed into place: the layout zarr's
    ``sharding_indexed`` codec reads. Every layout decision comes from the array's zarr.json
    (:class:`ShardLayout`). Memory is one chunk per array, not one shard (a full-AVA objects
    shard at 2048 dims is 256 MB raw).
    """

    def __init__(self, array: Any, root: Path, start: int, stop: int) -> None:
        self.array, self.root, self.stop = array, Path(root), stop
        self.dir = self.root / array.path
        self.layout = layout = ShardLayout.read(self.dir)
        if not layout.sharded:
            raise UnknownLayout(f"{self.dir}: not sharded")
        self.shape = layout.shape
        self.chunk_rows, self.shard_rows = layout.chunk_rows, layout.shard_rows
        self.chunks_per_shard = layout.chunks_per_file
        self.buffer = np.zeros((self.chunk_rows, *self.shape[1:]), dtype=layout.dtype)
        self.fill, self.chunk_start = 0, start
        codec = layout.zstd_codec()
        self._compress = codec.encode if codec is not None else bytes
        self._file: Any = None

    @staticmethod
    def supports(array: Any, root: Path) -> bool:
        """Whether ``array`` (in the store at ``root``) is sharded along rows only with codecs
        this writer produces, by its zarr.json (False, with the reason logged, otherwise)."""
        try:
            layout = ShardLayout.read(Path(root) / array.path)
        except (UnknownLayout, KeyError, StoreError) as e:
            reason = str(e)
        else:
            if layout.sharded:
                return True
            reason = "not sharded"
        if (str(root), array.path) not in _WARNED:
            _WARNED.add((str(root), array.path))
            log.warning("%s: array %s is written through zarr (a whole shard in memory): %s", root, array.path, reason)
        return False

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), self.chunk_rows - self.fill)
            self.buffer[self.fill: self.fill + take] = rows[:take]
            self.fill, rows = self.fill + take, rows[take:]
            if self.fill == self.chunk_rows:
                self._emit()

    def _emit(self) -> None:
        """Encode the buffered chunk (zero-padded past the array's end) into its shard's file."""
        shard, position = divmod(self.chunk_start // self.chunk_rows, self.chunks_per_shard)
        if self._file is None:
            self._path = self.dir / self.layout.file_key(shard)
            self._path.parent.mkdir(parents=True, exist_ok=True)
            for stale in self._path.parent.glob(f".{self._path.name}.tmp*"):  # left by a killed writer
                stale.unlink(missing_ok=True)
            self._tmp = self._path.with_name(f".{self._path.name}.tmp{os.getpid()}")
            self._file = open(self._tmp, "wb")
            self._index = np.full((self.chunks_per_shard, 2), _NO_CHUNK_INDEX, dtype=self.layout.index_dtype)
            self._offset = 0
            if not self.layout.index_at_end:  # room for the index, written when the shard is complete
                self._offset = self.layout.index_nbytes
                self._file.write(bytes(self._offset))
        self.buffer[self.fill:] = 0
        encoded = self._compress(self.buffer.tobytes())
        self._file.write(encoded)
        self._index[position] = (self._offset, len(encoded))
        self._offset += len(encoded)
        self.chunk_start += self.chunk_rows
        self.fill = 0
        if position + 1 == self.chunks_per_shard or self.chunk_start >= self.shape[0]:
            self._finish_shard()

    def _finish_shard(self) -> None:
        index = self._index.tobytes()
        if self.layout.index_crc:  # the crc32c codec appends a little-endian uint32
            index += np.uint32(google_crc32c.value(index)).astype("<u4").tobytes()
        if not self.layout.index_at_end:
            self._file.seek(0)
        self._file.write(index)
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._path)

    def close(self, where: str) -> None:
        if self.fill:
            if self.chunk_start + self.fill != self.shape[0]:
                raise RuntimeError(f"{where}: a partial chunk at row {self.chunk_start} before the array's end")
            self._emit()
        if self._file is not None or self.chunk_start < min(self.stop, self.shape[0]):
            raise RuntimeError(f"{where}: wrote rows up to {self.chunk_start}, expected {self.stop}")


_WARNED: set[tuple[str, str]] = set()  # (store, array) the streaming writer fell back on: warned once per process


def row_writer(array: Any, root: Path, start: int, stop: int, shard_rows: int) -> Any:
    """The streaming writer where the array's layout allows it, else the buffered one (zarr)."""
    if ShardStreamWriter.supports(array, root):
        return ShardStreamWriter(array, root, start, stop)
    return BufferedRowWriter(array, start, stop, shard_rows)
