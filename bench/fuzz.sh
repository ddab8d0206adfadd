#!/usr/bin/env bash
# Runs the cargo-fuzz targets of tests/fuzz/ one after another, then folds what they found
# into the committed corpus (minimised). See tests/fuzz/README.md.
#
#   bench/fuzz.sh                     every target, FUZZ_SECONDS each
#   bench/fuzz.sh relay sql           only these targets
#   FUZZ_MERGE=0 bench/fuzz.sh        leave tests/fuzz/corpus alone
#
# Settings (environment):
#   FUZZ_SECONDS=600      time per target
#   FUZZ_WORK=/tmp/pgsluice-fuzz   working corpus per target (kept between runs) and logs
#   FUZZ_NICE=15          nice level (the fuzzers use one core each, one at a time)
#   FUZZ_SANITIZER=address  or none (faster; Rust's own bounds checks still catch most bugs)
#   FUZZ_MERGE=1          minimise working + committed corpus into tests/fuzz/corpus/<target>
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly
# flags (-Zsanitizer, coverage options) to a stable rustc. Install cargo-fuzz with
# `cargo install cargo-fuzz`. A crash stops that target's run: its input is saved under
# tests/fuzz/artifacts/<target>/ and the script goes on with the next target and exits 1.
# The summary (executions, crashes) is written to $FUZZ_WORK/summary.md.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-600}
WORK=${FUZZ_WORK:-/tmp/pgsluice-fuzz}
NICE=${FUZZ_NICE:-15}
SANITIZER=${FUZZ_SANITIZER:-address}
MERGE=${FUZZ_MERGE:-1}
ALL="frame startup relay scram admin sql"
TARGETS=${*:-$ALL}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
  exit 2
fi
mkdir -p "$WORK"
for t in $TARGETS; do
  nice -n "$NICE" cargo fuzz build --fuzz-dir tests/fuzz --sanitizer "$SANITIZER" "$t" || exit 2
done

status=0
SUMMARY="$WORK/summary.md"
{
  echo "| target | seconds | executions | exec/s | crashes | corpus files |"
  echo "|---|---:|---:|---:|---:|---:|"
} >"$SUMMARY"
for t in $TARGETS; do
  mkdir -p "$WORK/$t"
  log="$WORK/$t.log"
  echo "== $t: ${SECONDS_PER_TARGET}s (log: $log)"
  nice -n "$NICE" cargo fuzz run --fuzz-dir tests/fuzz --sanitizer "$SANITIZER" "$t" \
    "$WORK/$t" "tests/fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  crashes=0
  if [ "$rc" != 0 ]; then
    crashes=1
    status=1
    echo "   CRASH (exit $rc): see $log and tests/fuzz/artifacts/$t/"
  fi
  rate=$(( ${execs:-0} / (SECONDS_PER_TARGET > 0 ? SECONDS_PER_TARGET : 1) ))
  if [ "$MERGE" = 1 ] && [ "$rc" = 0 ]; then
    merged="$WORK/$t.merged"
    rm -rf "$merged" && mkdir -p "$merged"
    nice -n "$NICE" cargo fuzz run --fuzz-dir tests/fuzz --sanitizer "$SANITIZER" "$t" \
      "$merged" "tests/fuzz/corpus/$t" "$WORK/$t" -- -set_cover_merge=1 -use_counters=0 \
      >"$WORK/$t.merge.log" 2>&1
    # Keep the regression inputs of fixed findings under their own names.
    for f in tests/fuzz/corpus/$t/regression-*; do
      [ -e "$f" ] && cp "$f" "$merged/"
    done
    find "tests/fuzz/corpus/$t" -type f ! -name 'regression-*' -delete
    cp "$merged"/* "tests/fuzz/corpus/$t/"
  fi
  files=$(find "tests/fuzz/corpus/$t" -type f | wc -l)
  echo "| $t | $SECONDS_PER_TARGET | ${execs:-?} | $rate | $crashes | $files |" >>"$SUMMARY"
  echo "   executions: ${execs:-?}, crashes: $crashes"
done
cat "$SUMMARY"
exit $status
