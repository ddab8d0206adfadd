#!/usr/bin/env python3
"""The soak's own load, events, samples and end checks (bench/soak.sh starts it).

Standard library only (the wire client of bench/helper.py). Everything here is bounded by
the deadline given (and a hard cap of 2 x duration + 5 minutes).

- Ledger clients: BEGIN; INSERT a (client, seq) row; COMMIT, through pgsluice; each client
  reconnects after a random number of transactions (clients come and go). Every outcome is
  recorded: committed (COMMIT acknowledged), failed (an error, or COMMIT answered ROLLBACK),
  unknown (the connection broke after COMMIT was sent, before its answer).
- Cancel client: SELECT pg_sleep(3), then a CancelRequest through pgsluice after 0.3 s;
  expects SQLSTATE 57014.
- Events at fractions of the duration: admin console RELOAD, SIGHUP, an upstream restart
  (the command soak.sh passes).
- Samples every few seconds: pgsluice's VmRSS, fds, threads (/proc) and gauges (/metrics).
- At the end: lost transactions (acknowledged but not in the table), phantom ones (told
  failed but in the table), the leak checks, RSS growth after warm-up (least squares).
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helper import PgError, msg, pg_connect, read_msg  # noqa: E402


def fields(body):
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[part[:1].decode()] = part[1:].decode(errors="replace")
    return out


class Conn:
    """A simple-query connection that keeps its BackendKeyData."""

    def __init__(self, reader, writer, key):
        self.reader, self.writer, self.key = reader, writer, key

    async def query(self, sql):
        """Returns (command tags, sqlstate or None)."""
        self.writer.write(msg(b"Q", sql.encode() + b"\0"))
        await self.writer.drain()
        tags, code = [], None
        while True:
            tag, body = await read_msg(self.reader)
            if tag == b"C":
                tags.append(body.rstrip(b"\0").decode())
            elif tag == b"E":
                code = fields(body).get("C", "?????")
            elif tag == b"Z":
                return tags, code

    def close(self):
        try:
            self.writer.write(msg(b"X", b""))
            self.writer.close()
        except Exception:
            pass


async def connect(a, database=None, user=None, keyed=False):
    """Connects through pgsluice (or directly); `keyed` keeps the BackendKeyData."""
    if not keyed:
        r, w = await asyncio.wait_for(
            pg_connect(a.host, a.port, user or a.user, database or a.database, a.password), 30
        )
        return Conn(r, w, None)
    r, w = await asyncio.open_connection(a.host, a.port)
    return await asyncio.wait_for(login_keyed(r, w, a), 30)


async def login_keyed(reader, writer, a):
    import base64
    import hashlib
    import hmac as hm

    from helper import salted_password

    params = b"user\0" + a.user.encode() + b"\0database\0" + a.database.encode() + b"\0\0"
    body = struct.pack("!i", 196608) + params
    writer.write(struct.pack("!i", len(body) + 4) + body)
    await writer.drain()
    key, scram = None, None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            writer.close()
            raise PgError(fields(body).get("C", "?????"))
        if tag == b"K":
            key = struct.unpack("!ii", body[:8])
        elif tag == b"R":
            (code,) = struct.unpack("!i", body[:4])
            if code == 10:
                cnonce = base64.b64encode(os.urandom(18)).decode()
                first_bare = f"n=,r={cnonce}"
                first = ("n,," + first_bare).encode()
                writer.write(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
                scram = (cnonce, first_bare)
            elif code == 11:
                server_first = body[4:].decode()
                attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                cnonce, first_bare = scram
                salted = salted_password(a.password, base64.b64decode(attrs["s"]), int(attrs["i"]))
                client_key = hm.new(salted, b"Client Key", hashlib.sha256).digest()
                stored_key = hashlib.sha256(client_key).digest()
                final_bare = f"c=biws,r={attrs['r']}"
                auth_msg = f"{first_bare},{server_first},{final_bare}".encode()
                sig = hm.new(stored_key, auth_msg, hashlib.sha256).digest()
                proof = bytes(x ^ y for x, y in zip(client_key, sig))
                writer.write(msg(b"p", f"{final_bare},p={base64.b64encode(proof).decode()}".encode()))
            elif code not in (0, 12):
                raise PgError(f"unsupported authentication request {code}")
            await writer.drain()
        elif tag == b"Z":
            return Conn(reader, writer, key)


class Stats:
    def __init__(self):
        self.committed = set()
        self.failed = set()
        self.unknown = set()
        self.errors = {}  # sqlstate or kind -> count
        self.connects = 0
        self.connect_failures = 0
        self.cancels_ok = 0
        self.cancels_missed = 0
        self.cancel_errors = 0
        self.events = []

    def error(self, code):
        self.errors[code] = self.errors.get(code, 0) + 1


BROKEN = (ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.TimeoutError)


async def ledger_client(a, n, stats, deadline):
    seq = 0
    rng = random.Random(n)
    while time.monotonic() < deadline:
        try:
            c = await connect(a)
            stats.connects += 1
        except PgError as e:
            stats.connect_failures += 1
            stats.error("connect " + str(e).split()[1] if len(str(e).split()) > 1 else "connect")
            await asyncio.sleep(0.5)
            continue
        except BROKEN as e:
            stats.connect_failures += 1
            stats.error("connect " + type(e).__name__)
            await asyncio.sleep(0.5)
            continue
        for _ in range(rng.randint(1, 60)):
            if time.monotonic() >= deadline:
                break
            seq += 1
            ident = (n, seq)
            sent_commit = False
            try:
                _, code = await asyncio.wait_for(c.query("BEGIN"), 30)
                if code is None:
                    _, code = await asyncio.wait_for(
                        c.query(f"INSERT INTO soak_ledger (client, seq) VALUES ({n}, {seq})"), 30
                    )
                if code is None:
                    sent_commit = True
                    tags, code = await asyncio.wait_for(c.query("COMMIT"), 30)
                    if code is None and tags == ["COMMIT"]:
                        stats.committed.add(ident)
                    else:
                        stats.failed.add(ident)
                else:
                    stats.failed.add(ident)
                    await asyncio.wait_for(c.query("ROLLBACK"), 30)
                if code is not None:
                    stats.error(code)
            except BROKEN as e:
                (stats.unknown if sent_commit else stats.failed).add(ident)
                stats.error("connection " + type(e).__name__)
                break
            await asyncio.sleep(rng.uniform(0.005, 0.05))
        c.close()
        await asyncio.sleep(rng.uniform(0, 0.2))


async def cancel_client(a, stats, deadline):
    while time.monotonic() < deadline - 5:
        try:
            c = await connect(a, keyed=True)
            q = asyncio.ensure_future(c.query("SELECT pg_sleep(3)"))
            await asyncio.sleep(0.3)
            r, w = await asyncio.open_connection(a.host, a.port)
            pid, secret = c.key
            w.write(struct.pack("!iiii", 16, 80877102, pid, secret))
            await w.drain()
            w.close()
            _, code = await asyncio.wait_for(q, 15)
            if code == "57014":
                stats.cancels_ok += 1
            else:
                stats.cancels_missed += 1
                if code:
                    stats.error(code)
            c.close()
        except (PgError,) + BROKEN as e:
            stats.cancel_errors += 1
            stats.error("cancel " + type(e).__name__)
        await asyncio.sleep(2)


def proc_sample(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def scrape(a):
    text = urllib.request.urlopen(f"http://{a.metrics}/metrics", timeout=5).read().decode()
    g = {"clients": 0.0, "servers": 0.0, "servers_by_state": {}}
    for line in text.splitlines():
        m = re.match(r'^pgsluice_(client|server)_connections\{([^}]*)\} ([0-9.e+-]+)$', line)
        if not m:
            continue
        v = float(m.group(3))
        if m.group(1) == "client":
            g["clients"] += v
        else:
            g["servers"] += v
            st = re.search(r'state="([^"]*)"', m.group(2))
            if st:
                g["servers_by_state"][st.group(1)] = g["servers_by_state"].get(st.group(1), 0) + v
    return g


async def sampler(a, samples, t0, deadline, out):
    while time.monotonic() < deadline:
        s = {"t": round(time.monotonic() - t0, 1)}
        try:
            s.update(proc_sample(a.pid))
            s.update({k: v for k, v in scrape(a).items() if k != "servers_by_state"})
        except Exception as e:  # noqa: BLE001
            s["error"] = str(e)
        samples.append(s)
        out.write(json.dumps(s) + "\n")
        out.flush()
        await asyncio.sleep(a.sample_seconds)


async def events(a, stats, t0, duration):
    plan = [(0.40, "admin RELOAD"), (0.45, "SIGHUP"), (0.60, "upstream restart")]
    for frac, what in plan:
        wait = t0 + frac * duration - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        at = round(time.monotonic() - t0, 1)
        ok, detail = True, ""
        try:
            if what == "admin RELOAD":
                c = await connect(a, database="pgsluice", user=a.user)
                tags, code = await c.query("RELOAD")
                c.close()
                ok, detail = code is None, str(code or tags)
            elif what == "SIGHUP":
                os.kill(a.pid, signal.SIGHUP)
            else:
                r = await asyncio.to_thread(
                    subprocess.run, a.restart_cmd, shell=True, capture_output=True, timeout=120
                )
                ok, detail = r.returncode == 0, (r.stderr or r.stdout).decode()[-200:]
        except Exception as e:  # noqa: BLE001
            ok, detail = False, repr(e)
        stats.events.append({"t": at, "event": what, "ok": ok, "detail": detail})
        print(f"[soak] t={at}s {what}: {'ok' if ok else 'FAILED ' + detail}", file=sys.stderr)


def slope_mb_per_hour(points):
    """Least-squares slope of (seconds, KiB) in MB/h."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx * 3600 / 1024


async def end_checks(a, stats):
    checks = {}
    direct = argparse.Namespace(**{**vars(a), "port": a.pg_port})
    # Gauges settle: in-flight cleanups finish, the janitor closes servers the restart killed.
    deadline = time.monotonic() + 30
    while True:
        g = scrape(a)
        c = await connect(direct)
        _, _ = await c.query("SELECT 1")
        rows = await rows_of(
            c,
            "SELECT count(*) FILTER (WHERE true), "
            "count(*) FILTER (WHERE state = 'idle in transaction'), "
            "count(*) FILTER (WHERE state <> 'idle' AND wait_event = 'ClientRead') "
            "FROM pg_stat_activity WHERE usename = current_user AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' "
            # The budget's control connection is not a pool server (and not in the gauge).
            "AND application_name NOT LIKE 'pgsluice:fleet=%'",
        )
        c.close()
        servers_pg, idle_in_txn, client_read = (int(x) for x in rows[0])
        ok = servers_pg == g["servers"] and g["clients"] == a.baseline_clients and idle_in_txn == 0
        if ok or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    c = await connect(direct)
    checks["proxy_backends"] = {
        f"{r[0]}/{r[1]}": int(r[2])
        for r in await rows_of(
            c,
            "SELECT application_name, state, count(*) FROM pg_stat_activity "
            "WHERE usename = current_user AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' GROUP BY 1, 2",
        )
    }
    checks["servers_gauge_by_state"] = g["servers_by_state"]
    c.close()
    checks["server_connections_in_pg_stat_activity"] = servers_pg
    checks["server_connections_gauge"] = g["servers"]
    checks["servers_match"] = servers_pg == g["servers"]
    checks["idle_in_transaction"] = idle_in_txn
    checks["stuck_in_client_read"] = client_read
    checks["clients_gauge"] = g["clients"]
    checks["clients_baseline"] = a.baseline_clients
    checks["clients_back_to_baseline"] = g["clients"] == a.baseline_clients
    t = time.monotonic()
    try:
        c = await asyncio.wait_for(connect(a), 5)
        _, code = await asyncio.wait_for(c.query("SELECT 1"), 5)
        c.close()
        checks["select_1_ok"] = code is None
    except Exception as e:  # noqa: BLE001
        checks["select_1_ok"] = False
        checks["select_1_error"] = repr(e)
    checks["select_1_seconds"] = round(time.monotonic() - t, 3)
    # The ledger.
    c = await connect(direct)
    rows = await rows_of(c, "SELECT client, seq FROM soak_ledger")
    c.close()
    in_db = {(int(x), int(y)) for x, y in rows}
    checks["rows_in_table"] = len(in_db)
    checks["commits_acknowledged"] = len(stats.committed)
    checks["lost"] = len(stats.committed - in_db)
    checks["phantom"] = len(stats.failed & in_db)
    checks["unknown_outcome"] = len(stats.unknown)
    checks["unknown_outcome_committed"] = len(stats.unknown & in_db)
    checks["untracked_rows"] = len(in_db - stats.committed - stats.failed - stats.unknown)
    return checks


async def rows_of(c, sql):
    c.writer.write(msg(b"Q", sql.encode() + b"\0"))
    await c.writer.drain()
    rows, err = [], None
    while True:
        tag, body = await read_msg(c.reader)
        if tag == b"D":
            (n,) = struct.unpack("!h", body[:2])
            pos, row = 2, []
            for _ in range(n):
                (ln,) = struct.unpack("!i", body[pos : pos + 4])
                pos += 4
                row.append(None if ln < 0 else body[pos : pos + ln].decode())
                pos += max(ln, 0)
            rows.append(row)
        elif tag == b"E":
            err = fields(body)
        elif tag == b"Z":
            if err:
                raise PgError(str(err))
            return rows


async def main(a):
    stats = Stats()
    samples = []
    t0 = time.monotonic()
    deadline = t0 + a.duration
    if a.baseline_clients is None:
        a.baseline_clients = scrape(a)["clients"]
    with open(os.path.join(a.out, "samples.jsonl"), "w") as out:
        tasks = [asyncio.ensure_future(sampler(a, samples, t0, deadline + 60, out))]
        load = [asyncio.ensure_future(ledger_client(a, n, stats, deadline)) for n in range(a.clients)]
        load.append(asyncio.ensure_future(cancel_client(a, stats, deadline)))
        load.append(asyncio.ensure_future(events(a, stats, t0, a.duration)))
        hard = a.duration * 2 + 300
        done, pending = await asyncio.wait(load, timeout=hard)
        for p in pending:
            p.cancel()
        for d in done:
            if d.exception():
                print(f"[soak] a load task failed: {d.exception()!r}", file=sys.stderr)
        # Wait for pgbench's loop (soak.sh) to finish, then check.
        for _ in range(300):
            if not a.wait_file or os.path.exists(a.wait_file):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(3)
        checks = await end_checks(a, stats)
        end_sample = {"t": round(time.monotonic() - t0, 1), **proc_sample(a.pid), "end": True}
        samples.append(end_sample)
        out.write(json.dumps(end_sample) + "\n")
        for t in tasks:
            t.cancel()
    warm = a.warmup
    pts = [(s["t"], s["VmRSS"]) for s in samples if "VmRSS" in s and s["t"] >= warm]
    first = [s for s in samples if "VmRSS" in s]
    result = {
        "duration_seconds": a.duration,
        "warmup_seconds": warm,
        "ledger_clients": a.clients,
        "rss_kib_start": first[0]["VmRSS"] if first else None,
        "rss_kib_after_warmup": pts[0][1] if pts else None,
        "rss_kib_end": first[-1]["VmRSS"] if first else None,
        "rss_kib_max": max((s["VmRSS"] for s in first), default=None),
        "rss_growth_mb_per_hour_after_warmup": slope_mb_per_hour(pts),
        "fds_start": first[0].get("fds") if first else None,
        "fds_end": first[-1].get("fds") if first else None,
        "fds_max": max((s.get("fds", 0) for s in first), default=None),
        "threads_end": first[-1].get("Threads") if first else None,
        "connects": stats.connects,
        "connect_failures": stats.connect_failures,
        "transactions_committed": len(stats.committed),
        "transactions_failed": len(stats.failed),
        "cancels_ok": stats.cancels_ok,
        "cancels_missed": stats.cancels_missed,
        "cancel_errors": stats.cancel_errors,
        "errors_by_sqlstate": dict(sorted(stats.errors.items())),
        "events": stats.events,
        "checks": checks,
    }
    with open(os.path.join(a.out, "soak-client.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["checks"]), file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="pgsluice")
    p.add_argument("--pg-port", type=int, required=True, help="PostgreSQL, for the checks")
    p.add_argument("--metrics", required=True, help="HOST:PORT of pgsluice's /metrics")
    p.add_argument("--pid", type=int, required=True, help="pgsluice's pid")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--warmup", type=float, default=300)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--sample-seconds", type=float, default=10)
    p.add_argument("--restart-cmd", required=True)
    p.add_argument("--wait-file", default="")
    p.add_argument("--baseline-clients", type=float, default=None)
    p.add_argument("--out", required=True)
    asyncio.run(main(p.parse_args()))
