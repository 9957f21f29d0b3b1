//! How docker prints ids, sizes, times and ports.

use std::time::{SystemTime, UNIX_EPOCH};

use bollard::models::PortSummary;

/// The 12-character id docker shows, without the `sha256:` prefix.
pub fn short_id(id: &str) -> String {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    id.chars().take(12).collect()
}

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// go-units' HumanDuration: "Less than a second", "5 minutes", "2 hours", "3 days"…
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0 => "Less than a second".to_owned(),
        1 => "1 second".to_owned(),
        s if s < 60 => format!("{s} seconds"),
        s if s < 120 => "About a minute".to_owned(),
        s if s < 3600 => format!("{} minutes", s / 60),
        s if s < 7200 => "About an hour".to_owned(),
        s if s < 48 * 3600 => format!("{} hours", s / 3600),
        s if s < 7 * 24 * 3600 * 2 => format!("{} days", s / 86_400),
        s if s < 30 * 24 * 3600 * 2 => format!("{} weeks", s / (7 * 86_400)),
        s if s < 365 * 24 * 3600 * 2 => format!("{} months", s / (30 * 86_400)),
        s => format!("{} years", s / (365 * 86_400)),
    }
}

/// "5 minutes ago" for a time in seconds since the epoch.
pub fn ago(secs: i64) -> String {
    format!("{} ago", human_duration(now_secs() - secs))
}

/// go-units' HumanSizeWithPrecision(size, 3): decimal units, 3 significant digits.
pub fn human_size(bytes: i64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes.max(0) as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    format!("{}{}", g(v, 3), units[i])
}

/// go-units' BytesSize: binary units, 4 significant digits (stats, info).
pub fn binary_size(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes.max(0.0);
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{}{}", g(v, 4), units[i])
}

/// `%.<digits>g` as Go prints it (no trailing zeros).
fn g(v: f64, digits: i32) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    let significant = digits;
    let digits = v.abs().log10().floor() as i32 + 1;
    let decimals = (significant - digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// Go's time.Time String() for a UTC time: `2024-01-02 03:04:05 +0000 UTC`.
pub fn created_at(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = api::time::civil(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} +0000 UTC")
}

/// RFC 3339 (seconds) in UTC.
pub fn rfc3339(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = api::time::civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Parses an RFC 3339 time (`2024-01-02T03:04:05.123Z`, offsets allowed; no zone reads as
/// UTC) to epoch seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    api::time::parse_rfc3339(s)
        .or_else(|| api::time::parse_rfc3339(&format!("{s}Z")))
        .map(|ns| ns.div_euclid(1_000_000_000))
}

/// docker ps's PORTS column: `0.0.0.0:8080->80/tcp, 443/tcp`.
pub fn ports(ports: &[PortSummary]) -> String {
    let mut ps: Vec<&PortSummary> = ports.iter().collect();
    ps.sort_by_key(|p| (p.private_port, p.public_port));
    let mut out: Vec<String> = Vec::new();
    for p in ps {
        let proto = p.typ.map_or("tcp".to_owned(), |t| t.to_string());
        match p.public_port {
            Some(pub_port) if pub_port != 0 => {
                let ip = p.ip.as_deref().unwrap_or("0.0.0.0");
                let ip = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip.to_owned()
                };
                out.push(format!("{ip}:{pub_port}->{}/{proto}", p.private_port));
            }
            _ => out.push(format!("{}/{proto}", p.private_port)),
        }
    }
    out.dedup();
    out.join(", ")
}

/// docker's truncated, quoted COMMAND column.
pub fn command(cmd: &str, no_trunc: bool) -> String {
    let c = if no_trunc || cmd.chars().count() <= 20 {
        cmd.to_owned()
    } else {
        format!("{}…", cmd.chars().take(19).collect::<String>())
    };
    format!("\"{c}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(human_size(4_261_000), "4.26MB");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_000), "1kB");
        assert_eq!(human_size(12_500_000), "12.5MB");
        assert_eq!(binary_size(1024.0 * 1024.0 * 1.5), "1.5MiB");
        assert_eq!(binary_size(25_275_000_000.0), "23.54GiB");
        assert_eq!(human_duration(3), "3 seconds");
        assert_eq!(human_duration(90), "About a minute");
        assert_eq!(human_duration(600), "10 minutes");
        assert_eq!(human_duration(3 * 86_400), "3 days");
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(created_at(0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.123456789+01:00"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn ids_and_commands() {
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(command("echo hi", false), "\"echo hi\"");
        assert_eq!(
            command("sh -c 'while true; do sleep 1; done'", false),
            "\"sh -c 'while true; …\""
        );
    }
}
