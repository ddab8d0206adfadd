# Shared by bench/instructions.sh and bench/pgo.sh, which run a pgsluice of their own in front
# of the PostgreSQL of a `bench/compare.sh --serve` (its serve.env sourced: PORT_direct,
# PGPASSWORD). Sourced, not run.

# bench_config FILE PORT WORKERS AUTH: a pgsluice configuration on 127.0.0.1:PORT, transaction
# pooling with a pool of 20, for the serve's database and user `bench`.
bench_config() {
  cat >"$1" <<CONF
listen = "127.0.0.1:$2"
worker_threads = $3
pool_mode = "transaction"
pool_size = 20
max_client_conn = 5000
auth_type = "$4"

[databases.bench]
host = "127.0.0.1"
port = $PORT_direct

[users.bench]
password = "$PGPASSWORD"
CONF
}

# bench_wait PORT PID LOG TRIES: until the pgsluice on PORT answers a query (TRIES times 0.3 s
# at most); fails, naming LOG, if process PID ends first.
bench_wait() {
  local i
  for i in $(seq 1 "$4"); do
    psql -X -At -h 127.0.0.1 -p "$1" -U bench -d bench -c "select 1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "pgsluice ended (see $3): $(tail -5 "$3")" >&2; return 1; }
    sleep 0.3
  done
  echo "pgsluice on port $1 did not answer (see $3)" >&2
  return 1
}
