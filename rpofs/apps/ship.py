"""Shipping an application's logs out of a running guest: what to read, and
what a read means for each file's stream (schema: StreamState).

Only bytes not shipped yet are read, through the guest agent (rpofs.apps.
guestio); the guest is never frozen. What makes a stream go on or start
again:

SQLite in WAL mode (kind "sqlite"; the file shipped is the database's -wal)
    A generation is one set of WAL salts. Only committed frames are shipped
    (rpofs.apps.wal checks salts and checksums as SQLite's recovery does),
    each generation from its header on. When SQLite restarts the WAL after a
    checkpoint (salt-1 and the checkpoint sequence one up, same page size),
    the old generation's frames not shipped yet are still in the file past
    where the new one has written: they are shipped first, and the new
    generation continues the same lineage (a database as of a later point
    is its base's file plus every generation since, in order). When that
    cannot be shown (the WAL was deleted and made anew, truncated, or the
    new generation already overwrote frames not shipped), a new lineage
    starts: it can only extend a block point that holds one of its
    generations (rpofs.apps.relate).
Append-only files (kind "files")
    A generation is one file at the path: when the file got shorter than
    what was shipped, or the last bytes shipped are no longer where they
    were (rotated: another file now has the name), the next generation is
    shipped from its start.
"""

import dataclasses
import struct
from typing import NamedTuple

from ..store.schema import ShippedFile, StreamState
from . import wal
from .guestio import ROUND_LIMIT, AgentFile

TAIL = 64   # bytes of a file kept to recognise it next time


class Piece(NamedTuple):
    """Bytes read for one file's stream, to be stored."""
    file: ShippedFile
    data: bytes


class FileRound(NamedTuple):
    """What one round read of one file: the pieces to store, the stream's new
    state, and why a new lineage started ("" if it did not)."""
    pieces: list[Piece]
    state: StreamState | None
    restart: str = ""


def _salts(frame_header: bytes) -> tuple[int, int] | None:
    return struct.unpack(">II", frame_header[8:16]) if len(frame_header) >= 16 else None


def _restarted(old: wal.WalHeader, new: wal.WalHeader) -> bool:
    """Whether `new` is SQLite's restart of the WAL that had header `old`."""
    return (new.salt1 == (old.salt1 + 1) & 0xFFFFFFFF and new.checkpoint_seq == old.checkpoint_seq + 1
            and new.page_size == old.page_size)


def wal_round(f: AgentFile, path: str, state: StreamState | None, new_lineage: int) -> FileRound:
    """One round of a SQLite WAL file: its header, then what follows the
    stream's end (two reads), or the whole file for a generation not seen."""
    replaced = ""
    if state is not None:
        header = wal.parse_header(f.read(0, wal.WAL_HEADER_SIZE))
        if header is None:
            return FileRound([], state)  # no WAL yet, or truncated: its next header says what it is
        if header.generation == state.generation:
            # the last frame shipped is read again with what follows: the same salts
            # do not make the same file (a restored disk holds an older copy of this
            # WAL, which SQLite goes on writing with other frames)
            back = wal.FRAME_HEADER_SIZE + header.page_size if state.offset > wal.WAL_HEADER_SIZE else 0
            data = f.read(state.offset - back, back + ROUND_LIMIT)
            replaced = _not_shipped_from(data[:back], back, header, state)
            if not replaced:
                found = wal.scan(header, memoryview(data)[back:], state.offset, state.checksum)
                if found.end == state.offset:
                    return FileRound([], state)
                shipped = ShippedFile(path, state.lineage, state.generation, state.offset, found.end - state.offset)
                return FileRound([Piece(shipped, bytes(data[back:back + found.end - state.offset]))],
                                 dataclasses.replace(state, offset=found.end, checksum=found.checksum))
    # a generation not seen before: read the file from its start (past where the
    # old one was shipped to, to ship its tail)
    data = f.read(0, ROUND_LIMIT + (state.offset if state is not None else 0))
    header = wal.parse_header(data[:wal.WAL_HEADER_SIZE])
    if header is None:
        return FileRound([], state)
    new = wal.scan(header, memoryview(data)[wal.WAL_HEADER_SIZE:], wal.WAL_HEADER_SIZE, header.checksum)
    pieces, lineage, restart = [], None, ""
    if state is not None:
        old = wal.parse_header(bytes.fromhex(state.header))
        tail = None
        if replaced:
            restart = replaced
        elif not _restarted(old, header):
            restart = "the WAL was made anew (not SQLite's restart of the one shipped)"
        elif len(data) < state.offset:
            restart = "the WAL was truncated past what was shipped"
        elif _salts(data[state.offset:state.offset + wal.FRAME_HEADER_SIZE]) == (header.salt1, header.salt2):
            restart = "the restarted WAL overwrote frames before they were shipped"
        else:
            tail = wal.scan(old, memoryview(data)[state.offset:], state.offset, state.checksum)
            after = data[tail.end:tail.end + wal.FRAME_HEADER_SIZE]
            if _salts(after) == (header.salt1, header.salt2):
                restart = "the restarted WAL reached the old one's end before it was shipped"
                tail = None
        if tail is not None:
            lineage = state.lineage
            if tail.end > state.offset:
                pieces.append(Piece(ShippedFile(path, lineage, state.generation, state.offset, tail.end - state.offset),
                                    bytes(data[state.offset:tail.end])))
            if new.end == wal.WAL_HEADER_SIZE:  # nothing committed in the new one yet: stay on the old
                return FileRound(pieces, dataclasses.replace(state, offset=tail.end, checksum=tail.checksum))
    if new.end == wal.WAL_HEADER_SIZE and lineage is None and state is not None:
        return FileRound(pieces, state)  # wait for a commit before starting a lineage
    if lineage is None:
        lineage = new_lineage
    pieces.append(Piece(ShippedFile(path, lineage, header.generation, 0, new.end), bytes(data[:new.end])))
    return FileRound(pieces, StreamState(path, lineage, header.generation, new.end, new.checksum,
                                         header=bytes(data[:wal.WAL_HEADER_SIZE]).hex()), restart)


def _not_shipped_from(last: bytes, back: int, header: wal.WalHeader, state: StreamState) -> str:
    """Why the WAL is not the file the stream shipped from ("" when it is):
    its last shipped frame must still be there with the running checksum the
    stream reached, which chains every frame before it."""
    if not back:
        return ""
    if len(last) < back:
        return "the WAL is shorter than what was shipped of it (a restored or replaced disk)"
    if _salts(last) != (header.salt1, header.salt2) or tuple(struct.unpack(">II", last[16:24])) != tuple(state.checksum):
        return "the WAL's frames before where shipping stood changed (a restored or replaced disk)"
    return ""


def file_round(f: AgentFile, path: str, state: StreamState | None, new_lineage: int) -> FileRound:
    """One round of an append-only file: the last bytes shipped and what
    follows them (one read), or the file from its start."""
    restart = ""
    if state is None:
        state = StreamState(path, new_lineage, "1", 0)
    elif state.offset:
        keep = min(TAIL, state.offset)
        data = f.read(state.offset - keep, keep + ROUND_LIMIT)
        if len(data) < keep:
            state, restart = _next_generation(state), "the file got shorter (truncated or replaced)"
        elif data[:keep].hex() != state.tail:
            state, restart = _next_generation(state), "another file has the name (rotated)"
        else:
            return _appended(path, state, data[keep:])
    return FileRound(*_appended(path, state, f.read(0, ROUND_LIMIT))[:2], restart)


def _next_generation(state: StreamState) -> StreamState:
    return StreamState(state.path, state.lineage, str(int(state.generation) + 1), 0)


def _appended(path: str, state: StreamState, data: bytes) -> FileRound:
    if not data:
        return FileRound([], state)
    shipped = ShippedFile(path, state.lineage, state.generation, state.offset, len(data))
    tail = ((bytes.fromhex(state.tail) + data)[-TAIL:]).hex()
    return FileRound([Piece(shipped, data)], dataclasses.replace(state, offset=state.offset + len(data), tail=tail))
