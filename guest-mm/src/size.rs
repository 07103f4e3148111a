//! Sizes on the command line: "512M", "1G", "2048K", "1T", "512MiB", or plain bytes.

use crate::Error;

/// Parses a size with an optional binary unit (K, M, G, T; "B", "iB" suffixes accepted).
pub fn parse_size(text: &str) -> Result<u64, Error> {
    let bad = |why| Error::BadSize {
        text: text.to_string(),
        why,
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(bad(if t.starts_with('-') {
            "negative"
        } else {
            "no number"
        }));
    }
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        u if u.starts_with('.') => return Err(bad("fractions are not allowed")),
        _ => return Err(bad("unknown unit")),
    };
    let n: u64 = num.parse().map_err(|_| bad("number too large"))?;
    if n == 0 {
        return Err(bad("must be greater than zero"));
    }
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| bad("number too large"))
}

/// "512 MiB", "1 GiB", "2 MiB", "4 KiB", or bytes when not a whole KiB.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, name) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {name}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        for (t, v) in [
            ("512M", 512 << 20),
            ("1G", 1 << 30),
            ("2g", 2 << 30),
            ("4096K", 4 << 20),
            ("1T", 1 << 40),
            ("1048576", 1 << 20),
            ("512MiB", 512 << 20),
            ("1GiB", 1 << 30),
            ("64MB", 64 << 20),
        ] {
            assert_eq!(parse_size(t).unwrap(), v, "{t}");
        }
    }

    #[test]
    fn rejects_bad_sizes_naming_them() {
        for t in [
            "",
            "0",
            "-5M",
            "1.5G",
            "12Q",
            "M",
            "99999999999999999999G",
            "20000000T",
        ] {
            let e = parse_size(t).unwrap_err().to_string();
            assert!(e.contains(&format!("{t:?}")), "{t}: {e}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(3 << 20), "3 MiB");
        assert_eq!(format_size(100), "100 bytes");
    }
}
