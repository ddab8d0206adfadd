//! Tracked session parameters (`application_name`, `client_encoding`, `DateStyle`, ...) as
//! shared, immutable sets.
//!
//! Every client holds the set it asked for at login and the set it has now; every server
//! holds the set the proxy last applied to it. Most clients of an application send the same
//! startup parameters, so logins are interned: clients with equal sets share one allocation,
//! and the check before each transaction (does this server have the client's parameters?) is
//! a pointer comparison instead of a walk over two maps. A set that changes (`SET`, `RESET
//! ALL`) is copied on write.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// A set of tracked parameters: lower-case name → value.
pub type SessionParams = Arc<BTreeMap<String, String>>;

/// Distinct login sets kept for sharing; logins with sets beyond these get their own copy.
const MAX_SHARED_SETS: usize = 256;

/// The login parameter sets seen so far, shared by the clients that sent them.
#[derive(Debug, Default)]
pub struct ParamSets {
    /// The set of a client that sent none (no lock taken for it).
    empty: SessionParams,
    sets: Mutex<HashSet<SessionParams>>,
}

impl ParamSets {
    /// The shared set equal to `params`, made shared if there is room.
    pub fn intern(&self, params: BTreeMap<String, String>) -> SessionParams {
        if params.is_empty() {
            return self.empty.clone();
        }
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sets.get(&params) {
            return s.clone();
        }
        let s = Arc::new(params);
        if sets.len() < MAX_SHARED_SETS {
            sets.insert(s.clone());
        }
        s
    }

    /// The empty set, shared.
    pub fn empty(&self) -> SessionParams {
        self.empty.clone()
    }
}

/// Whether two sets are equal: at once when they are the same allocation.
pub fn same(a: &SessionParams, b: &SessionParams) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equal_sets_share_one_allocation() {
        let sets = ParamSets::default();
        let a = sets.intern(set(&[("application_name", "web"), ("datestyle", "ISO")]));
        let b = sets.intern(set(&[("datestyle", "ISO"), ("application_name", "web")]));
        let c = sets.intern(set(&[("application_name", "worker")]));
        assert!(Arc::ptr_eq(&sets.intern(set(&[])), &sets.empty()));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(same(&a, &b) && !same(&a, &c));
        // Equal content in another allocation is still the same set.
        assert!(same(&a, &Arc::new((*a).clone())));
    }

    #[test]
    fn sharing_is_bounded() {
        let sets = ParamSets::default();
        for i in 0..MAX_SHARED_SETS + 10 {
            sets.intern(set(&[("application_name", &i.to_string())]));
        }
        assert_eq!(sets.sets.lock().unwrap().len(), MAX_SHARED_SETS);
        // A set past the bound is still returned whole, just not shared.
        let late = sets.intern(set(&[("application_name", "late")]));
        assert_eq!(
            late.get("application_name").map(String::as_str),
            Some("late")
        );
    }
}
