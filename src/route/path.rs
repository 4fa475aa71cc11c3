//! Path normalization: the one spelling of a request path that routing,
//! authorization and the upstream all see.
//!
//! Routes and allow-lists match on paths; an upstream resolves the path it
//! is sent (nginx decodes `%2e`, merges `//`, resolves `..`). If the proxy
//! matched the raw spelling while the upstream resolved it, `/admin/x`
//! spelled `/public/../admin/x` or `/%61dmin/x` would pass a check meant
//! for `/admin/` (the class of Envoy's CVE-2019-9901). So the path is
//! normalized once, before any decision, and the normalized path is what
//! is forwarded.
//!
//! What must hold (RFC 3986 §6.2.2): every `%XX` is valid hex; encoded
//! unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded exactly once,
//! other escapes are kept with upper-case hex (so `%25` never becomes a new
//! escape); dot segments are resolved (§5.2.4), never climbing above `/`;
//! runs of `/` are merged when [`PathOptions::merge_slashes`] (the default,
//! as nginx does); an encoded `/` or `\` (`%2F`, `%5C`) and a raw `\` follow
//! [`SlashAction`] (default: refused, since servers disagree on them). The
//! query is not touched. A path that is already normal costs one scan and
//! no allocation.

use serde::Serialize;

/// What to do with `%2F`, `%5C` and a raw `\` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlashAction {
    /// 400: servers disagree on whether these separate segments (Envoy's
    /// `REJECT_REQUEST`). The default.
    Reject,
    /// Turn each into `/`, then normalize (Envoy's `UNESCAPE_AND_FORWARD`):
    /// routing sees what a decoding upstream will.
    Unescape,
    /// Keep them as data, escapes upper-cased. Safe only when the upstream
    /// never decodes `%2F` into a separator.
    Keep,
}

/// A listener's normalization settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PathOptions {
    pub merge_slashes: bool,
    pub escaped_slashes: SlashAction,
}

impl Default for PathOptions {
    fn default() -> Self {
        Self {
            merge_slashes: true,
            escaped_slashes: SlashAction::Reject,
        }
    }
}

/// Why a path was refused (400 `bad_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("invalid percent-encoding in the path")]
    BadEscape,
    #[error("the path contains an encoded slash or backslash (%2F, %5C) or a backslash")]
    Slash,
    #[error("the path does not start with /")]
    NotAbsolute,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` may need rewriting: one pass over the bytes, the common
/// case (a plain path) returns false.
fn needs_work(path: &[u8], opts: PathOptions) -> bool {
    path.iter().enumerate().any(|(i, &b)| match b {
        b'%' | b'\\' => true,
        b'/' => match path.get(i + 1) {
            Some(b'/') => opts.merge_slashes,
            Some(b'.') => matches!(path.get(i + 2), None | Some(b'/' | b'.')),
            _ => false,
        },
        _ => false,
    })
}

/// The normal form of `path` (no query), or None when it already is.
pub fn normalize(path: &[u8], opts: PathOptions) -> Result<Option<Vec<u8>>, PathError> {
    if path.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if !needs_work(path, opts) {
        return Ok(None);
    }
    let decoded = decode(path, opts.escaped_slashes)?;
    let out = resolve(&decoded, opts.merge_slashes);
    Ok((out != path).then_some(out))
}

/// Decodes unreserved escapes, upper-cases the others, applies the slash
/// action. Escapes that stay are kept as three bytes, so `resolve` never
/// sees a separator that was not one (except under `Unescape`).
fn decode(path: &[u8], slashes: SlashAction) -> Result<Vec<u8>, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'\\' {
            match slashes {
                SlashAction::Reject => return Err(PathError::Slash),
                SlashAction::Unescape => out.push(b'/'),
                SlashAction::Keep => out.push(b'\\'),
            }
            i += 1;
            continue;
        }
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            path.get(i + 1).copied().and_then(hex),
            path.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let v = hi << 4 | lo;
        match v {
            _ if is_unreserved(v) => out.push(v),
            b'/' | b'\\' if slashes == SlashAction::Reject => return Err(PathError::Slash),
            b'/' | b'\\' if slashes == SlashAction::Unescape => out.push(b'/'),
            _ => out.extend_from_slice(&[b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]]),
        }
        i += 3;
    }
    Ok(out)
}

/// Resolves `.` and `..` segments (never above the root) and, if asked,
/// merges empty segments. A path that ended in a directory (`/`, `/.`,
/// `/..`) keeps its trailing slash.
fn resolve(path: &[u8], merge_slashes: bool) -> Vec<u8> {
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    let parts: Vec<&[u8]> = path[1..].split(|&b| b == b'/').collect();
    let last = parts.len() - 1;
    for (i, seg) in parts.into_iter().enumerate() {
        let is_last = i == last;
        match seg {
            b"." => trailing = is_last,
            b".." => {
                segments.pop();
                trailing = is_last;
            }
            b"" if is_last => trailing = true,
            b"" if merge_slashes => {}
            _ => {
                segments.push(seg);
                trailing = false;
            }
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for seg in &segments {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str, opts: PathOptions) -> Result<String, PathError> {
        normalize(path.as_bytes(), opts)
            .map(|o| String::from_utf8(o.unwrap_or_else(|| path.as_bytes().to_vec())).unwrap())
    }

    #[test]
    fn table_of_spellings() {
        let d = PathOptions::default();
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/a/b", Ok("/a/b")),
            ("/a/b/", Ok("/a/b/")),
            ("/admin/../public", Ok("/public")),
            ("/public/../admin/x", Ok("/admin/x")),
            ("/public/%2e%2e/admin/x", Ok("/admin/x")),
            ("/public/%2E%2E/admin/x", Ok("/admin/x")),
            ("/public/.%2e/admin", Ok("/admin")),
            ("/%61dmin/x", Ok("/admin/x")),
            ("/a/./b/.", Ok("/a/b/")),
            ("/a/b/..", Ok("/a/")),
            ("/..", Ok("/")),
            ("/../../etc/passwd", Ok("/etc/passwd")),
            ("//admin//x", Ok("/admin/x")),
            ("/admin/", Ok("/admin/")),
            ("/a/.b/..c/...", Ok("/a/.b/..c/...")),
            ("/a%20b", Ok("/a%20b")),
            ("/a%c3%a9", Ok("/a%C3%A9")),
            ("/%25%32%65", Ok("/%252e")),
            ("/a%2fb", Err(PathError::Slash)),
            ("/a%5Cb", Err(PathError::Slash)),
            ("/a\\..\\admin", Err(PathError::Slash)),
            ("/a%", Err(PathError::BadEscape)),
            ("/a%g1", Err(PathError::BadEscape)),
            ("/a%1", Err(PathError::BadEscape)),
            ("a/b", Err(PathError::NotAbsolute)),
        ];
        for (input, want) in cases {
            let got = norm(input, d);
            assert_eq!(got.as_deref(), want.as_ref().map(|s| *s), "{input}");
        }
    }

    #[test]
    fn options_change_slashes_and_merging() {
        let unescape = PathOptions {
            escaped_slashes: SlashAction::Unescape,
            ..PathOptions::default()
        };
        assert_eq!(norm("/a%2F..%2Fadmin", unescape).unwrap(), "/admin");
        assert_eq!(norm("/a\\..\\admin", unescape).unwrap(), "/admin");
        let keep = PathOptions {
            escaped_slashes: SlashAction::Keep,
            ..PathOptions::default()
        };
        assert_eq!(norm("/a%2f..%2fb", keep).unwrap(), "/a%2F..%2Fb");
        let no_merge = PathOptions {
            merge_slashes: false,
            ..PathOptions::default()
        };
        assert_eq!(norm("/a//b", no_merge).unwrap(), "/a//b");
        assert_eq!(norm("/a//../b", no_merge).unwrap(), "/a/b");
    }

    #[test]
    fn normal_paths_are_not_copied() {
        for p in ["/", "/api/v1/items", "/a.b/c", "/a/b/"] {
            assert_eq!(normalize(p.as_bytes(), PathOptions::default()), Ok(None));
        }
    }

    #[test]
    fn normalizing_is_idempotent() {
        for p in ["/a/../b/%2e/c//d/", "/%7euser/%41", "/x/%2e%2e%2f"] {
            let opts = PathOptions {
                escaped_slashes: SlashAction::Keep,
                ..PathOptions::default()
            };
            let once = norm(p, opts).unwrap();
            assert_eq!(norm(&once, opts).unwrap(), once, "{p}");
        }
    }
}
