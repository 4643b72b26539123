"""Byte streams of data files (plain, .gz, .zst) that say where a damaged file broke.

``open_stream(path)`` gives a ``DataStream``: ``readline(limit)`` / ``read(n)`` of the
decompressed bytes, ``offset`` (decompressed bytes consumed) and, for estimates of what a
damaged file lost, ``compressed_position()`` and ``file_size``. Reading a damaged file raises
``DamagedFile`` with the decompressed offset, the compressed offset and the reason:

- gzip: Python's ``gzip`` raises ``EOFError`` on a truncated stream and ``BadGzipFile`` /
  ``zlib.error`` on corrupt bytes or a failed CRC;
- zstd: python-zstandard raises ``ZstdError`` on corrupt bytes, but reads a frame cut short
  as a short stream without a word (measured with zstandard 0.25: a .zst truncated at 60%
  read 722 of 2000 lines, no error). So at the end of a .zst stream ``zstd_frames``
  walks the frame and block headers (RFC 8878: a few bytes per 128 KiB block, read by seeking)
  and reports an incomplete last frame. python-zstandard offers no such check, hence ours;
- any file: an ``OSError`` other than a missing file (an I/O error on a bad disk).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib

from jaxcpt.data.remote import file_size, open_binary

COMPRESSED = (".gz", ".zst", ".zstd")
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark: Windows tools write it; JSON parsers reject it


def is_compressed(path: str) -> bool:
    return path.lower().endswith(COMPRESSED)


class DamagedFile(Exception):
    """A file that cannot be read past ``offset`` (decompressed bytes)."""

    def __init__(self, reason: str, offset: int, compressed: int | None):
        super().__init__(reason)
        self.reason, self.offset, self.compressed = reason, offset, compressed


def _damage_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error, OSError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


DAMAGE_ERRORS = _damage_errors()


class DataStream:
    """The decompressed bytes of one file, with the offsets a damage report needs."""

    def __init__(self, path: str):
        self.path = path
        self.file_size = file_size(path)  # local, or a bucket object (jaxcpt.data.remote)
        lower = path.lower()
        self._zstd = lower.endswith((".zst", ".zstd"))
        self._end_checked = False
        # Compressed: small reads, so the records before the damage still arrive (a read that meets it
        # loses all it decompressed) and the estimate of the rest has a rate. GzipFile unwrapped: its
        # readline takes what each decompression step gives; another BufferedReader around it would
        # ask for 64 KiB at once and lose a short file's every line to a truncation.
        if lower.endswith(".gz"):
            self._raw = open_binary(path)
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="rb")
        elif self._zstd:
            import zstandard

            self._raw = open_binary(path)
            reader = zstandard.ZstdDecompressor().stream_reader(self._raw, read_across_frames=True, closefd=False)
            self._stream = io.BufferedReader(reader, 1 << 16)
        else:  # one handle: opened once (a FIFO or a hung mount blocks in open, where the stall watch sees it)
            self._raw = self._stream = open_binary(path, buffering=1 << 20)
        self.offset = 0  # decompressed bytes consumed by readline / read / seek

    @property
    def compressed(self) -> bool:
        return self._stream is not self._raw

    def compressed_position(self) -> int:
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return self.file_size

    def _fail(self, e: BaseException) -> DamagedFile:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return DamagedFile(reason, self.offset, self.compressed_position() if self.compressed else None)

    def _check_end(self, data: bytes, asked: int) -> None:
        if self._zstd and len(data) < asked and not self._end_checked:
            # EOF: python-zstandard does not tell a cut frame from the end of the stream
            self._end_checked = True
            cut, _ = zstd_frames(self.path)
            if cut is not None:
                raise DamagedFile(f"truncated zstd stream: {cut}", self.offset + len(data), self.file_size)

    def decompressed_size(self, damage: DamagedFile) -> int | None:
        """The file's decompressed size when the file says it, for estimating what the rest of it held.

        Plain: its size. zstd: the frames' declared content sizes (zstd writes them when it knows
        the input size). gzip: the trailer's ISIZE (size mod 2**32 of a single-member file), except
        after a truncation, where the last bytes are not the trailer.
        """
        if not self.compressed:
            return self.file_size
        if self._zstd:
            return zstd_frames(self.path)[1]
        if damage.reason.startswith("EOFError") or self.file_size < 18:
            return None
        with open_binary(self.path) as f:
            f.seek(-4, os.SEEK_END)
            size = struct.unpack("<I", f.read(4))[0]
        while size < damage.offset:  # ISIZE wraps at 4 GiB
            size += 1 << 32
        return size

    def readline(self, limit: int = -1) -> bytes:
        try:
            line = self._stream.readline(limit)
        except FileNotFoundError:
            raise
        except DAMAGE_ERRORS as e:
            raise self._fail(e) from None
        if not line.endswith(b"\n") and (limit < 0 or len(line) < limit):
            self._check_end(line, len(line) + 1)
        self.offset += len(line)
        return line

    def read(self, n: int) -> bytes:
        try:
            data = self._stream.read(n)
        except FileNotFoundError:
            raise
        except DAMAGE_ERRORS as e:
            raise self._fail(e) from None
        self._check_end(data, n)
        self.offset += len(data)
        return data

    def seek(self, offset: int) -> None:
        """Move to a decompressed byte offset: a real seek for plain files, read-and-drop for compressed ones."""
        if not self.compressed:
            self._stream.seek(offset)
            self.offset = offset
            return
        while self.offset < offset:
            if not self.read(min(offset - self.offset, 1 << 22)):
                break

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_stream(path: str) -> DataStream:
    return DataStream(path)


_ZSTD_MAGIC = 0xFD2FB528


def zstd_frames(path: str) -> tuple[str | None, int | None]:
    """(where the last zstd frame of ``path`` is cut short, or None; the declared content size of all frames,
    or None when a frame does not declare it).

    Walks frame and block headers only (RFC 8878 section 3.1): frame header descriptor, then
    3-byte block headers (last-block bit, type, size), then the optional 4-byte checksum.
    """
    size = file_size(path)
    content: int | None = 0
    with open_binary(path) as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(18)
            if len(head) < 4:
                return f"{size - pos} stray byte(s) at byte {pos}", content
            (magic,) = struct.unpack("<I", head[:4])
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: magic, 4-byte size, content
                if len(head) < 8:
                    return f"skippable frame at byte {pos} cut in its header", content
                pos += 8 + struct.unpack("<I", head[4:8])[0]
                continue
            if magic != _ZSTD_MAGIC:
                return None, None  # not a frame we can walk: leave judging it to the decompressor
            if len(head) < 5:
                return f"frame at byte {pos} cut in its header", content
            descriptor = head[4]
            single_segment = bool(descriptor & 0x20)
            fcs_size = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
            dict_size = (0, 1, 2, 4)[descriptor & 3]
            fcs_at = 5 + (0 if single_segment else 1) + dict_size
            if content is not None and fcs_size and len(head) >= fcs_at + fcs_size:
                declared = int.from_bytes(head[fcs_at : fcs_at + fcs_size], "little")
                content += declared + (256 if fcs_size == 2 else 0)
            else:
                content = None
            checksum = 4 if descriptor & 0x04 else 0
            frame_start, pos = pos, fcs_at + fcs_size + pos
            while True:
                f.seek(pos)
                block = f.read(3)
                if len(block) < 3:
                    return f"frame at byte {frame_start} ends at byte {size} inside a block header", content
                (value,) = struct.unpack("<I", block + b"\0")
                last, kind, block_size = value & 1, (value >> 1) & 3, value >> 3
                pos += 3 + (1 if kind == 1 else block_size)
                if pos > size:
                    return f"frame at byte {frame_start} ends at byte {size} inside a block that needs {pos}", content
                if last:
                    break
            pos += checksum
            if pos > size:
                return f"frame at byte {frame_start} ends at byte {size} inside its checksum", content
    return None, content
