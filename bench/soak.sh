#!/usr/bin/env bash
# Soak: a bounded mixed load through pgsluice for a set time, with a reload and an upstream
# restart in the middle; RSS and fds over time, errors by SQLSTATE, leak checks at the end.
#
#   bench/soak.sh                 30 minutes (SOAK_MINUTES)
#   SOAK_MINUTES=3 bench/soak.sh  a short check of the script itself
#
# Starts a throwaway PostgreSQL (as bench/compare.sh does) and pgsluice (transaction mode,
# pool_size 10, SCRAM, admin console, /metrics), then for the whole time:
#   - bench/soak.py: ledger clients (BEGIN; INSERT (client, seq); COMMIT, reconnecting after
#     1-60 transactions), a cancel client (pg_sleep(3) cancelled after 0.3 s), the samples,
#     and the events: admin RELOAD at 40%, SIGHUP at 45%, `pg_ctl restart -m fast` at 60%;
#   - pgbench -M prepared (TPC-B-like, rate-limited), runs of 60 s, every other run with -C
#     (a new connection per transaction), restarted when the upstream restart aborts it.
# Then the end checks: server connections in pg_stat_activity == pgsluice's gauge, none idle
# in transaction or stuck in ClientRead, client gauge back to baseline, SELECT 1 works, no
# panic in pgsluice's log, no lost transaction (acknowledged COMMIT whose row is missing)
# and no phantom one (a transaction the client was told failed whose row exists).
# Writes summary.md, summary.json, samples.jsonl and logs under bench/results/soak-DATE/.
# Exits 1 if a check fails or RSS grew by more than SOAK_MAX_MB_PER_HOUR after warm-up.
#
# Settings (environment):
#   SOAK_MINUTES=30          duration of the load
#   SOAK_WARMUP_MINUTES=5    excluded from the RSS growth fit (least squares over samples)
#   SOAK_CLIENTS=6           ledger clients
#   SOAK_PGBENCH_CLIENTS=8   pgbench clients
#   SOAK_PGBENCH_RATE=100    pgbench transactions per second (all clients; a quarter with -C)
#   SOAK_SAMPLE_SECONDS=10
#   SOAK_MAX_MB_PER_HOUR=1
#   SOAK_NICE=10             nice level of the load and of pgsluice
#   SOAK_PROFILE=release     cargo profile of pgsluice
#   SOAK_RESULTS=bench/results
#   SOAK_KEEP=0              1 keeps the temporary directory
#   BENCH_PG_BIN             PostgreSQL bin directory (default: newest /usr/lib/postgresql/*/bin)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python3}
MINUTES=${SOAK_MINUTES:-30}
WARMUP_MINUTES=${SOAK_WARMUP_MINUTES:-5}
CLIENTS=${SOAK_CLIENTS:-6}
PGB_CLIENTS=${SOAK_PGBENCH_CLIENTS:-8}
PGB_RATE=${SOAK_PGBENCH_RATE:-100}
SAMPLE=${SOAK_SAMPLE_SECONDS:-10}
MAX_GROWTH=${SOAK_MAX_MB_PER_HOUR:-1}
NICE=${SOAK_NICE:-10}
PROFILE=${SOAK_PROFILE:-release}
KEEP=${SOAK_KEEP:-0}
POOL_SIZE=10

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

PG_BIN=${BENCH_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)}
for tool in initdb pg_ctl psql pgbench; do
  [ -x "$PG_BIN/$tool" ] || die "$tool not found in '$PG_BIN' (set BENCH_PG_BIN)"
done
if [ "$(id -u)" = 0 ]; then
  as_pg() { runuser -u postgres -- "$@"; }
  PG_OWNER=postgres
else
  as_pg() { "$@"; }
  PG_OWNER=$(id -un)
fi

log "building pgsluice ($PROFILE)"
case "$PROFILE" in
  debug | dev) PROFILE=dev PROFILE_DIR=debug ;;
  *) PROFILE_DIR=$PROFILE ;;
esac
(cd "$ROOT" && nice -n "$NICE" cargo build --profile "$PROFILE" --quiet --bin pgsluice)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE_DIR/pgsluice"

STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS="${SOAK_RESULTS:-$ROOT/bench/results}/soak-$STAMP"
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/pgsluice-soak.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/pg" "$WORK/run"
chmod 700 "$WORK/pg"
[ "$(id -u)" = 0 ] && chown "$PG_OWNER" "$WORK/pg" "$WORK/run"
PG_STARTED=0
PGSLUICE_PID=
LOAD_PID=

cleanup() {
  [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null || true
  if [ -n "$PGSLUICE_PID" ]; then
    kill -TERM "$PGSLUICE_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$PGSLUICE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PGSLUICE_PID" 2>/dev/null || true
  fi
  [ "$PG_STARTED" = 1 ] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  cp "$WORK"/*.log "$RESULTS/" 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

freeport() { "$PY" "$HERE/helper.py" freeport; }
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# --- PostgreSQL ----------------------------------------------------------------------------
PASSWORD="soak-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
PG_PORT=$(freeport)
log "starting PostgreSQL on 127.0.0.1:$PG_PORT in $WORK"
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1 || die "initdb failed (see $WORK/initdb.log)"
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/run'
max_connections = 100
shared_buffers = 128MB
fsync = off
full_page_writes = off
password_encryption = 'scram-sha-256'
EOF
PG_LOG="$WORK/run/postgres.log"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$PG_LOG" -w -t 60 start >/dev/null ||
  die "PostgreSQL did not start (see $PG_LOG)"
PG_STARTED=1
psql_admin() { as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK/run" -p "$PG_PORT" -U postgres "$@"; }
psql_admin -d postgres -c "CREATE ROLE soak LOGIN PASSWORD '$PASSWORD'" -c "CREATE DATABASE soak OWNER soak"
as_pg "$PG_BIN/pgbench" -i -q -s 1 -h "$WORK/run" -p "$PG_PORT" -U soak soak >"$WORK/pgbench-init.log" 2>&1 ||
  die "pgbench -i failed"
psql_admin -d soak -c "CREATE TABLE soak_ledger (client int, seq int, at timestamptz DEFAULT now(), PRIMARY KEY (client, seq))" \
  -c "ALTER TABLE soak_ledger OWNER TO soak"
VERIFIER=$(psql_admin -d postgres -At -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'soak'")

# --- pgsluice ------------------------------------------------------------------------------
PORT=$(freeport)
METRICS_PORT=$(freeport)
cat >"$WORK/pgsluice.toml" <<EOF
listen = "127.0.0.1:$PORT"
pool_mode = "transaction"
pool_size = $POOL_SIZE
max_client_conn = 500
auth_type = "scram-sha-256"
admin_users = ["soak"]
worker_threads = 2

[metrics]
listen = "127.0.0.1:$METRICS_PORT"

[databases.soak]
host = "127.0.0.1"
port = $PG_PORT
password = "$PASSWORD"

[users.soak]
password = "$VERIFIER"
EOF
PGSLUICE_LOG=${PGSLUICE_LOG:-info} nice -n "$NICE" "$BIN" --config "$WORK/pgsluice.toml" >"$WORK/pgsluice.log" 2>&1 &
PGSLUICE_PID=$!
wait_port "$PORT" || die "pgsluice did not start (see $WORK/pgsluice.log)"
wait_port "$METRICS_PORT" || die "pgsluice's /metrics did not start"
log "pgsluice (pid $PGSLUICE_PID) on 127.0.0.1:$PORT, metrics on $METRICS_PORT; load for $MINUTES min"

# --- load ----------------------------------------------------------------------------------
BASELINE=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | awk '/^pgsluice_client_connections/ {s += $NF} END {print s + 0}')
DURATION=$((MINUTES * 60))
END=$(($(date +%s) + DURATION))
export PGPASSWORD="$PASSWORD"
DONE_FILE="$WORK/pgbench.done"
(
  run=0
  while [ "$(date +%s)" -lt "$END" ]; do
    left=$((END - $(date +%s)))
    t=$((left < 60 ? left : 60))
    [ "$t" -ge 2 ] || break
    run=$((run + 1))
    conn_flag="" rate=$PGB_RATE
    if [ $((run % 2)) = 0 ]; then conn_flag="-C" rate=$((PGB_RATE / 4 + 1)); fi
    echo "=== run $run: -T $t $conn_flag" >>"$WORK/pgbench.log"
    nice -n "$NICE" "$PG_BIN/pgbench" -n -M prepared -c "$PGB_CLIENTS" -j 1 -T "$t" -R "$rate" \
      $conn_flag -h 127.0.0.1 -p "$PORT" -U soak soak >>"$WORK/pgbench.log" 2>&1 || true
    sleep 1
  done
  touch "$DONE_FILE"
) &
LOAD_PID=$!

RESTART="'$PG_BIN/pg_ctl' -D '$WORK/pg' -l '$PG_LOG' -m fast -w -t 60 restart"
[ "$(id -u)" = 0 ] && RESTART="runuser -u postgres -- $RESTART"
nice -n "$NICE" "$PY" "$HERE/soak.py" --port "$PORT" --pg-port "$PG_PORT" \
  --metrics "127.0.0.1:$METRICS_PORT" --pid "$PGSLUICE_PID" --user soak --password "$PASSWORD" \
  --database soak --duration "$DURATION" --warmup $((WARMUP_MINUTES * 60)) --clients "$CLIENTS" \
  --sample-seconds "$SAMPLE" --restart-cmd "$RESTART" --wait-file "$DONE_FILE" --baseline-clients "$BASELINE" --out "$RESULTS" ||
  die "soak.py failed"
wait "$LOAD_PID" || true
LOAD_PID=
cp "$WORK/pgbench.log" "$WORK/pgsluice.log" "$RESULTS/"
cp "$PG_LOG" "$RESULTS/postgres.log" 2>/dev/null || true

# --- summary -------------------------------------------------------------------------------
"$PY" - "$RESULTS" "$MAX_GROWTH" "$MINUTES" <<'EOF'
import json, re, sys
out, max_growth, minutes = sys.argv[1], float(sys.argv[2]), sys.argv[3]
r = json.load(open(f"{out}/soak-client.json"))
pgb = open(f"{out}/pgbench.log", errors="replace").read()
processed = sum(int(x) for x in re.findall(r"number of transactions actually processed: (\d+)", pgb))
failed = sum(int(x) for x in re.findall(r"number of failed transactions: (\d+)", pgb))
aborted = len(re.findall(r"client \d+ aborted", pgb))
errs = {}
for m in re.findall(r"(?:ERROR|FATAL):\s+(.{0,70})", pgb):
    key = re.sub(r"\d+", "N", m.strip())
    errs[key] = errs.get(key, 0) + 1
log = open(f"{out}/pgsluice.log", errors="replace").read()
panics = len(re.findall(r"panicked", log))
r["pgbench"] = {"runs": len(re.findall(r"^=== run", pgb, re.M)), "transactions": processed,
                "failed": failed, "clients_aborted": aborted, "errors": errs}
r["checks"]["panics_in_log"] = panics
c = r["checks"]
growth = r["rss_growth_mb_per_hour_after_warmup"]
verdicts = {
    "no lost transaction": c["lost"] == 0,
    "no phantom transaction": c["phantom"] == 0,
    "server connections == gauge": c["servers_match"],
    "none idle in transaction": c["idle_in_transaction"] == 0,
    "none stuck in ClientRead": c["stuck_in_client_read"] == 0,
    "clients back to baseline": c["clients_back_to_baseline"],
    "SELECT 1 works": c["select_1_ok"] and c["select_1_seconds"] < 1,
    "no panic": panics == 0,
    f"RSS growth < {max_growth} MB/h after warm-up": growth is not None and growth < max_growth,
    "events succeeded": all(e["ok"] for e in r["events"]),
}
r["verdicts"] = verdicts
r["passed"] = all(verdicts.values())
json.dump(r, open(f"{out}/summary.json", "w"), indent=2)
mib = lambda k: "?" if k is None else f"{k / 1024:.1f} MiB"
lines = [f"# Soak: {minutes} min", "",
         "| figure | value |", "|---|---|",
         f"| RSS start / after warm-up / end / max | {mib(r['rss_kib_start'])} / {mib(r['rss_kib_after_warmup'])} / {mib(r['rss_kib_end'])} / {mib(r['rss_kib_max'])} |",
         f"| RSS growth after warm-up (least squares) | {growth if growth is None else f'{growth:.2f}'} MB/h |",
         f"| fds start / end / max | {r['fds_start']} / {r['fds_end']} / {r['fds_max']} |",
         f"| ledger transactions committed / failed / unknown outcome | {c['commits_acknowledged']} / {r['transactions_failed']} / {c['unknown_outcome']} |",
         f"| lost / phantom | {c['lost']} / {c['phantom']} |",
         f"| ledger connects (failed) | {r['connects']} ({r['connect_failures']}) |",
         f"| cancels took effect / missed / errors | {r['cancels_ok']} / {r['cancels_missed']} / {r['cancel_errors']} |",
         f"| pgbench -M prepared runs / transactions / failed / clients aborted | {r['pgbench']['runs']} / {processed} / {failed} / {aborted} |",
         f"| server conns pg_stat_activity / gauge | {c['server_connections_in_pg_stat_activity']} / {c['server_connections_gauge']:.0f} |",
         f"| idle in transaction / ClientRead | {c['idle_in_transaction']} / {c['stuck_in_client_read']} |",
         f"| clients gauge end / baseline | {c['clients_gauge']:.0f} / {c['clients_baseline']:.0f} |",
         f"| SELECT 1 after | {'ok' if c['select_1_ok'] else 'FAILED'} in {c['select_1_seconds']} s |",
         "", "Errors seen by the ledger and cancel clients (SQLSTATE or kind):", ""]
lines += [f"- `{k}`: {v}" for k, v in r["errors_by_sqlstate"].items()] or ["- none"]
lines += ["", "pgbench errors (message, digits as N):", ""]
lines += [f"- `{k}`: {v}" for k, v in sorted(errs.items())] or ["- none"]
lines += ["", "Events:", ""] + [f"- t={e['t']} s: {e['event']}: {'ok' if e['ok'] else 'FAILED ' + e['detail']}" for e in r["events"]]
lines += ["", "Verdicts:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {k}" for k, ok in verdicts.items()]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if r["passed"] else 1)
EOF
