"""What PostgreSQL's btree indexes take: the size of the entry a row of text values makes
in an index of them (`entry_size`), and whether it fits (`fits`). Pure: the checks of
stream ids, subscription names and snapshot ids call it before any I/O.

A btree entry holds at most `MAX_ENTRY_BYTES` (version 4 btrees, 8 KiB pages). Before
a value of more than `_COMPRESS_ABOVE` bytes goes into an entry, the server compresses
it (``index_form_tuple``, with its default method, pglz), and keeps the compressed form
if it is more than 2 bytes shorter: a long value that compresses well fits, one that
does not (random letters, hex, base64) does not. `_pglz_size` reproduces pglz's choices
byte for byte (as a server on x86-64 hashes bytes), so the checks accept what the
server accepts and refuse what it refuses. (A server set to ``default_toast_compression =
lz4`` compresses differently: there, a value at the edge may be refused by the check
though the server would take it, or the other way round. So may a value with bytes over
127 on a server whose ``char`` is unsigned, such as ARM64.) Values that do not compress,
the usual long names, are judged exactly whatever the server.
"""

from __future__ import annotations

__all__ = ["MAX_ENTRY_BYTES", "MAX_RAW_BYTES", "MAX_RAW_PAIR_BYTES", "entry_size", "fits"]

#: The largest btree entry (``BTMaxItemSize``: a third of a page, less room for a heap
#: pointer), header included.
MAX_ENTRY_BYTES = 2704

#: An entry's own header (``IndexTupleData``).
_ENTRY_HEADER = 8

#: The longest text that fits alone in an entry as it is (a 4-byte length word of its own).
MAX_RAW_BYTES = MAX_ENTRY_BYTES - _ENTRY_HEADER - 4

#: The longest two texts (both over 126 bytes) that fit together as they are: a length
#: word each (and up to 3 bytes of alignment between them).
MAX_RAW_PAIR_BYTES = MAX_RAW_BYTES - 4

#: Values longer than this (with their 4-byte length word) are compressed first
#: (``TOAST_INDEX_TARGET``).
_COMPRESS_ABOVE = 510

#: The longest value stored with a 1-byte length word (``VARATT_SHORT_MAX``, less it).
_SHORT_MAX = 126

#: The header of a compressed value: length word and the raw size.
_COMPRESSED_HEADER = 8

# pglz's default strategy (``PGLZ_strategy_default``) and limits.
_PGLZ_MIN_INPUT = 32
_PGLZ_NEED_RATE = 25
_PGLZ_FIRST_SUCCESS_BY = 1024
_PGLZ_GOOD_MATCH = 128
_PGLZ_GOOD_DROP = 10
_PGLZ_MAX_MATCH = 273
_PGLZ_MAX_OFFSET = 0x0FFF
_PGLZ_HISTORY = 4096


def fits(*values: str) -> bool:
    """Whether a btree index of text columns takes the entry of a row of these values
    (in the index's column order)."""
    if _size(values, compress=False) <= MAX_ENTRY_BYTES:
        return True  # as they are (compressing makes an entry no longer)
    return entry_size(*values) <= MAX_ENTRY_BYTES


def entry_size(*values: str) -> int:
    """The size of the btree entry of a row of these text values, header included, as
    the server reports it ("index row size ..."; for its default compression)."""
    return _size(values, compress=True)


def _size(values: tuple[str, ...], *, compress: bool) -> int:
    size = 0
    for value in values:
        raw = value.encode()
        if len(raw) <= _SHORT_MAX:
            size += 1 + len(raw)  # a 1-byte length word, not aligned
            continue
        stored = 4 + len(raw)
        if compress and stored > _COMPRESS_ABOVE:
            compressed = _pglz_size(raw)
            # Kept only if more than 2 bytes shorter (``toast_compress_datum``).
            if compressed is not None and compressed + _COMPRESSED_HEADER < len(raw) - 2:
                stored = compressed + _COMPRESSED_HEADER
        size = (size + 3) & ~3  # a 4-byte length word is aligned to 4 bytes
        size += stored
    return (_ENTRY_HEADER + size + 7) & ~7  # rounded up to 8 bytes (``MAXALIGN``)


def _signed(data: bytes) -> list[int]:
    """The bytes as the server's hash reads them (``char``: signed on x86-64)."""
    return [b - 256 if b > 127 else b for b in data]


def _pglz_size(data: bytes) -> int | None:
    """The size pglz compresses ``data`` to with its default strategy, or None when it
    gives up (less than 25% saved, or nothing to match in its first 1 KiB of output)."""
    n = len(data)
    if n < _PGLZ_MIN_INPUT:
        return None
    result_max = n * (100 - _PGLZ_NEED_RATE) // 100
    hash_size = 512 if n < 128 else 1024 if n < 256 else 2048 if n < 512 else 4096
    if n >= 1024:
        hash_size = 8192
    mask = hash_size - 1
    chars = _signed(data)
    # The hash of each position: its next 4 bytes (or the byte itself near the end).
    hashes = [
        ((chars[i] << 6) ^ (chars[i + 1] << 4) ^ (chars[i + 2] << 2) ^ chars[i + 3]) & mask
        if n - i >= 4
        else chars[i] & mask
        for i in range(n)
    ]
    # History: entries 1..4096 (0 ends a list), each a position, in lists by hash,
    # newest first; the oldest entry is reused once all are taken.
    heads = [0] * hash_size
    nexts = [0] * (_PGLZ_HISTORY + 1)
    prevs = [0] * (_PGLZ_HISTORY + 1)  # 0: the head of its list
    slots = [0] * (_PGLZ_HISTORY + 1)
    positions = [0] * (_PGLZ_HISTORY + 1)
    entry, recycle = 1, False

    def add(pos: int) -> None:
        nonlocal entry, recycle
        slot = hashes[pos]
        if recycle:
            prev, nxt = prevs[entry], nexts[entry]
            if prev == 0:
                heads[slots[entry]] = nxt
            else:
                nexts[prev] = nxt
            prevs[nxt] = prev
        nexts[entry] = heads[slot]
        prevs[entry] = 0
        slots[entry] = slot
        positions[entry] = pos
        prevs[heads[slot]] = entry
        heads[slot] = entry
        entry += 1
        if entry > _PGLZ_HISTORY:
            entry, recycle = 1, True

    out = 0  # bytes written, control bytes included
    items = 8  # items under the current control byte (8: a new one is due)
    found = False
    pos = 0
    while pos < n:
        if out >= result_max or (not found and out >= _PGLZ_FIRST_SUCCESS_BY):
            return None
        # The longest match in the history, settling for less the further it looks.
        length = 0
        good = _PGLZ_GOOD_MATCH
        candidate = heads[hashes[pos]]
        while candidate:
            start = positions[candidate]
            if pos - start >= _PGLZ_MAX_OFFSET:
                break
            limit = min(_PGLZ_MAX_MATCH, n - pos)
            this = 0
            if length >= 16:
                if data[pos : pos + length] == data[start : start + length]:
                    this = length
                    while this < limit and data[pos + this] == data[start + this]:
                        this += 1
            else:
                while this < limit and data[pos + this] == data[start + this]:
                    this += 1
            length = max(length, this)
            candidate = nexts[candidate]
            if candidate:
                if length >= good:
                    break
                good -= good * _PGLZ_GOOD_DROP // 100
        if items == 8:
            out += 1
            items = 0
        items += 1
        if length > 2:
            out += 3 if length > 17 else 2
            for at in range(pos, pos + length):
                add(at)
            pos += length
            found = True
        else:
            out += 1
            add(pos)
            pos += 1
    return None if out >= result_max else out
