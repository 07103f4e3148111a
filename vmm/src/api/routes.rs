//! What the API serves: every path and method ([`ROUTES`], which `docs/api.yaml`
//! documents one for one), and how each request becomes an [`ApiCall`] and its answer.
//!
//! Status codes follow Cloud Hypervisor's document where it has one (200 with a body,
//! 204 without), and HTTP's meaning otherwise: 400 a bad body (naming the field), 404 an
//! unknown path, 405 a known path with the wrong method (with `Allow`), 409 a VM in the
//! wrong state for the call, 500 a call that was tried and failed. (Cloud Hypervisor
//! answers 405 for a VM in the wrong state on `vm.pause`/`vm.resume`; hugevisor keeps 405
//! for methods and says 409.)

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use serde_json::Value;

use super::body::{self, SendFlavour};
use super::http::{Answer, Request};
use super::{ApiCall, StateRefusal};

/// The API's path prefix, as Cloud Hypervisor's.
pub const PREFIX: &str = "/api/v1";

/// How long the controller may take to answer a call that does not wait for a migration.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmSendMigration,
    VmReceiveMigration,
    /// hugevisor's own, older name for `vm.send-migration`; answers with the report.
    VmMigrate,
    VmSnapshot,
}

pub struct Route {
    /// The path after [`PREFIX`].
    pub path: &'static str,
    pub method: Method,
    pub endpoint: Endpoint,
}

const fn route(path: &'static str, method: Method, endpoint: Endpoint) -> Route {
    Route {
        path,
        method,
        endpoint,
    }
}

/// Every route served.
pub const ROUTES: &[Route] = &[
    route("/vmm.ping", Method::Get, Endpoint::VmmPing),
    route("/vmm.shutdown", Method::Put, Endpoint::VmmShutdown),
    route("/vm.info", Method::Get, Endpoint::VmInfo),
    route("/vm.counters", Method::Get, Endpoint::VmCounters),
    route("/vm.pause", Method::Put, Endpoint::VmPause),
    route("/vm.resume", Method::Put, Endpoint::VmResume),
    route("/vm.shutdown", Method::Put, Endpoint::VmShutdown),
    route("/vm.send-migration", Method::Put, Endpoint::VmSendMigration),
    route(
        "/vm.receive-migration",
        Method::Put,
        Endpoint::VmReceiveMigration,
    ),
    route("/vm.migrate", Method::Put, Endpoint::VmMigrate),
    route("/vm.snapshot", Method::Put, Endpoint::VmSnapshot),
];

/// The route for `method` on `path`, or the answer that there is none.
pub fn find(method: &str, path: &str) -> Result<Endpoint, Answer> {
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Err(not_found(method, path));
    };
    let on_path: Vec<&Route> = ROUTES.iter().filter(|r| r.path == rest).collect();
    if on_path.is_empty() {
        return Err(not_found(method, path));
    }
    match on_path.iter().find(|r| r.method.as_str() == method) {
        Some(r) => Ok(r.endpoint),
        None => {
            let allow: Vec<&str> = on_path.iter().map(|r| r.method.as_str()).collect();
            let mut a = Answer::error(
                405,
                &format!("{path} takes {}, not {method:?}", allow.join(", ")),
                None,
            );
            a.allow = Some(allow.join(", "));
            Err(a)
        }
    }
}

fn not_found(method: &str, path: &str) -> Answer {
    Answer::error(
        404,
        &format!("no endpoint {method} {path}; the API is described in docs/api.yaml"),
        None,
    )
}

/// Serves `request` on `endpoint`: the call to the controller, then its answer.
pub fn serve(endpoint: Endpoint, request: &Request, calls: &Sender<ApiCall>) -> Answer {
    match endpoint {
        Endpoint::VmmPing => Answer::json(200, ping()),
        Endpoint::VmInfo => ask_json(calls, ApiCall::Info),
        Endpoint::VmCounters => ask_json(calls, ApiCall::Counters),
        Endpoint::VmPause => ask_state(calls, ApiCall::Pause),
        Endpoint::VmResume => ask_state(calls, ApiCall::Resume),
        Endpoint::VmShutdown => ask_state(calls, ApiCall::Shutdown),
        Endpoint::VmmShutdown => ask_state(calls, ApiCall::VmmShutdown),
        Endpoint::VmSendMigration => migrate(calls, &request.body, SendFlavour::CloudHypervisor),
        Endpoint::VmMigrate => migrate(calls, &request.body, SendFlavour::Legacy),
        Endpoint::VmReceiveMigration => receive(calls, &request.body),
        Endpoint::VmSnapshot => snapshot(calls, &request.body),
    }
}

/// `vmm.ping`: Cloud Hypervisor's `VmmPingResponse`.
fn ping() -> Value {
    serde_json::json!({
        "build_version": concat!("hugevisor ", env!("CARGO_PKG_VERSION")),
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "features": ["precopy", "postcopy", "hybrid", "dirty-ring", "collapse", "numa", "snapshot"],
    })
}

fn vm_gone() -> Answer {
    Answer::error(500, "the VM is shutting down", None)
}

/// Sends the call `make` builds; `None` when the controller is gone.
fn send<T>(
    calls: &Sender<ApiCall>,
    make: impl FnOnce(Sender<T>) -> ApiCall,
) -> Option<Receiver<T>> {
    let (tx, rx) = channel();
    calls.send(make(tx)).ok().map(|()| rx)
}

/// A call the controller answers at once.
fn answer_of<T>(
    calls: &Sender<ApiCall>,
    make: impl FnOnce(Sender<T>) -> ApiCall,
) -> Result<T, Answer> {
    let rx = send(calls, make).ok_or_else(vm_gone)?;
    rx.recv_timeout(ANSWER_WITHIN).map_err(|e| match e {
        RecvTimeoutError::Timeout => Answer::error(
            500,
            &format!("the VM did not answer within {ANSWER_WITHIN:?}"),
            None,
        ),
        RecvTimeoutError::Disconnected => vm_gone(),
    })
}

fn ask_json(calls: &Sender<ApiCall>, make: fn(Sender<Value>) -> ApiCall) -> Answer {
    match answer_of(calls, make) {
        Ok(v) => Answer::json(200, v),
        Err(a) => a,
    }
}

fn ask_state(
    calls: &Sender<ApiCall>,
    make: fn(Sender<Result<(), StateRefusal>>) -> ApiCall,
) -> Answer {
    match answer_of(calls, make) {
        Ok(Ok(())) => Answer::no_content(),
        Ok(Err(refusal)) => Answer::error(refusal.status(), &refusal.to_string(), None),
        Err(a) => a,
    }
}

fn bad_body(e: &body::BodyError) -> Answer {
    Answer::error(400, &e.to_string(), e.field())
}

/// `vm.send-migration` (204) and `vm.migrate` (200 with the report): answered when the
/// migration has ended.
fn migrate(calls: &Sender<ApiCall>, raw: &[u8], flavour: SendFlavour) -> Answer {
    let req = match body::send_migration(raw, flavour) {
        Ok(r) => r,
        Err(e) => return bad_body(&e),
    };
    let Some(rx) = send(calls, |tx| ApiCall::Migrate(Box::new(req), tx)) else {
        return vm_gone();
    };
    match rx.recv() {
        Ok(Ok(report)) => match flavour {
            SendFlavour::CloudHypervisor => Answer::no_content(),
            SendFlavour::Legacy => match serde_json::to_value(&report) {
                Ok(v) => Answer::json(200, v),
                Err(e) => Answer::error(500, &format!("encoding the report: {e}"), None),
            },
        },
        Ok(Err(refusal)) => Answer::error(refusal.status(), &refusal.to_string(), None),
        Err(_) => Answer::error(500, "the VM ended during the migration", None),
    }
}

/// `vm.receive-migration`: 204 when the guest has arrived, every page of it.
fn receive(calls: &Sender<ApiCall>, raw: &[u8]) -> Answer {
    let req = match body::receive_migration(raw) {
        Ok(r) => r,
        Err(e) => return bad_body(&e),
    };
    let Some(rx) = send(calls, |tx| ApiCall::Receive(req, tx)) else {
        return vm_gone();
    };
    match rx.recv() {
        Ok(Ok(())) => Answer::no_content(),
        Ok(Err(refusal)) => Answer::error(refusal.status(), &refusal.to_string(), refusal.field()),
        Err(_) => Answer::error(500, "the VM ended during the migration", None),
    }
}

/// `vm.snapshot`: 200 with the snapshot's report once it is written.
fn snapshot(calls: &Sender<ApiCall>, raw: &[u8]) -> Answer {
    let req = match body::snapshot(raw) {
        Ok(r) => r,
        Err(e) => return bad_body(&e),
    };
    let Some(rx) = send(calls, |tx| ApiCall::Snapshot(req, tx)) else {
        return vm_gone();
    };
    match rx.recv() {
        Ok(Ok(report)) => match serde_json::to_value(&report) {
            Ok(v) => Answer::json(200, v),
            Err(e) => Answer::error(500, &format!("encoding the report: {e}"), None),
        },
        Ok(Err(refusal)) => Answer::error(refusal.status(), &refusal.to_string(), None),
        Err(_) => Answer::error(500, "the VM ended before its snapshot was written", None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// `docs/api.yaml`'s (method, path) pairs.
    fn documented() -> BTreeSet<(String, String)> {
        let text = include_str!("../../../docs/api.yaml");
        let doc: serde_yaml::Value = serde_yaml::from_str(text).expect("docs/api.yaml is YAML");
        let paths = doc["paths"].as_mapping().expect("docs/api.yaml has paths");
        let mut out = BTreeSet::new();
        for (path, item) in paths {
            let path = path.as_str().expect("a path is a string").to_string();
            for (method, _) in item.as_mapping().expect("a path item is a mapping") {
                let m = method
                    .as_str()
                    .expect("a method is a string")
                    .to_uppercase();
                if ["GET", "PUT", "POST", "PATCH", "DELETE", "HEAD"].contains(&m.as_str()) {
                    out.insert((m, path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn every_served_route_is_documented_and_every_documented_route_is_served() {
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "served but not in docs/api.yaml: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "in docs/api.yaml but not served: {unserved:?}"
        );
        let doc: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../../docs/api.yaml")).unwrap();
        assert_eq!(
            doc["servers"][0]["url"].as_str(),
            Some("http://localhost/api/v1")
        );
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
        assert_eq!(find("GET", "/api/v1/vm.info").unwrap(), Endpoint::VmInfo);
        // vm.snapshot is served now (PUT): a path still unknown is 404, a GET of it 405.
        assert_eq!(find("GET", "/api/v1/vm.resize").unwrap_err().status, 404);
        assert_eq!(find("GET", "/api/v1/vm.snapshot").unwrap_err().status, 405);
        assert_eq!(find("GET", "/vm.info").unwrap_err().status, 404);
        let a = find("DELETE", "/api/v1/vm.pause").unwrap_err();
        assert_eq!((a.status, a.allow.as_deref()), (405, Some("PUT")));
    }
}
