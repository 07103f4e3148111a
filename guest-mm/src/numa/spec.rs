//! What the command line says about guest NUMA — `--numa`, `--numa-scan`,
//! `--numa-balancing` — and how that resolves against the vCPUs and the host's nodes.

use std::str::FromStr;

use super::balancer::BalancerConfig;
use crate::config::{NodeBackendKind, NumaLayout, Policy};

/// What is wrong with a NUMA argument (or its resolution against vCPUs and host).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("--numa {spec:?}: expected key=value, got {part:?}")]
    NotKeyValue { spec: String, part: String },
    #[error("--numa nodes={0:?} is not a number")]
    Nodes(String),
    #[error("--numa cpus={value:?}: {group:?} is not a vCPU list like 0-1")]
    CpuList { value: String, group: String },
    #[error("--numa backend={0:?}: choose host or emulated")]
    Backend(String),
    #[error("--numa policy={0:?}: choose bind, preferred or interleave")]
    Policy(String),
    #[error("--numa: unknown key {0:?} (nodes, cpus, backend, policy)")]
    UnknownKey(String),
    #[error("--numa {0:?}: nodes=N (N >= 1) is required")]
    NoNodes(String),
    #[error("--numa cpus= names {groups} node(s) but nodes={nodes}")]
    GroupCount { groups: usize, nodes: u16 },
    #[error("--numa cpus=: vCPU {vcpu} does not exist (--vcpus {vcpus})")]
    NoSuchVcpu { vcpu: u32, vcpus: u32 },
    #[error("--numa cpus=: vCPU {0} is in two nodes")]
    TwoNodes(u32),
    #[error("--numa cpus=: vCPU {0} is in no node")]
    NoNode(usize),
    #[error("--numa-scan {0:?}: expected key=value")]
    ScanNotKeyValue(String),
    #[error("--numa-scan window: {0}")]
    ScanWindow(#[source] crate::error::Error),
    #[error("--numa-scan period={value:?}: {source}")]
    ScanPeriod {
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("--numa-scan window={0}: a window is at least one 2 MiB region (hinting places whole regions)")]
    ScanWindowTooSmall(String),
    #[error("--numa-scan max={value:?}: {source}")]
    ScanMax {
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("--numa-scan max={max}: shorter than period={min}; give max >= period")]
    ScanMaxBelowMin { max: String, min: String },
    #[error("--numa-scan rate={0:?}: give the most region moves per second, a number")]
    ScanRate(String),
    #[error("--numa-scan: unknown key {0:?} (window, period, max, rate)")]
    ScanUnknownKey(String),
    #[error("--numa-balancing {0:?}: choose on or off")]
    Balancing(String),
}

/// `--numa nodes=N[,cpus=A-B:C-D...][,backend=host|emulated][,policy=bind|preferred|interleave]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaSpec {
    pub nodes: u16,
    /// vCPUs of each node, in node order (`cpus=0-1:2-3`).
    pub cpus: Option<Vec<Vec<u32>>>,
    pub backend: Option<NodeBackendKind>,
    pub policy: Policy,
}

impl FromStr for NumaSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut spec = NumaSpec {
            nodes: 0,
            cpus: None,
            backend: None,
            policy: Policy::Bind,
        };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| SpecError::NotKeyValue {
                spec: s.to_string(),
                part: part.to_string(),
            })?;
            match k {
                "nodes" => spec.nodes = v.parse().map_err(|_| SpecError::Nodes(v.into()))?,
                "cpus" => spec.cpus = Some(parse_cpu_groups(v)?),
                "backend" => {
                    spec.backend = Some(match v {
                        "host" => NodeBackendKind::Host,
                        "emulated" => NodeBackendKind::Emulated,
                        _ => return Err(SpecError::Backend(v.into())),
                    })
                }
                "policy" => {
                    spec.policy = match v {
                        "bind" => Policy::Bind,
                        "preferred" => Policy::Preferred,
                        "interleave" => Policy::Interleave,
                        _ => return Err(SpecError::Policy(v.into())),
                    }
                }
                _ => return Err(SpecError::UnknownKey(k.into())),
            }
        }
        if spec.nodes == 0 {
            return Err(SpecError::NoNodes(s.into()));
        }
        Ok(spec)
    }
}

fn parse_cpu_groups(v: &str) -> Result<Vec<Vec<u32>>, SpecError> {
    let mut per_node = Vec::new();
    for group in v.split(':') {
        let list = crate::host::parse_cpu_list(group);
        if list.is_empty() {
            return Err(SpecError::CpuList {
                value: v.into(),
                group: group.into(),
            });
        }
        per_node.push(list);
    }
    Ok(per_node)
}

/// The resolved topology: layout of guest RAM and the node of each vCPU.
#[derive(Clone, Debug)]
pub struct Topology {
    pub layout: NumaLayout,
    pub vcpu_nodes: Vec<u16>,
    /// Why the emulated backend was chosen, when the user did not ask for it.
    pub note: Option<String>,
}

impl NumaSpec {
    pub fn resolve(&self, vcpus: u32, host_nodes: usize) -> Result<Topology, SpecError> {
        let (backend, note) = match self.backend {
            Some(b) => (b, None),
            None if host_nodes >= self.nodes as usize => (NodeBackendKind::Host, None),
            None => (
                NodeBackendKind::Emulated,
                Some(format!(
                    "the host has {host_nodes} NUMA node(s), fewer than {}: using emulated nodes",
                    self.nodes
                )),
            ),
        };
        let vcpu_nodes = match &self.cpus {
            Some(groups) => self.nodes_of_groups(groups, vcpus)?,
            // Spread evenly: consecutive vCPUs share a node.
            None => (0..vcpus)
                .map(|v| (v as u64 * self.nodes as u64 / vcpus as u64) as u16)
                .collect(),
        };
        Ok(Topology {
            layout: NumaLayout {
                nodes: self.nodes,
                backend,
                policy: self.policy,
            },
            vcpu_nodes,
            note,
        })
    }

    fn nodes_of_groups(&self, groups: &[Vec<u32>], vcpus: u32) -> Result<Vec<u16>, SpecError> {
        if groups.len() != self.nodes as usize {
            return Err(SpecError::GroupCount {
                groups: groups.len(),
                nodes: self.nodes,
            });
        }
        let mut nodes = vec![u16::MAX; vcpus as usize];
        for (node, group) in groups.iter().enumerate() {
            for &c in group {
                let slot = nodes
                    .get_mut(c as usize)
                    .ok_or(SpecError::NoSuchVcpu { vcpu: c, vcpus })?;
                if *slot != u16::MAX {
                    return Err(SpecError::TwoNodes(c));
                }
                *slot = node as u16;
            }
        }
        if let Some(c) = nodes.iter().position(|&n| n == u16::MAX) {
            return Err(SpecError::NoNode(c));
        }
        Ok(nodes)
    }
}

/// Whether the NUMA engine scans and moves (`--numa-balancing on|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balancing {
    #[default]
    On,
    Off,
}

impl FromStr for Balancing {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "on" => Ok(Balancing::On),
            "off" => Ok(Balancing::Off),
            _ => Err(SpecError::Balancing(s.into())),
        }
    }
}

/// `--numa-scan window=SIZE,period=D[,max=D][,rate=N]`: hint `window` bytes at a time,
/// a full scan of guest RAM every `period` at the fastest and every `max` at the slowest
/// (default 16 × period, at least Linux's 60 s), at most `rate` region moves a second.
pub fn parse_scan(s: &str) -> Result<BalancerConfig, SpecError> {
    let mut cfg = BalancerConfig::default();
    let mut max: Option<(u64, String)> = None;
    let mut period_text = format!("{}ms", cfg.scan_period_min_ms);
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| SpecError::ScanNotKeyValue(s.into()))?;
        match k {
            "window" => {
                cfg.scan_window = crate::size::parse_size(v).map_err(SpecError::ScanWindow)?;
                if cfg.scan_window < crate::addr::SIZE_2M {
                    return Err(SpecError::ScanWindowTooSmall(v.into()));
                }
            }
            "period" => {
                let d = humantime::parse_duration(v).map_err(|source| SpecError::ScanPeriod {
                    value: v.into(),
                    source,
                })?;
                cfg.scan_period_min_ms = (d.as_millis() as u64).max(1);
                cfg.scan_period_max_ms = cfg.scan_period_max_ms.max(cfg.scan_period_min_ms * 16);
                period_text = v.into();
            }
            "max" => {
                let d = humantime::parse_duration(v).map_err(|source| SpecError::ScanMax {
                    value: v.into(),
                    source,
                })?;
                max = Some(((d.as_millis() as u64).max(1), v.into()));
            }
            "rate" => {
                cfg.max_moves_per_sec = v.parse().map_err(|_| SpecError::ScanRate(v.into()))?
            }
            _ => return Err(SpecError::ScanUnknownKey(k.into())),
        }
    }
    if let Some((ms, text)) = max {
        if ms < cfg.scan_period_min_ms {
            return Err(SpecError::ScanMaxBelowMin {
                max: text,
                min: period_text,
            });
        }
        cfg.scan_period_max_ms = ms;
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numa_specs() {
        let s: NumaSpec = "nodes=2".parse().unwrap();
        let t = s.resolve(4, 1).unwrap();
        assert_eq!(t.vcpu_nodes, vec![0, 0, 1, 1]);
        assert_eq!(t.layout.backend, NodeBackendKind::Emulated);
        assert!(t.note.unwrap().contains("emulated"));
        let s: NumaSpec = "nodes=2,cpus=0:1-2,backend=host,policy=preferred"
            .parse()
            .unwrap();
        assert_eq!(s.policy, Policy::Preferred);
        let t = s.resolve(3, 1).unwrap();
        assert_eq!(t.vcpu_nodes, vec![0, 1, 1]);
        assert_eq!(t.layout.backend, NodeBackendKind::Host);
        assert!("nodes=2,cpus=0:0"
            .parse::<NumaSpec>()
            .unwrap()
            .resolve(2, 1)
            .is_err());
        assert!("nodes=2,cpus=0"
            .parse::<NumaSpec>()
            .unwrap()
            .resolve(2, 1)
            .is_err());
        assert!("nodes=x".parse::<NumaSpec>().is_err());
        assert!("nodes=2,backend=magic".parse::<NumaSpec>().is_err());
        assert!("cpus=0".parse::<NumaSpec>().is_err());
        let c = parse_scan("window=64M,period=20ms").unwrap();
        assert_eq!((c.scan_window, c.scan_period_min_ms), (64 << 20, 20));
        assert_eq!(c.scan_period_max_ms, 60_000, "Linux's maximum stays");
        let c = parse_scan("period=2s,max=10s,rate=7").unwrap();
        assert_eq!(
            (
                c.scan_period_min_ms,
                c.scan_period_max_ms,
                c.max_moves_per_sec
            ),
            (2000, 10_000, 7)
        );
        assert!(parse_scan("period=2s,max=1s")
            .unwrap_err()
            .to_string()
            .contains("max >= period"));
        assert!(parse_scan("window=1M")
            .unwrap_err()
            .to_string()
            .contains("2 MiB"));
        assert!(parse_scan("speed=9").is_err());
        assert_eq!("off".parse::<Balancing>().unwrap(), Balancing::Off);
        assert!("maybe".parse::<Balancing>().is_err());
    }
}
