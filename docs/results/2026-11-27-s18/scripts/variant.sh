#!/usr/bin/env bash
# variant.sh NAME "-DFLAGS..." : builds .carry-s18/v/NAME/kvq-gpu-bench with quantized_attention.cu compiled with FLAGS
set -e
name=$1; flags=$2
root=/work/main; b=$root/build; d=$root/.carry-s18/v/$name
mkdir -p $d/obj
cmd=$(cat /tmp/qa_cmd.txt | sed "s# -c # $flags -c #; s#-o CMakeFiles/kvq_lib.dir/src/cuda/quantized_attention.cu.o#-o $d/obj/quantized_attention.cu.o#")
(cd $b && eval "$cmd")
cp $b/libkvq_lib.a $d/libkvq_lib.a
(cd $d/obj && ar r ../libkvq_lib.a quantized_attention.cu.o)
for t in ${TARGETS:-kvq-gpu-bench}; do
  out=$(ninja -C $b -t commands $t | tail -1 | grep -o -- "-o [^ ]*" | head -1 | cut -c4-)
  link=$(ninja -C $b -t commands $t | tail -1 | sed "s#[^ ]*libkvq_lib.a#$d/libkvq_lib.a#; s#-o $out#-o $d/$(basename $out)#")
  (cd $b && eval "$link")
done
rm -rf $d/obj $d/libkvq_lib.a
echo built $d
