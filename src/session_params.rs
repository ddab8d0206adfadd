//! Tracked session parameters (`application_name`, `client_encoding`, `DateStyle`, ...) as
//! shared, immutable sets.
//!
//! Every client holds the set it asked for at login and the set it has now; every server
//! holds the set the proxy last applied to it. Most clients of an application send the same
//! startup parameters, so logins are interned: clients with equal sets share one allocation,
//! and the check before each transaction (does this server have the client's parameters?) is
//! a pointer comparison instead of a walk over two maps. A set that changes (`SET`, `RESET
//! ALL`) is copied on write.
//!
//! What a pool's server reported is shown to each of its clients at login ([`Reported`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;

use crate::protocol::messages;

/// A set of tracked parameters: lower-case name → value.
pub type SessionParams = Arc<BTreeMap<String, String>>;

/// Distinct login sets kept for sharing; logins with sets beyond these get their own copy.
const MAX_SHARED_SETS: usize = 256;

/// The login parameter sets seen so far, shared by the clients that sent them.
#[derive(Debug, Default)]
pub struct ParamSets {
    /// The set of a client that sent none (no lock taken for it).
    empty: SessionParams,
    sets: Mutex<crate::Set<SessionParams>>,
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

/// The parameters a pool's first server reported (ParameterStatus), shown to each client of
/// the pool at login. Their messages are encoded once; a login copies them whole, with the
/// client's own value in place of the server's for a parameter it set.
#[derive(Debug, Default)]
pub struct Reported {
    /// Names as the server spelled them (`DateStyle`), and lower case (as tracked).
    names: Vec<(String, String)>,
    /// Every ParameterStatus message, in the server's order.
    encoded: Vec<u8>,
    /// Where each parameter's message ends in `encoded`.
    ends: Vec<usize>,
}

impl Reported {
    pub fn new(params: &[(String, String)]) -> Reported {
        let mut buf = BytesMut::new();
        let mut ends = Vec::with_capacity(params.len());
        for (name, value) in params {
            messages::parameter_status(&mut buf, name, value);
            ends.push(buf.len());
        }
        Reported {
            names: params
                .iter()
                .map(|(n, _)| (n.clone(), n.to_ascii_lowercase()))
                .collect(),
            encoded: buf.to_vec(),
            ends,
        }
    }

    /// Writes the ParameterStatus messages of a login whose startup packet set `own`
    /// (tracked names, lower case).
    pub fn write(&self, own: &BTreeMap<String, String>, buf: &mut BytesMut) {
        let mut copied = 0;
        if !own.is_empty() {
            for (i, (name, lower)) in self.names.iter().enumerate() {
                if let Some(value) = own.get(lower) {
                    let start = if i == 0 { 0 } else { self.ends[i - 1] };
                    buf.extend_from_slice(&self.encoded[copied..start]);
                    messages::parameter_status(buf, name, value);
                    copied = self.ends[i];
                }
            }
        }
        buf.extend_from_slice(&self.encoded[copied..]);
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
    fn a_login_is_shown_the_server_values_with_its_own_in_place() {
        let server: Vec<(String, String)> = [
            ("application_name", ""),
            ("DateStyle", "ISO, MDY"),
            ("server_version", "15.8"),
            ("TimeZone", "UTC"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let reported = Reported::new(&server);
        let expect = |pairs: &[(&str, &str)]| {
            let mut buf = BytesMut::new();
            for (k, v) in pairs {
                messages::parameter_status(&mut buf, k, v);
            }
            buf
        };
        let shown = |own: &[(&str, &str)]| {
            let mut buf = BytesMut::from(&b"before"[..]);
            reported.write(&set(own), &mut buf);
            assert_eq!(&buf[..6], b"before");
            buf.split_off(6)
        };
        let as_server = [
            ("application_name", ""),
            ("DateStyle", "ISO, MDY"),
            ("server_version", "15.8"),
            ("TimeZone", "UTC"),
        ];
        assert_eq!(shown(&[]), expect(&as_server));
        // A tracked name the server did not report is not shown.
        assert_eq!(shown(&[("search_path", "app")]), expect(&as_server));
        // The first and the last, under the server's spelling.
        assert_eq!(
            shown(&[("application_name", "web"), ("timezone", "Europe/Paris")]),
            expect(&[
                ("application_name", "web"),
                ("DateStyle", "ISO, MDY"),
                ("server_version", "15.8"),
                ("TimeZone", "Europe/Paris"),
            ])
        );
        assert_eq!(
            shown(&[("datestyle", "German")]),
            expect(&[
                ("application_name", ""),
                ("DateStyle", "German"),
                ("server_version", "15.8"),
                ("TimeZone", "UTC"),
            ])
        );
        assert!(shown_nothing(&Reported::default()));
    }

    fn shown_nothing(r: &Reported) -> bool {
        let mut buf = BytesMut::new();
        r.write(&set(&[("application_name", "web")]), &mut buf);
        buf.is_empty()
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
