#!/usr/bin/env python3
"""psycopg 3 through pgsluice in transaction mode, every query prepared by name.

Run by tests/drivers.rs. Connects with the libpq environment (PGHOST, PGPORT, PGUSER,
PGPASSWORD, PGDATABASE) to a transaction-mode pool smaller than the client count and, with
`prepare_threshold=0` (psycopg names every statement `_pg3_N`, counting from 0 on each
connection, so the same names mean different texts on different clients):

- threads, then asyncio tasks, each running queries whose rows are checked one by one:
  shared texts, a text of the client's own under a name other clients use for other texts,
  the same text with different parameter types, transaction blocks, a failing statement,
  executemany (pipeline mode), server-side cursors, cursors closed and opened again, and
  `conn.execute("DEALLOCATE ALL")` / `DEALLOCATE ALL` via a ROLLBACK's cache flush;
- every worker also checks its own writes at the end.

Bounded: CLIENTS workers of ITERATIONS iterations each per phase, loopback only, and a
watchdog ends the process after DEADLINE seconds. Exits 0 and prints `psycopg OK ...` when
every row was right; otherwise prints each failure and exits 1 (2 on a timeout).
"""

import asyncio
import os
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors

CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 24
ITERATIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 30
# "full", or "no-sql-deallocate" to leave out the application's own DEALLOCATE ALL
# (psycopg sends it as a prepared statement like any other query).
MODE = sys.argv[3] if len(sys.argv) > 3 else "full"
SQL_DEALLOCATE = MODE == "full"
DEADLINE = float(os.environ.get("DRIVER_DEADLINE", "150"))
ROWS = 300

if os.environ.get("PGHOST") not in ("127.0.0.1", "localhost", "::1"):
    sys.exit("psycopg_check: PGHOST must be a loopback address")


def watchdog():
    time.sleep(DEADLINE)
    print(f"psycopg FAIL: still running after {DEADLINE}s", flush=True)
    os._exit(2)


threading.Thread(target=watchdog, daemon=True).start()

failures = []
checked = [0]
lock = threading.Lock()


class Wrong(Exception):
    pass


def expect(what, got, want):
    if got != want:
        raise Wrong(f"{what}: got {got!r}, want {want!r}")
    with lock:
        checked[0] += 1


def connect(autocommit):
    return psycopg.connect(prepare_threshold=0, autocommit=autocommit, connect_timeout=10)


def setup():
    with connect(True) as c:
        c.execute("DROP TABLE IF EXISTS items, log")
        c.execute("CREATE TABLE items (id int PRIMARY KEY, label text, n bigint NOT NULL DEFAULT 0)")
        c.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, %s) g", (ROWS,))
        c.execute("CREATE TABLE log (worker text, i int, note text)")


def iteration(conn, w, t, i, autocommit):
    """One iteration of worker `w` (number t); every result is checked."""
    id_ = (t * 13 + i) % ROWS + 1
    # A shared text: every client prepares it under its own _pg3_N name.
    row = conn.execute("SELECT id, label FROM items WHERE id = %s", (id_,)).fetchone()
    expect("by id", row, (id_, f"item {id_}"))
    lo = min(id_, ROWS - 9)
    rows = conn.execute("SELECT id FROM items WHERE id BETWEEN %s AND %s ORDER BY id", (lo, lo + 9)).fetchall()
    expect("range", [r[0] for r in rows], list(range(lo, lo + 10)))
    # A text of this client's own: other clients hold different texts under the same names.
    row = conn.execute(f"SELECT %s::int + {t}, '{w}'", (i,)).fetchone()
    expect("own text", row, (i + t, w))
    # The same text with other parameter types is another statement.
    expect("int param", conn.execute("SELECT %s", (i,)).fetchone(), (i,))
    expect("text param", conn.execute("SELECT %s", (f"{w}-{i}",)).fetchone(), (f"{w}-{i}",))
    expect("no rows", conn.execute("SELECT id FROM items WHERE id < %s", (0,)).fetchall(), [])
    if not autocommit:
        conn.commit()

    if i % 5 == 0:
        # A transaction block: several prepared statements on one server.
        with conn.transaction():
            conn.execute("UPDATE items SET n = n + 1 WHERE id = %s", (t + 1,))
            conn.execute("INSERT INTO log VALUES (%s, %s, %s)", (w, i, "txn"))
            row = conn.execute("SELECT count(*) FROM log WHERE worker = %s", (w,)).fetchone()
            if row[0] < 1:
                raise Wrong(f"log count inside the transaction: {row}")
    if i % 6 == 1:
        # A statement that fails at execution: reported once, the connection goes on.
        try:
            conn.execute("SELECT 1 / %s", (0,))
            raise Wrong("division by zero did not fail")
        except errors.DivisionByZero:
            if not autocommit:
                conn.rollback()  # psycopg flushes its statement cache: DEALLOCATE ALL
        expect("after error", conn.execute("SELECT %s::int * 2", (i,)).fetchone(), (i * 2,))
    if i % 7 == 2:
        # executemany runs in pipeline mode: Parse/Bind/Execute batches.
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO log VALUES (%s, %s, %s)", [(w, i, f"many {k}") for k in range(5)])
        if not autocommit:
            conn.commit()
    if i % 8 == 3:
        # Cursors closed and opened again, on the same statements.
        for _ in range(2):
            cur = conn.cursor()
            cur.execute("SELECT id FROM items WHERE id <= %s ORDER BY id", (3,))
            expect("cursor", cur.fetchall(), [(1,), (2,), (3,)])
            cur.close()
        cur = conn.cursor()
        cur.execute("SELECT label FROM items WHERE id = %s", (id_,))
        expect("cursor reuse", cur.fetchone(), (f"item {id_}",))
        cur.execute("SELECT label FROM items WHERE id = %s", (1,))
        expect("cursor reuse 2", cur.fetchone(), ("item 1",))
        cur.close()
        if not autocommit:
            conn.commit()
    if i % 9 == 4:
        # A server-side cursor (DECLARE without HOLD) inside a transaction.
        with conn.transaction():
            with conn.cursor(name=f"cur_{t}") as cur:
                cur.itersize = 7
                cur.execute("SELECT id FROM items WHERE id > %s ORDER BY id", (ROWS - 20,))
                expect("server cursor", [r[0] for r in cur], list(range(ROWS - 19, ROWS + 1)))
    if i % 10 == 7 and SQL_DEALLOCATE:
        # DEALLOCATE ALL as the application sends it; psycopg forgets its statements too.
        conn.execute("DEALLOCATE ALL")
        if not autocommit:
            conn.commit()
        expect("after deallocate", conn.execute("SELECT id, label FROM items WHERE id = %s", (id_,)).fetchone(), (id_, f"item {id_}"))


def log_rows(i_max):
    """Rows a worker logs over iterations 0..i_max-1."""
    return sum(1 for i in range(i_max) if i % 5 == 0) + sum(5 for i in range(i_max) if i % 7 == 2)


def thread_worker(t):
    w = f"t{t}"
    autocommit = t % 2 == 0
    try:
        with connect(autocommit) as conn:
            for i in range(ITERATIONS):
                iteration(conn, w, t, i, autocommit)
            n = conn.execute("SELECT count(*) FROM log WHERE worker = %s", (w,)).fetchone()[0]
            expect(f"{w} log rows", n, log_rows(ITERATIONS))
    except Exception as e:  # noqa: BLE001 - every failure is reported
        with lock:
            failures.append(f"{w}: {type(e).__name__}: {e}\n{traceback.format_exc()}")


async def async_iteration(conn, w, t, i):
    id_ = (t * 17 + i) % ROWS + 1
    cur = await conn.execute("SELECT id, label FROM items WHERE id = %s", (id_,))
    expect("async by id", await cur.fetchone(), (id_, f"item {id_}"))
    cur = await conn.execute(f"SELECT %s::int * {t + 1}, '{w}'", (i,))
    expect("async own text", await cur.fetchone(), (i * (t + 1), w))
    if i % 4 == 0:
        async with conn.transaction():
            await conn.execute("INSERT INTO log VALUES (%s, %s, %s)", (w, i, "async"))
            cur = await conn.execute("SELECT count(*) FROM log WHERE worker = %s", (w,))
            expect("async count", (await cur.fetchone())[0], i // 4 + 1)
    if i % 6 == 5 and SQL_DEALLOCATE:
        await conn.execute("DEALLOCATE ALL")
    # A short pause lets the tasks interleave on the pool's servers.
    await asyncio.sleep(0)


async def async_worker(t):
    w = f"a{t}"
    try:
        async with await psycopg.AsyncConnection.connect(prepare_threshold=0, autocommit=True, connect_timeout=10) as conn:
            for i in range(ITERATIONS):
                await async_iteration(conn, w, t, i)
    except Exception as e:  # noqa: BLE001
        with lock:
            failures.append(f"{w}: {type(e).__name__}: {e}\n{traceback.format_exc()}")


async def async_phase():
    await asyncio.gather(*(async_worker(t) for t in range(CLIENTS)))


def main():
    start = time.monotonic()
    setup()
    threads = [threading.Thread(target=thread_worker, args=(t,)) for t in range(CLIENTS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    asyncio.run(async_phase())
    # Totals written by every worker, read back over a fresh connection.
    if not failures:
        with connect(True) as c:
            n = c.execute("SELECT sum(n) FROM items").fetchone()[0]
            expect("updates", n, CLIENTS * sum(1 for i in range(ITERATIONS) if i % 5 == 0))
    elapsed = time.monotonic() - start
    if failures:
        print(f"psycopg FAIL: {len(failures)} of {2 * CLIENTS} workers failed", flush=True)
        for f in failures:
            print(f, flush=True)
        sys.exit(1)
    print(
        f"psycopg OK ({MODE}): {CLIENTS} threads + {CLIENTS} tasks x {ITERATIONS} iterations, "
        f"{checked[0]} results checked in {elapsed:.1f}s (psycopg {psycopg.__version__}, libpq {psycopg.pq.version()})",
        flush=True,
    )


if __name__ == "__main__":
    main()
