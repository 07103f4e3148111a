//! The snapshot command line: `hugevisor snapshot` (a client of `vm.snapshot`), and the
//! `run` flags that restore a snapshot or take one at a set time.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use migration::snapshot::RestoreMode;

use crate::config::{GuestSource, SnapshotAt};
use crate::snapshot::{AfterSnapshot, SnapshotRequest, DEFAULT_HOT_PERIOD};

fn parse_restore_mode(s: &str) -> Result<RestoreMode, String> {
    s.parse().map_err(|e: migration::ParseError| e.to_string())
}

fn parse_then(s: &str) -> Result<AfterSnapshot, String> {
    s.parse()
        .map_err(|e: crate::snapshot::AfterSnapshotParseError| e.to_string())
}

/// `run`'s snapshot flags.
#[derive(Args, Debug)]
pub struct RunSnapshotArgs {
    /// Restore the guest from this snapshot directory instead of booting it; --memory,
    /// --backing and --vcpus must be the snapshotted guest's.
    #[arg(long, conflicts_with_all = ["incoming", "kernel", "workload", "passes", "inject_corruption"])]
    restore: Option<PathBuf>,
    /// copy (load every page, check the memory hash, then start) or lazy (start at once;
    /// pages come from the file on a fault, the rest in the background, hot set first).
    #[arg(long, default_value = "copy", requires = "restore", value_parser = parse_restore_mode)]
    restore_mode: RestoreMode,
    /// Take a snapshot this long after the guest starts (e.g. 2s); needs --to.
    #[arg(long, requires = "to", value_parser = super::parse_duration)]
    snapshot_at: Option<Duration>,
    /// The directory --snapshot-at writes.
    #[arg(long, requires = "snapshot_at")]
    to: Option<PathBuf>,
    /// After --snapshot-at: resume (the default) or stop the guest.
    #[arg(long, default_value = "resume", requires = "snapshot_at", value_parser = parse_then)]
    snapshot_then: AfterSnapshot,
    /// How long the dirty log watches the guest before --snapshot-at's pause, in ms (its
    /// written pages are the hot set; 0: none).
    #[arg(long, requires = "snapshot_at")]
    hot_set_ms: Option<u64>,
}

impl RunSnapshotArgs {
    /// The guest source these flags ask for, if any.
    pub fn guest_source(&self) -> Option<GuestSource> {
        self.restore.as_ref().map(|dir| GuestSource::Restore {
            dir: dir.clone(),
            mode: self.restore_mode,
        })
    }

    pub fn snapshot_at(&self) -> Option<SnapshotAt> {
        let (after, to) = (self.snapshot_at?, self.to.clone()?);
        Some(SnapshotAt {
            after,
            request: SnapshotRequest {
                to,
                then: self.snapshot_then,
                hot_period: self
                    .hot_set_ms
                    .map_or(DEFAULT_HOT_PERIOD, Duration::from_millis),
            },
        })
    }
}

/// `hugevisor snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The running VMM's control API socket.
    #[arg(long)]
    api_socket: PathBuf,
    /// The snapshot directory (created if missing; a snapshot there is replaced).
    #[arg(long)]
    to: PathBuf,
    /// What the guest does once the snapshot is written: resume or stop.
    #[arg(long, default_value = "resume", value_parser = parse_then)]
    then: AfterSnapshot,
    /// How long the dirty log watches the guest before the pause, in ms (its written
    /// pages are the hot set a lazy restore fetches first; 0: none).
    #[arg(long, default_value_t = DEFAULT_HOT_PERIOD.as_millis() as u64)]
    hot_set_ms: u64,
    /// Print the snapshot's report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn cmd_snapshot(args: &SnapshotArgs) -> i32 {
    let to = match std::path::absolute(&args.to) {
        Ok(p) => p,
        Err(e) => return super::fail(&format!("--to {}: {e}", args.to.display())),
    };
    let body = serde_json::json!({
        "destination_url": format!("file://{}", to.display()),
        "then": args.then.name(),
        "hot_set_ms": args.hot_set_ms,
    });
    match crate::api::call(&args.api_socket, "PUT", "/api/v1/vm.snapshot", Some(&body)) {
        Ok((200, report)) => {
            if args.json {
                println!("{report}");
            } else {
                println!(
                    "snapshot written to {}: {} data pages of {} bytes, {} hot, {:.0} ms; the guest {}",
                    report["to"].as_str().unwrap_or("?"),
                    report["data_pages"],
                    report["page_size"],
                    report["hot_pages"],
                    report["write_ms"].as_f64().unwrap_or(0.0),
                    match args.then {
                        AfterSnapshot::Resume => "runs on",
                        AfterSnapshot::Stop => "stops",
                    }
                );
            }
            super::EXIT_OK
        }
        Ok((status, body)) => super::fail(&format!(
            "snapshot failed (HTTP {status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        )),
        Err(e) => super::fail(&e.to_string()),
    }
}
