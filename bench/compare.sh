#!/usr/bin/env bash
# pgsluice vs PgBouncer vs direct PostgreSQL, side by side in one run.
#
#   bench/compare.sh            full run (about 45 minutes with the defaults on 2 cores)
#   bench/compare.sh --serve    set everything up, print how to reach it, and wait (for
#                               profiling by hand; BENCH_SERVE_SECONDS=3600, Ctrl-C ends it)
#   bench/compare.sh --smoke    ~20 s check that the benchmark still works (CI): debug build,
#                               1 s runs, 16 clients, select-only, 100 idle clients, storm of 50
#
# Builds pgsluice, starts a throwaway PostgreSQL (fsync off) in a temporary directory as the
# postgres user, starts pgsluice (worker_threads 0 and 1) and PgBouncer (if installed) in
# transaction mode with pool size 20 and the same SCRAM verifier, then runs pgbench through
# each and directly, interleaved (A B direct, B direct A, ...) so that machine noise hits all
# alike. Writes results.md, results.json and the raw runs under bench/results/DATE/.
# See docs/performance.md for the method and how to read the figures.
#
# Settings (environment):
#   BENCH_SECONDS=10         length of each pgbench run
#   BENCH_REPEATS=3          rounds; figures are medians, ratios are paired per round
#   BENCH_CLIENTS="16 100 500 1000"
#   BENCH_WORKLOADS="select-simple select-extended select-prepared tpcb"
#                            Also: select-orm (bench/orm.sql: one 630-byte SELECT as an ORM
#                            writes it, with quoted names, function calls and an IN list)
#   BENCH_TARGETS="pgsluice pgsluice-1t pgbouncer direct"
#                            pgsluice = worker_threads 0 (one per core), pgsluice-1t = 1
#                            Also (not in the default list): pgsluice-unix, pgsluice-unix-1t
#                            (pgbench -> pgsluice over its listen_unix socket, pgsluice ->
#                            PostgreSQL over its socket directory: the sidecar shape) and
#                            pgbouncer-unix (the same legs through PgBouncer's unix_socket_dir);
#                            pgsluice-uring: 1 thread with io_uring = 1 (sockets through io_uring);
#                            pgsluice-2p: two 1-thread processes on one port (so_reuseport),
#                            each with half the pool (CPU and RSS are the two processes' sums)
#   BENCH_ALT_BIN            another pgsluice binary (say, a build of main before a change): adds
#                            targets pgsluice-alt and pgsluice-alt-1t unless BENCH_TARGETS is set
#   BENCH_JOBS=2             pgbench threads (-j)
#   BENCH_SCALE=10           pgbench scale
#   BENCH_IDLE="2000 10000"  idle-client counts for RSS per client ("" skips)
#   BENCH_STORM=1000         clients in the connect-query-leave storm (0 skips)
#   BENCH_STORM_AUTH="scram-sha-256 trust"
#   BENCH_STORM_REPEATS=$BENCH_REPEATS  storm rounds, the targets' order rotated each round;
#                            CPU per connection is the median, ratios are paired per round
#   BENCH_PERF_CLIENTS="16 100 500"  client counts of the syscall-count pass with perf
#                            tracepoints (root; skipped without perf; "" skips)
#   BENCH_STRACE_CLIENTS="16 100"   client counts of the strace -c -f pass ("" skips)
#   BENCH_STRACE_SECONDS=5   length of each syscall pass
#   BENCH_PROFILE=release    cargo profile of pgsluice (debug in --smoke)
#   BENCH_PG_BIN             PostgreSQL bin directory (default: newest /usr/lib/postgresql/*/bin)
#   BENCH_RESULTS=bench/results
#   BENCH_KEEP=0             1 keeps the temporary directory (configs, logs, pgbench logs)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
HELPER="$HERE/helper.py"
PY=${PYTHON:-python3}

SMOKE=0
SERVE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --serve) SERVE=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

if [ "$SMOKE" = 1 ]; then
  SECONDS_PER_RUN=${BENCH_SECONDS:-1}
  REPEATS=${BENCH_REPEATS:-1}
  CLIENTS=${BENCH_CLIENTS:-16}
  WORKLOADS=${BENCH_WORKLOADS:-select-simple}
  TARGETS=${BENCH_TARGETS:-pgsluice pgbouncer direct}
  SCALE=${BENCH_SCALE:-1}
  IDLE=${BENCH_IDLE-100}
  STORM=${BENCH_STORM:-50}
  STORM_AUTH=${BENCH_STORM_AUTH:-scram-sha-256}
  STRACE_CLIENTS=${BENCH_STRACE_CLIENTS-}
  PERF_CLIENTS=${BENCH_PERF_CLIENTS-}
  STRACE_SECONDS=${BENCH_STRACE_SECONDS:-1}
  PROFILE=${BENCH_PROFILE:-debug}
  WARMUP=1
else
  SECONDS_PER_RUN=${BENCH_SECONDS:-10}
  REPEATS=${BENCH_REPEATS:-3}
  CLIENTS=${BENCH_CLIENTS:-16 100 500 1000}
  WORKLOADS=${BENCH_WORKLOADS:-select-simple select-extended select-prepared tpcb}
  SCALE=${BENCH_SCALE:-10}
  IDLE=${BENCH_IDLE-2000 10000}
  STORM=${BENCH_STORM:-1000}
  STORM_AUTH=${BENCH_STORM_AUTH:-scram-sha-256 trust}
  STRACE_CLIENTS=${BENCH_STRACE_CLIENTS-16 100}
  PERF_CLIENTS=${BENCH_PERF_CLIENTS-16 100 500}
  STRACE_SECONDS=${BENCH_STRACE_SECONDS:-5}
  PROFILE=${BENCH_PROFILE:-release}
  WARMUP=3
fi
ALT_BIN=${BENCH_ALT_BIN:-}
if [ -n "$ALT_BIN" ]; then
  [ -x "$ALT_BIN" ] || { echo "BENCH_ALT_BIN: $ALT_BIN is not an executable" >&2; exit 2; }
  TARGETS=${TARGETS:-${BENCH_TARGETS:-pgsluice pgsluice-alt pgsluice-1t pgsluice-alt-1t pgbouncer direct}}
fi
TARGETS=${TARGETS:-${BENCH_TARGETS:-pgsluice pgsluice-1t pgbouncer direct}}
JOBS=${BENCH_JOBS:-2}
POOL_SIZE=20
KEEP=${BENCH_KEEP:-0}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- tools ---------------------------------------------------------------------------------
PG_BIN=${BENCH_PG_BIN:-}
if [ -z "$PG_BIN" ]; then
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$PG_BIN" ] || PG_BIN=$(pg_config --bindir 2>/dev/null || true)
fi
for tool in initdb pg_ctl psql pgbench; do
  [ -x "$PG_BIN/$tool" ] || die "$tool not found in '$PG_BIN' (set BENCH_PG_BIN)"
done
command -v "$PY" >/dev/null || die "python3 is needed for bench/helper.py"
command -v cargo >/dev/null || die "cargo is needed to build pgsluice"

PGBOUNCER=$(command -v pgbouncer || true)
if [ -z "$PGBOUNCER" ] && [ -x /usr/sbin/pgbouncer ]; then PGBOUNCER=/usr/sbin/pgbouncer; fi
if [ -z "$PGBOUNCER" ]; then
  log "PgBouncer is not installed (apt-get install pgbouncer): comparing with direct only"
  TARGETS=$(echo "$TARGETS" | tr ' ' '\n' | grep -vx -e pgbouncer -e pgbouncer-unix | tr '\n' ' ')
fi
STRACE=$(command -v strace || true)
[ -n "$STRACE" ] || STRACE_CLIENTS=""
# Syscall tracepoints need perf and root (or perf_event_paranoid <= 1 and tracefs access).
if ! command -v perf >/dev/null || ! perf stat -e syscalls:sys_enter_sendto -o /dev/null -- true >/dev/null 2>&1; then
  PERF_CLIENTS=""
fi

# PostgreSQL and PgBouncer refuse to run as root: run them as postgres.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "run as a normal user, or create the postgres user"
  as_pg() { runuser -u postgres -- "$@"; }
  PG_OWNER=postgres
else
  as_pg() { "$@"; }
  PG_OWNER=$(id -un)
fi

# Idle clients and 1000-client runs need file descriptors.
max_idle=0
for n in $IDLE; do [ "$n" -gt "$max_idle" ] && max_idle=$n; done
max_clients=0
for n in $CLIENTS; do [ "$n" -gt "$max_clients" ] && max_clients=$n; done
# (the storm's clients are all connected at once, like the idle ones)
[ "$STORM" -gt "$max_idle" ] && max_idle=$STORM
want_fds=$((max_idle + max_clients + 1000))
ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
FDS=$(ulimit -n)
if [ "$FDS" -lt "$want_fds" ]; then
  log "ulimit -n is $FDS (hard limit): idle-client counts above $((FDS - 200)) are skipped"
fi
n_proxies=$(echo "$TARGETS" | tr ' ' '\n' | grep -c -v -e '^direct$' -e '^$' || true)
MAX_CONN=$((max_clients + (n_proxies + 1) * POOL_SIZE + 40))

# --- build ---------------------------------------------------------------------------------
case "$PROFILE" in
  debug | dev) PROFILE=dev PROFILE_DIR=debug ;;
  *) PROFILE_DIR=$PROFILE ;;
esac
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET_DIR/$PROFILE_DIR/pgsluice"
# Not when no target runs this tree's build (bench/pgo.sh's PostgreSQL: direct only).
needs_build=0
for t in $TARGETS; do
  case $t in pgsluice-alt*) ;; pgsluice*) needs_build=1 ;; esac
done
if [ "$needs_build" = 1 ]; then
  log "building pgsluice ($PROFILE)"
  (cd "$ROOT" && cargo build --profile "$PROFILE" --quiet --bin pgsluice)
  [ -x "$BIN" ] || die "no binary at $BIN"
fi

# --- results and scratch -------------------------------------------------------------------
STAMP=$(date +%Y%m%d-%H%M%S)
[ "$SMOKE" = 1 ] && STAMP="$STAMP-smoke"
RESULTS="${BENCH_RESULTS:-$ROOT/bench/results}/$STAMP"
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/pgsluice-bench.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/pgb" "$WORK/pg" "$WORK/logs"
chmod 700 "$WORK/pg"
[ "$(id -u)" = 0 ] && chown "$PG_OWNER" "$WORK/pgb" "$WORK/pg"

declare -A PORT PID HOST
# Where pgbench connects: 127.0.0.1, or a socket directory for the *-unix targets.
host_of() { echo "${HOST[$1]:-127.0.0.1}"; }
PG_STARTED=0

stop_pid() { # pid (or pid,pid,...): SIGTERM, wait up to 10 s, then SIGKILL
  local pid i
  for pid in ${1//,/ }; do
    [ -n "$pid" ] && [ "$pid" != 0 ] || continue
    kill -TERM "$pid" 2>/dev/null || continue
    for i in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

cleanup() {
  local t
  # Background helpers (the --serve sleep).
  jobs -p | xargs -r kill 2>/dev/null || true
  for t in "${!PID[@]}"; do stop_pid "${PID[$t]}"; done
  # A PgBouncer interrupted before its PID was read (it daemonizes): its pid file.
  for t in "$WORK"/pgb/*.pid; do [ -s "$t" ] && stop_pid "$(cat "$t")"; done
  if [ "$PG_STARTED" = 1 ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

freeport() { "$PY" "$HELPER" freeport; }

wait_port() { # port: until it accepts, at most 20 s
  local i
  for i in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# --- PostgreSQL ----------------------------------------------------------------------------
PASSWORD="bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
PORT[direct]=$(freeport)
log "starting PostgreSQL on 127.0.0.1:${PORT[direct]} (max_connections $MAX_CONN, scale $SCALE) in $WORK"
printf '%s\n' "$PASSWORD" >"$WORK/pgb/pwfile"
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1 || {
  cat "$WORK/initdb.log" >&2
  die "initdb failed"
}
shared_buffers=512MB
[ "$SMOKE" = 1 ] && shared_buffers=128MB
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = ${PORT[direct]}
unix_socket_directories = '$WORK/pgb'
max_connections = $MAX_CONN
shared_buffers = $shared_buffers
fsync = off
synchronous_commit = off
full_page_writes = off
autovacuum = off
max_wal_size = 4GB
checkpoint_timeout = 1h
password_encryption = 'scram-sha-256'
EOF
# Counted as started before pg_ctl returns: an interrupt while it waits must still stop it.
PG_STARTED=1
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pgb/postgres.log" -w -t 60 start >/dev/null ||
  die "PostgreSQL did not start (see $WORK/pgb/postgres.log)"
psql_admin() { as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK/pgb" -p "${PORT[direct]}" -U postgres "$@"; }
psql_admin -d postgres -c "CREATE ROLE bench LOGIN PASSWORD '$PASSWORD'" -c "CREATE DATABASE bench OWNER bench"
as_pg "$PG_BIN/pgbench" -i -q -s "$SCALE" -h "$WORK/pgb" -p "${PORT[direct]}" -U bench bench >"$WORK/pgbench-init.log" 2>&1 ||
  die "pgbench -i failed (see $WORK/pgbench-init.log)"
VERIFIER=$(psql_admin -d postgres -At -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'bench'")
case "$VERIFIER" in SCRAM-SHA-256*) ;; *) die "no SCRAM verifier for role bench" ;; esac
export PGPASSWORD="$PASSWORD"

# --- proxies -------------------------------------------------------------------------------
# Both proxies check client passwords against the same SCRAM verifier (no PBKDF2 per login);
# with auth "trust" they check nothing. pgsluice logs in to PostgreSQL with the plain-text
# password (PBKDF2 once per server connection, 20 per pool); PgBouncer reuses the client's
# SCRAM keys with the verifier, or the plain-text password under trust.
start_pgsluice() { # target workers auth [binary] [unix] [processes] [io_uring]
  local t=$1 workers=$2 auth=$3 bin=${4:-$BIN} unix=${5:-0} procs=${6:-1} uring=${7:-0} upstream=127.0.0.1 listen_unix=""
  # Several processes share the port (so_reuseport) and split the pool between them.
  local reuse=0 pool=$POOL_SIZE
  [ "$procs" -gt 1 ] && reuse=1 pool=$(((POOL_SIZE + procs - 1) / procs))
  PORT[$t]=$(freeport)
  if [ "$unix" = 1 ]; then
    # Both legs over Unix sockets: clients in $WORK/$t.sock, PostgreSQL's socket directory.
    mkdir -p "$WORK/$t.sock"
    HOST[$t]=$WORK/$t.sock listen_unix=$WORK/$t.sock upstream=$WORK/pgb
  fi
  cat >"$WORK/$t.toml" <<EOF
listen = "127.0.0.1:${PORT[$t]}"
listen_unix = "$listen_unix"
so_reuseport = $reuse
pool_mode = "transaction"
pool_size = $pool
max_client_conn = $((max_idle + max_clients + 500))
auth_type = "$auth"
worker_threads = $workers
io_uring = $uring

[budget]
max_server_connections = $((POOL_SIZE * 5))

[databases.bench]
host = "$upstream"
port = ${PORT[direct]}
password = "$PASSWORD"

[users.bench]
password = "$VERIFIER"
EOF
  local i pids=""
  for i in $(seq 1 "$procs"); do
    PGSLUICE_LOG=${PGSLUICE_LOG:-warn} "$bin" --config "$WORK/$t.toml" >>"$WORK/$t.log" 2>&1 &
    pids="$pids${pids:+,}$!"
    # One at a time: a second process must find the first one's listener.
    wait_port "${PORT[$t]}" || die "$t did not start (see $WORK/$t.log)"
  done
  PID[$t]=$pids
  for i in ${pids//,/ }; do kill -0 "$i" 2>/dev/null || die "$t did not start (see $WORK/$t.log)"; done
}

start_pgbouncer() { # auth [target] [unix]
  local auth=$1 t=${2:-pgbouncer} unix=${3:-0} upstream=127.0.0.1 sockdir=""
  PORT[$t]=$(freeport)
  if [ "$unix" = 1 ]; then
    mkdir -p "$WORK/$t.sock"
    [ "$(id -u)" = 0 ] && chown "$PG_OWNER" "$WORK/$t.sock"
    HOST[$t]=$WORK/$t.sock sockdir=$WORK/$t.sock upstream=$WORK/pgb
  fi
  if [ "$auth" = trust ]; then
    printf '"bench" "%s"\n' "$PASSWORD" >"$WORK/pgb/userlist.txt"
  else
    printf '"bench" "%s"\n' "$VERIFIER" >"$WORK/pgb/userlist.txt"
  fi
  cat >"$WORK/pgb/$t.ini" <<EOF
[databases]
bench = host=$upstream port=${PORT[direct]} dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${PORT[$t]}
unix_socket_dir = $sockdir
auth_type = $auth
auth_file = $WORK/pgb/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $((max_idle + max_clients + 500))
listen_backlog = 4096
log_connections = 0
log_disconnections = 0
logfile = $WORK/pgb/$t.log
pidfile = $WORK/pgb/$t.pid
EOF
  [ "$(id -u)" = 0 ] && chown "$PG_OWNER" "$WORK/pgb/userlist.txt" "$WORK/pgb/$t.ini"
  rm -f "$WORK/pgb/$t.pid"
  as_pg bash -c "ulimit -n $FDS; exec '$PGBOUNCER' -d '$WORK/pgb/$t.ini'" >>"$WORK/$t.out" 2>&1 ||
    die "PgBouncer did not start (see $WORK/pgb/$t.log)"
  local i
  for i in $(seq 1 100); do
    [ -s "$WORK/pgb/$t.pid" ] && break
    sleep 0.1
  done
  PID[$t]=$(cat "$WORK/pgb/$t.pid")
  wait_port "${PORT[$t]}" || die "PgBouncer did not start (see $WORK/pgb/$t.log)"
}

start_target() { # target auth
  case $1 in
    pgsluice) start_pgsluice pgsluice 0 "$2" ;;
    pgsluice-1t) start_pgsluice pgsluice-1t 1 "$2" ;;
    pgsluice-alt) start_pgsluice pgsluice-alt 0 "$2" "$ALT_BIN" ;;
    pgsluice-alt-1t) start_pgsluice pgsluice-alt-1t 1 "$2" "$ALT_BIN" ;;
    pgsluice-unix) start_pgsluice pgsluice-unix 0 "$2" "$BIN" 1 ;;
    pgsluice-unix-1t) start_pgsluice pgsluice-unix-1t 1 "$2" "$BIN" 1 ;;
    pgsluice-2p) start_pgsluice pgsluice-2p 1 "$2" "$BIN" 0 2 ;;
    pgsluice-uring) start_pgsluice pgsluice-uring 1 "$2" "$BIN" 0 1 1 ;;
    pgsluice-unix-uring) start_pgsluice pgsluice-unix-uring 1 "$2" "$BIN" 1 1 1 ;;
    pgbouncer) start_pgbouncer "$2" ;;
    pgbouncer-unix) start_pgbouncer "$2" pgbouncer-unix 1 ;;
    direct) PID[direct]=0 ;;
  esac
}

stop_target() {
  if [ "$1" != direct ]; then
    stop_pid "${PID[$1]:-}"
    PID[$1]=0
  fi
}

proxies() { echo "$TARGETS" | tr ' ' '\n' | grep -v -e '^direct$' -e '^$' || true; }
# The idle-client and storm passes connect over TCP (bench/helper.py): not the *-unix targets.
tcp_proxies() { proxies | grep -v -e '-unix' || true; }

# --- pgbench runs --------------------------------------------------------------------------
workload_args() {
  case $1 in
    select-simple) echo "-S -M simple" ;;
    select-extended) echo "-S -M extended" ;;
    select-prepared) echo "-S -M prepared" ;;
    tpcb) echo "-M simple" ;;
    select-orm) echo "-M simple -f $ROOT/bench/orm.sql" ;;
    *) die "unknown workload $1" ;;
  esac
}

statements_per_txn() { if [ "$1" = tpcb ]; then echo 7; else echo 1; fi; }

skip_run() { # target workload clients
  # PgBouncer before 1.21 has no prepared statements in transaction mode.
  if [ "$1" = pgbouncer ] && [ "$2" = select-prepared ]; then
    local v
    v=$("$PGBOUNCER" --version | sed -n 's/^PgBouncer \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    set -- $v
    [ "${1:-0}" -gt 1 ] || [ "${2:-0}" -ge 21 ] || return 0
  fi
  return 1
}

run_one() { # target workload clients repeat [seconds] [warmup]
  local t=$1 wl=$2 c=$3 r=$4 secs=${5:-$SECONDS_PER_RUN} warm=${6:-0}
  local pid=${PID[$t]:-0} dir="$WORK/logs/$t-$wl-$c-$r"
  mkdir -p "$dir"
  if [ "$pid" != 0 ] && [ -w "/proc/$pid/clear_refs" ]; then echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; fi
  local sargs=() p
  for p in ${pid//,/ }; do [ "$p" != 0 ] && sargs+=(--pid "$p"); done
  "$PY" "$HELPER" sample "${sargs[@]}" --interval 0.2 --max-seconds $((secs + 300)) --out "$dir/samples" &
  local spid=$! ec=0
  # shellcheck disable=SC2046
  timeout $((secs + 240)) "$PG_BIN/pgbench" -n -h "$(host_of "$t")" -p "${PORT[$t]}" -U bench -c "$c" -j "$JOBS" -T "$secs" \
    $(workload_args "$wl") -l --log-prefix="$dir/tx" bench >"$dir/out" 2>&1 || ec=$?
  stop_pid "$spid"
  wait "$spid" 2>/dev/null || true
  if [ "$warm" = 1 ]; then
    [ "$ec" = 0 ] || log "warm-up of $t failed: $(tail -3 "$dir/out")"
  else
    local res
    res=$("$PY" "$HELPER" analyze --target "$t" --workload "$wl" --clients "$c" --repeat "$r" --pid "$pid" \
      --exit-code "$ec" --log-prefix "$dir/tx" --pgbench-output "$dir/out" --samples "$dir/samples")
    echo "$res" >>"$RESULTS/runs.jsonl"
    "$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); print("  %-12s %-16s c=%-5s r=%s  tps=%-9s p99=%-8s cpu=%s us/txn (user %s)%s" % (r["target"], r["workload"], r["clients"], r["repeat"], r.get("tps"), r.get("p99_ms"), r.get("cpu_us_per_txn"), r.get("user_us_per_txn"), "  FAILED" if r.get("exit_code") or r.get("aborted") else ""), file=sys.stderr)' "$res"
    [ "$ec" = 0 ] || tail -5 "$dir/out" >&2
  fi
  [ "$KEEP" = 1 ] || rm -rf "$dir"
}

# --- meta ----------------------------------------------------------------------------------
commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then commit="$commit+dirty"; fi
"$PY" - "$RESULTS/meta.json" <<EOF
import json, os, sys
model = ""
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip(); break
except OSError:
    pass
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "cpus": os.cpu_count(), "cpu_model": model,
    "kernel": os.uname().release, "commit": "$commit",
    "pgsluice_version": "$([ -x "$BIN" ] && "$BIN" --version)", "profile": "$PROFILE",
    "pgbouncer_version": "$([ -n "$PGBOUNCER" ] && "$PGBOUNCER" --version | head -1)",
    "pg_version": "$("$PG_BIN/postgres" --version | awk '{print $3}')",
    "seconds": $SECONDS_PER_RUN, "repeats": $REPEATS, "scale": $SCALE, "jobs": $JOBS,
    "clients": "$CLIENTS", "workloads": "$WORKLOADS", "targets": "$TARGETS", "smoke": $SMOKE,
}, open(sys.argv[1], "w"), indent=1)
EOF

# --- 1. throughput, latency, CPU per transaction -------------------------------------------
for t in $TARGETS; do start_target "$t" scram-sha-256; done
log "targets: $(for t in $TARGETS; do printf '%s=%s ' "$t" "${PORT[$t]}"; done)"
if [ "$SERVE" = 1 ]; then
  {
    echo "export PGPASSWORD='$PASSWORD' PGUSER=bench PGDATABASE=bench PGHOST=127.0.0.1 PG_BIN='$PG_BIN'"
    for t in $TARGETS; do
      echo "export PORT_${t//-/_}=${PORT[$t]} PID_${t//-/_}=${PID[$t]:-0} HOST_${t//-/_}=$(host_of "$t")"
    done
  } >"$RESULTS/serve.env.tmp"
  # Whole or not at all: bench/pgo.sh starts as soon as the file is there.
  mv "$RESULTS/serve.env.tmp" "$RESULTS/serve.env"
  log "serving; source $RESULTS/serve.env, then e.g. pgbench -S -c 16 -T 10 -p \$PORT_pgsluice"
  # In the background and waited for: a SIGTERM or Ctrl-C then stops everything at once
  # (bash runs a trap only after the foreground command it waits for has ended).
  sleep "${BENCH_SERVE_SECONDS:-3600}" &
  wait $! || true
  exit 0
fi
if [ "$WARMUP" -gt 0 ]; then
  for t in $TARGETS; do run_one "$t" select-simple 16 0 "$WARMUP" 1; done
fi

read -r -a order <<<"$TARGETS"
n=${#order[@]}
for wl in $WORKLOADS; do
  for c in $CLIENTS; do
    for r in $(seq 1 "$REPEATS"); do
      log "$wl, $c clients, round $r/$REPEATS"
      for i in $(seq 0 $((n - 1))); do
        t=${order[$(((i + r - 1) % n))]}
        skip_run "$t" "$wl" "$c" && continue
        if [ "$t" = direct ] && [ "$c" -gt $((MAX_CONN - (n_proxies + 1) * POOL_SIZE - 5)) ]; then continue; fi
        run_one "$t" "$wl" "$c" "$r"
      done
    done
  done
done

# --- 2. syscalls per transaction (separate passes) -----------------------------------------
# perf counts syscall tracepoints in the kernel and barely slows the proxy; strace -c -f stops
# the proxy at every syscall, which batches more events per epoll_wait than a free run would.
syscall_pass() { # tool target workload clients seconds
  local tool=$1 t=$2 wl=$3 c=$4 secs=$5 dir="$WORK/logs/$1-$2-$3-$4" bpid t0 t1
  mkdir -p "$dir"
  # shellcheck disable=SC2046
  timeout $((secs + 240)) "$PG_BIN/pgbench" -n -h "$(host_of "$t")" -p "${PORT[$t]}" -U bench -c "$c" -j "$JOBS" \
    -T $((secs + 4 + c / 200)) $(workload_args "$wl") -l --log-prefix="$dir/tx" bench >"$dir/out" 2>&1 &
  bpid=$!
  sleep $((2 + c / 200)) # past the logins
  if [ "$tool" = perf ]; then
    local ev="" s
    for s in recvfrom sendto read write readv writev recvmsg sendmsg epoll_wait epoll_pwait futex sched_yield epoll_ctl io_uring_enter; do
      ev="$ev,syscalls:sys_enter_$s"
    done
    # The command runs between the counters' start and stop: its clock bounds the window.
    perf stat -x, -e "${ev#,}" -e syscalls:sys_exit_recvfrom --filter 'ret == -11' -p "${PID[$t]}" -o "$dir/counts" \
      -- sh -c "date +%s.%N >'$dir/t0'; sleep $secs; date +%s.%N >'$dir/t1'" >/dev/null 2>&1 || true
    t0=$(cat "$dir/t0" 2>/dev/null || echo 0)
    t1=$(cat "$dir/t1" 2>/dev/null || echo 0)
  else
    t0=$(date +%s.%N)
    local pargs=() p
    for p in ${PID[$t]//,/ }; do pargs+=(-p "$p"); done
    timeout -s INT "$secs" "$STRACE" -c -f -q "${pargs[@]}" -o "$dir/counts" 2>/dev/null || true
    t1=$(date +%s.%N)
  fi
  wait "$bpid" || log "pgbench failed during the $tool pass of $t: $(tail -2 "$dir/out")"
  if [ -s "$dir/counts" ]; then
    "$PY" "$HELPER" syscalls --tool "$tool" --target "$t" --workload "$wl" --clients "$c" --start "$t0" --end "$t1" \
      --statements "$(statements_per_txn "$wl")" --counts "$dir/counts" --log-prefix "$dir/tx" >>"$RESULTS/syscalls.jsonl"
  else
    log "no $tool counts for $t (is $tool allowed here?)"
  fi
  [ "$KEEP" = 1 ] || rm -rf "$dir"
}

for wl in select-simple tpcb; do
  echo " $WORKLOADS " | grep -q " $wl " || continue
  for c in $PERF_CLIENTS; do
    for t in $(proxies); do
      skip_run "$t" "$wl" "$c" && continue
      log "perf syscall counts: $t, $wl, $c clients"
      syscall_pass perf "$t" "$wl" "$c" "$STRACE_SECONDS"
    done
  done
  for c in $STRACE_CLIENTS; do
    for t in $(proxies); do
      skip_run "$t" "$wl" "$c" && continue
      log "strace -c -f: $t, $wl, $c clients"
      syscall_pass strace "$t" "$wl" "$c" "$STRACE_SECONDS"
    done
  done
done
for t in $TARGETS; do stop_target "$t"; done

# --- 3. idle clients: RSS per client (a fresh proxy each time) -----------------------------
rss_kib() { # pid (or pid,pid,...): the sum
  local p sum=0
  for p in ${1//,/ }; do sum=$((sum + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done
  echo "$sum"
}
for n in $IDLE; do
  if [ "$n" -gt $((FDS - 200)) ]; then continue; fi
  for t in $(tcp_proxies); do
    start_target "$t" scram-sha-256
    # The warm-up opens the pool and has as many clients at once as the idle pass (200), so
    # that what a proxy keeps for that many (spare read buffers, say) is in the baseline and
    # what is measured is what each idle client adds.
    "$PY" "$HELPER" storm --port "${PORT[$t]}" --user bench --database bench --password "$PASSWORD" --n 200 --concurrency 200 >/dev/null
    sleep 0.5
    before=$(rss_kib "${PID[$t]}")
    log "idle: $t, $n clients"
    fifo="$WORK/idle-$t-$n"
    "$PY" "$HELPER" idle --port "${PORT[$t]}" --user bench --database bench --password "$PASSWORD" --n "$n" \
      --concurrency 200 --hold 300 >"$fifo" 2>"$fifo.err" &
    ipid=$!
    for i in $(seq 1 1200); do
      [ -s "$fifo" ] && break
      kill -0 "$ipid" 2>/dev/null || break
      sleep 0.1
    done
    sleep 1
    after=$(rss_kib "${PID[$t]}")
    stop_pid "$ipid"
    wait "$ipid" 2>/dev/null || true
    "$PY" - "$t" "$n" "$before" "$after" "$fifo" >>"$RESULTS/idle.jsonl" <<'EOF'
import json, sys
t, n, before, after, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
try:
    r = json.loads(open(path).readline())
except ValueError:
    r = {"connected": 0, "errors": n, "first_error": "idle helper failed"}
r.update(target=t, clients=n, rss_before_kib=before, rss_after_kib=after,
         kib_per_client=round((after - before) / r["connected"], 3) if r["connected"] else None)
print(json.dumps(r))
EOF
    stop_target "$t"
  done
done

# --- 4. connection storm: proxy CPU per connection -----------------------------------------
# Rounds, the targets' order rotated each round as in the pgbench runs: one storm is a few
# seconds, and a slower second on the machine would otherwise decide the ratio.
STORM_REPEATS=${BENCH_STORM_REPEATS:-$REPEATS}
if [ "$STORM" -gt 0 ]; then
  read -r -a storm_order <<<"$(tcp_proxies | tr '\n' ' ')"
  ns=${#storm_order[@]}
  for r in $(seq 1 "$STORM_REPEATS"); do
    for auth in $STORM_AUTH; do
      for i in $(seq 0 $((ns - 1))); do
        t=${storm_order[$(((i + r - 1) % ns))]}
        start_target "$t" "$auth"
        # Open the pool first: the storm measures logins, not server connections.
        "$PY" "$HELPER" storm --port "${PORT[$t]}" --user bench --database bench --password "$PASSWORD" --n 40 --concurrency 40 >/dev/null
        log "storm: $t, $auth, $STORM clients, round $r/$STORM_REPEATS"
        res=$("$PY" "$HELPER" storm --port "${PORT[$t]}" --user bench --database bench --password "$PASSWORD" \
          --n "$STORM" --concurrency "$STORM" --timeout 120 --pid "${PID[$t]}")
        "$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(target=sys.argv[2], auth=sys.argv[3], repeat=int(sys.argv[4])); print(json.dumps(r))' \
          "$res" "$t" "$auth" "$r" >>"$RESULTS/storm.jsonl"
        stop_target "$t"
      done
    done
  done
fi

# --- report --------------------------------------------------------------------------------
check=()
[ "$SMOKE" = 1 ] && check=(--check)
"$PY" "$HELPER" report --dir "$RESULTS" "${check[@]}" >/dev/null || {
  cat "$RESULTS/results.md"
  die "some runs or connections failed (see above)"
}
cat "$RESULTS/results.md"
log "results: $RESULTS/results.md and results.json"
