//! PAUSE and RESUME (admin console), kept in the pools' state so that they are exact: a
//! paused pool hands out no server (not an idle one, not a slot, not the server another
//! client returns) under the same lock that hands them out, so no request slips through
//! between PAUSE and its answer. Its clients wait in its queue, which counts toward
//! `query_wait_timeout` as in PgBouncer; RESUME hands them what is idle and free room.

use std::collections::HashMap;

use super::{Grant, Pools, State};

/// One pause (of a database, or of everything), from its first PAUSE until RESUME.
#[derive(Debug)]
struct Pause {
    /// Names this pause, and no later one: a PAUSE given up takes back only the pause it
    /// made or joined, never one made after a RESUME (see [`Pools::withdraw_pause`]).
    token: u64,
    /// PAUSEs of it still waiting for their answer.
    waiting: u32,
    /// A PAUSE of it answered: it holds until RESUME, whoever gives up.
    held: bool,
}

/// Which databases are paused.
#[derive(Debug, Default)]
pub(super) struct Paused {
    /// `PAUSE` of everything.
    all: Option<Pause>,
    databases: HashMap<String, Pause>,
    /// The last token given.
    tokens: u64,
}

impl Paused {
    pub(super) fn covers(&self, database: &str) -> bool {
        self.all.is_some() || self.databases.contains_key(database)
    }

    fn entry(&mut self, database: Option<&str>) -> Option<&mut Pause> {
        match database {
            None => self.all.as_mut(),
            Some(d) => self.databases.get_mut(d),
        }
    }

    fn new_pause(&mut self) -> Pause {
        self.tokens += 1;
        Pause {
            token: self.tokens,
            waiting: 1,
            held: false,
        }
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
    /// now on. See [`Pools::busy`] for when its running transactions are over. `Some(token)`
    /// while the pause has not answered yet (this call made it, or joins another PAUSE of
    /// the same database still waiting): the caller gives the token to
    /// [`Pools::pause_answered`] when it answers, or to [`Pools::withdraw_pause`] if it
    /// gives up first.
    pub fn pause(&self, database: Option<&str>) -> Result<Option<u64>, PauseError> {
        let mut st = self.lock();
        if st.paused.all.is_some() {
            return Err(PauseError::AlreadyPaused);
        }
        let token = match database {
            None => {
                let p = st.paused.new_pause();
                let token = p.token;
                st.paused.all = Some(p);
                Some(token)
            }
            Some(d) => match st.paused.databases.get_mut(d) {
                Some(p) if p.held => None,
                Some(p) => {
                    p.waiting += 1;
                    Some(p.token)
                }
                None => {
                    let p = st.paused.new_pause();
                    let token = p.token;
                    st.paused.databases.insert(d.to_owned(), p);
                    Some(token)
                }
            },
        };
        st.apply_paused();
        Ok(token)
    }

    /// A PAUSE holding `token` answered: the pause holds until RESUME.
    pub fn pause_answered(&self, database: Option<&str>, token: u64) {
        let mut st = self.lock();
        if let Some(p) = st.paused.entry(database).filter(|p| p.token == token) {
            p.held = true;
        }
    }

    /// Resumes `database` (everything when `None`): its waiting clients get the idle servers
    /// and free room, oldest first, and the room other pools hold idle.
    pub fn resume(&self, database: Option<&str>) -> Result<(), PauseError> {
        let mut st = self.lock();
        match database {
            None if st.paused.all.is_none() && st.paused.databases.is_empty() => {
                return Err(PauseError::NotPaused)
            }
            None => {
                st.paused.all = None;
                st.paused.databases.clear();
            }
            Some(_) if st.paused.all.is_some() => return Err(PauseError::AllPaused),
            Some(d) if st.paused.databases.remove(d).is_none() => {
                return Err(PauseError::DatabaseNotPaused)
            }
            Some(_) => {}
        }
        let_go(st);
        Ok(())
    }

    /// A PAUSE holding `token` gave up before it answered (cancelled, or its client left).
    /// The pause is taken back when no other PAUSE of it waits and none answered; only
    /// that pause (`PAUSE` of everything leaves the databases paused by name). After a
    /// RESUME the token names nothing, so a later PAUSE's pause is left alone. True when
    /// something was taken back.
    pub fn withdraw_pause(&self, database: Option<&str>, token: u64) -> bool {
        let mut st = self.lock();
        let Some(p) = st.paused.entry(database).filter(|p| p.token == token) else {
            return false;
        };
        p.waiting = p.waiting.saturating_sub(1);
        if p.waiting > 0 || p.held {
            return false;
        }
        match database {
            None => st.paused.all = None,
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
            None => st.paused.all.is_some(),
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
