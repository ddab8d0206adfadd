#!/usr/bin/env python3
"""Helpers for bench/compare.sh (Python 3.8+, standard library only).

Subcommands:
  freeport                 print a free TCP port on 127.0.0.1
  sample                   sample CPU time and RSS of processes from /proc until stopped
  analyze                  one pgbench run: TPS, latency percentiles, proxy CPU per transaction
  idle                     hold N authenticated idle client connections (RSS per client)
  storm                    N clients that each connect, run one query and leave
  syscalls                 syscalls per transaction from `strace -c -f` or `perf stat` counts
  report                   medians, paired ratios and targets: results.md and results.json

Every loop here is bounded by a count and a deadline.
"""

import argparse
import asyncio
import base64
import glob
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import statistics
import struct
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# /proc


def pid_list(pids):
    """The processes of a target: "123" or, for several processes, "123,456"; 0 for none."""
    return [int(p) for p in str(pids).split(",") if p.strip() and int(p) != 0]


def proc_cpu(pid):
    """(utime, stime) in seconds for a whole process (all threads); for "p1,p2", the sum."""
    u = s = 0.0
    for p in pid_list(pid):
        with open(f"/proc/{p}/stat") as f:
            data = f.read()
        fields = data[data.rindex(")") + 2 :].split()
        u += int(fields[11]) / CLK_TCK
        s += int(fields[12]) / CLK_TCK
    return u, s


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def proc_cpu_ns(pid):
    """On-CPU nanoseconds of all live threads of a process (finer than the tick counts);
    for "p1,p2", of both."""
    total = 0
    paths = [q for p in pid_list(pid) for q in glob.glob(f"/proc/{p}/task/*/schedstat")]
    for path in paths:
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def machine_busy():
    """Busy seconds of the whole machine (all CPUs) from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts[:8]]
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / CLK_TCK


def cmd_freeport(_args):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def cmd_sample(args):
    """Writes one JSON line per tick: t, machine busy seconds, and per pid utime/stime/rss."""
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    deadline = time.time() + args.max_seconds
    with open(args.out, "w") as out:
        while not stop and time.time() < deadline:
            row = {"t": time.time(), "busy": machine_busy()}
            for pid in args.pid:
                try:
                    u, s = proc_cpu(pid)
                    st = proc_status(pid)
                    row[str(pid)] = [u, s, st.get("VmRSS", 0), st.get("VmHWM", 0)]
                except (FileNotFoundError, ProcessLookupError, ValueError):
                    pass
            out.write(json.dumps(row) + "\n")
            out.flush()
            time.sleep(args.interval)


# ---------------------------------------------------------------------------------------
# pgbench runs


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def read_pgbench_logs(prefix):
    """Per-transaction log lines: (end time in epoch seconds, latency µs)."""
    ends, lats = [], []
    for path in glob.glob(glob.escape(prefix) + ".*"):
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) < 6:
                    continue
                # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
                if p[2] in ("failed", "skipped"):
                    continue
                lats.append(int(p[2]))
                ends.append(int(p[4]) + int(p[5]) / 1e6)
    return ends, lats


def parse_pgbench_output(text):
    out = {}
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    if m:
        out["tps"] = float(m.group(1))
    m = re.search(r"number of transactions actually processed: (\d+)", text)
    if m:
        out["transactions"] = int(m.group(1))
    m = re.search(r"number of failed transactions: (\d+)", text)
    out["failed"] = int(m.group(1)) if m else 0
    out["aborted"] = "Run was aborted" in text or "aborted in command" in text
    return out


def load_samples(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return rows


def cmd_analyze(args):
    with open(args.pgbench_output, errors="replace") as f:
        text = f.read()
    res = parse_pgbench_output(text)
    res.update(
        target=args.target,
        workload=args.workload,
        clients=args.clients,
        repeat=args.repeat,
        exit_code=args.exit_code,
    )
    ends, lats = read_pgbench_logs(args.log_prefix)
    lats.sort()
    res["logged"] = len(lats)
    res["p50_ms"] = percentile(lats, 0.50) / 1000 if lats else None
    res["p99_ms"] = percentile(lats, 0.99) / 1000 if lats else None
    # Steady state: skip the edges of the run, then take the CPU between the first and the
    # last sample inside that window and the transactions that ended between them.
    samples = load_samples(args.samples)
    if ends and len(samples) >= 2:
        ends.sort()
        t0, t1 = ends[0], ends[-1]
        edge = min(1.0, 0.1 * (t1 - t0))
        inside = [s for s in samples if t0 + edge <= s["t"] <= t1 - edge]
        if len(inside) >= 2:
            a, b = inside[0], inside[-1]
            import bisect

            n = bisect.bisect_right(ends, b["t"]) - bisect.bisect_left(ends, a["t"])
            res["window_s"] = round(b["t"] - a["t"], 3)
            res["window_txns"] = n
            res["window_tps"] = round(n / (b["t"] - a["t"]), 1) if b["t"] > a["t"] else None
            if n > 0:
                res["machine_us_per_txn"] = round((b["busy"] - a["busy"]) / n * 1e6, 2)
                keys = [str(p) for p in pid_list(args.pid)]
                if keys and all(k in a and k in b for k in keys):
                    du = sum(b[k][0] - a[k][0] for k in keys)
                    ds = sum(b[k][1] - a[k][1] for k in keys)
                    res["cpu_user_s"] = round(du, 3)
                    res["cpu_sys_s"] = round(ds, 3)
                    res["cpu_us_per_txn"] = round((du + ds) / n * 1e6, 2)
                    res["user_us_per_txn"] = round(du / n * 1e6, 2)
                    res["sys_us_per_txn"] = round(ds / n * 1e6, 2)
        peaks = []
        for k in (str(p) for p in pid_list(args.pid)):
            hwm = [s[k][3] for s in samples if k in s]
            if hwm:
                peaks.append(max(hwm))
        if peaks:
            res["peak_rss_kib"] = sum(peaks)
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------
# A small PostgreSQL client (startup, trust/cleartext/md5/SCRAM-SHA-256, simple query)

_SALTED = {}


def salted_password(password, salt, iterations):
    # Cached per (salt, iterations), as a proxy should: PBKDF2 costs ~1-2 ms per login.
    key = (password, salt, iterations)
    if key not in _SALTED:
        _SALTED[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return _SALTED[key]


class PgError(Exception):
    pass


async def read_msg(reader):
    hdr = await reader.readexactly(5)
    tag = hdr[0:1]
    (n,) = struct.unpack("!i", hdr[1:])
    body = await reader.readexactly(n - 4)
    return tag, body


def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body


def error_text(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode(errors="replace")
    return f"{fields.get('S', '')} {fields.get('C', '')} {fields.get('M', '')}"


async def pg_connect(host, port, user, database, password):
    reader, writer = await asyncio.open_connection(host, port)
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!i", 196608) + params
    writer.write(struct.pack("!i", len(body) + 4) + body)
    await writer.drain()
    scram = None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            writer.close()
            raise PgError(error_text(body))
        if tag == b"R":
            (code,) = struct.unpack("!i", body[:4])
            if code == 0:
                continue
            if code == 3:
                writer.write(msg(b"p", password.encode() + b"\0"))
            elif code == 5:
                inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
                outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                writer.write(msg(b"p", b"md5" + outer.encode() + b"\0"))
            elif code == 10:
                cnonce = base64.b64encode(os.urandom(18)).decode()
                first_bare = f"n=,r={cnonce}"
                first = ("n,," + first_bare).encode()
                writer.write(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
                scram = (cnonce, first_bare)
            elif code == 11:
                server_first = body[4:].decode()
                attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                cnonce, first_bare = scram
                if not attrs["r"].startswith(cnonce):
                    raise PgError("SCRAM nonce mismatch")
                salted = salted_password(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
                client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                stored_key = hashlib.sha256(client_key).digest()
                final_bare = f"c=biws,r={attrs['r']}"
                auth_msg = f"{first_bare},{server_first},{final_bare}".encode()
                sig = hmac.new(stored_key, auth_msg, hashlib.sha256).digest()
                proof = bytes(a ^ b for a, b in zip(client_key, sig))
                final = f"{final_bare},p={base64.b64encode(proof).decode()}".encode()
                writer.write(msg(b"p", final))
            elif code == 12:
                continue
            else:
                raise PgError(f"unsupported authentication request {code}")
            await writer.drain()
        elif tag == b"Z":
            return reader, writer


async def pg_query(reader, writer, sql):
    writer.write(msg(b"Q", sql.encode() + b"\0"))
    await writer.drain()
    err = None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            err = error_text(body)
        elif tag == b"Z":
            if err:
                raise PgError(err)
            return


def raise_nofile(n):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n)) if hard != resource.RLIM_INFINITY else max(soft, n)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


async def bounded(coros, concurrency):
    sem = asyncio.Semaphore(concurrency)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def idle_main(args):
    raise_nofile(args.n + 100)
    started = time.time()
    conns, errors = [], []

    async def one():
        r, w = await asyncio.wait_for(
            pg_connect(args.host, args.port, args.user, args.database, args.password), args.timeout
        )
        if args.query:
            await asyncio.wait_for(pg_query(r, w, args.query), args.timeout)
        conns.append((r, w))

    results = await bounded([one() for _ in range(args.n)], args.concurrency)
    for res in results:
        if isinstance(res, BaseException):
            errors.append(repr(res))
    report = {
        "connected": len(conns),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "connect_seconds": round(time.time() - started, 3),
    }
    print(json.dumps(report), flush=True)
    # Hold until SIGTERM/SIGINT or --hold seconds pass.
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, args.hold)
    except asyncio.TimeoutError:
        pass
    for r, w in conns:
        try:
            w.write(msg(b"X", b""))
            w.close()
        except Exception:
            pass
    await asyncio.sleep(0.2)


def cmd_idle(args):
    asyncio.run(idle_main(args))


async def storm_main(args):
    raise_nofile(args.concurrency + 100)
    errors = []

    async def one():
        r, w = await asyncio.wait_for(
            pg_connect(args.host, args.port, args.user, args.database, args.password), args.timeout
        )
        try:
            await asyncio.wait_for(pg_query(r, w, args.query), args.timeout)
            w.write(msg(b"X", b""))
            await w.drain()
        finally:
            w.close()

    # Derive the SCRAM key once before the storm: the client side is not what is measured.
    if args.password:
        try:
            r, w = await pg_connect(args.host, args.port, args.user, args.database, args.password)
            w.close()
        except Exception:
            pass
    await asyncio.sleep(0.3)
    measured = bool(pid_list(args.pid))
    cpu0 = proc_cpu_ns(args.pid) if measured else None
    ticks0 = proc_cpu(args.pid) if measured else None
    started = time.time()
    results = await bounded([one() for _ in range(args.n)], args.concurrency)
    elapsed = time.time() - started
    # Let the proxy finish with the connections that just closed.
    await asyncio.sleep(0.3)
    cpu = {}
    if measured:
        ns = proc_cpu_ns(args.pid) - cpu0
        u, s = proc_cpu(args.pid)
        cpu = {
            "cpu_ms": round(ns / 1e6, 2),
            "cpu_ms_per_conn": round(ns / 1e6 / args.n, 4),
            "user_ms": round((u - ticks0[0]) * 1000, 1),
            "sys_ms": round((s - ticks0[1]) * 1000, 1),
        }
    for res in results:
        if isinstance(res, BaseException):
            errors.append(repr(res))
    print(
        json.dumps(
            {
                "clients": args.n,
                "ok": args.n - len(errors),
                "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "seconds": round(elapsed, 3),
                **cpu,
            }
        )
    )


def cmd_storm(args):
    asyncio.run(storm_main(args))


# ---------------------------------------------------------------------------------------
# strace -c


SOCKET_IO = ("recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "writev", "read", "write")


def cmd_syscalls(args):
    """Syscalls per transaction from `strace -c -f` output or `perf stat -x,` tracepoint counts."""
    calls = {}
    with open(args.counts, errors="replace") as f:
        for line in f:
            if args.tool == "perf":
                p = line.strip().split(",")
                if len(p) < 3 or not p[0].isdigit():
                    continue
                ev = p[2]
                if ev.startswith("syscalls:sys_enter_"):
                    calls.setdefault(ev[len("syscalls:sys_enter_"):], {"calls": 0, "errors": 0})["calls"] += int(p[0])
                elif ev == "syscalls:sys_exit_recvfrom":  # filtered on ret == -EAGAIN
                    calls.setdefault("recvfrom", {"calls": 0, "errors": 0})["errors"] += int(p[0])
            else:
                p = line.split()
                # % time  seconds  usecs/call  calls  [errors]  syscall
                if len(p) >= 5 and re.match(r"^[0-9.]+$", p[0]) and p[-1] != "total":
                    try:
                        n = int(p[3])
                    except ValueError:
                        continue
                    calls[p[-1]] = {"calls": n, "errors": int(p[4]) if len(p) == 6 else 0}
    calls = {k: v for k, v in calls.items() if v["calls"]}
    ends, _ = read_pgbench_logs(args.log_prefix)
    n = sum(1 for e in ends if args.start <= e <= args.end)
    per = {k: round(v["calls"] / n, 3) for k, v in calls.items()} if n else {}
    res = {
        "tool": args.tool,
        "target": args.target,
        "workload": args.workload,
        "clients": args.clients,
        "transactions": n,
        "statements_per_txn": args.statements,
        "calls": calls,
        "per_txn": per,
        "socket_io_per_statement": round(sum(per.get(k, 0) for k in SOCKET_IO) / args.statements, 3) if n else None,
        "failed_reads_per_txn": round(sum(calls[k]["errors"] for k in SOCKET_IO if k in calls) / n, 3) if n else None,
        "epoll_wait_per_txn": round(per.get("epoll_wait", 0) + per.get("epoll_pwait", 0), 3) if n else None,
    }
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------
# Report

LABEL = {
    "pgsluice": "pgsluice",
    "pgsluice-1t": "pgsluice (1 thread)",
    "pgsluice-alt": "pgsluice alt",
    "pgsluice-alt-1t": "pgsluice alt (1 thread)",
    "pgsluice-unix": "pgsluice over Unix sockets",
    "pgsluice-unix-1t": "pgsluice over Unix sockets (1 thread)",
    "pgsluice-2p": "pgsluice, 2 processes of 1 thread (so_reuseport)",
    "pgsluice-uring": "pgsluice with io_uring (1 thread)",
    "pgsluice-unix-uring": "pgsluice with io_uring over Unix sockets (1 thread)",
    "pgbouncer": "PgBouncer",
    "pgbouncer-unix": "PgBouncer over Unix sockets",
    "direct": "direct",
}
PGSLUICE_TARGETS = ["pgsluice", "pgsluice-1t", "pgsluice-alt", "pgsluice-alt-1t", "pgsluice-unix", "pgsluice-unix-1t", "pgsluice-2p", "pgsluice-uring", "pgsluice-unix-uring"]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def ratio_fmt(v):
    return "–" if v is None else f"{v:.2f}×"


def load_jsonl(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    return out


def paired_ratio(runs, a, b, key):
    """Median over repeats of run(a)[key] / run(b)[key], paired by repeat."""
    by = {}
    for r in runs:
        by.setdefault(r["repeat"], {})[r["target"]] = r
    ratios = []
    for pair in by.values():
        x, y = pair.get(a, {}).get(key), pair.get(b, {}).get(key)
        if x is not None and y:
            ratios.append(x / y)
    return med(ratios)


def storm_ratio(storms, auth, a, b):
    """Median over rounds of a's storm CPU per connection / b's, paired by round."""
    rounds = {}
    for x in storms:
        if x["auth"] == auth:
            rounds.setdefault(x.get("repeat", 1), {})[x["target"]] = x.get("cpu_ms_per_conn")
    return med([r[a] / r[b] for r in rounds.values() if r.get(a) is not None and r.get(b)])


def cmd_report(args):
    d = args.dir
    runs = [r for r in load_jsonl(os.path.join(d, "runs.jsonl")) if not r.get("warmup")]
    straces = load_jsonl(os.path.join(d, "syscalls.jsonl")) + [
        dict(x, tool="strace") for x in load_jsonl(os.path.join(d, "strace.jsonl"))
    ]
    idles = load_jsonl(os.path.join(d, "idle.jsonl"))
    storms = load_jsonl(os.path.join(d, "storm.jsonl"))
    meta = {}
    if os.path.exists(os.path.join(d, "meta.json")):
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)

    groups = {}
    for r in runs:
        groups.setdefault((r["workload"], r["clients"]), []).append(r)
    workloads_order = ["select-simple", "select-extended", "select-prepared", "select-orm", "tpcb"]
    keys = sorted(groups, key=lambda k: (workloads_order.index(k[0]) if k[0] in workloads_order else 9, k[1]))
    targets_order = PGSLUICE_TARGETS + ["pgbouncer", "pgbouncer-unix", "direct"]
    proxies = [t for t in PGSLUICE_TARGETS if any(r["target"] == t for r in runs)]

    summary = []
    for k in keys:
        rs = groups[k]
        for t in targets_order:
            tr = [r for r in rs if r["target"] == t]
            if not tr:
                continue
            summary.append(
                {
                    "workload": k[0],
                    "clients": k[1],
                    "target": t,
                    "repeats": len(tr),
                    "tps": med([r.get("tps") for r in tr]),
                    "p50_ms": med([r.get("p50_ms") for r in tr]),
                    "p99_ms": med([r.get("p99_ms") for r in tr]),
                    "cpu_us_per_txn": med([r.get("cpu_us_per_txn") for r in tr]),
                    "user_us_per_txn": med([r.get("user_us_per_txn") for r in tr]),
                    "sys_us_per_txn": med([r.get("sys_us_per_txn") for r in tr]),
                    "peak_rss_kib": med([r.get("peak_rss_kib") for r in tr]),
                    "machine_us_per_txn": med([r.get("machine_us_per_txn") for r in tr]),
                    "failed": sum(r.get("failed", 0) for r in tr),
                    "aborted": sum(1 for r in tr if r.get("aborted") or r.get("exit_code")),
                }
            )
    ratios = []
    for k in keys:
        rs = groups[k]
        for p in proxies:
            row = {"workload": k[0], "clients": k[1], "proxy": p}
            for other in ("pgbouncer", "direct"):
                # Like with like: a Unix-socket pgsluice against a Unix-socket PgBouncer.
                base = other
                if other == "pgbouncer" and "unix" in p and any(r["target"] == "pgbouncer-unix" for r in rs):
                    base = "pgbouncer-unix"
                for key in ("tps", "p99_ms", "cpu_us_per_txn", "user_us_per_txn"):
                    if other == "direct" and key.endswith("per_txn"):
                        continue
                    row[f"{key}_vs_{other}"] = paired_ratio(rs, p, base, key)
            ratios.append(row)

    # Targets from issue 6, for each pgsluice variant.
    def s(t, wl, c, key):
        for row in summary:
            if row["target"] == t and row["workload"] == wl and row["clients"] == c:
                return row[key]
        return None

    def rat(p, wl, c, key):
        for row in ratios:
            if row["proxy"] == p and row["workload"] == wl and row["clients"] == c:
                return row.get(f"{key}_vs_pgbouncer")
        return None

    checks = []

    def check(p, name, value, ok, shown):
        checks.append({"proxy": p, "target": name, "value": value, "met": ok, "shown": shown})

    clients_seen = sorted({k[1] for k in keys})
    for p in proxies:
        for wl in ("select-simple", "select-extended", "tpcb"):
            for c in clients_seen:
                v = rat(p, wl, c, "cpu_us_per_txn")
                if v is None:
                    continue
                limit = 1.0 if (wl == "tpcb" or c <= 100) else 0.85
                check(p, f"CPU/txn {wl} @{c} ≤ {limit:.2f}× PgBouncer", v, v <= limit, ratio_fmt(v))
        for wl in ("select-simple", "select-extended"):
            for c in clients_seen:
                v = s(p, wl, c, "user_us_per_txn")
                if v is not None:
                    check(p, f"user CPU {wl} @{c} ≤ 2 µs/txn", v, v <= 2.0, f"{v:.2f} µs")
        for wl in ("select-simple", "select-extended", "select-prepared", "tpcb"):
            for c in clients_seen:
                v = rat(p, wl, c, "tps")
                if v is not None:
                    check(p, f"TPS {wl} @{c} ≥ 1.0× PgBouncer", v, v >= 1.0, ratio_fmt(v))
                v = rat(p, wl, c, "p99_ms")
                if v is not None:
                    check(p, f"p99 {wl} @{c} ≤ 1.0× PgBouncer", v, v <= 1.0, ratio_fmt(v))
        for wl in ("select-simple", "select-extended", "tpcb"):
            lo, hi = min(clients_seen, default=None), max(clients_seen, default=None)
            a, b = s(p, wl, lo, "cpu_us_per_txn"), s(p, wl, hi, "cpu_us_per_txn")
            if a and b and hi != lo:
                check(p, f"flat cost {wl}: CPU/txn @{hi} ≤ 1.15× @{lo}", b / a, b / a <= 1.15, ratio_fmt(b / a))
        # perf's counts where there are any: strace changes what it measures.
        best = "perf" if any(x["tool"] == "perf" for x in straces) else "strace"
        for st in straces:
            if st["target"] != p or st["tool"] != best or st.get("socket_io_per_statement") is None:
                continue
            v = st["socket_io_per_statement"]
            check(p, f"socket syscalls/statement = 4 ({st['workload']} @{st['clients']}, {best})", v, abs(v - 4) <= 0.05, f"{v:.2f}")
            v = st["epoll_wait_per_txn"]
            check(p, f"epoll_wait ≤ 0.2/txn ({st['workload']} @{st['clients']}, {best})", v, v <= 0.2, f"{v:.2f}")
        for idle in idles:
            if idle["target"] == p and idle.get("kib_per_client") is not None and idle["clients"] >= 10000:
                v = idle["kib_per_client"]
                check(p, f"RSS per idle client @{idle['clients']} ≤ 1.5 KiB", v, v <= 1.5, f"{v:.2f} KiB")
        for auth in sorted({x["auth"] for x in storms}):
            v = storm_ratio(storms, auth, p, "pgbouncer")
            if v is not None:
                check(p, f"storm CPU/connection ({auth}) ≤ 1.0× PgBouncer", v, v <= 1.0, ratio_fmt(v))

    out = {"meta": meta, "summary": summary, "ratios": ratios, "syscalls": straces, "idle": idles,
           "storm": storms, "targets": checks, "runs": runs}
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(out, f, indent=1)

    L = []
    L.append("# pgsluice vs PgBouncer vs direct")
    L.append("")
    if meta:
        L.append(
            f"{meta.get('date', '')} · {meta.get('cpus', '?')} CPUs ({meta.get('cpu_model', '')}) · "
            f"{meta.get('pgsluice_version', '')} ({meta.get('commit', '')}) · {meta.get('pgbouncer_version', 'no PgBouncer')} · "
            f"PostgreSQL {meta.get('pg_version', '')} · {meta.get('seconds')} s per run · "
            f"{meta.get('repeats')} repeats (medians) · pool_size 20 · pgbench scale {meta.get('scale')} · "
            f"pgbench -j {meta.get('jobs')}"
        )
        L.append("")
    L.append("## Ratios (paired per repeat, median)")
    L.append("")
    L.append("CPU and user CPU are the proxy's own per transaction. Lower is better except TPS.")
    L.append("Unix-socket pgsluice targets are compared with PgBouncer over Unix sockets when it ran.")
    L.append("")
    L.append("| workload | clients | proxy | TPS ×PgB | p99 ×PgB | CPU/txn ×PgB | user CPU ×PgB | TPS ×direct | p99 ×direct |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in ratios:
        L.append(
            f"| {row['workload']} | {row['clients']} | {LABEL.get(row['proxy'], row['proxy'])} | "
            f"{ratio_fmt(row.get('tps_vs_pgbouncer'))} | {ratio_fmt(row.get('p99_ms_vs_pgbouncer'))} | "
            f"{ratio_fmt(row.get('cpu_us_per_txn_vs_pgbouncer'))} | {ratio_fmt(row.get('user_us_per_txn_vs_pgbouncer'))} | "
            f"{ratio_fmt(row.get('tps_vs_direct'))} | {ratio_fmt(row.get('p99_ms_vs_direct'))} |"
        )
    L.append("")
    L.append("## Medians")
    L.append("")
    L.append("| workload | clients | target | TPS | p50 ms | p99 ms | CPU µs/txn | user µs | sys µs | peak RSS MiB | machine µs/txn | failed |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in summary:
        rss = row["peak_rss_kib"] / 1024 if row["peak_rss_kib"] else None
        L.append(
            f"| {row['workload']} | {row['clients']} | {LABEL.get(row['target'], row['target'])} | {fmt(row['tps'], 0)} | "
            f"{fmt(row['p50_ms'], 3)} | {fmt(row['p99_ms'], 3)} | {fmt(row['cpu_us_per_txn'])} | "
            f"{fmt(row['user_us_per_txn'])} | {fmt(row['sys_us_per_txn'])} | {fmt(rss)} | "
            f"{fmt(row['machine_us_per_txn'])} | {row['failed'] + row['aborted']} |"
        )
    if straces:
        L.append("")
        L.append("## Syscalls per transaction (separate passes)")
        L.append("")
        L.append("perf counts syscall tracepoints without slowing the proxy; strace -c -f stops it at every")
        L.append("syscall, so it sees more events per epoll_wait than a free run.")
        L.append("")
        L.append("| tool | workload | clients | target | socket I/O per statement | failed reads (EAGAIN)/txn | epoll_wait/txn | other calls/txn |")
        L.append("|---|---|---:|---|---:|---:|---:|---|")
        sock = {"recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "writev", "read", "write", "epoll_wait", "epoll_pwait"}
        for st in straces:
            per = st.get("per_txn", {})
            others = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if k not in sock and v >= 0.01)
            detail = ", ".join(f"{k} {per[k]:.2f}" for k in sorted(per) if k in sock - {"epoll_wait", "epoll_pwait"})
            L.append(
                f"| {st['tool']} | {st['workload']} | {st['clients']} | {LABEL.get(st['target'], st['target'])} | "
                f"{fmt(st.get('socket_io_per_statement'), 2)} ({detail}) | {fmt(st.get('failed_reads_per_txn'), 2)} | "
                f"{fmt(st.get('epoll_wait_per_txn'), 2)} | {others or '–'} |"
            )
    if idles:
        L.append("")
        L.append("## Idle clients (logged in, one query run, then idle)")
        L.append("")
        L.append("| target | clients | connected | errors | RSS before MiB | RSS after MiB | KiB per client |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for x in idles:
            L.append(
                f"| {LABEL.get(x['target'], x['target'])} | {x['clients']:,} | {x.get('connected', 0):,} | {x.get('errors', 0)} | "
                f"{fmt(x.get('rss_before_kib', 0) / 1024)} | {fmt(x.get('rss_after_kib', 0) / 1024)} | {fmt(x.get('kib_per_client'), 2)} |"
            )
    if storms:
        L.append("")
        L.append("## Connection storm (each client: connect, log in, SELECT 1, leave)")
        L.append("")
        L.append("Medians over the rounds (targets interleaved); ×PgBouncer is paired per round.")
        L.append("")
        L.append("| auth | target | rounds | clients | errors | seconds | proxy CPU ms | CPU ms per connection | ×PgBouncer |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for auth, target in sorted({(x["auth"], x["target"]) for x in storms}):
            xs = [x for x in storms if x["auth"] == auth and x["target"] == target]
            ratio = storm_ratio(storms, auth, target, "pgbouncer") if target != "pgbouncer" else None
            L.append(
                f"| {auth} | {LABEL.get(target, target)} | {len(xs)} | {xs[0]['clients']:,} | "
                f"{sum(x.get('errors') or 0 for x in xs)} | {fmt(med([x.get('seconds') for x in xs]), 2)} | "
                f"{fmt(med([x.get('cpu_ms') for x in xs]))} | {fmt(med([x.get('cpu_ms_per_conn') for x in xs]), 3)} | "
                f"{ratio_fmt(ratio)} |"
            )
    if checks:
        L.append("")
        L.append("## Targets (issue 6)")
        L.append("")
        L.append("| proxy | target | value | met |")
        L.append("|---|---|---:|---|")
        for c in checks:
            L.append(f"| {LABEL.get(c['proxy'], c['proxy'])} | {c['target']} | {c['shown']} | {'yes' if c['met'] else '**no**'} |")
    L.append("")
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))
    if args.check:
        # The smoke run asserts no speed, only that every run and connection worked.
        bad = [f"{r['target']} {r['workload']} c={r['clients']}: pgbench exit {r.get('exit_code')}"
               for r in runs if r.get("exit_code") or r.get("aborted") or r.get("failed") or not r.get("tps")]
        bad += [f"idle {x['target']}: {x.get('errors')} errors ({x.get('first_error')})" for x in idles if x.get("errors")]
        bad += [f"storm {x['target']} {x['auth']}: {x.get('errors')} errors ({x.get('first_error')})" for x in storms if x.get("errors")]
        if not runs:
            bad.append("no pgbench runs recorded")
        for b in bad:
            print("FAILED: " + b, file=sys.stderr)
        if bad:
            sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    sub.add_parser("freeport")

    p = sub.add_parser("sample")
    p.add_argument("--pid", type=int, action="append", default=[])
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--max-seconds", type=float, default=3600)
    p.add_argument("--out", required=True)

    p = sub.add_parser("analyze")
    for a in ("--target", "--workload", "--log-prefix", "--pgbench-output", "--samples"):
        p.add_argument(a, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--pid", default="0", help="the target's process ids, comma-separated")
    p.add_argument("--exit-code", type=int, default=0)

    for name in ("idle", "storm"):
        p = sub.add_parser(name)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--user", required=True)
        p.add_argument("--database", required=True)
        p.add_argument("--password", default="")
        p.add_argument("--n", type=int, required=True)
        p.add_argument("--concurrency", type=int, default=200)
        p.add_argument("--timeout", type=float, default=60)
        p.add_argument("--query", default="SELECT 1")
        if name == "idle":
            p.add_argument("--hold", type=float, default=60)
        else:
            p.add_argument("--pid", default="0", help="proxy processes whose CPU to measure (comma-separated)")

    p = sub.add_parser("syscalls")
    p.add_argument("--tool", choices=("perf", "strace"), required=True)
    for a in ("--target", "--workload", "--counts", "--log-prefix"):
        p.add_argument(a, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--start", type=float, required=True)
    p.add_argument("--end", type=float, required=True)
    p.add_argument("--statements", type=int, default=1)

    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    p.add_argument("--check", action="store_true", help="exit 1 if a run or connection failed")

    args = ap.parse_args()
    {
        "freeport": cmd_freeport,
        "sample": cmd_sample,
        "analyze": cmd_analyze,
        "idle": cmd_idle,
        "storm": cmd_storm,
        "syscalls": cmd_syscalls,
        "report": cmd_report,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
