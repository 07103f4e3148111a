//! The QEMU baseline for `hugevisor-bench migration`: the same guest image (written by the
//! hugevisor under measurement, `hugevisor guest-image`) under QEMU's `microvm`
//! machine, with the same memory size and backing, migrated on the same host over QMP
//! by pre-copy and by postcopy-ram.
//!
//! QEMU runs the guest on as many vCPUs as hugevisor (`-smp`; the image starts its APs
//! from the MADT of microvm's ACPI tables). The guest's own stall is read from its console: with
//! `slow=2` it prints every pass slower than twice its fastest, with the pass's end TSC;
//! under KVM here the guest's TSC is the host's, so the bench keeps the slow passes that
//! overlap the migration window and reports the worst.
//!
//! The QMP client is hand-written: a line-delimited JSON exchange over a unix socket is
//! a few lines with `serde_json`, and no maintained crate speaks QMP without pulling in
//! an async runtime.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use guest_image::clock::{rdtsc, TscClock, TscPoint};

/// What went wrong in one QEMU migration (the row then carries this as its `error`).
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("spawning qemu-system-x86_64: {0} (apt-get install qemu-system-x86, or --qemu off)")]
    Spawn(#[source] std::io::Error),
    #[error("QEMU stdout not piped")]
    NoStdout,
    #[error("QMP socket {path}: {source}")]
    QmpConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {what}: {source}")]
    QmpIo {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP: QEMU closed the socket")]
    QmpClosed,
    #[error("QMP reply: {0}")]
    QmpReply(#[source] serde_json::Error),
    #[error("QMP {cmd}: {desc}")]
    Qmp { cmd: String, desc: String },
    #[error("QEMU exited ({status}) before printing {needle:?}")]
    Exited {
        status: std::process::ExitStatus,
        needle: String,
    },
    #[error("QEMU did not print {needle:?} within {timeout:?}")]
    Silent { needle: String, timeout: Duration },
    #[error("QEMU migration {status}: {reason}")]
    Migration { status: String, reason: String },
    #[error("QEMU migration did not complete within 300 s")]
    MigrationTimeout,
}

/// QEMU's migration modes measured beside hugevisor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuMode {
    Precopy,
    PostcopyRam,
}

impl QemuMode {
    pub fn name(self) -> &'static str {
        match self {
            QemuMode::Precopy => "precopy",
            QemuMode::PostcopyRam => "postcopy-ram",
        }
    }
}

/// One QEMU migration to measure.
pub struct QemuCase<'a> {
    pub memory: &'a str,
    pub vcpus: u32,
    /// `shmem` or `hugetlb-2m`: QEMU's memfd backend with the same page size.
    pub backing: &'a str,
    pub workload: &'a str,
    pub mode: QemuMode,
    /// The guest image, from the hugevisor under measurement.
    pub image: &'a Path,
    /// How long the guest runs before the migration starts.
    pub warmup: Duration,
    /// How long the destination runs after the migration completes (checking memory).
    pub after: Duration,
    pub dir: &'a Path,
}

/// What one QEMU migration measured.
#[derive(Debug, Default)]
pub struct QemuResult {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes_sent: u64,
    pub postcopy_requests: u64,
    /// Worst guest pass overlapping the migration; `None` if no pass was slower than twice
    /// the fastest (the stall then hid inside one ordinary pass).
    pub guest_stall_ms: Option<f64>,
    pub integrity_errors: u64,
    /// Slow-pass or integrity lines printed by the destination (it ran after the switch).
    pub destination_lines: usize,
}

/// Whether `qemu-system-x86_64` can be started.
pub fn available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, QemuError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if Instant::now() > deadline => {
                    return Err(QemuError::QmpConnect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let writer = stream.try_clone().map_err(|source| QemuError::QmpIo {
            what: "cloning the socket",
            source,
        })?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.read_reply()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Reads the next line that is not an asynchronous event.
    fn read_reply(&mut self) -> Result<Value, QemuError> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QemuError::QmpClosed),
                Ok(_) => {}
                Err(source) => {
                    return Err(QemuError::QmpIo {
                        what: "read",
                        source,
                    })
                }
            }
            let v: Value = serde_json::from_str(&line).map_err(QemuError::QmpReply)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QemuError> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").map_err(|source| QemuError::QmpIo {
            what: "write",
            source,
        })?;
        let v = self.read_reply()?;
        match v.get("error") {
            Some(e) => Err(QemuError::Qmp {
                cmd: cmd.to_string(),
                desc: e["desc"].as_str().unwrap_or("error").to_string(),
            }),
            None => Ok(v["return"].clone()),
        }
    }
}

/// Which end of the migration a QEMU process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Source,
    /// Started with `-incoming defer`.
    Destination,
}

/// A QEMU process whose console lines arrive on a channel.
struct Peer {
    child: Child,
    lines: mpsc::Receiver<String>,
    qmp_path: PathBuf,
}

impl Peer {
    fn spawn(case: &QemuCase, role: Role) -> Result<Peer, QemuError> {
        let role_name = match role {
            Role::Source => "src",
            Role::Destination => "dst",
        };
        let qmp_path = case.dir.join(format!("qmp-{role_name}.sock"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut backend = format!("memory-backend-memfd,id=mem,size={},share=on", case.memory);
        match case.backing {
            "hugetlb-2m" => backend.push_str(",hugetlb=on,hugetlbsize=2M"),
            "hugetlb-1g" => backend.push_str(",hugetlb=on,hugetlbsize=1G"),
            _ => {}
        }
        // A pre-copy destination with its RAM allocated before the pages come, as
        // hugevisor's hugetlb destination populates while it waits (a fair peer: without
        // it each first write zeroes a page). Not for postcopy-ram, which discards the
        // destination's RAM before it starts.
        if role == Role::Destination && case.mode == QemuMode::Precopy {
            backend.push_str(",prealloc=on");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-M"])
            .arg("microvm,x-option-roms=off,rtc=off,memory-backend=mem")
            .args(["-cpu", "max,-arch-capabilities", "-m", case.memory])
            .args(["-smp", &case.vcpus.to_string()])
            .args(["-object", &backend])
            .arg("-kernel")
            .arg(case.image)
            .args([
                "-append",
                &format!(
                    "workload={} passes=0 vcpus={} seed=1 slow=2",
                    case.workload, case.vcpus
                ),
            ])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if role == Role::Destination {
            cmd.args(["-incoming", "defer"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(QemuError::Spawn)?;
        let stdout = child.stdout.take().ok_or(QemuError::NoStdout)?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Peer {
            child,
            lines,
            qmp_path,
        })
    }

    fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(QemuError::Exited {
                            status,
                            needle: needle.to_string(),
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Err(QemuError::Silent {
            needle: needle.to_string(),
            timeout,
        })
    }

    fn drain(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}

/// A slow pass the guest printed: (cycles, end TSC).
fn slow_pass(line: &str) -> Option<(u64, u64)> {
    if !line.contains(" slow ") {
        return None;
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("cycles")?, field("end_tsc")?))
}

/// Migrates a running QEMU guest to a second QEMU on this host and measures it.
pub fn measure(case: &QemuCase) -> Result<QemuResult, QemuError> {
    let uri = format!("unix:{}", case.dir.join("qemu-mig.sock").display());
    let _ = std::fs::remove_file(case.dir.join("qemu-mig.sock"));
    let origin = TscPoint::now();

    let mut dst = Peer::spawn(case, Role::Destination)?;
    let mut src = Peer::spawn(case, Role::Source)?;
    let mut dq = Qmp::connect(&dst.qmp_path)?;
    let mut sq = Qmp::connect(&src.qmp_path)?;
    if case.mode == QemuMode::PostcopyRam {
        let caps = json!({ "capabilities": [{ "capability": "postcopy-ram", "state": true }] });
        dq.execute("migrate-set-capabilities", caps.clone())?;
        sq.execute("migrate-set-capabilities", caps)?;
    }
    dq.execute("migrate-incoming", json!({ "uri": uri }))?;
    // Migrate a warm guest: its first pass (4 KiB first touches, seconds for 1 GiB)
    // is over, as on the hugevisor side.
    src.wait_for_line(" warm", Duration::from_secs(120))?;
    std::thread::sleep(case.warmup);

    let downtime_limit = match case.mode {
        QemuMode::Precopy => 50,
        QemuMode::PostcopyRam => 1,
    };
    sq.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 64u64 << 30, "downtime-limit": downtime_limit }),
    )?;
    let t_start = rdtsc();
    sq.execute("migrate", json!({ "uri": uri }))?;
    if case.mode == QemuMode::PostcopyRam {
        sq.execute("migrate-start-postcopy", json!({}))?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let info = loop {
        let q = sq.execute("query-migrate", json!({}))?;
        match q["status"].as_str().unwrap_or("") {
            "completed" => break q,
            "failed" | "cancelled" => {
                return Err(QemuError::Migration {
                    status: q["status"].as_str().unwrap_or("").to_string(),
                    reason: q["error-desc"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string(),
                })
            }
            _ if Instant::now() > deadline => return Err(QemuError::MigrationTimeout),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let t_end = rdtsc();
    std::thread::sleep(case.after);
    let clock = TscClock::calibrate(origin);

    let src_lines = src.drain();
    let dst_lines = dst.drain();
    drop(src);
    drop(dst);

    let slow: Vec<(u64, u64)> = src_lines
        .iter()
        .chain(&dst_lines)
        .filter_map(|l| slow_pass(l))
        .collect();
    let stall = slow
        .iter()
        .filter(|(cycles, end)| *end >= t_start && end.saturating_sub(*cycles) <= t_end)
        .map(|(cycles, _)| *cycles)
        .max();
    let ram = &info["ram"];
    Ok(QemuResult {
        total_ms: info["total-time"].as_f64().unwrap_or(0.0),
        downtime_ms: info["downtime"].as_f64().unwrap_or(0.0),
        bytes_sent: ram["transferred"].as_u64().unwrap_or(0),
        postcopy_requests: ram["postcopy-requests"].as_u64().unwrap_or(0),
        guest_stall_ms: stall.map(|c| clock.cycles_to_ms(c)),
        integrity_errors: src_lines
            .iter()
            .chain(&dst_lines)
            .filter(|l| l.contains("INTEGRITY ERROR"))
            .count() as u64,
        destination_lines: dst_lines.len(),
    })
}

/// What QEMU's save to a file and `-incoming` from it measured.
#[derive(Debug, Default)]
pub struct QemuRestore {
    /// The saved stream's size.
    pub file_bytes: u64,
    /// From the fork of the restoring QEMU to its guest running (`query-status`): QEMU
    /// loads all of RAM before the guest's first instruction.
    pub to_running_ms: f64,
}

/// Waits until `q`'s migration completed.
fn wait_completed(q: &mut Qmp) -> Result<(), QemuError> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let m = q.execute("query-migrate", json!({}))?;
        match m["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(QemuError::Migration {
                    status: m["status"].as_str().unwrap_or("").to_string(),
                    reason: m["error-desc"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string(),
                })
            }
            _ if Instant::now() > deadline => return Err(QemuError::MigrationTimeout),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Runs the guest under QEMU until it is warm, stops it, saves it to a file
/// (`migrate exec:cat > FILE`), then starts a second QEMU with `-incoming` from that file
/// and times it to its guest running.
pub fn save_and_restore(case: &QemuCase) -> Result<QemuRestore, QemuError> {
    let file = case.dir.join("qemu-saved");
    let mut src = Peer::spawn(case, Role::Source)?;
    let mut sq = Qmp::connect(&src.qmp_path)?;
    src.wait_for_line(" warm", Duration::from_secs(120))?;
    std::thread::sleep(case.warmup);
    sq.execute("stop", json!({}))?;
    sq.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 64u64 << 30 }),
    )?;
    let uri = format!("exec:cat > {}", file.display());
    sq.execute("migrate", json!({ "uri": uri }))?;
    wait_completed(&mut sq)?;
    drop(src);
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let fork = Instant::now();
    let dst = Peer::spawn(case, Role::Destination)?;
    let mut dq = Qmp::connect(&dst.qmp_path)?;
    let uri = format!("exec:cat {}", file.display());
    dq.execute("migrate-incoming", json!({ "uri": uri }))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let st = dq.execute("query-status", json!({}))?;
        if st["running"] == true {
            break;
        }
        if st["status"] == "paused" {
            // The source was stopped, so the loaded guest stays paused: start it (refused
            // while the load is still going on, hence tried until it runs).
            let _ = dq.execute("cont", json!({}));
        }
        if Instant::now() > deadline {
            return Err(QemuError::MigrationTimeout);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let to_running_ms = fork.elapsed().as_secs_f64() * 1000.0;
    drop(dst);
    let _ = std::fs::remove_file(&file);
    Ok(QemuRestore {
        file_bytes,
        to_running_ms,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn slow_pass_lines_parse() {
        let l = "hvguest: vcpu 0 slow pass=7 cycles=123456 end_tsc=999";
        assert_eq!(super::slow_pass(l), Some((123456, 999)));
        assert_eq!(super::slow_pass("hvguest: vcpu 0 done passes=3"), None);
    }
}
