"""scripts/austen.py: the six novels and the DESIGN.md splits come out of
janeaustenr's lazy-load database as clean UTF-8, and damaged input fails with a
message that names the record."""

import shutil
import struct
import subprocess
import sys

import pytest

import austen

# Word counts (whitespace-separated) of janeaustenr 1.0.0's text; a different
# count means lines were lost, duplicated or mangled.
WORDS = {
    "sensesensibility": 118565, "prideprejudice": 121567, "mansfieldpark": 159540,
    "emma": 157441, "northangerabbey": 77141, "persuasion": 83283,
}
FIRST_LINE = {
    "sensesensibility": "SENSE AND SENSIBILITY", "prideprejudice": "PRIDE AND PREJUDICE",
    "mansfieldpark": "MANSFIELD PARK", "emma": "EMMA",
    "northangerabbey": "NORTHANGER ABBEY", "persuasion": "Persuasion",
}


def run_extractor(repo_root, rdata_dir, out_dir):
    return subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "austen.py"),
         "--rdata-dir", str(rdata_dir), "--out-dir", str(out_dir)],
        capture_output=True, text=True)


@pytest.fixture(scope="module")
def corpus(repo_root, rdata_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    result = run_extractor(repo_root, rdata_dir, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("book", austen.BOOKS)
def test_book(corpus, book):
    text = (corpus / "austen" / f"{book}.txt").read_bytes().decode("utf-8")
    assert len(text.split()) == WORDS[book]
    assert text.split("\n", 1)[0] == FIRST_LINE[book]
    assert text.endswith("\n") and not text.endswith("\n\n")
    # R artefacts a broken reader would leave: NA lines, escaped characters,
    # control bytes (length or flag words read as text).
    assert "\nNA\n" not in text
    assert "\\n" not in text and '\\"' not in text
    assert not any(ord(c) < 32 and c != "\n" for c in text)


def test_pride_and_prejudice_opening(corpus):
    text = (corpus / "austen" / "prideprejudice.txt").read_text(encoding="utf-8")
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n")
    assert "It is a truth universally acknowledged, that a single man in possession\n" in text


def test_splits(corpus):
    for split, members in austen.SPLITS.items():
        expected = "".join(
            (corpus / "austen" / f"{book}.txt").read_text(encoding="utf-8") + "\n"
            for book in members)
        assert (corpus / f"{split}.txt").read_text(encoding="utf-8") == expected
    # Every novel lands in exactly one split.
    assert sorted(b for members in austen.SPLITS.values() for b in members) == sorted(austen.BOOKS)


def test_corrupted_record_is_named(repo_root, rdata_dir, tmp_path):
    damaged = tmp_path / "rdata"
    shutil.copytree(rdata_dir, damaged)
    index = austen.XdrReader(
        austen.decompress_index((damaged / "Rdata.rdx").read_bytes()), "Rdata.rdx").read()
    offset, length = index.as_dict()["variables"].as_dict()["emma"]
    rdb = bytearray((damaged / "Rdata.rdb").read_bytes())
    middle = int(offset) + int(length) // 2
    rdb[middle:middle + 16] = bytes(b ^ 0xFF for b in rdb[middle:middle + 16])
    (damaged / "Rdata.rdb").write_bytes(bytes(rdb))

    result = run_extractor(repo_root, damaged, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.startswith("austen.py: error: Rdata.rdb record 'emma': ")
    assert "Traceback" not in result.stderr


def test_unsupported_sexp_type_is_named():
    # A closure (SEXP type 3) is valid R serialization this reader does not handle.
    payload = b"X\n" + struct.pack(">iii", 2, 0x040000, 0x020300) + struct.pack(">i", 3)
    with pytest.raises(austen.RFormatError, match=r"record 'x': unsupported SEXP type 3"):
        austen.XdrReader(payload, "record 'x'").read()


def test_truncated_serialization_is_named():
    payload = b"X\n" + struct.pack(">iii", 2, 0x040000, 0x020300) + struct.pack(">ii", 16, 5)
    with pytest.raises(austen.RFormatError, match=r"record 'x': truncated"):
        austen.XdrReader(payload, "record 'x'").read()
