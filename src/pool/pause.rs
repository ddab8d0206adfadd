//! PAUSE and RESUME (admin console), kept in the pools' state so that they are exact: a
//! paused pool hands out no server (not an idle one, not a slot, not the server another
//! client returns) under the same lock that hands them out, so no request slips through
//! between PAUSE and its answer. Its clients wait in its queue, which counts toward
//! `query_wait_timeout` as in PgBouncer; RESUME hands them what is idle and free room.

use std::collections::HashSet;

use super::{Grant, Pools, State};

/// Which databases are paused.
#[derive(Debug, Default)]
pub(super) struct Paused {
    /// `PAUSE` of everything.
    all: bool,
    databases: HashSet<String>,
    /// RESUMEs so far: a PAUSE withdrawn before it answered takes back its pause only if
    /// none came since (after one, what is paused may be another PAUSE's).
    resumes: u64,
}

impl Paused {
    pub(super) fn covers(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }
}

/// Why PAUSE or RESUME was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PauseError {
    /// PAUSE while everything is paused.
    AlreadyPaused,
    /// RESUME with nothing paused.
    NotPaused,
    /// RESUME of a database that is not paused.
    DatabaseNotPaused,
    /// RESUME of one database while everything is paused.
    AllPaused,
}

/// After the paused set shrank: the pools no longer paused hand their idle servers and free
/// room to their waiting clients, oldest first, and take back room other pools hold idle.
fn let_go(mut st: std::sync::MutexGuard<'_, State>) {
    st.apply_paused();
    for p in st.pools.iter_mut().filter(|p| !p.paused) {
        while !p.waiters.is_empty() && !p.idle.is_empty() {
            let server = p.idle.pop().expect("not empty");
            let w = p.waiters.pop_front().expect("not empty");
            w.give(Grant::Server(server));
        }
    }
    let closing = st.make_room_for_waiters();
    drop(st);
    for server in closing {
        server.close();
    }
}

impl State {
    /// Sets each pool's flag from the paused set.
    fn apply_paused(&mut self) {
        for p in self.pools.iter_mut() {
            p.paused = self.paused.covers(&p.settings.database);
        }
    }
}

impl Pools {
    /// Pauses `database` (every database when `None`): its pools hand out no server from
    /// now on. See [`Pools::busy`] for when its running transactions are over. `Some` when
    /// this call paused something that was not paused already: what
    /// [`Pools::withdraw_pause`] may take back, with the token to give it.
    pub fn pause(&self, database: Option<&str>) -> Result<Option<u64>, PauseError> {
        let mut st = self.lock();
        if st.paused.all {
            return Err(PauseError::AlreadyPaused);
        }
        let paused = match database {
            None => {
                st.paused.all = true;
                true
            }
            Some(d) => st.paused.databases.insert(d.to_owned()),
        };
        st.apply_paused();
        Ok(paused.then_some(st.paused.resumes))
    }

    /// Resumes `database` (everything when `None`): its waiting clients get the idle servers
    /// and free room, oldest first, and the room other pools hold idle.
    pub fn resume(&self, database: Option<&str>) -> Result<(), PauseError> {
        let mut st = self.lock();
        match database {
            None if !st.paused.all && st.paused.databases.is_empty() => {
                return Err(PauseError::NotPaused)
            }
            None => {
                st.paused.all = false;
                st.paused.databases.clear();
            }
            Some(_) if st.paused.all => return Err(PauseError::AllPaused),
            Some(d) if !st.paused.databases.remove(d) => return Err(PauseError::DatabaseNotPaused),
            Some(_) => {}
        }
        st.paused.resumes += 1;
        let_go(st);
        Ok(())
    }

    /// Takes back what a PAUSE that never answered paused (see [`Pools::pause`]): only that
    /// (`PAUSE` of everything leaves the databases paused by name), so a pause that
    /// answered holds. `token` is what [`Pools::pause`] returned: after a RESUME since,
    /// nothing is taken back (the pause may be another PAUSE's by then). True when
    /// something was taken back.
    pub fn withdraw_pause(&self, database: Option<&str>, token: u64) -> bool {
        let mut st = self.lock();
        if st.paused.resumes != token {
            return false;
        }
        match database {
            None => st.paused.all = false,
            Some(d) => {
                st.paused.databases.remove(d);
            }
        }
        let_go(st);
        true
    }

    /// True when `database` (or, for `None`, any database) is paused.
    pub fn is_paused(&self, database: Option<&str>) -> bool {
        let st = self.lock();
        match database {
            Some(d) => st.paused.covers(d),
            None => st.paused.all,
        }
    }

    /// True while a pool of `database` (any pool for `None`) has a server lent to a
    /// client or being opened: PAUSE answers once there is none.
    pub fn busy(&self, database: Option<&str>) -> bool {
        self.lock().pools.iter().any(|p| {
            database.is_none_or(|d| p.settings.database == d) && p.open as usize > p.idle.len()
        })
    }
}
