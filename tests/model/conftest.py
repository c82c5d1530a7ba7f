"""Shared fixtures for the model tests: where the repository, build, model and
Austen data are. Tests that need something missing skip and say what is missing.

Overrides: KVQ_MODEL (GGUF file), KVQ_BUILD_DIR (holds kvq and kvq-testtool),
KVQ_RDATA_DIR (janeaustenr's data directory with Rdata.rdx/Rdata.rdb).
"""

import glob
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The reference and corpus scripts are plain files, not a package.
sys.path.insert(0, str(REPO_ROOT / "scripts"))

JANEAUSTENR_DEB_GLOB = os.path.expanduser("~/.cache/kvq/r-cran-janeaustenr_*_all.deb")
RDATA_IN_DEB = "usr/lib/R/site-library/janeaustenr/data/"


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def build_dir():
    return Path(os.environ.get("KVQ_BUILD_DIR", REPO_ROOT / "build"))


@pytest.fixture(scope="session")
def kvq(build_dir):
    """Runs build/kvq with the given arguments; check=N asserts the exit status."""
    binary = build_dir / "kvq"
    if not binary.is_file():
        pytest.skip(f"{binary} not built")

    def run(*args, check=None):
        proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=900)
        if check is not None:
            assert proc.returncode == check, proc.stderr
        return proc
    return run


@pytest.fixture(scope="session")
def model_path():
    path = Path(os.environ.get("KVQ_MODEL",
                               REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        pytest.skip(f"model file {path} not found (set KVQ_MODEL or run the setup script)")
    return path


def _deb_member(deb_bytes, prefix):
    """Returns the bytes of the first member of an ar archive (a .deb) whose name
    starts with prefix. The format is an 8-byte magic then 60-byte headers."""
    if deb_bytes[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(deb_bytes):
        header = deb_bytes[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii"))
        if name.startswith(prefix):
            return deb_bytes[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    raise ValueError(f"no {prefix}* member")


@pytest.fixture(scope="session")
def rdata_dir(tmp_path_factory):
    """janeaustenr's data directory: KVQ_RDATA_DIR, else unpacked from the cached
    .deb with the standard library (so the test needs no dpkg)."""
    if "KVQ_RDATA_DIR" in os.environ:
        return Path(os.environ["KVQ_RDATA_DIR"])
    debs = sorted(glob.glob(JANEAUSTENR_DEB_GLOB))
    if not debs:
        pytest.skip(f"no {JANEAUSTENR_DEB_GLOB} (set KVQ_RDATA_DIR or run the setup script)")
    out = tmp_path_factory.mktemp("janeaustenr")
    data_tar = _deb_member(Path(debs[-1]).read_bytes(), "data.tar")
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as tar:
        for member in tar.getmembers():
            name = member.name.lstrip("./")
            if name.startswith(RDATA_IN_DEB) and member.isfile():
                (out / Path(name).name).write_bytes(tar.extractfile(member).read())
    return out
