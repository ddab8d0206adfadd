#!/usr/bin/env node
// node-postgres (`pg`) named queries through pgsluice in transaction mode.
//
// Run by tests/drivers.rs. Connects with the libpq environment (PGHOST, PGPORT, PGUSER,
// PGPASSWORD, PGDATABASE), which `pg` reads itself, to a transaction-mode pool smaller than
// the client count. node-postgres sends a named query's Parse once per connection and then
// only Bind/Execute/Sync under its name, so every client's later transactions rely on
// pgsluice to prepare the statement on whichever server they get. Concurrent clients:
//
// - use shared names for shared texts, and one name ('own') for a text of each client's
//   own, so the same name means different statements on different clients;
// - check every row; run named queries inside BEGIN/COMMIT and ROLLBACK; hit a named query
//   that fails at execution and go on; run `DEALLOCATE ALL` and `DEALLOCATE <name>`;
// - also go through a pg.Pool whose connections outnumber pgsluice's servers.
//
// Bounded: CLIENTS clients of ITERATIONS iterations, loopback only, a watchdog ends the
// process after DEADLINE seconds. Exits 0 and prints `node-postgres OK ...` when every row
// was right; otherwise prints each failure and exits 1 (2 on a timeout).
'use strict';

const { Client, Pool } = require('pg');

const CLIENTS = Number(process.argv[2] || 24);
const ITERATIONS = Number(process.argv[3] || 30);
const DEADLINE = Number(process.env.DRIVER_DEADLINE || 150);
const ROWS = 200;

if (!['127.0.0.1', 'localhost', '::1'].includes(process.env.PGHOST)) {
  console.log('node-postgres FAIL: PGHOST must be a loopback address');
  process.exit(1);
}

const watchdog = setTimeout(() => {
  console.log(`node-postgres FAIL: still running after ${DEADLINE}s`);
  process.exit(2);
}, DEADLINE * 1000);

let checked = 0;
const failures = [];

function expect(what, got, want) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) {
    throw new Error(`${what}: got ${g}, want ${w}`);
  }
  checked += 1;
}

function range(lo, hi) {
  const out = [];
  for (let i = lo; i <= hi; i++) out.push(i);
  return out;
}

const BY_ID = { name: 'by-id', text: 'SELECT id, label FROM items WHERE id = $1', rowMode: 'array' };
const RANGE = { name: 'range', text: 'SELECT id FROM items WHERE id BETWEEN $1 AND $2 ORDER BY id', rowMode: 'array' };
const LOG = { name: 'log', text: 'INSERT INTO log VALUES ($1, $2, $3)' };
const COUNT = { name: 'count', text: 'SELECT count(*)::int AS n FROM log WHERE worker = $1' };
const DIV = { name: 'div', text: 'SELECT 10 / $1::int AS q' };

async function iteration(c, w, t, i) {
  const id = ((t * 11 + i) % ROWS) + 1;
  let r = await c.query({ ...BY_ID, values: [id] });
  expect('by-id', r.rows, [[id, `item ${id}`]]);
  const lo = Math.min(id, ROWS - 9);
  r = await c.query({ ...RANGE, values: [lo, lo + 9] });
  expect('range', r.rows.map((x) => x[0]), range(lo, lo + 9));
  // The name 'own' means a different text on every client.
  r = await c.query({ name: 'own', text: `SELECT $1::int + ${t} AS v, '${w}' AS w`, values: [i] });
  expect('own', r.rows, [{ v: i + t, w }]);
  if (i % 4 == 0) {
    await c.query('BEGIN');
    await c.query({ ...LOG, values: [w, i, 'txn'] });
    r = await c.query({ ...COUNT, values: [w] });
    expect('count in txn', r.rows[0].n, i / 4 + 1);
    await c.query('COMMIT');
  }
  if (i % 5 == 1) {
    // Rolled back: the insert must not stay.
    await c.query('BEGIN');
    await c.query({ ...LOG, values: [w, i, 'rolled back'] });
    await c.query('ROLLBACK');
    r = await c.query({ ...COUNT, values: [w] });
    expect('count after rollback', r.rows[0].n, Math.floor(i / 4) + 1);
  }
  if (i % 6 == 2) {
    // A named query that fails at execution, then the same name works.
    try {
      await c.query({ ...DIV, values: [0] });
      throw new Error('division by zero did not fail');
    } catch (e) {
      if (e.code !== '22012') throw e;
      checked += 1;
    }
    r = await c.query({ ...DIV, values: [5] });
    expect('div', r.rows, [{ q: 2 }]);
  }
}

async function worker(t) {
  const w = `n${t}`;
  const c = new Client({ connectionTimeoutMillis: 10000 });
  try {
    await c.connect();
    for (let i = 0; i < ITERATIONS; i++) {
      await iteration(c, w, t, i);
    }
    // DEALLOCATE, as on a direct connection: node-postgres still believes 'by-id' parsed and
    // sends only Bind, which must fail as PostgreSQL fails it (26000); a fresh connection
    // prepares it again.
    await c.query(t % 2 ? 'DEALLOCATE ALL' : 'DEALLOCATE "by-id"');
    try {
      await c.query({ ...BY_ID, values: [1] });
      throw new Error('by-id still exists after DEALLOCATE');
    } catch (e) {
      if (e.code !== '26000') throw e;
      checked += 1;
    }
    const fresh = new Client({ connectionTimeoutMillis: 10000 });
    await fresh.connect();
    try {
      const r = await fresh.query({ ...BY_ID, values: [2] });
      expect('fresh by-id', r.rows, [[2, 'item 2']]);
    } finally {
      await fresh.end();
    }
  } catch (e) {
    failures.push(`${w}: ${e.stack || e}`);
  } finally {
    await c.end().catch(() => {});
  }
}

async function poolPhase() {
  // A pg.Pool of more connections than pgsluice has servers; named queries on any of them.
  const pool = new Pool({ max: 12, connectionTimeoutMillis: 10000 });
  const jobs = [];
  for (let k = 0; k < 6 * CLIENTS; k++) {
    jobs.push(
      (async () => {
        const id = (k % ROWS) + 1;
        const r = await pool.query({ ...BY_ID, values: [id] });
        expect('pool by-id', r.rows, [[id, `item ${id}`]]);
      })().catch((e) => failures.push(`pool job ${k}: ${e.stack || e}`)),
    );
  }
  await Promise.all(jobs);
  await pool.end();
}

async function main() {
  const start = Date.now();
  const setup = new Client({ connectionTimeoutMillis: 10000 });
  await setup.connect();
  await setup.query('DROP TABLE IF EXISTS items, log');
  await setup.query("CREATE TABLE items (id int PRIMARY KEY, label text)");
  await setup.query("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, $1::int) g", [ROWS]);
  await setup.query('CREATE TABLE log (worker text, i int, note text)');
  await Promise.all(range(0, CLIENTS - 1).map(worker));
  await poolPhase();
  if (failures.length === 0) {
    const r = await setup.query({ name: 'total', text: 'SELECT count(*)::int AS n FROM log' });
    expect('total log rows', r.rows[0].n, CLIENTS * Math.ceil(ITERATIONS / 4));
  }
  await setup.end();
  clearTimeout(watchdog);
  const secs = ((Date.now() - start) / 1000).toFixed(1);
  if (failures.length) {
    console.log(`node-postgres FAIL: ${failures.length} failures`);
    for (const f of failures) console.log(f);
    process.exit(1);
  }
  const version = require('pg/package.json').version;
  console.log(`node-postgres OK: ${CLIENTS} clients x ${ITERATIONS} iterations + ${6 * CLIENTS} pool queries, ${checked} results checked in ${secs}s (pg ${version})`);
}

main().catch((e) => {
  console.log(`node-postgres FAIL: ${e.stack || e}`);
  process.exit(1);
});
