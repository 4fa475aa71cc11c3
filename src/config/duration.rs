//! Human-readable durations in the config ("250ms", "5s", "1m 30s").
//!
//! Every duration is checked against [`DURATION_MIN`]..=[`DURATION_MAX`] while
//! it is parsed, so the error carries the value's position in the file.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

use super::limits::{DURATION_MAX, DURATION_MIN};

/// A duration read from the config, already range-checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map(HumanDuration).map_err(de::Error::custom)
    }
}

/// Parses and range-checks one duration string.
pub fn parse(text: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(text).map_err(|e| {
        format!("invalid duration {text:?} ({e}); write it like \"250ms\", \"5s\" or \"2m\"")
    })?;
    if value < DURATION_MIN || value > DURATION_MAX {
        return Err(format!(
            "duration {text:?} is out of range: it must be between {} and {}",
            humantime::format_duration(DURATION_MIN),
            humantime::format_duration(DURATION_MAX)
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("1m 30s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn rejects_garbage_and_out_of_range() {
        for bad in ["", "5", "five seconds", "-1s", "0s", "2days", "1us"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
