//! Configuration reload (SIGHUP, admin `RELOAD`): read the configuration again from where
//! it came from, check it, and apply it without dropping a client. A configuration that
//! does not load, or changes a key that needs a restart, is refused and the old one stays.

use std::path::PathBuf;
use std::sync::Arc;

use crate::app::{start_control, Shared};
use crate::auth::Credentials;
use crate::config::Config;

/// Where a configuration came from: a file (optional), the environment, and flags.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    /// Command-line flags as (key, value), applied over the file and the environment.
    pub flags: Vec<(String, String)>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, String> {
        let flags: Vec<(&str, String)> = self
            .flags
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        Config::load(self.file.as_deref(), &flags).map_err(|e| e.to_string())
    }
}

/// Keys whose change needs a restart, with what each is in `c` (SHOW CONFIG's
/// `changeable` is `no` for these).
pub(crate) fn restart_keys(c: &Config) -> Vec<(String, String)> {
    let mut keys = vec![
        ("listen".to_owned(), c.listen.clone()),
        ("listen_unix".to_owned(), c.listen_unix.clone()),
        (
            "unix_socket_mode".to_owned(),
            format!("{:o}", c.unix_socket_mode),
        ),
        ("worker_threads".to_owned(), c.worker_threads.to_string()),
        ("io_uring".to_owned(), c.io_uring.to_string()),
        ("log_format".to_owned(), format!("{:?}", c.log_format)),
        (
            "metrics.listen".to_owned(),
            format!("{:?}", c.metrics.listen),
        ),
        ("max_client_conn".to_owned(), c.max_client_conn.to_string()),
        // The metrics' label table is sized at start.
        (
            "metrics.max_applications".to_owned(),
            c.metrics.max_applications.to_string(),
        ),
        // The cancel keys handed out carry it.
        ("peer_id".to_owned(), c.peer_id.to_string()),
        ("budget.mode".to_owned(), format!("{:?}", c.budget.mode())),
        ("fleet.name".to_owned(), c.fleet.name.clone()),
    ];
    // An existing database's upstream: its servers and budget are tied to it. (Its password
    // may change: a rotated secret is used by the next server login.)
    for (name, db) in &c.databases {
        let upstream = format!("{}:{}/{:?}/{:?}", db.host, db.port, db.dbname, db.user);
        keys.push((
            format!("databases.{name} (host, port, dbname, user)"),
            upstream,
        ));
    }
    keys
}

/// Reads the configuration again and applies it. Errors say why nothing changed. One reload
/// at a time (SIGHUP and RELOAD may come together): each applies one whole file.
pub fn reload(shared: &Arc<Shared>) -> Result<(), String> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let result = apply(shared);
    match &result {
        Ok(()) => tracing::info!("configuration reloaded"),
        Err(e) => {
            shared.metrics.config_reload_errors.inc();
            tracing::error!(error = %e, "configuration reload refused; keeping the old configuration");
        }
    }
    result
}

fn apply(shared: &Arc<Shared>) -> Result<(), String> {
    let new = shared.source.load()?;
    let old = shared.pools.config();
    let before = restart_keys(&old);
    for (key, value) in restart_keys(&new) {
        if let Some((_, was)) = before.iter().find(|(k, _)| *k == key) {
            if *was != value {
                return Err(format!("{key}: changing it needs a restart"));
            }
        }
    }
    drop(old);
    // Also a database an earlier reload removed, whose pool remains.
    if let Some(key) = shared.pools.upstream_changed(&new) {
        return Err(format!("{key}: changing it needs a restart"));
    }
    let credentials = Credentials::from_config(&new, Some(&shared.credentials.load()));
    shared.credentials.store(Arc::new(credentials));
    shared.auth_query.clear();
    let reloaded = shared.pools.reload(new);
    start_control(shared, &reloaded.created);
    shared.clients.pools_removed(&reloaded.removed);
    Ok(())
}
