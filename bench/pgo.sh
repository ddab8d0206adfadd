#!/usr/bin/env bash
# A profile-guided release build of pgsluice: build it instrumented, run the benchmark's
# workloads through it, then build it again with what it recorded, so the compiler lays out
# the hot path (the relay, the pool, tokio's readiness and tasks) for the instruction cache
# and the branches as they are taken. See docs/performance.md for what it saves.
#
#   bench/pgo.sh [OUT]        OUT defaults to target/release-pgo/pgsluice
#
# Trains against the PostgreSQL of a running `bench/compare.sh --serve` (its serve.env:
# PGO_SERVE_ENV=path, or the newest one under bench/results if its PostgreSQL answers);
# without one, it starts its own
# (`compare.sh --serve` with the direct target only) and stops it at the end. Needs what
# compare.sh needs, and llvm-profdata of rustc's LLVM version:
# `rustup component add llvm-tools-preview` (or PGO_PROFDATA=path).
#
#   PGO_SECONDS=5            length of each training run
#   PGO_PORT=6790            port of the instrumented pgsluice
#   PGO_TARGET_DIR=target    cargo's target directory (builds go to pgo-gen/ and pgo-use/)
#
# The training covers what production runs most: pgbench select-only (simple, extended and
# prepared protocol) and TPC-B-like at 16 and 500 clients, through one worker thread and
# through two, and a storm of short SCRAM logins. Paths it does not run (TLS, say) stay
# compiled as in a plain release build.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
root=$(cd "$here/.." && pwd)
TARGET_DIR=${PGO_TARGET_DIR:-$root/target}
OUT=${1:-$TARGET_DIR/release-pgo/pgsluice}
SECS=${PGO_SECONDS:-5}
PORT=${PGO_PORT:-6790}

die() { echo "pgo.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
PROFDATA=${PGO_PROFDATA:-$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)}
[ -n "$PROFDATA" ] && [ -x "$PROFDATA" ] ||
  die "no llvm-profdata: rustup component add llvm-tools-preview (or set PGO_PROFDATA)"

WORK=$(mktemp -d)
chmod 755 "$WORK"
SERVE_PID=
stop_serve() {
  [ -n "$SERVE_PID" ] || return 0
  # Its TERM trap stops PostgreSQL.
  kill -TERM "$SERVE_PID" 2>/dev/null || true
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=
}
trap 'stop_serve; kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 20000 2>/dev/null || true

# live ENV_FILE: whether the PostgreSQL it names answers.
live() {
  (. "$1" && PATH="${PG_BIN:+$PG_BIN:}$PATH" &&
    psql -X -At -h 127.0.0.1 -p "$PORT_direct" -c "select 1" >/dev/null 2>&1)
}
ENV_FILE=${PGO_SERVE_ENV:-}
if [ -z "$ENV_FILE" ]; then
  newest=$(ls -t "$here"/results/*/serve.env 2>/dev/null | head -1 || true)
  if [ -n "$newest" ] && live "$newest"; then ENV_FILE=$newest; fi
fi
if [ -z "$ENV_FILE" ]; then
  log "starting a throwaway PostgreSQL (bench/compare.sh --serve)"
  BENCH_RESULTS="$WORK/results" BENCH_TARGETS=direct BENCH_SERVE_SECONDS=7200 \
    "$here/compare.sh" --serve >"$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 1200); do
    ENV_FILE=$(ls "$WORK"/results/*/serve.env 2>/dev/null | head -1 || true)
    [ -n "$ENV_FILE" ] && break
    kill -0 "$SERVE_PID" 2>/dev/null || die "compare.sh --serve ended: $(tail -5 "$WORK/serve.log")"
    sleep 0.5
  done
  [ -n "$ENV_FILE" ] || die "compare.sh --serve did not start in 10 minutes"
fi
live "$ENV_FILE" || die "the PostgreSQL of $ENV_FILE does not answer"
# shellcheck disable=SC1090
. "$ENV_FILE"
[ -n "${PORT_direct:-}" ] || die "$ENV_FILE names no direct PostgreSQL port"
# The PostgreSQL's own pgbench and psql first.
PATH="${PG_BIN:+$PG_BIN:}$PATH"
command -v pgbench >/dev/null || die "no pgbench in ${PG_BIN:-} or on PATH"

# The instrumented build's flags stay the same from run to run, so cargo reuses it; the
# build with the profile starts afresh each time (cargo does not track the profile's content).
RAW="$TARGET_DIR/pgo-gen/profraw"
log "building instrumented (release, $TARGET_DIR/pgo-gen)"
(cd "$root" && RUSTFLAGS="-Cprofile-generate=$RAW" \
  cargo build --release --quiet --target-dir "$TARGET_DIR/pgo-gen")
rm -rf "$RAW"

# train THREADS: runs the workloads through an instrumented pgsluice with THREADS workers.
train() {
  local threads=$1 pid
  bench_config "$WORK/p.toml" "$PORT" "$threads" scram-sha-256
  PGSLUICE_LOG=warn "$TARGET_DIR/pgo-gen/release/pgsluice" --config "$WORK/p.toml" \
    >"$WORK/pgsluice.log" 2>&1 &
  pid=$!
  bench_wait "$PORT" "$pid" "$WORK/pgsluice.log" 100 || die "the instrumented pgsluice did not start"
  local mode clients
  for mode in "-S" "-S -M extended" "-S -M prepared" ""; do
    for clients in 16 500; do
      log "training: $threads thread(s), pgbench ${mode:-tpcb} at $clients clients"
      # shellcheck disable=SC2086
      pgbench -n $mode -c "$clients" -j 2 -T "$SECS" -h 127.0.0.1 -p "$PORT" -U bench bench \
        >"$WORK/pgbench.log" 2>&1 || die "pgbench failed: $(tail -5 "$WORK/pgbench.log")"
    done
  done
  log "training: $threads thread(s), a storm of 500 SCRAM logins"
  python3 "$here/helper.py" storm --port "$PORT" --user bench --database bench \
    --password "$PGPASSWORD" --timeout 120 --n 500 --concurrency 100 >"$WORK/storm.json"
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(1 if d.get("errors") else 0)' \
    "$WORK/storm.json" || die "the training storm had errors: $(cat "$WORK/storm.json")"
  # The profile is written as the process exits (a graceful shutdown returns from main).
  kill -TERM "$pid"
  wait "$pid" || true
}

train 1
train 2
ls "$RAW"/*.profraw >/dev/null 2>&1 || die "the instrumented pgsluice wrote no profile"
"$PROFDATA" merge -o "$WORK/pgsluice.profdata" "$RAW"/*.profraw
stop_serve # (its own PostgreSQL, if it started one: not needed for the build)

log "building with the profile ($TARGET_DIR/pgo-use)"
rm -rf "$TARGET_DIR/pgo-use"
(cd "$root" && RUSTFLAGS="-Cprofile-use=$WORK/pgsluice.profdata" \
  cargo build --release --quiet --target-dir "$TARGET_DIR/pgo-use")
mkdir -p "$(dirname "$OUT")"
cp "$TARGET_DIR/pgo-use/release/pgsluice" "$OUT"
log "wrote $OUT"
