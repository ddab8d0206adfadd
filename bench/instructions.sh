#!/usr/bin/env bash
# Instructions pgsluice executes per transaction and per login, counted by valgrind's
# callgrind: figures that do not move with the machine's noise, for comparing two builds.
#
#   bench/instructions.sh [BIN [OTHER_BIN]]
#
# Needs a PostgreSQL from `bench/compare.sh --serve` (its serve.env: the newest one under
# bench/results, or INSTR_SERVE_ENV=path), valgrind and pgbench. BIN defaults to
# target/release/pgsluice. Each workload runs pgsluice (one worker thread, pool of 20) under
# callgrind on a port of its own, warms it up, then counts only the measured part:
#
#   select-16, select-500   pgbench -S at 16 / 500 clients: instructions per transaction
#   extended-16, prepared-16  pgbench -S -M extended / -M prepared at 16 clients
#   tpcb-16                 pgbench's TPC-B-like script at 16 clients (7 statements each)
#   storm-trust, storm-scram  1,000 clients that connect, run SELECT 1 and leave, after a
#                           warm-up storm of 200: instructions per connection
#
#   INSTR_WORKLOADS="select-16 select-500 tpcb-16 storm-trust storm-scram"
#   INSTR_SECONDS=5          length of each measured pgbench run (callgrind runs ~50x slower)
#   INSTR_PORT=6690          first port used
#   INSTR_KEEP=DIR           keep each measured callgrind dump there, as BIN-WORKLOAD.callgrind
#                            (for callgrind_annotate: where the instructions go)
#   INSTR_CALLGRIND_ARGS="--cache-sim=yes"  more callgrind options; with the cache simulation,
#                            a second table gives L1 misses per transaction (instruction
#                            cache, data reads, data writes) as valgrind simulates them
#
# Prints a markdown table; with OTHER_BIN, a column for it and the change.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
BIN=${1:-$here/../target/release/pgsluice}
OTHER=${2:-}
WORKLOADS=${INSTR_WORKLOADS:-select-16 select-500 tpcb-16 storm-trust storm-scram}
SECS=${INSTR_SECONDS:-5}
PORT=${INSTR_PORT:-6690}
ENV_FILE=${INSTR_SERVE_ENV:-$(ls -t "$here"/results/*/serve.env 2>/dev/null | head -1)}

die() { echo "instructions.sh: $*" >&2; exit 1; }
command -v valgrind >/dev/null || die "valgrind is not installed (apt-get install valgrind)"
command -v pgbench >/dev/null || die "pgbench is not on PATH"
[ -x "$BIN" ] || die "no pgsluice binary at $BIN (cargo build --release)"
[ -z "$OTHER" ] || [ -x "$OTHER" ] || die "no binary at $OTHER"
[ -n "$ENV_FILE" ] && [ -f "$ENV_FILE" ] || die "no serve.env: start bench/compare.sh --serve first"
# shellcheck disable=SC1090
. "$ENV_FILE"
[ -n "${PORT_direct:-}" ] || die "$ENV_FILE names no direct PostgreSQL port"
ulimit -n 20000 2>/dev/null || true
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

# count BIN WORKLOAD -> instructions per transaction (or per connection)
count() {
  local bin=$1 workload=$2 auth=trust clients=16 mode=-S port=$((PORT++))
  case $workload in
    select-*) clients=${workload#select-} ;;
    extended-*) clients=${workload#extended-} mode="-S -M extended" ;;
    prepared-*) clients=${workload#prepared-} mode="-S -M prepared" ;;
    tpcb-*) clients=${workload#tpcb-} mode= ;;
    storm-trust) ;;
    storm-scram) auth=scram-sha-256 ;;
    *) die "unknown workload $workload" ;;
  esac
  bench_config "$WORK/p.toml" "$port" 1 "$auth"
  rm -f "$WORK"/cg.out*
  PGSLUICE_LOG=warn valgrind --tool=callgrind ${INSTR_CALLGRIND_ARGS:-} --callgrind-out-file="$WORK/cg.out" \
    "$bin" --config "$WORK/p.toml" >"$WORK/valgrind.log" 2>&1 &
  local vg=$! n
  # This runs in a command substitution: whatever ends it takes valgrind along.
  trap "kill $vg 2>/dev/null || true" EXIT
  bench_wait "$port" "$vg" "$WORK/valgrind.log" 200 || die "pgsluice under valgrind did not start"
  case $workload in
    storm-*)
      local storm=(python3 "$here/helper.py" storm --port "$port" --user bench --database bench
        --password "$PGPASSWORD" --timeout 120)
      "${storm[@]}" --n 200 --concurrency 200 >/dev/null
      callgrind_control -z "$vg" >/dev/null 2>&1
      "${storm[@]}" --n 1000 --concurrency 1000 >"$WORK/storm.json"
      sleep 1
      python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(1 if d.get("errors") else 0)' \
        "$WORK/storm.json" || die "the storm had errors: $(cat "$WORK/storm.json")"
      n=1000
      ;;
    *)
      pgbench -n $mode -c "$clients" -j 2 -T 3 -h 127.0.0.1 -p "$port" -U bench bench >/dev/null 2>&1
      callgrind_control -z "$vg" >/dev/null 2>&1
      n=$(pgbench -n $mode -c "$clients" -j 2 -T "$SECS" -h 127.0.0.1 -p "$port" -U bench bench 2>&1 |
        awk '/actually processed/ {split($NF, a, "/"); print a[1]}')
      [ -n "$n" ] && [ "$n" -gt 0 ] || die "pgbench ran no transactions through $bin"
      ;;
  esac
  callgrind_control -d "$vg" >/dev/null 2>&1
  kill "$vg" 2>/dev/null || true
  wait "$vg" 2>/dev/null || true
  local dump
  dump=$(ls "$WORK"/cg.out.* 2>/dev/null | head -1)
  [ -n "$dump" ] || die "callgrind wrote no dump"
  [ -z "${INSTR_KEEP:-}" ] || cp "$dump" "$INSTR_KEEP/$(basename "$bin")-$workload.callgrind"
  awk -v n="$n" '/^(summary|totals):/ {printf "%d\n", $2 / n; exit}' "$dump"
  # With --cache-sim=yes the events are Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
  if grep -q '^events: Ir Dr Dw I1mr D1mr D1mw' "$dump"; then
    awk -v n="$n" -v w="$workload" -v b="$(basename "$bin")" '/^(summary|totals):/ {
      printf "| %s | %s | %.1f | %.1f | %.1f |\n", w, b, $5 / n, $6 / n, $7 / n; exit }' \
      "$dump" >>"$WORK/misses"
  fi
}

if [ -n "$OTHER" ]; then
  echo "| workload | $(basename "$BIN") | $(basename "$OTHER") | change |"
  echo "|---|---:|---:|---:|"
else
  echo "| workload | instructions |"
  echo "|---|---:|"
fi
for w in $WORKLOADS; do
  a=$(count "$BIN" "$w")
  if [ -n "$OTHER" ]; then
    b=$(count "$OTHER" "$w")
    echo "| $w | $a | $b | $(python3 -c "print(f'{($a - $b) / $b * 100:+.1f} %')") |"
  else
    echo "| $w | $a |"
  fi
done
if [ -s "$WORK/misses" ]; then
  echo
  echo "| workload | binary | I1 misses | D1 read misses | D1 write misses |"
  echo "|---|---|---:|---:|---:|"
  cat "$WORK/misses"
fi
