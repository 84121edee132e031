#!/usr/bin/env bash
# Run here, before a GPU check:  bash benchmarks/gpu/prepare.sh
# Fills .gpu/ (git-ignored) with what the GPU machine lacks, so that `bash benchmarks/gpu/run.sh` runs
# there with no network: the benchmarks' tokenizer and pairs (stories260K, UltraFeedback 1k, from
# ../shared) and the pure-Python wheels of TRL and its missing needs, for Python 3.12. The machine is
# expected to have torch, transformers' own needs, accelerate, pandas, pyarrow and xxhash; the
# transformers we test with (5.24) travels too, since the machine's may be older.
set -euo pipefail
cd "$(dirname "$0")/../.."
shared="${SDPO_SHARED:-../shared}"
rm -rf .gpu && mkdir -p .gpu/assets .gpu/whl
cp -r "$shared/models/stories260K" .gpu/assets/
cp "$shared/data/ultrafeedback_binarized_1k.jsonl" .gpu/assets/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0
du -sh .gpu && ls .gpu/whl
