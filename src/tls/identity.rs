//! SPIFFE IDs and allow-list patterns.
//!
//! What must hold: an ID is accepted only in the SPIFFE ID form
//! (`spiffe://trust-domain/path`, lower-case trust domain, path segments
//! of `[A-Za-z0-9._-]`, no empty, `.` or `..` segments, no query, fragment,
//! port or user info, at most 2048 bytes); patterns match whole path
//! segments, so `spiffe://td/ns/prod/*` never matches `spiffe://td/ns/production`.

use std::fmt;

/// Longest SPIFFE ID accepted (the SPIFFE spec's limit for URI SANs).
pub const SPIFFE_ID_BYTES_MAX: usize = 2048;

const SCHEME: &str = "spiffe://";

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SpiffeId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("a SPIFFE ID starts with spiffe://")]
    Scheme,
    #[error("SPIFFE ID longer than {SPIFFE_ID_BYTES_MAX} bytes")]
    TooLong,
    #[error("the trust domain is empty or has characters other than a-z 0-9 . - _")]
    TrustDomain,
    #[error(
        "the path has an empty, `.` or `..` segment, or characters other than A-Z a-z 0-9 . - _"
    )]
    Path,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > SPIFFE_ID_BYTES_MAX {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::Scheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !domain_ok {
            return Err(IdError::TrustDomain);
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                let ok = !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return Err(IdError::Path);
                }
            }
        }
        Ok(SpiffeId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain, e.g. `mesh.local`.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0[SCHEME.len()..];
        rest.split('/').next().unwrap_or(rest)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One allow-list entry: an exact ID, or every ID under a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Pattern {
    Exact(SpiffeId),
    /// `spiffe://td/ns/prod/*`, kept as `spiffe://td/ns/prod/`: matches IDs
    /// with at least one more segment.
    Prefix(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        match s.strip_suffix("/*") {
            Some(base) => {
                // The base must itself be a valid ID (a trust domain alone
                // is fine: `spiffe://td/*` allows the whole domain).
                SpiffeId::parse(base)?;
                Ok(Pattern::Prefix(format!("{base}/")))
            }
            None => SpiffeId::parse(s).map(Pattern::Exact),
        }
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Pattern::Exact(want) => want == id,
            Pattern::Prefix(prefix) => {
                id.0.len() > prefix.len() && id.0.starts_with(prefix.as_str())
            }
        }
    }
}

/// Any of the patterns allows the ID.
pub fn allowed(patterns: &[Pattern], id: &SpiffeId) -> bool {
    patterns.iter().any(|p| p.matches(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_ids() {
        for ok in [
            "spiffe://mesh.local/ns/prod/sa/orders",
            "spiffe://mesh.local",
            "spiffe://a_b-c.d/x.y-z_1",
        ] {
            assert!(SpiffeId::parse(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("https://mesh.local/x", IdError::Scheme),
            ("SPIFFE://mesh.local/x", IdError::Scheme),
            ("spiffe:///x", IdError::TrustDomain),
            ("spiffe://Mesh.local/x", IdError::TrustDomain),
            ("spiffe://mesh.local:8080/x", IdError::TrustDomain),
            ("spiffe://user@mesh.local/x", IdError::TrustDomain),
            ("spiffe://mesh.local/", IdError::Path),
            ("spiffe://mesh.local//x", IdError::Path),
            ("spiffe://mesh.local/a/../b", IdError::Path),
            ("spiffe://mesh.local/a/./b", IdError::Path),
            ("spiffe://mesh.local/a?b=c", IdError::Path),
            ("spiffe://mesh.local/a#f", IdError::Path),
            ("spiffe://mesh.local/a%20b", IdError::Path),
        ] {
            assert_eq!(SpiffeId::parse(bad), Err(why), "{bad}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(SPIFFE_ID_BYTES_MAX));
        assert_eq!(SpiffeId::parse(&long), Err(IdError::TooLong));
        assert_eq!(
            SpiffeId::parse("spiffe://mesh.local/x")
                .unwrap()
                .trust_domain(),
            "mesh.local"
        );
    }

    #[test]
    fn patterns_match_whole_segments() {
        let id = |s| SpiffeId::parse(s).unwrap();
        let p = Pattern::parse("spiffe://td/ns/prod/*").unwrap();
        assert!(p.matches(&id("spiffe://td/ns/prod/sa/web")));
        assert!(p.matches(&id("spiffe://td/ns/prod/x")));
        assert!(!p.matches(&id("spiffe://td/ns/prod")));
        assert!(!p.matches(&id("spiffe://td/ns/production/x")));
        assert!(!p.matches(&id("spiffe://other/ns/prod/x")));
        let exact = Pattern::parse("spiffe://td/ns/prod/sa/web").unwrap();
        assert!(exact.matches(&id("spiffe://td/ns/prod/sa/web")));
        assert!(!exact.matches(&id("spiffe://td/ns/prod/sa/web2")));
        let domain = Pattern::parse("spiffe://td/*").unwrap();
        assert!(domain.matches(&id("spiffe://td/anything")));
        assert!(!domain.matches(&id("spiffe://td")));
        assert!(Pattern::parse("spiffe://td/ns/*/x").is_err());
        assert!(allowed(&[exact, p], &id("spiffe://td/ns/prod/a")));
    }
}
