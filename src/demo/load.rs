//! The demo's load: workers of a Rails/Sidekiq-style app that fill in product specs, each
//! job reading a product, "calling an API" and writing the result.
//!
//! - Holding (phase 1): the job opens a transaction, claims a product, waits for the API
//!   while the transaction stays open, then writes and commits. The server sits idle
//!   inside the transaction for the whole call: that is the hoarding pgsluice measures.
//! - Releasing (phase 2, "the fix deployed"): the claim and the write are each a short
//!   statement of their own; nothing is held during the API call.
//!
//! Every worker has its own client connection to pgsluice (one per thread, as ActiveRecord
//! gives each thread its own connection). A switch of phase stops the old workers, as a
//! deploy stops the old processes, and starts new ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// What a job does with its connection around the API call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Holding,
    Releasing,
}

/// What the workers of one phase did, as they saw it.
#[derive(Debug, Default)]
pub struct Counts {
    /// Jobs finished: product claimed, API called, specs written.
    pub products: AtomicU64,
    /// Statements refused with 53300 (query_wait_timeout): no connection within the wait.
    pub timeouts: AtomicU64,
    /// Any other failure (connect, lost connection, SQL).
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl Counts {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The SQL that makes the table the workers go through.
pub fn schema_sql(products: u32) -> String {
    format!(
        "CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, specs text, claimed_at timestamptz, filled_at timestamptz);\n\
         INSERT INTO products (id, name) SELECT i, 'product ' || i FROM generate_series(1, {products}) i;\n\
         CREATE INDEX products_unclaimed ON products (id) WHERE claimed_at IS NULL;"
    )
}

const CLAIM: &str = "UPDATE products SET claimed_at = now() WHERE id = \
     (SELECT id FROM products WHERE claimed_at IS NULL ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
     RETURNING id";

fn fill(id: &str) -> String {
    format!(
        "UPDATE products SET specs = 'specs written from the API''s answer', filled_at = now() WHERE id = {id}"
    )
}

/// The first column of the first row, if any.
fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}

/// One job: Ok(true) when a product was filled in, Ok(false) when none was left.
async fn job(c: &Client, phase: Phase, api_call: Duration) -> Result<bool, tokio_postgres::Error> {
    match phase {
        Phase::Holding => {
            c.simple_query("BEGIN").await?;
            let result = async {
                let Some(id) = first_value(&c.simple_query(CLAIM).await?) else {
                    return Ok(false);
                };
                // The API call, inside the transaction: the server waits with it.
                tokio::time::sleep(api_call).await;
                c.simple_query(&fill(&id)).await?;
                Ok(true)
            }
            .await;
            match result {
                Ok(done) => {
                    c.simple_query("COMMIT").await?;
                    Ok(done)
                }
                Err(e) => {
                    let _ = c.simple_query("ROLLBACK").await;
                    Err(e)
                }
            }
        }
        Phase::Releasing => {
            let Some(id) = first_value(&c.simple_query(CLAIM).await?) else {
                return Ok(false);
            };
            // The API call, with no transaction open: pgsluice lends the server to others.
            tokio::time::sleep(api_call).await;
            c.simple_query(&fill(&id)).await?;
            Ok(true)
        }
    }
}

/// An error with the server's message and SQLSTATE, when it sent one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

async fn connect(conn: &str) -> Result<Client, String> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_postgres::connect(conn, NoTls),
    )
    .await
    .map_err(|_| "connecting to pgsluice timed out".to_owned())?
    .map_err(|e| format!("connecting to pgsluice: {}", describe(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn worker(
    conn: Arc<str>,
    mut client: Option<Client>,
    phase: Phase,
    api_call: Duration,
    counts: Arc<Counts>,
) {
    loop {
        let c = match client.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => match connect(&conn).await {
                Ok(c) => c,
                Err(e) => {
                    counts.error(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        match job(&c, phase, api_call).await {
            Ok(true) => {
                counts.products.fetch_add(1, Ordering::Relaxed);
            }
            // Every product is done: idle like a worker with an empty queue.
            Ok(false) => tokio::time::sleep(api_call).await,
            Err(e) if e.code().map(|c| c.code()) == Some("53300") => {
                // ActiveRecord::ConnectionTimeoutError in the story: the job fails and is
                // retried.
                counts.timeouts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                counts.error(describe(&e));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        client = Some(c);
    }
}

/// The workers of one phase; dropping it stops them (their connections close).
#[derive(Debug)]
pub struct Workers {
    tasks: JoinSet<()>,
}

impl Workers {
    /// Opens `n` connections with `conn` (a tokio-postgres connection string), all at once,
    /// so that logging in is not part of a phase. A login that fails (on a machine so busy
    /// that the pool's first server takes longer than the checkout timeout, say) is tried
    /// again, up to 5 times.
    pub async fn connect(n: u32, conn: &str) -> Result<Vec<Client>, String> {
        let mut logins = JoinSet::new();
        for _ in 0..n {
            let conn = conn.to_owned();
            logins.spawn(async move {
                let mut tries = 0;
                loop {
                    match connect(&conn).await {
                        Ok(c) => return Ok(c),
                        Err(e) if tries == 4 => return Err(e),
                        Err(_) => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            });
        }
        let mut out = Vec::with_capacity(n as usize);
        while let Some(c) = logins.join_next().await {
            out.push(c.map_err(|e| e.to_string())??);
        }
        Ok(out)
    }

    /// Starts a worker on each client; one that loses its connection opens another with
    /// `conn`.
    pub fn start(
        clients: Vec<Client>,
        conn: &str,
        phase: Phase,
        api_call: Duration,
        counts: Arc<Counts>,
    ) -> Workers {
        let conn: Arc<str> = conn.into();
        let mut tasks = JoinSet::new();
        for c in clients {
            tasks.spawn(worker(
                conn.clone(),
                Some(c),
                phase,
                api_call,
                counts.clone(),
            ));
        }
        Workers { tasks }
    }

    /// Stops every worker and waits until they are gone.
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}
