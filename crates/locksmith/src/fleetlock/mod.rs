//! FleetLock, the HTTP reboot-coordination protocol of Fedora CoreOS's Zincati
//! (`docs/development/fleetlock/protocol.md` in coreos/zincati), on locksmith's
//! semaphore: `server` serves it over the cluster, `client` speaks it for the daemon's
//! `--strategy fleetlock`.
//!
//! The protocol: POST `/v1/pre-reboot` (RecursiveLock: a holder locking again
//! succeeds) and POST `/v1/steady-state` (UnlockIfHeld: releasing a slot not held
//! succeeds), each with the header `fleet-lock-protocol: true` and the body
//! `{"client_params":{"id":ID,"group":GROUP}}`. 200 is success; anything else is a
//! failure, with a JSON body `{"kind":...,"value":...}` whose kinds are few and fixed.
//!
//! This file holds the protocol itself, without IO: request checks, the error kinds
//! and their status codes, and how a group names a locksmith semaphore.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

/// The lock endpoint.
pub const PRE_REBOOT: &str = "/v1/pre-reboot";
/// The unlock endpoint.
pub const STEADY_STATE: &str = "/v1/steady-state";
/// The header every lock and unlock request carries, with the value `true`.
pub const PROTOCOL_HEADER: &str = "fleet-lock-protocol";
/// The group Zincati uses unless configured otherwise; it is locksmith's default
/// semaphore (no `--group`).
pub const DEFAULT_GROUP: &str = "default";
/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `RecursiveLock` on `/v1/pre-reboot`.
    Lock,
    /// `UnlockIfHeld` on `/v1/steady-state`.
    Unlock,
}

impl Op {
    pub fn from_path(path: &str) -> Option<Op> {
        match path {
            PRE_REBOOT => Some(Op::Lock),
            STEADY_STATE => Some(Op::Unlock),
            _ => None,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Op::Lock => PRE_REBOOT,
            Op::Unlock => STEADY_STATE,
        }
    }
}

/// The request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client_params: ClientParams,
}

/// Who asks, and for which reboot group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientParams {
    /// The lock holder: case-sensitive, non-empty (Zincati sends the machine's app-specific ID).
    pub id: String,
    /// The reboot group, `^[a-zA-Z0-9.-]+$`.
    pub group: String,
}

/// A failed request: the status code and the protocol's JSON error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {value}")]
pub struct Failure {
    #[serde(skip)]
    pub status: u16,
    /// One of the fixed kinds below (bounded cardinality, as the protocol requires).
    pub kind: String,
    pub value: String,
}

/// The error kinds this server returns, with their status codes.
pub mod kind {
    /// No such endpoint (404).
    pub const NOT_FOUND: &str = "not_found";
    /// Lock and unlock are POST only (405).
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// The `fleet-lock-protocol: true` header is missing or has another value (400).
    pub const MISSING_PROTOCOL_HEADER: &str = "missing_fleet_lock_protocol_header";
    /// A bearer token is configured and the request lacks it or has another (401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The body is larger than `MAX_BODY_BYTES` (413).
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    /// The body is not the protocol's JSON, or the ID is empty (400).
    pub const INVALID_BODY: &str = "invalid_body";
    /// The group does not match `^[a-zA-Z0-9.-]+$` (400).
    pub const INVALID_GROUP: &str = "invalid_group";
    /// The group is not one this server serves (400).
    pub const UNKNOWN_GROUP: &str = "unknown_group";
    /// Every slot of the group is held by others (409).
    pub const SEMAPHORE_FULL: &str = "failed_lock_semaphore_full";
    /// The stored semaphore is not valid; locksmith never rewrites one (500).
    pub const INVALID_SEMAPHORE: &str = "invalid_semaphore";
    /// The cluster did not answer in time (503).
    pub const CLUSTER_UNAVAILABLE: &str = "cluster_unavailable";
}

impl Failure {
    pub fn new(status: u16, kind: &str, value: impl Into<String>) -> Failure {
        Failure {
            status,
            kind: kind.to_string(),
            value: value.into(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("two strings serialize")
    }
}

/// Whether `group` is a valid reboot group: `^[a-zA-Z0-9.-]+$`.
pub fn valid_group(group: &str) -> bool {
    !group.is_empty()
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// The locksmith `--group` a FleetLock group stands for: Zincati's `default` is
/// locksmith's default semaphore, any other group the locksmith group of that name.
pub fn locksmith_group(group: &str) -> Option<&str> {
    (group != DEFAULT_GROUP).then_some(group)
}

/// Checks the protocol parts of a lock or unlock request: the header's value (`None`
/// when absent) and the body. The group's validity is checked here; whether this
/// server serves it is the server's decision.
pub fn check_request(protocol_header: Option<&[u8]>, body: &[u8]) -> Result<ClientParams, Failure> {
    if protocol_header != Some(b"true".as_slice()) {
        return Err(Failure::new(
            400,
            kind::MISSING_PROTOCOL_HEADER,
            format!("the request must carry the header '{PROTOCOL_HEADER}: true'"),
        ));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(Failure::new(
            413,
            kind::BODY_TOO_LARGE,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        ));
    }
    let req: Request = serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            400,
            kind::INVALID_BODY,
            format!("the body must be {{\"client_params\":{{\"id\":...,\"group\":...}}}}: {e}"),
        )
    })?;
    let p = req.client_params;
    if p.id.is_empty() {
        return Err(Failure::new(
            400,
            kind::INVALID_BODY,
            "client_params.id is empty",
        ));
    }
    if !valid_group(&p.group) {
        return Err(Failure::new(
            400,
            kind::INVALID_GROUP,
            format!("group {:?} does not match ^[a-zA-Z0-9.-]+$", p.group),
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(id: &str, group: &str) -> Vec<u8> {
        serde_json::to_vec(&Request {
            client_params: ClientParams {
                id: id.into(),
                group: group.into(),
            },
        })
        .unwrap()
    }

    #[test]
    fn requests_are_checked_as_the_protocol_says() {
        let ok = check_request(Some(b"true"), &body("c988", "workers")).unwrap();
        assert_eq!((ok.id.as_str(), ok.group.as_str()), ("c988", "workers"));
        // Zincati's body, with its field order and spacing.
        let zincati = br#"{ "client_params": { "group": "default", "id": "c988d2509fdf5cdcbed39037c56406fb" } }"#;
        assert_eq!(
            check_request(Some(b"true"), zincati).unwrap().group,
            "default"
        );

        let kind_of = |h: Option<&[u8]>, b: &[u8]| check_request(h, b).unwrap_err();
        let f = kind_of(None, &body("a", "g"));
        assert_eq!(
            (f.status, f.kind.as_str()),
            (400, kind::MISSING_PROTOCOL_HEADER)
        );
        assert_eq!(
            kind_of(Some(b"yes"), &body("a", "g")).kind,
            kind::MISSING_PROTOCOL_HEADER
        );
        assert_eq!(kind_of(Some(b"true"), b"{}").kind, kind::INVALID_BODY);
        assert_eq!(kind_of(Some(b"true"), b"not json").kind, kind::INVALID_BODY);
        assert_eq!(
            kind_of(Some(b"true"), &body("", "g")).kind,
            kind::INVALID_BODY
        );
        let f = kind_of(Some(b"true"), &body("a", "web servers"));
        assert_eq!((f.status, f.kind.as_str()), (400, kind::INVALID_GROUP));
        assert_eq!(
            kind_of(Some(b"true"), &body("a", "")).kind,
            kind::INVALID_GROUP
        );
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(kind_of(Some(b"true"), &big).status, 413);
    }

    #[test]
    fn groups_name_locksmith_semaphores() {
        assert_eq!(locksmith_group("default"), None);
        assert_eq!(locksmith_group("db-1.eu"), Some("db-1.eu"));
        assert!(valid_group("a.B-9"));
        assert!(!valid_group("a_b") && !valid_group("a/b") && !valid_group("ä"));
    }

    #[test]
    fn failures_serialize_as_kind_and_value_only() {
        let f = Failure::new(409, kind::SEMAPHORE_FULL, "all slots are held");
        assert_eq!(
            f.to_json(),
            r#"{"kind":"failed_lock_semaphore_full","value":"all slots are held"}"#
        );
    }
}
