//! Reading this process's memory use from /proc/self/smaps.

/// Resident bytes of this process: (total, in mappings overlapping the given host VA ranges).
///
/// Overlap rather than containment: the kernel may merge an anonymous guest-RAM mapping
/// with a neighbouring anonymous VMA, and smaps reports RSS per VMA.
pub fn rss_split(ranges: &[(u64, u64)]) -> std::io::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let (mut total, mut inside) = (0u64, 0u64);
    let mut current_inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                current_inside = ranges.iter().any(|&(s, e)| lo < e && hi > s);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kb * 1024;
            if current_inside {
                inside += kb * 1024;
            }
        }
    }
    Ok((total, inside))
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_rss_is_positive() {
        let (total, inside) = super::rss_split(&[]).unwrap();
        assert!(total > 0);
        assert_eq!(inside, 0);
    }
}
