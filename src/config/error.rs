//! Config errors that name the file, the line, the column and the key.

use std::{fmt, ops::Range, path::PathBuf};

/// One problem with a config file, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the text came from (`<inline>` for text given directly).
    pub file: PathBuf,
    /// 1-based line and column of the offending value, when known.
    pub position: Option<(usize, usize)>,
    /// The key at fault, as a dotted path (`listeners[0].cluster`) or the
    /// bare key name when only the parser's span is known.
    pub key: Option<String>,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
    /// The offending source line, for display.
    pub source_line: Option<String>,
}

impl ConfigError {
    /// An error not tied to a position (unreadable file, say).
    pub fn whole_file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            position: None,
            key: None,
            message: message.into(),
            source_line: None,
        }
    }

    /// An error located by a byte span into `text`.
    pub fn at(
        file: impl Into<PathBuf>,
        text: &str,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        let located = span.map(|span| locate(text, span.start));
        let key = key.or_else(|| located.as_ref().and_then(|l| key_on_line(&l.2)));
        Self {
            file: file.into(),
            position: located.as_ref().map(|l| (l.0, l.1)),
            key,
            message: message.into(),
            source_line: located.map(|l| l.2),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let (Some((line, _)), Some(source)) = (self.position, &self.source_line) {
            write!(f, "\n  {line:>4} | {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// 1-based (line, column) of a byte offset, and that line's text.
fn locate(text: &str, offset: usize) -> (usize, usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let column = text[line_start..offset].chars().count() + 1;
    (
        line,
        column,
        text[line_start..line_end].trim_end().to_string(),
    )
}

/// The key of a `key = value` line, when the parser only gave us a span.
fn key_on_line(line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    plain.then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_column_and_key() {
        let text = "a = 1\nconnect_timeout = \"5x\"\n";
        let offset = text.find("\"5x").unwrap();
        let e = ConfigError::at("f.toml", text, Some(offset..offset + 4), None, "bad");
        assert_eq!(e.position, Some((2, 19)));
        assert_eq!(e.key.as_deref(), Some("connect_timeout"));
        let shown = e.to_string();
        assert!(
            shown.starts_with("f.toml:2:19: key `connect_timeout`: bad"),
            "{shown}"
        );
    }
}
