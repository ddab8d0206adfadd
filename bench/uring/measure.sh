#!/usr/bin/env bash
# io_uring vs epoll (tokio) for a 1:1 pass-through relay: CPU per transaction and syscalls.
#
#   bench/uring/measure.sh        (about 12 minutes with the defaults on 2 cores; run as root)
#
# Builds uring-relay (release), starts a throwaway PostgreSQL (fsync off, trust for
# 127.0.0.1, pgbench scale 10) as the postgres user, starts the relay in each mode on its own
# port, and runs pgbench select-only through each and directly, interleaved by round (the
# order rotates each round) so that machine noise hits all alike. Per run: TPS and the
# relay's user and system CPU from /proc/PID/stat -> CPU us per transaction. Then a short
# syscall pass per relay (perf tracepoints, or strace -c -f without perf).
#
# Settings (environment):
#   URING_SECONDS=10                  length of each timed pgbench run
#   URING_ROUNDS=3                    rounds; figures are medians, ratios paired per round
#   URING_RUNS="simple:16 simple:100 extended:16"   protocol:clients
#   URING_TARGETS="epoll epoll-raw uring uring-link uring-ms direct"
#        epoll    = --mode epoll (tokio current-thread, edge-triggered epoll)
#        epoll-raw = --mode epoll-raw (one thread, a plain epoll_wait loop, no tokio)
#        uring    = --mode uring (single-shot RECV re-armed after each SEND, POLL_FIRST,
#                   SINGLE_ISSUER + DEFER_TASKRUN)
#        uring-ms = --mode uring --multishot (multishot RECV + provided buffer ring)
#        uring-link = --mode uring --link (the RECV re-armed in the same enter as the SEND,
#                   linked behind it)
#        uring-plain = --mode uring --no-poll-first --no-defer-taskrun (not in the default list)
#        usend    = --mode usend (epoll's reads; sends queued on a ring, one enter per runtime
#                   turn; SINGLE_ISSUER + DEFER_TASKRUN; not in the default list)
#        usend-coop = --mode usend --no-defer-taskrun (COOP_TASKRUN instead)
#   URING_SYSCALL_SECONDS=5           length of each syscall pass ("0" skips the pass)
#   URING_PG_BIN=/usr/lib/postgresql/15/bin
#   URING_RESULTS=bench/uring/results
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SECS=${URING_SECONDS:-10}
ROUNDS=${URING_ROUNDS:-3}
RUNS=${URING_RUNS:-simple:16 simple:100 extended:16}
TARGETS=${URING_TARGETS:-epoll epoll-raw uring uring-link uring-ms direct}
SYS_SECS=${URING_SYSCALL_SECONDS:-5}
PG_BIN=${URING_PG_BIN:-/usr/lib/postgresql/15/bin}
OUT=${URING_RESULTS:-$HERE/results}/$(date +%Y%m%d-%H%M%S)
JOBS=2

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (PostgreSQL runs via runuser -u postgres)"
for t in initdb pg_ctl pgbench; do [ -x "$PG_BIN/$t" ] || die "$PG_BIN/$t missing"; done
mkdir -p "$OUT"

log "building uring-relay (release)"
(cd "$HERE" && nice -n 10 cargo build --release --locked -q) || die "build failed"
BIN=$HERE/target/release/uring-relay

WORK=$(mktemp -d /tmp/uring-bench.XXXXXX)
chown postgres: "$WORK"
declare -A PORT PID
cleanup() {
  local t
  for t in "${!PID[@]}"; do kill "${PID[$t]}" 2>/dev/null || true; done
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # at most 20 s
  local i
  for i in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# --- PostgreSQL ----------------------------------------------------------------------------
PORT[direct]=$(freeport)
log "PostgreSQL 127.0.0.1:${PORT[direct]} in $WORK"
runuser -u postgres -- "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 --no-sync \
  >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = ${PORT[direct]}
unix_socket_directories = '$WORK'
max_connections = 300
shared_buffers = 512MB
fsync = off
synchronous_commit = off
full_page_writes = off
autovacuum = off
EOF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/postgres.log" -w -t 60 start >/dev/null ||
  die "PostgreSQL did not start (see $WORK/postgres.log)"
"$PG_BIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "${PORT[direct]}" -U postgres postgres >"$WORK/init.log" 2>&1 ||
  die "pgbench -i failed: $(tail -3 "$WORK/init.log")"

# --- relays --------------------------------------------------------------------------------
flags_of() {
  case "$1" in
    epoll) echo "--mode epoll" ;;
    epoll-raw) echo "--mode epoll-raw" ;;
    uring) echo "--mode uring" ;;
    uring-ms) echo "--mode uring --multishot" ;;
    uring-link) echo "--mode uring --link" ;;
    uring-plain) echo "--mode uring --no-poll-first --no-defer-taskrun" ;;
    usend) echo "--mode usend" ;;
    usend-coop) echo "--mode usend --no-defer-taskrun" ;;
    *) die "unknown target $1" ;;
  esac
}
for t in $TARGETS; do
  [ "$t" = direct ] && continue
  PORT[$t]=$(freeport)
  # shellcheck disable=SC2046
  "$BIN" $(flags_of "$t") --listen "${PORT[$t]}" --upstream "${PORT[direct]}" 2>"$OUT/$t.log" &
  PID[$t]=$!
  wait_port "${PORT[$t]}" || die "$t did not start: $(cat "$OUT/$t.log")"
  log "$t: port ${PORT[$t]}, pid ${PID[$t]}"
done

machine_ticks() { # busy clock ticks of the whole machine (all but idle and iowait)
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
cpu_ticks() { # pid -> "utime stime" in clock ticks (fields 14, 15; comm has no spaces here)
  awk '{print $14, $15}' "/proc/$1/stat"
}
pgbench_run() { # target proto clients seconds -> pgbench output on stdout
  timeout $(($4 + 60)) "$PG_BIN/pgbench" -n -S -M "$2" -c "$3" -j "$JOBS" -T "$4" \
    -h 127.0.0.1 -p "${PORT[$1]}" -U postgres postgres 2>&1
}
txns_of() { awk '/number of transactions actually processed/ {split($0, a, ": "); split(a[2], b, "/"); print b[1]}'; }
tps_of() { awk '/^tps = / {print $3}'; }

# Same bytes through every path: a 20 MB result (server -> client, many chunks and short
# sends) and a 1.3 MB COPY FROM STDIN (client -> server).
check() {
  "$PG_BIN/psql" -X -At -h 127.0.0.1 -p "${PORT[$1]}" -U postgres postgres \
    -c "SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, 20000) i" | md5sum
  "$PG_BIN/psql" -X -At -h 127.0.0.1 -p "${PORT[$1]}" -U postgres postgres \
    -c "CREATE TEMP TABLE t (x text)" -c "\\copy t FROM PROGRAM 'seq 1 200000'" \
    -c "SELECT count(*), sum(x::int) FROM t"
}
want=$(check direct)
for t in $TARGETS; do
  [ "$(check "$t")" = "$want" ] || die "$t did not relay the same bytes as the direct path"
done
log "all paths relay the same bytes"

# Warm up each path once (connections, caches).
for t in $TARGETS; do pgbench_run "$t" simple 16 2 >/dev/null || die "warm-up through $t failed"; done

# --- timed runs, interleaved ----------------------------------------------------------------
TICK=$(getconf CLK_TCK)
printf 'round\ttarget\tproto\tclients\ttps\ttxns\tuser_s\tsys_s\tmachine_s\n' >"$OUT/runs.tsv"
read -r -a T <<<"$TARGETS"
for r in $(seq 1 "$ROUNDS"); do
  for run in $RUNS; do
    proto=${run%%:*} c=${run##*:}
    n=${#T[@]}
    for i in $(seq 0 $((n - 1))); do
      t=${T[$(((i + r - 1) % n))]}
      before="0 0"
      [ "$t" = direct ] || before=$(cpu_ticks "${PID[$t]}")
      m0=$(machine_ticks)
      res=$(pgbench_run "$t" "$proto" "$c" "$SECS") || die "pgbench through $t failed: $(echo "$res" | tail -3)"
      m1=$(machine_ticks)
      after="0 0"
      [ "$t" = direct ] || after=$(cpu_ticks "${PID[$t]}")
      txns=$(echo "$res" | txns_of)
      tps=$(echo "$res" | tps_of)
      read -r u0 s0 <<<"$before"
      read -r u1 s1 <<<"$after"
      us=$(awk -v a="$u0" -v b="$u1" -v k="$TICK" 'BEGIN {printf "%.2f", (b - a) / k}')
      ss=$(awk -v a="$s0" -v b="$s1" -v k="$TICK" 'BEGIN {printf "%.2f", (b - a) / k}')
      ms=$(awk -v a="$m0" -v b="$m1" -v k="$TICK" 'BEGIN {printf "%.2f", (b - a) / k}')
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$proto" "$c" "$tps" "$txns" "$us" "$ss" "$ms" >>"$OUT/runs.tsv"
      log "round $r $t $proto c=$c: tps $tps, relay cpu user $us s sys $ss s, machine $ms s"
    done
  done
done

# --- syscalls per transaction ---------------------------------------------------------------
# perf counts tracepoints in the kernel and barely slows the relay; its window is exactly
# pgbench's run (so the clients' logins are in it: ~10 syscalls per client, negligible).
printf 'target\tproto\tclients\ttxns\tsyscall\tcount\n' >"$OUT/syscalls.tsv"
if [ "$SYS_SECS" != 0 ]; then
  if perf stat -e raw_syscalls:sys_enter -o /dev/null -- true >/dev/null 2>&1; then
    ev=raw_syscalls:sys_enter
    for s in recvfrom sendto epoll_wait io_uring_enter; do ev="$ev,syscalls:sys_enter_$s"; done
    for run in $RUNS; do
      proto=${run%%:*} c=${run##*:}
      for t in $TARGETS; do
        [ "$t" = direct ] && continue
        perf stat -x, -e "$ev" -p "${PID[$t]}" -o "$WORK/counts" -- \
          "$PG_BIN/pgbench" -n -S -M "$proto" -c "$c" -j "$JOBS" -T "$SYS_SECS" \
          -h 127.0.0.1 -p "${PORT[$t]}" -U postgres postgres >"$WORK/sys.out" 2>&1 || die "perf pass on $t failed"
        txns=$(txns_of <"$WORK/sys.out")
        awk -F, -v t="$t" -v p="$proto" -v c="$c" -v n="$txns" \
          '$3 ~ /sys_enter/ {sub(/.*:(sys_enter_)?/, "", $3); printf "%s\t%s\t%s\t%s\t%s\t%s\n", t, p, c, n, $3, $1}' \
          "$WORK/counts" >>"$OUT/syscalls.tsv"
        log "syscalls: $t $proto c=$c done ($txns transactions)"
      done
    done
  else
    log "perf tracepoints unavailable: no syscall pass (apt-get install linux-perf)"
  fi
fi

# Every relayed session closed its server connection (none leaked by a relay).
left=$("$PG_BIN/psql" -X -At -h 127.0.0.1 -p "${PORT[direct]}" -U postgres postgres \
  -c "SELECT count(*) - 1 FROM pg_stat_activity WHERE backend_type = 'client backend'")
[ "$left" = 0 ] || log "warning: $left server connections still open after all runs"

python3 - "$OUT" "$SECS" <<'EOF' | tee "$OUT/summary.md"
import csv, statistics as st, sys, collections
out, secs = sys.argv[1], float(sys.argv[2])
runs = list(csv.DictReader(open(f"{out}/runs.tsv"), delimiter="\t"))
by = collections.defaultdict(list)
for r in runs:
    n = int(r["txns"]); u = float(r["user_s"]); s = float(r["sys_s"])
    r.update(tps=float(r["tps"]), u=u * 1e6 / n, s=s * 1e6 / n, cpu=(u + s) * 1e6 / n)
    by[(r["proto"], r["clients"], r["target"])].append(r)
sysc = collections.defaultdict(dict)
for r in csv.DictReader(open(f"{out}/syscalls.tsv"), delimiter="\t"):
    if r["count"].isdigit() and int(r["txns"] or 0) > 0:
        sysc[(r["proto"], r["clients"], r["target"])][r["syscall"]] = int(r["count"]) / int(r["txns"])
keys = sorted({(k[0], k[1]) for k in by}, key=lambda k: (k[0] != "simple", int(k[1])))
targets = list(dict.fromkeys(r["target"] for r in runs))
med = lambda rs, f: st.median(x[f] for x in rs)

def paired(rs, base, f):
    """Median over rounds of this target's figure over the base's in the same round."""
    b = {x["round"]: x for x in base}
    v = [x[f] / b[x["round"]][f] for x in rs if x["round"] in b and b[x["round"]][f] > 0]
    return f"{st.median(v):.2f}" if v else "-"

print("| workload | target | TPS | relay CPU µs/txn | user | system | syscalls/txn | recv+send | epoll_wait | io_uring_enter | CPU vs epoll | CPU vs epoll-raw | TPS vs epoll |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for proto, c in keys:
    for t in targets:
        rs = by.get((proto, c, t), [])
        if not rs: continue
        tps_ratio = paired(rs, by.get((proto, c, "epoll"), []), "tps") if t != "epoll" else "-"
        if t == "direct":
            print(f"| {proto} c={c} | direct | {med(rs,'tps'):.0f} |" + " - |" * 9 + f" {tps_ratio} |")
            continue
        y = sysc.get((proto, c, t), {})
        sc = lambda k: f"{y[k]:.2f}" if k in y else "-"
        rw = f"{y.get('recvfrom', 0) + y.get('sendto', 0):.2f}" if y else "-"
        vs = [paired(rs, by.get((proto, c, b), []), "cpu") if t != b else "-" for b in ("epoll", "epoll-raw")]
        half = (max(x["cpu"] for x in rs) - min(x["cpu"] for x in rs)) / med(rs, "cpu") * 50
        print(f"| {proto} c={c} | {t} | {med(rs,'tps'):.0f} | {med(rs,'cpu'):.1f} (±{half:.0f}%) | {med(rs,'u'):.1f} | {med(rs,'s'):.1f} "
              f"| {sc('sys_enter')} | {rw} | {sc('epoll_wait')} | {sc('io_uring_enter')} | {vs[0]} | {vs[1]} | {tps_ratio} |")
busy = st.median(float(r["machine_s"]) for r in runs) / secs
print()
print(f"Medians of {len({r['round'] for r in runs})} rounds of {secs:.0f} s; ratios are paired per round, then the median. "
      "(±x%) is half the spread between the rounds' lowest and highest CPU per transaction. "
      f"Machine busy during a run (median, all processes): {busy:.2f} of {len(open('/proc/cpuinfo').read().split('processor')) - 1} cores.")
EOF
log "results in $OUT"
