#!/bin/bash
# ppl on the CPU with OpenBLAS's default kernels (SkylakeX here) and with its Haswell kernels: same binary and
# inputs, only the GEMMs' rounding differs.
cd /work/main
run() { # kv core
  local kv=$1 core=$2 f=/tmp/blas/ppl_$(echo $1 | tr '%' 'p')_$2.json
  if [ "$core" = default ]; then unset OPENBLAS_CORETYPE; else export OPENBLAS_CORETYPE=$core; fi
  ./build/kvq ppl --device cpu -f data/evaluation.txt --ctx 2048 --max-tokens 32768 --threads 1 --kv "$kv" --json "$f" > /tmp/blas/log_$(echo $1 | tr '%' 'p')_$2.txt 2>&1
}
for kv in "$@"; do
  run "$kv" default &
  run "$kv" Haswell &
  wait
done
