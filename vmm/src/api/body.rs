//! The request bodies the API takes, checked field by field before anything is done with
//! them: each refusal names its field, and says what to send instead.
//!
//! `vm.send-migration` and `vm.receive-migration` take Cloud Hypervisor's bodies
//! (`SendMigrationData`, `ReceiveMigrationData` in its OpenAPI document). Where Cloud
//! Hypervisor offers what hugevisor does not (`local`, TLS in the call, a timeout that
//! forces the switch-over), a body that asks for it is refused naming the
//! difference rather than served otherwise. hugevisor's own fields — `mode` (with
//! `hybrid`), `push_order`, `verify` — are extra properties with defaults. The legacy
//! `vm.migrate` takes the same body and also its old field name `to`.

use std::time::Duration;

use serde_json::{Map, Value};

/// The migration a `vm.send-migration` / `vm.migrate` body asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendMigration {
    pub request: migration::MigrationRequest,
    /// The migration is cancelled (the guest keeps running here) if it has not switched
    /// over by then (`timeout_s`; Cloud Hypervisor's `Cancel` strategy).
    pub timeout: Duration,
}

/// Where a `vm.receive-migration` body says to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveMigration {
    pub receiver: migration::Uri,
}

/// Which endpoint a send body is for: they differ only in defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFlavour {
    /// `vm.send-migration`: Cloud Hypervisor's defaults (300 ms downtime).
    CloudHypervisor,
    /// `vm.migrate`: hugevisor's own (50 ms downtime), and `to` for `destination_url`.
    Legacy,
}

/// Cloud Hypervisor's default downtime budget.
pub const CH_DOWNTIME: Duration = Duration::from_millis(300);
/// Cloud Hypervisor's default migration timeout.
pub const CH_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest `downtime_ms` taken: an hour (beyond it the number is a mistake).
const MAX_DOWNTIME_MS: u64 = 3_600_000;
/// Largest `timeout_s` taken: a year.
const MAX_TIMEOUT_S: u64 = 365 * 24 * 3600;

/// A body that cannot be served, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("the body must be a JSON object")]
    NotObject,
    #[error("{field} is required")]
    Missing { field: &'static str },
    #[error("unknown field {field:?}; this endpoint takes {known}")]
    Unknown { field: String, known: String },
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("{field}: {why}")]
    Unsupported {
        field: &'static str,
        why: &'static str,
    },
}

impl BodyError {
    /// The field at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            BodyError::NotJson(_) | BodyError::NotObject => None,
            BodyError::Unknown { field, .. } => Some(field),
            BodyError::Missing { field }
            | BodyError::Invalid { field, .. }
            | BodyError::Unsupported { field, .. } => Some(field),
        }
    }
}

const SEND_FIELDS: &[&str] = &[
    "destination_url",
    "local",
    "preserve_source",
    "downtime_ms",
    "timeout_s",
    "timeout_strategy",
    "connections",
    "tls_dir",
    "memory_mode",
    "mode",
    "push_order",
    "verify",
    "action",
];

const RECEIVE_FIELDS: &[&str] = &["receiver_url", "tls_dir", "memory_mode", "zone_updates"];

/// A JSON object whose fields are taken one by one, each checked.
struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    fn parse(body: &[u8], known: &[&str]) -> Result<Fields, BodyError> {
        let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(body).map_err(BodyError::NotJson)?
        };
        let Value::Object(map) = value else {
            return Err(BodyError::NotObject);
        };
        if let Some(field) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(BodyError::Unknown {
                field: field.clone(),
                known: known.join(", "),
            });
        }
        Ok(Fields { map })
    }

    /// The field, unless absent or null.
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn str(&self, field: &'static str) -> Result<Option<&str>, BodyError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(field, format!("{other} is not a string"))),
        }
    }

    fn bool(&self, field: &'static str) -> Result<bool, BodyError> {
        match self.get(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(invalid(field, format!("{other} is not true or false"))),
        }
    }

    /// A whole number in `min..=max`.
    fn count(&self, field: &'static str, min: u64, max: u64) -> Result<Option<u64>, BodyError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(invalid(
                field,
                format!("{v} is not a whole number from {min} to {max}"),
            )),
        }
    }
}

fn invalid(field: &'static str, why: String) -> BodyError {
    BodyError::Invalid { field, why }
}

/// `memory_mode`: Cloud Hypervisor's `Precopy` / `Postcopy` (any case).
fn memory_mode(f: &Fields) -> Result<Option<migration::Mode>, BodyError> {
    let Some(s) = f.str("memory_mode")? else {
        return Ok(None);
    };
    match s.to_ascii_lowercase().as_str() {
        "precopy" => Ok(Some(migration::Mode::Precopy)),
        "postcopy" => Ok(Some(migration::Mode::Postcopy)),
        _ => Err(invalid(
            "memory_mode",
            format!("{s:?} is not Precopy or Postcopy (for hybrid, give hugevisor's \"mode\": \"hybrid\")"),
        )),
    }
}

fn uri(field: &'static str, s: &str) -> Result<migration::Uri, BodyError> {
    s.parse()
        .map_err(|e: migration::ParseError| invalid(field, e.to_string()))
}

/// Refusals of Cloud Hypervisor options hugevisor does not have.
fn refuse_unsupported_send(f: &Fields) -> Result<(), BodyError> {
    if f.bool("local")? {
        return Err(BodyError::Unsupported {
            field: "local",
            why: "hugevisor does not hand guest memory's file descriptors to the destination; it copies pages over the socket (leave local out, or false)",
        });
    }
    if f.bool("preserve_source")? {
        return Err(BodyError::Unsupported {
            field: "preserve_source",
            why: "a hugevisor source ends its run once the guest is the destination's (leave preserve_source out, or false)",
        });
    }
    if f.get("tls_dir").is_some() {
        return Err(BodyError::Unsupported {
            field: "tls_dir",
            why: "hugevisor takes migration TLS from the command line of both runs (--tls-cert, --tls-key, --tls-ca), not from the call; leave tls_dir out",
        });
    }
    if let Some(s) = f.str("timeout_strategy")? {
        match s.to_ascii_lowercase().as_str() {
            "cancel" => {}
            "ignore" => {
                return Err(BodyError::Unsupported {
                    field: "timeout_strategy",
                    why: "Ignore (switch over at the timeout whatever the downtime) is not offered: hugevisor's pre-copy switches over after at most 20 rounds; give Cancel or leave it out",
                })
            }
            _ => {
                return Err(invalid(
                    "timeout_strategy",
                    format!("{s:?} is not Cancel or Ignore"),
                ))
            }
        }
    }
    Ok(())
}

/// Parses a `vm.send-migration` (or `vm.migrate`) body.
pub fn send_migration(body: &[u8], flavour: SendFlavour) -> Result<SendMigration, BodyError> {
    let mut known = SEND_FIELDS.to_vec();
    if flavour == SendFlavour::Legacy {
        known.push("to");
    }
    let f = Fields::parse(body, &known)?;
    refuse_unsupported_send(&f)?;
    let to = match (f.str("destination_url")?, f.str("to")?) {
        (Some(url), None) => uri("destination_url", url)?,
        (None, Some(to)) => uri("to", to)?,
        (Some(_), Some(_)) => {
            return Err(invalid(
                "to",
                "give destination_url or its old name to, not both".into(),
            ))
        }
        (None, None) => {
            return Err(BodyError::Missing {
                field: "destination_url",
            })
        }
    };
    let mode = match (memory_mode(&f)?, f.str("mode")?) {
        (ch, None) => ch.unwrap_or_default(),
        (ch, Some(s)) => {
            let mode: migration::Mode = s
                .parse()
                .map_err(|e: migration::ParseError| invalid("mode", e.to_string()))?;
            // Hybrid is post-copy after three pre-copy rounds; auto is pre-copy that may
            // end as post-copy.
            let agrees = |ch: migration::Mode| {
                ch == mode
                    || (ch == migration::Mode::Postcopy && mode == migration::Mode::Hybrid)
                    || mode == migration::Mode::Auto
            };
            if ch.is_some_and(|ch| !agrees(ch)) {
                return Err(invalid(
                    "mode",
                    format!("{mode} contradicts memory_mode; give one of them"),
                ));
            }
            mode
        }
    };
    let downtime = match f.count("downtime_ms", 1, MAX_DOWNTIME_MS)? {
        Some(ms) => Duration::from_millis(ms),
        None => match flavour {
            SendFlavour::CloudHypervisor => CH_DOWNTIME,
            SendFlavour::Legacy => migration::MigrationRequest::new(to.clone(), mode).downtime,
        },
    };
    let timeout = f
        .count("timeout_s", 1, MAX_TIMEOUT_S)?
        .map_or(CH_TIMEOUT, Duration::from_secs);
    let push_order = match f.str("push_order")? {
        Some(s) => s
            .parse()
            .map_err(|e: migration::ParseError| invalid("push_order", e.to_string()))?,
        None => migration::PushOrder::default(),
    };
    let verify = match f.str("verify")? {
        Some(s) => Some(
            s.parse()
                .map_err(|e: migration::ParseError| invalid("verify", e.to_string()))?,
        ),
        None => None,
    };
    // Cloud Hypervisor's multi-connection: hugevisor's pre-copy channels.
    let channels = f
        .count("connections", 1, migration::MAX_CHANNELS.into())?
        .map_or(1, |n| n as u32);
    // hugevisor's: the resume of a migration paused after the hand-over.
    let action = match f.str("action")? {
        None | Some("start") => migration::Action::Start,
        Some("resume") => migration::Action::Resume,
        Some(other) => {
            return Err(invalid(
                "action",
                format!("{other:?} is not an action (start, resume)"),
            ))
        }
    };
    Ok(SendMigration {
        request: migration::MigrationRequest {
            action,
            downtime,
            verify,
            push_order,
            channels,
            ..migration::MigrationRequest::new(to, mode)
        },
        timeout,
    })
}

/// Parses a `vm.receive-migration` body.
pub fn receive_migration(body: &[u8]) -> Result<ReceiveMigration, BodyError> {
    let f = Fields::parse(body, RECEIVE_FIELDS)?;
    if f.get("tls_dir").is_some() {
        return Err(BodyError::Unsupported {
            field: "tls_dir",
            why: "hugevisor takes migration TLS from the command line of both runs (--tls-cert, --tls-key, --tls-ca), not from the call; leave tls_dir out",
        });
    }
    match f.get("zone_updates") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(Value::Array(_)) => {
            return Err(BodyError::Unsupported {
                field: "zone_updates",
                why: "hugevisor has no memory zones to move to host NUMA nodes (guest NUMA is --numa on the destination's command line); leave zone_updates out",
            })
        }
        Some(other) => return Err(invalid("zone_updates", format!("{other} is not a list"))),
    }
    // The mode comes with the source's Hello; a destination is ready for either.
    memory_mode(&f)?;
    let url = f.str("receiver_url")?.ok_or(BodyError::Missing {
        field: "receiver_url",
    })?;
    Ok(ReceiveMigration {
        receiver: uri("receiver_url", url)?,
    })
}

const SNAPSHOT_FIELDS: &[&str] = &["destination_url", "then", "hot_set_ms"];

/// Longest hot-set period taken: a minute (the guest runs logged meanwhile).
const MAX_HOT_SET_MS: u64 = 60_000;

/// Parses a `vm.snapshot` body: Cloud Hypervisor's `destination_url` (`file:///DIR`, or
/// a path), hugevisor's `then` (resume, the default, or stop) and `hot_set_ms` (how long
/// the dirty log watches the guest first; 0: no hot set).
pub fn snapshot(body: &[u8]) -> Result<crate::snapshot::SnapshotRequest, BodyError> {
    let f = Fields::parse(body, SNAPSHOT_FIELDS)?;
    let url = f.str("destination_url")?.ok_or(BodyError::Missing {
        field: "destination_url",
    })?;
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.is_empty() || url.contains("://") && !url.starts_with("file://") {
        return Err(invalid(
            "destination_url",
            format!("{url:?} is not file:///DIR or a directory path"),
        ));
    }
    let then = match f.str("then")? {
        None => crate::snapshot::AfterSnapshot::Resume,
        Some(s) => s
            .parse()
            .map_err(|e: crate::snapshot::AfterSnapshotParseError| {
                invalid("then", e.to_string())
            })?,
    };
    let hot_period = f
        .count("hot_set_ms", 0, MAX_HOT_SET_MS)?
        .map_or(crate::snapshot::DEFAULT_HOT_PERIOD, Duration::from_millis);
    Ok(crate::snapshot::SnapshotRequest {
        to: path.into(),
        then,
        hot_period,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_bodies_name_their_field() {
        let s = snapshot(br#"{"destination_url": "file:///tmp/snap"}"#).unwrap();
        assert_eq!(s.to, std::path::PathBuf::from("/tmp/snap"));
        assert_eq!(s.then, crate::snapshot::AfterSnapshot::Resume);
        let s = snapshot(br#"{"destination_url": "/d", "then": "stop", "hot_set_ms": 0}"#).unwrap();
        assert_eq!(s.then, crate::snapshot::AfterSnapshot::Stop);
        assert!(s.hot_period.is_zero());
        for (body, field) in [
            (r#"{}"#, "destination_url"),
            (r#"{"destination_url": "tcp://x"}"#, "destination_url"),
            (r#"{"destination_url": "/d", "then": "pause"}"#, "then"),
            (
                r#"{"destination_url": "/d", "hot_set_ms": -1}"#,
                "hot_set_ms",
            ),
        ] {
            let e = snapshot(body.as_bytes()).unwrap_err();
            assert_eq!(e.field(), Some(field), "{body}: {e}");
        }
    }

    fn send(body: &str) -> Result<SendMigration, BodyError> {
        send_migration(body.as_bytes(), SendFlavour::CloudHypervisor)
    }

    #[test]
    fn cloud_hypervisor_bodies_get_its_defaults() {
        let s = send(r#"{"destination_url": "unix:/tmp/m.sock"}"#).unwrap();
        assert_eq!(s.request.mode, migration::Mode::Precopy);
        assert_eq!(s.request.downtime, CH_DOWNTIME);
        assert_eq!(s.timeout, CH_TIMEOUT);
        let s = send(r#"{"destination_url": "tcp:127.0.0.1:4444", "memory_mode": "Postcopy", "downtime_ms": 20, "timeout_s": 9, "timeout_strategy": "Cancel", "connections": 1, "local": false}"#).unwrap();
        assert_eq!(s.request.mode, migration::Mode::Postcopy);
        assert_eq!(s.request.downtime, Duration::from_millis(20));
        assert_eq!(s.timeout, Duration::from_secs(9));
    }

    #[test]
    fn hugevisor_fields_are_extra_and_the_old_body_still_parses() {
        let s = send(r#"{"destination_url": "unix:/m", "connections": 4}"#).unwrap();
        assert_eq!(s.request.channels, 4, "connections are pre-copy channels");
        let s = send(r#"{"destination_url": "unix:/m", "mode": "hybrid", "push_order": "fewest-missing-first", "memory_mode": "Postcopy"}"#).unwrap();
        assert_eq!(s.request.mode, migration::Mode::Hybrid);
        assert_eq!(
            s.request.push_order,
            migration::PushOrder::FewestMissingFirst
        );
        for ch in [
            "",
            r#", "memory_mode": "Precopy""#,
            r#", "memory_mode": "Postcopy""#,
        ] {
            let body = format!(r#"{{"destination_url": "unix:/m", "mode": "auto"{ch}}}"#);
            assert_eq!(send(&body).unwrap().request.mode, migration::Mode::Auto);
        }
        let old = send_migration(
            br#"{"to": "unix:/m", "mode": "precopy", "downtime_ms": 50, "verify": "memory-hash"}"#,
            SendFlavour::Legacy,
        )
        .unwrap();
        assert_eq!(old.request.verify, Some(migration::Verify::MemoryHash));
        assert_eq!(old.request.downtime, Duration::from_millis(50));
        // `to` is vm.migrate's only.
        assert_eq!(
            send(r#"{"to": "unix:/m"}"#).unwrap_err().field(),
            Some("to")
        );
    }

    #[test]
    fn every_refusal_names_its_field() {
        for (body, field) in [
            (r#"{}"#, "destination_url"),
            (r#"{"destination_url": "ftp:x"}"#, "destination_url"),
            (r#"{"destination_url": 3}"#, "destination_url"),
            (
                r#"{"destination_url": "unix:/m", "downtime_ms": 0}"#,
                "downtime_ms",
            ),
            (
                r#"{"destination_url": "unix:/m", "downtime_ms": "5"}"#,
                "downtime_ms",
            ),
            (
                r#"{"destination_url": "unix:/m", "timeout_s": -1}"#,
                "timeout_s",
            ),
            (
                r#"{"destination_url": "unix:/m", "memory_mode": "fast"}"#,
                "memory_mode",
            ),
            (
                r#"{"destination_url": "unix:/m", "mode": "postcopy", "memory_mode": "Precopy"}"#,
                "mode",
            ),
            (r#"{"destination_url": "unix:/m", "local": true}"#, "local"),
            (
                r#"{"destination_url": "unix:/m", "connections": 17}"#,
                "connections",
            ),
            (
                r#"{"destination_url": "unix:/m", "connections": 0}"#,
                "connections",
            ),
            (
                r#"{"destination_url": "unix:/m", "tls_dir": "/etc"}"#,
                "tls_dir",
            ),
            (
                r#"{"destination_url": "unix:/m", "timeout_strategy": "Ignore"}"#,
                "timeout_strategy",
            ),
            (
                r#"{"destination_url": "unix:/m", "push_order": "random"}"#,
                "push_order",
            ),
            (
                r#"{"destination_url": "unix:/m", "verify": "sha256"}"#,
                "verify",
            ),
            (
                r#"{"destination_url": "unix:/m", "action": "restart"}"#,
                "action",
            ),
            (
                r#"{"destination_url": "unix:/m", "destnation_url": "x"}"#,
                "destnation_url",
            ),
        ] {
            let e = send(body).unwrap_err();
            assert_eq!(e.field(), Some(field), "{body}: {e}");
            assert!(e.to_string().contains(field), "{body}: {e}");
        }
        assert!(matches!(send("[1]").unwrap_err(), BodyError::NotObject));
        assert!(matches!(send("{").unwrap_err(), BodyError::NotJson(_)));
    }

    #[test]
    fn receive_bodies() {
        let r = receive_migration(br#"{"receiver_url": "unix:/tmp/r.sock", "memory_mode": "Postcopy", "zone_updates": []}"#).unwrap();
        assert_eq!(r.receiver, "unix:/tmp/r.sock".parse().unwrap());
        for (body, field) in [
            (r#"{}"#, "receiver_url"),
            (r#"{"receiver_url": "nowhere"}"#, "receiver_url"),
            (r#"{"receiver_url": "unix:/r", "tls_dir": "/x"}"#, "tls_dir"),
            (
                r#"{"receiver_url": "unix:/r", "zone_updates": [{"id": "a", "host_numa_node": 1}]}"#,
                "zone_updates",
            ),
            (r#"{"receiver_url": "unix:/r", "vfio_fds": []}"#, "vfio_fds"),
        ] {
            let e = receive_migration(body.as_bytes()).unwrap_err();
            assert_eq!(e.field(), Some(field), "{body}: {e}");
        }
    }
}
