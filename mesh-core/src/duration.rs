//! Durations as people write them: `500ms`, `30s`, `5m`, `1h`, `7d`, `1m30s`.

use std::time::Duration;

/// Parse a duration made of one or more `NUMBER UNIT` parts, where the unit is `ms`,
/// `s`, `m`, `h` or `d` (`90s`, `1m30s`, `1.5h`, `7d`). A bare number is refused, because a
/// timeout of `30` could mean seconds or milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let bad = |why: &str| {
        format!("'{text}' is not a duration ({why}); write e.g. 500ms, 30s, 5m, 1h, 7d or 1m30s")
    };
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let value: f64 = num.parse().map_err(|_| bad("malformed number"))?;
        let seconds_per_unit = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => return Err(bad("a unit is missing")),
            _ => return Err(bad(&format!("unknown unit '{unit}'"))),
        };
        let part = Duration::try_from_secs_f64(value * seconds_per_unit)
            .map_err(|_| bad("out of range"))?;
        total = total.checked_add(part).ok_or_else(|| bad("out of range"))?;
        rest = after.trim_start();
    }
    Ok(total)
}

/// A short human form (`1m30s`, `250ms`) for listings.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        if h == 0 && m == 0 && !ms.is_multiple_of(1000) {
            out.push_str(&format!("{:.1}s", d.as_secs_f64()));
        } else {
            out.push_str(&format!("{s}s"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            parse_duration(" 2h 10m ").unwrap(),
            Duration::from_secs(7800)
        );
    }

    #[test]
    fn refuses_what_is_ambiguous_or_malformed() {
        for bad in ["", "30", "s", "10x", "1..5s", "-1s", "5 minutes"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("write e.g. 500ms"), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_briefly() {
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }
}
