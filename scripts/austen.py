#!/usr/bin/env python3
"""Extract Jane Austen's six novels from the r-cran-janeaustenr lazy-load database.

The package ships its data as R's lazy-load pair: Rdata.rdx (the gzip'd R
serialization of an index: list(variables = list(<name> = c(offset, length)), ...))
and Rdata.rdb (records of a 4-byte big-endian uncompressed length followed by a
zlib stream, each an R XDR serialization of one object). Each novel is a
character vector, one string per line. No R is needed: this file holds a small
reader of R's XDR serialization covering what these files use, and fails with a
message naming the record and the construct on anything else.

    python3 scripts/austen.py --rdata-dir /tmp/ja/usr/lib/R/site-library/janeaustenr/data --out-dir data

writes data/austen/<book>.txt and the splits of DESIGN.md (calibration,
evaluation, haystack). Standard library only, so setup needs nothing installed.
"""

import argparse
import os
import struct
import sys
import zlib

BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
         "northangerabbey", "persuasion")

# DESIGN.md "Data": never calibrate on the evaluation split.
SPLITS = {
    "calibration": ("persuasion", "northangerabbey"),
    "evaluation": ("prideprejudice", "emma"),
    "haystack": ("sensesensibility", "mansfieldpark"),
}

# SEXP type codes and pseudo-types from R's serialize.c / Rinternals.h.
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP = 0, 1, 2, 9, 10
INTSXP, REALSXP, STRSXP, VECSXP = 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
NA_INTEGER = -(2 ** 31)
# CHARSXP encoding bits in the "levels" field of the flags word.
LATIN1_MASK, BYTES_MASK, UTF8_MASK, ASCII_MASK = 1 << 2, 1 << 1, 1 << 3, 1 << 6


class RFormatError(Exception):
    """The input is not an R serialization this reader understands."""


class RList(list):
    """A VECSXP or pairlist: its elements, plus R attributes (e.g. names)."""

    def __init__(self, items, attributes=None):
        super().__init__(items)
        self.attributes = attributes or {}

    def as_dict(self):
        names = self.attributes.get("names")
        if names is None or len(names) != len(self):
            raise RFormatError("list has no names attribute of matching length")
        return dict(zip(names, self))


class RVector(list):
    """An atomic vector (logical/integer/real/character) plus R attributes.
    Missing values (NA) are None."""

    def __init__(self, items, attributes=None):
        super().__init__(items)
        self.attributes = attributes or {}


class XdrReader:
    """Reads one object from an R serialization in XDR ("X\\n") format 2 or 3."""

    def __init__(self, data, what):
        self.data = data
        self.pos = 0
        self.what = what  # names the record in error messages
        self.refs = []    # symbols, for REFSXP back-references

    def fail(self, message):
        raise RFormatError(f"{self.what}: {message} (at byte {self.pos})")

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"truncated: wanted {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves follow
            hi, lo = self.int(), self.int()
            return (hi << 32) + lo
        if n < 0:
            self.fail(f"negative length {n}")
        return n

    def read(self):
        if self.take(2) != b"X\n":
            self.fail("not an R XDR serialization (expected 'X\\n' header)")
        version = self.int()
        if version not in (2, 3):
            self.fail(f"serialization format {version} not supported (only 2 and 3)")
        self.int()  # R version that wrote it
        self.int()  # oldest R version that can read it
        if version == 3:
            self.take(self.int())  # native encoding name, e.g. "UTF-8"
        obj = self.item()
        if self.pos != len(self.data):
            self.fail(f"{len(self.data) - self.pos} trailing bytes after the object")
        return obj

    def item(self):
        flags = self.int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sexptype == NILVALUE_SXP:
            return None
        if sexptype == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.int()
            if not 1 <= index <= len(self.refs):
                self.fail(f"back-reference {index} to an unknown object")
            return self.refs[index - 1]
        if sexptype == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if sexptype == LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if sexptype == CHARSXP:
            return self.charsxp(levels)

        if sexptype == LGLSXP or sexptype == INTSXP:
            raw = self.take(4 * self.length())
            items = [None if v == NA_INTEGER else v
                     for v in struct.unpack(f">{len(raw) // 4}i", raw)]
            if sexptype == LGLSXP:
                items = [None if v is None else bool(v) for v in items]
        elif sexptype == REALSXP:
            raw = self.take(8 * self.length())
            items = list(struct.unpack(f">{len(raw) // 8}d", raw))
        elif sexptype == STRSXP:
            items = [self.item() for _ in range(self.length())]
        elif sexptype == VECSXP:
            items = [self.item() for _ in range(self.length())]
        else:
            self.fail(f"unsupported SEXP type {sexptype} (flags 0x{flags:x})")
        attributes = self.attributes() if has_attr else {}
        if sexptype == VECSXP:
            return RList(items, attributes)
        return RVector(items, attributes)

    def pairlist(self, has_attr, has_tag):
        # A pairlist is a chain of cells; read it iteratively so long lists
        # don't recurse once per element.
        items, tags = [], []
        while True:
            if has_attr:
                self.attributes()
            tags.append(self.item() if has_tag else None)
            items.append(self.item())
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                break
            if flags & 0xFF != LISTSXP:
                self.fail(f"pairlist tail of type {flags & 0xFF} not supported")
            has_attr = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))
        result = RList(items)
        if any(tag is not None for tag in tags):
            result.attributes["names"] = tags
        return result

    def attributes(self):
        attrs = self.item()
        if not isinstance(attrs, RList):
            self.fail("attributes are not a pairlist")
        return attrs.as_dict()

    def charsxp(self, levels):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & BYTES_MASK:
            self.fail("CHARSXP marked as raw bytes; cannot decode as text")
        try:
            # UTF8_MASK, ASCII_MASK or native: the package was built in a UTF-8 locale.
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"string is not valid UTF-8: {e}")


def decompress_index(data):
    """The .rdx is written by saveRDS (gzip); accept a length-prefixed zlib stream too."""
    try:
        if data[:2] == b"\x1f\x8b":
            return zlib.decompress(data, 16 + zlib.MAX_WBITS)
        return decompress_record(data, "Rdata.rdx")
    except zlib.error as e:
        raise RFormatError(f"Rdata.rdx: cannot decompress: {e}") from None


def decompress_record(record, what):
    if len(record) < 5:
        raise RFormatError(f"{what}: record of {len(record)} bytes is too short")
    expected = struct.unpack(">I", record[:4])[0]
    try:
        data = zlib.decompress(record[4:])
    except zlib.error as e:
        raise RFormatError(f"{what}: corrupted zlib stream: {e}") from None
    if len(data) != expected:
        raise RFormatError(f"{what}: decompressed to {len(data)} bytes, header says {expected}")
    return data


def read_books(rdata_dir):
    """Returns {book name: list of lines} for every character vector in the database."""
    with open(os.path.join(rdata_dir, "Rdata.rdx"), "rb") as f:
        index = XdrReader(decompress_index(f.read()), "Rdata.rdx").read()
    if not isinstance(index, RList):
        raise RFormatError("Rdata.rdx: index is not a list")
    fields = index.as_dict()
    variables = fields.get("variables")
    if not isinstance(variables, RList):
        raise RFormatError("Rdata.rdx: index has no 'variables' list")
    # makeLazyLoadDB writes compressed = TRUE for zlib, 2 for bzip2, 3 for xz.
    compressed = fields.get("compressed")
    if compressed is None or len(compressed) != 1 or compressed[0] is not True:
        raise RFormatError(f"Rdata.rdx: compression {list(compressed or [])} is not "
                           "supported (only zlib, compressed = TRUE)")
    with open(os.path.join(rdata_dir, "Rdata.rdb"), "rb") as f:
        rdb = f.read()
    books = {}
    for name, span in variables.as_dict().items():
        if len(span) != 2 or None in span:
            raise RFormatError(f"Rdata.rdx: bad (offset, length) for {name!r}: {list(span)}")
        offset, length = int(span[0]), int(span[1])
        if offset < 0 or offset + length > len(rdb):
            raise RFormatError(f"Rdata.rdb: record {name!r} at {offset}+{length} "
                               f"lies outside the {len(rdb)}-byte file")
        what = f"Rdata.rdb record {name!r}"
        obj = XdrReader(decompress_record(rdb[offset:offset + length], what), what).read()
        if isinstance(obj, RVector) and all(isinstance(s, str) or s is None for s in obj):
            books[name] = obj
    return books


def book_text(lines):
    # An NA line carries no text; keep the line so line structure is preserved.
    return "\n".join("" if line is None else line for line in lines) + "\n"


def write_corpus(rdata_dir, out_dir):
    """Writes out_dir/austen/<book>.txt and the three splits; returns {path: word count}."""
    books = read_books(rdata_dir)
    missing = [b for b in BOOKS if b not in books]
    if missing:
        raise RFormatError(f"Rdata.rdx: books missing from the database: {', '.join(missing)}")
    os.makedirs(os.path.join(out_dir, "austen"), exist_ok=True)
    texts = {b: book_text(books[b]) for b in BOOKS}
    outputs = {os.path.join(out_dir, "austen", f"{b}.txt"): texts[b] for b in BOOKS}
    for split, members in SPLITS.items():
        outputs[os.path.join(out_dir, f"{split}.txt")] = "".join(texts[b] + "\n" for b in members)
    for path, text in outputs.items():
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return {path: len(text.split()) for path, text in outputs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rdata-dir", required=True,
                        help="directory holding Rdata.rdx and Rdata.rdb")
    parser.add_argument("--out-dir", default="data")
    args = parser.parse_args()
    try:
        counts = write_corpus(args.rdata_dir, args.out_dir)
    except (OSError, RFormatError) as e:
        print(f"austen.py: error: {e}", file=sys.stderr)
        return 1
    for path, words in counts.items():
        print(f"{path}: {words} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
