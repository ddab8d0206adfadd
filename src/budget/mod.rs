//! The global connection budget: how many server connections this proxy may hold, so that
//! a whole fleet of proxies stays below `max_connections × fraction` (half by default).
//!
//! The rule, from production: keep all connections to a database below half of
//! `max_connections`, so that the old and the new tasks of a deploy still fit side by side.
//! Every proxy of a fleet reads the live figures from the database through its own control
//! connection and takes its share; the database itself is the only coordinator. The
//! formulas are pure functions here, so that `pgsluice budget` and the proxy agree.
//! See `docs/budget.md` for the reasoning.

pub mod control;
pub mod plan;
pub mod report;

use std::time::{Duration, SystemTime};

/// `application_name` prefix of control connections: `pgsluice:fleet=NAME:member=ID`.
pub const FLEET_APPLICATION_PREFIX: &str = "pgsluice:fleet=";

/// Longest fleet name: `application_name` holds 63 bytes, and the prefix, `:member=` and a
/// 16-digit member id take 39 of them.
pub const MAX_FLEET_NAME: usize = 24;

/// Checks a fleet name: 1 to 24 letters, digits, `-` and `.` (none of them special in `LIKE`).
pub fn check_fleet_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_FLEET_NAME
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
    {
        return Err(format!(
            "use 1 to {MAX_FLEET_NAME} letters, digits, '-' and '.'"
        ));
    }
    Ok(())
}

/// The control connection's `application_name` for a fleet member.
pub fn member_application_name(fleet: &str, member: &str) -> String {
    format!("{FLEET_APPLICATION_PREFIX}{fleet}:member={member}")
}

/// The SQL `LIKE` pattern matching every member of a fleet: the prefix, then exactly the
/// 16 characters of a member id (fleet names are validated to hold no `%`, `_`, `\` or
/// `:`).
pub fn fleet_like_pattern(fleet: &str) -> String {
    format!("{FLEET_APPLICATION_PREFIX}{fleet}:member=________________")
}

/// What the database says about its connection limits and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Upstream {
    pub max_connections: u32,
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (PostgreSQL 16+), 0 where it does not exist.
    pub reserved_connections: u32,
    /// Client backends connected now, all users and applications.
    pub connections: u32,
    /// Live members of this proxy's fleet (control connections), itself included.
    pub members: u32,
}

impl Upstream {
    /// Connections ordinary roles can open before the database refuses them.
    pub fn usable(&self) -> u32 {
        self.max_connections.saturating_sub(
            self.superuser_reserved_connections
                .saturating_add(self.reserved_connections),
        )
    }
}

/// `floor(max_connections × fraction) − reserve`, at least 1.
pub fn fleet_budget(max_connections: u32, fraction: f64, reserve: u32) -> u32 {
    ((max_connections as f64 * fraction).floor() as u32)
        .saturating_sub(reserve)
        .max(1)
}

/// A member's share of the fleet budget: `floor(fleet_budget / members)`, at least 1.
pub fn share(fleet_budget: u32, members: u32) -> u32 {
    (fleet_budget / members.max(1)).max(1)
}

/// How many server connections (control connection included) a member may hold now.
///
/// It is its share, except that a member grows only into room the database really has,
/// split between all members: `min(share, mine + (usable − connections) / members)`. While
/// a deploy adds members, old members still hold their old share until their next refresh;
/// new members start small and grow into free room only. Members that read the same
/// figures add at most the free room together. A member that joins between another's
/// reading and the growth that reading allowed reads the room before that growth: until
/// the next refresh the two may together pass `usable` by up to the newcomer's part
/// (splitting the room between one member more would prevent that, but halves a lone
/// proxy's growth per refresh in the common case; see docs/budget.md, rule 1). A member
/// above its share stops opening servers and closes idle ones; active transactions finish
/// normally.
pub fn limit(share: u32, mine: u32, up: &Upstream) -> u32 {
    let room = up.usable().saturating_sub(up.connections);
    share
        .min(mine.saturating_add(room / up.members.max(1)))
        .max(1)
}

/// The budget figures, kept in one place for metrics, logs and `SHOW BUDGET`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// `auto` or `fixed`.
    pub mode: &'static str,
    /// Server connections this proxy may hold now (control connection included).
    pub limit: u32,
    /// This proxy's share of the fleet budget.
    pub share: u32,
    pub fleet_budget: u32,
    pub upstream: Upstream,
    /// Server connections this proxy holds (control connection included).
    pub in_use: u32,
    pub last_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
    pub refresh_errors: u64,
    pub refresh_interval: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(max: u32, conns: u32, members: u32) -> Upstream {
        Upstream {
            max_connections: max,
            superuser_reserved_connections: 3,
            reserved_connections: 0,
            connections: conns,
            members,
        }
    }

    /// Reserved counts as large as a `--plan` file may write do not overflow: nothing is
    /// usable.
    #[test]
    fn huge_reserved_counts_leave_nothing_usable() {
        let u = Upstream {
            max_connections: 100,
            superuser_reserved_connections: u32::MAX,
            reserved_connections: 1,
            ..Default::default()
        };
        assert_eq!(u.usable(), 0);
    }

    #[test]
    fn formulas() {
        assert_eq!(fleet_budget(100, 0.5, 0), 50);
        assert_eq!(fleet_budget(45, 0.5, 0), 22);
        assert_eq!(fleet_budget(20, 0.5, 4), 6);
        assert_eq!(fleet_budget(4, 0.5, 10), 1);
        assert_eq!(share(10, 4), 2);
        assert_eq!(share(10, 0), 10);
        assert_eq!(share(3, 8), 1);
    }

    #[test]
    fn a_new_member_grows_only_into_free_room() {
        // max 20, usable 17; two old members hold 5 each; two new members appear.
        let u = up(20, 10, 4);
        assert_eq!(limit(share(10, 4), 0, &u), 1, "(17-10)/4 = 1 of room each");
        // The old members, at their refresh, shrink to the new share.
        assert_eq!(limit(share(10, 4), 5, &u), 2);
        // Once the old ones shrank (total 2+2+1+1 = 6), new ones grow to the share.
        let u = up(20, 6, 4);
        assert_eq!(limit(share(10, 4), 1, &u), 2);
    }

    /// Whatever the members hold and however many join, what they may open together
    /// never passes what the database accepts.
    #[test]
    fn the_fleet_never_passes_usable() {
        for max in [10u32, 20, 45, 100] {
            for members in 1..8u32 {
                for held in 0..=max {
                    let u = up(max, held.min(max - 3), members);
                    let s = share(fleet_budget(max, 0.5, 0), members);
                    // Growth of all members together, from the same reading:
                    let growth: u32 = (0..members).map(|_| limit(s, 0, &u)).sum();
                    if u.connections + growth > u.usable() {
                        // Only the floor of 1 may pass it, when the database is already full.
                        assert!(
                            u.usable() <= u.connections + members,
                            "max {max} members {members} held {held}"
                        );
                    }
                }
            }
        }
    }
}
