//! Sizes and bandwidths as people write them (`20GiB`, `512MiB`, `936GB/s`), and the
//! rule that turns a device's memory and a user's limits into what it offers.
//!
//! Both sides use these: the worker for its `--max-memory` / `--reserve`, the
//! coordinator's planner for the same flags and for `--nodes` devices, so a size
//! means the same everywhere.

/// A size or bandwidth that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}`: {reason}")]
pub struct QuantityError {
    pub text: String,
    pub reason: &'static str,
}

/// `24GiB`, `24 GB`, `512MiB`, `24G` (binary), `1048576` (bytes) → bytes.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let (number, unit) = split_unit(text)?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        _ => {
            return Err(bad(
                text,
                "unknown unit (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)",
            ))
        }
    };
    let bytes = number * scale;
    if bytes >= u64::MAX as f64 {
        return Err(bad(text, "too large"));
    }
    Ok(bytes.round() as u64)
}

/// `936GB/s`, `1.5TB/s` → bytes per second.
pub fn parse_bandwidth(text: &str) -> Result<f64, QuantityError> {
    let lower = text.trim().to_ascii_lowercase();
    let Some(per_second) = lower.strip_suffix("/s") else {
        return Err(bad(text, "a bandwidth needs a unit such as GB/s"));
    };
    let bytes =
        parse_bytes(per_second).map_err(|_| bad(text, "not a bandwidth such as 936GB/s"))?;
    if bytes == 0 {
        return Err(bad(text, "a bandwidth must be above zero"));
    }
    Ok(bytes as f64)
}

/// `60s`, `5m`, `1h`, `500ms`, `90` (seconds) → a duration.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, QuantityError> {
    const WHY: &str = "not a duration such as 60s, 5m, 1h or 500ms";
    let (number, unit) = split_unit(text).map_err(|_| bad(text, WHY))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "ms" => 1e-3,
        "" | "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad(text, WHY)),
    };
    std::time::Duration::try_from_secs_f64(number * scale).map_err(|_| bad(text, WHY))
}

/// `39.8 GiB`, `512.0 MiB`, `100 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn split_unit(text: &str) -> Result<(f64, &str), QuantityError> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let number: f64 = text[..end]
        .parse()
        .map_err(|_| bad(text, "not a number followed by a unit"))?;
    if !number.is_finite() {
        return Err(bad(text, "not a number followed by a unit"));
    }
    Ok((number, text[end..].trim()))
}

fn bad(text: &str, reason: &'static str) -> QuantityError {
    QuantityError {
        text: text.to_string(),
        reason,
    }
}

/// Per-device limits on what a node offers: `--max-memory` and `--reserve`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Never offer more than this per device.
    pub max_memory: Option<u64>,
    /// Keep this much of every device free (else the device's default reserve).
    pub reserve: Option<u64>,
}

impl MemoryLimits {
    /// Bytes a device with `total` usable bytes offers: what is left after the
    /// reserve, capped by the maximum.
    pub fn offered(&self, total: u64, default_reserve: u64) -> u64 {
        let left = total.saturating_sub(self.reserve.unwrap_or(default_reserve));
        self.max_memory.map_or(left, |cap| left.min(cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes_in_every_unit() {
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 * GIB);
        assert_eq!(parse_bytes("24g").unwrap(), 24 * GIB);
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes(" 4096 ").unwrap(), 4096);
        assert_eq!(parse_bytes("100b").unwrap(), 100);
        assert_eq!(parse_bandwidth("1.5TB/s").unwrap(), 1.5e12);
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        let ok = [
            ("60s", Duration::from_secs(60)),
            ("90", Duration::from_secs(90)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("500ms", Duration::from_millis(500)),
            (" 1.5 s ", Duration::from_millis(1500)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for text in ["", "s", "ten", "5 days", "-1s", "1e400s"] {
            let err = parse_duration(text).unwrap_err().to_string();
            assert!(err.contains("not a duration such as 60s"), "{text}: {err}");
        }
    }

    #[test]
    fn bad_sizes_say_why() {
        assert_eq!(
            parse_bytes("GiB").unwrap_err().to_string(),
            "`GiB`: not a number followed by a unit"
        );
        assert!(parse_bytes("12QB")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_bytes("-1GiB").is_err());
        assert!(parse_bytes("1.2.3GB").is_err());
        assert_eq!(parse_bytes("99999999TiB").unwrap_err().reason, "too large");
        assert!(parse_bandwidth("12GB")
            .unwrap_err()
            .to_string()
            .contains("needs a unit"));
        assert!(parse_bandwidth("0GB/s")
            .unwrap_err()
            .to_string()
            .contains("above zero"));
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_bytes(512 << 20), "512.0 MiB");
        assert_eq!(format_bytes(GIB + GIB / 2), "1.5 GiB");
        assert_eq!(
            parse_bytes(&format_bytes(20 * GIB).replace(' ', "")).unwrap(),
            20 * GIB
        );
    }

    #[test]
    fn offered_is_what_the_reserve_leaves_capped_by_the_maximum() {
        let none = MemoryLimits::default();
        assert_eq!(
            none.offered(24 * GIB, GIB),
            23 * GIB,
            "the default reserve applies"
        );
        let both = MemoryLimits {
            max_memory: Some(20 * GIB),
            reserve: Some(2 * GIB),
        };
        assert_eq!(both.offered(24 * GIB, GIB), 20 * GIB, "capped");
        assert_eq!(both.offered(8 * GIB, GIB), 6 * GIB, "less the reserve");
        assert_eq!(
            both.offered(GIB, 0),
            0,
            "a reserve above the total leaves nothing"
        );
    }
}
