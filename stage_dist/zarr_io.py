"""Zarr v3 arrays on local disk read and written directly, without zarr-python's per-call cost.

The store's row arrays use the ``sharding_indexed`` layout: one file per shard holding encoded
chunks (``bytes`` [+ ``zstd``]) followed by an index of (offset, size) per chunk and its crc32c.
:class:`ArrayReader` reads rows from those files (the index, then the chunks a read touches,
decoded with numcodecs) and returns what zarr returns; :func:`open_reader` falls back to zarr
for a layout it does not know. :class:`ShardStreamWriter` writes whole shards a chunk at a time
(memory: one chunk, not one shard) in the layout zarr reads; :func:`row_writer` falls back to
buffered zarr writes for other layouts. Damaged files raise :class:`~stage_dist.schema.StoreError`
naming the array and shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import google_crc32c  # zarr's own dependency (its crc32c codec) since zarr 3.1
import numpy as np
import zarr
from numcodecs import Zstd

from stage_dist.schema import StoreError

log = logging.getLogger(__name__)


class UnknownLayout(Exception):
    """An array whose zarr metadata :class:`ArrayReader` does not read (zarr reads it instead)."""


MAX_OPEN_FILES = 64  # per array and process
_NO_CHUNK = 2**64 - 1  # shard index entry of a chunk that was never written (all fill value)


def _codec_name(codec: Any) -> str:
    return codec if isinstance(codec, str) else codec.get("name", "")


def _parse_codecs(codecs: list[Any], dtype: np.dtype) -> tuple[np.dtype, bool]:
    """(dtype with byte order, zstd or not) of a ``bytes`` [+ ``zstd``] codec chain."""
    if not codecs or _codec_name(codecs[0]) != "bytes":
        raise UnknownLayout(f"codecs {codecs}")
    config = codecs[0].get("configuration", {}) if isinstance(codecs[0], dict) else {}
    endian = config.get("endian", "little")
    if endian not in ("little", "big"):
        raise UnknownLayout(f"endian {endian}")
    dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    rest = [_codec_name(c) for c in codecs[1:]]
    if rest not in ([], ["zstd"]):
        raise UnknownLayout(f"codecs {codecs}")
    return dtype, rest == ["zstd"]


class ArrayReader:
    """Rows of one zarr v3 array of a local store, read from its files without zarr-python.

    Reads regular-grid arrays whose chunks span whole rows, with the ``bytes`` codec and
    optionally ``zstd``, plain or inside ``sharding_indexed`` shards (index at the end or the
    start, ``bytes`` + ``crc32c``, checked), with the default chunk key encoding; chunks never
    written read as the fill value, as in zarr. Anything else raises :class:`UnknownLayout`.
    A reader holds open file descriptors: one per process (see :class:`FeatureStore`).
    """

    def __init__(self, root: Path, name: str, meta: dict[str, Any]) -> None:
        self.name = name
        self.dir = Path(root) / name
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            raise UnknownLayout("not a plain zarr v3 array")
        self.shape: tuple[int, ...] = tuple(int(n) for n in meta["shape"])
        data_type = meta["data_type"]
        if isinstance(data_type, dict) and not data_type.get("configuration"):
            data_type = data_type.get("name")
        if not isinstance(data_type, str):
            raise UnknownLayout(f"data type {data_type}")
        grid = meta["chunk_grid"]
        keys = meta.get("chunk_key_encoding", {"name": "default"})
        self.separator = keys.get("configuration", {}).get("separator", "/")
        if grid.get("name") != "regular" or keys.get("name") != "default" or not self.shape:
            raise UnknownLayout(f"chunk grid {grid}, key encoding {keys}")
        outer = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        self.sharded = len(codecs) == 1 and _codec_name(codecs[0]) == "sharding_indexed"
        if self.sharded:
            sharding = codecs[0]["configuration"]
            inner = tuple(int(n) for n in sharding["chunk_shape"])
            self.index_at_end = sharding.get("index_location", "end") == "end"
            index_codecs = [_codec_name(c) for c in sharding["index_codecs"]]
            if index_codecs not in (["bytes"], ["bytes", "crc32c"]) or \
                    _parse_codecs(sharding["index_codecs"][:1], np.dtype("<u8"))[0] != np.dtype("<u8"):
                raise UnknownLayout(f"index codecs {sharding['index_codecs']}")
            self.index_crc = index_codecs[-1] == "crc32c"
            self.dtype, self.zstd = _parse_codecs(sharding["codecs"], np.dtype(data_type))
            if outer[0] % inner[0]:
                raise UnknownLayout(f"shard rows {outer[0]} not a multiple of chunk rows {inner[0]}")
        else:
            inner = outer
            self.dtype, self.zstd = _parse_codecs(codecs, np.dtype(data_type))
        if outer[1:] != self.shape[1:] or inner[1:] != self.shape[1:]:
            raise UnknownLayout(f"chunks {inner} / {outer} do not span whole rows of {self.shape}")
        fill = meta.get("fill_value", 0)
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):
            raise UnknownLayout(f"fill value {fill!r}")
        self.fill_value = fill
        self.chunk_rows = inner[0]
        self.chunks_per_file = outer[0] // self.chunk_rows  # a file is a shard, or one chunk
        self.row_shape = self.shape[1:]
        self._chunk_items = self.chunk_rows * math.prod(self.row_shape)
        self._codec = Zstd() if self.zstd else None
        self._fds: OrderedDict[int, int | None] = OrderedDict()  # file index -> descriptor (None: no file)
        self._indexes: dict[int, np.ndarray | None] = {}  # shard index -> (chunks, 2) offsets, sizes

    @classmethod
    def open(cls, root: Path, name: str) -> "ArrayReader":
        """The reader of array ``name``; KeyError if the store has no such array."""
        meta_path = Path(root) / name / "zarr.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise KeyError(name) from None
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{meta_path}: unreadable array metadata: {e}") from None
        try:
            return cls(root, name, meta)
        except (KeyError, TypeError, ValueError) as e:
            raise UnknownLayout(f"metadata {e!r}") from None

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
        key = self.separator.join(["c", str(file_index), *["0"] * len(self.row_shape)])
        try:
            fd: int | None = os.open(self.dir / key, os.O_RDONLY)
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
                size = 16 * self.chunks_per_file + 4 * self.index_crc
                file_size = os.fstat(fd).st_size
                if file_size < size:
                    raise StoreError(f"{self.dir}: shard {shard} is truncated; reconvert the store")
                raw = os.pread(fd, size, file_size - size if self.index_at_end else 0)
                if self.index_crc and google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise StoreError(f"{self.dir}: shard {shard} index fails its checksum; reconvert the store")
                index = np.frombuffer(raw[: 16 * self.chunks_per_file], dtype="<u8").reshape(-1, 2)
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
        return self.array[start:stop]

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

    Each chunk is encoded (bytes, little endian, then zstd if the array has it) as soon as its
    rows are in and appended to its shard's file; the shard index (offset, size per chunk) and
    its crc32c go last, then the file is renamed into place: the layout zarr's
    ``sharding_indexed`` codec reads. Memory is one chunk per array, not one shard (a full-AVA
    objects shard at 2048 dims is 256 MB raw).
    """

    def __init__(self, array: Any, root: Path, start: int, stop: int) -> None:
        codec = array.metadata.codecs[0]
        self.array, self.root, self.stop = array, Path(root), stop
        self.chunk_rows, self.shard_rows = codec.chunk_shape[0], array.shards[0]
        self.chunks_per_shard = self.shard_rows // self.chunk_rows
        self.buffer = np.zeros((self.chunk_rows, *array.shape[1:]), dtype=array.dtype.newbyteorder("<"))
        self.fill, self.chunk_start = 0, start
        zstd = [c for c in codec.codecs if type(c).__name__ == "ZstdCodec"]
        if zstd:
            self._compress = Zstd(level=zstd[0].level, checksum=zstd[0].checksum).encode
        else:
            self._compress = bytes
        self._file: Any = None

    @staticmethod
    def supports(array: Any) -> bool:
        """Whether ``array`` is sharded along rows only with the codecs this writer produces."""
        codecs = array.metadata.codecs
        if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec" or array.shards is None:
            return False
        codec = codecs[0]
        inner = [type(c).__name__ for c in codec.codecs]
        index = [type(c).__name__ for c in codec.index_codecs]
        return (tuple(codec.chunk_shape[1:]) == tuple(array.shape[1:]) == tuple(array.shards[1:])
                and inner in (["BytesCodec"], ["BytesCodec", "ZstdCodec"])
                and all(str(getattr(c.endian, "value", c.endian)) in ("little", "None")
                        for c in codec.codecs if type(c).__name__ == "BytesCodec")
                and index == ["BytesCodec", "Crc32cCodec"] and str(codec.index_location.value) == "end")

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
            key = self.array.metadata.encode_chunk_key((shard,) + (0,) * (self.array.ndim - 1))
            self._path = self.root / self.array.path / key
            self._path.parent.mkdir(parents=True, exist_ok=True)
            for stale in self._path.parent.glob(f".{self._path.name}.tmp*"):  # left by a killed writer
                stale.unlink(missing_ok=True)
            self._tmp = self._path.with_name(f".{self._path.name}.tmp{os.getpid()}")
            self._file = open(self._tmp, "wb")
            self._index = np.full((self.chunks_per_shard, 2), _NO_CHUNK_INDEX, dtype="<u8")
            self._offset = 0
        self.buffer[self.fill:] = 0
        encoded = self._compress(self.buffer.tobytes())
        self._file.write(encoded)
        self._index[position] = (self._offset, len(encoded))
        self._offset += len(encoded)
        self.chunk_start += self.chunk_rows
        self.fill = 0
        if position + 1 == self.chunks_per_shard or self.chunk_start >= self.array.shape[0]:
            self._finish_shard()

    def _finish_shard(self) -> None:
        index = self._index.tobytes()
        self._file.write(index + np.uint32(google_crc32c.value(index)).astype("<u4").tobytes())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._path)

    def close(self, where: str) -> None:
        if self.fill:
            if self.chunk_start + self.fill != self.array.shape[0]:
                raise RuntimeError(f"{where}: a partial chunk at row {self.chunk_start} before the array's end")
            self._emit()
        if self._file is not None or self.chunk_start < min(self.stop, self.array.shape[0]):
            raise RuntimeError(f"{where}: wrote rows up to {self.chunk_start}, expected {self.stop}")


def row_writer(array: Any, root: Path, start: int, stop: int, shard_rows: int) -> Any:
    """The streaming writer where the array's layout allows it, else the buffered one."""
    if ShardStreamWriter.supports(array):
        return ShardStreamWriter(array, root, start, stop)
    return BufferedRowWriter(array, start, stop, shard_rows)
