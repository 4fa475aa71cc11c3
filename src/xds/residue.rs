//! Names the first field of a resource that Pilotfish did not take.
//!
//! What must hold: a translator clears every field it maps or may safely
//! ignore, then asks [`first_set`] about what is left; any field still set
//! is one whose meaning Pilotfish cannot honour, and the resource is
//! refused naming it (never silently ignored). Field names come from the
//! generated types' `Debug`, which prints every field in declaration order,
//! so comparing the residue's fields with a default message's names the
//! first one that differs without a table to keep in step with the API.

/// The first top-level field of `residue` that differs from `default`
/// (both `Debug` of the same message type), or None when they are equal.
pub fn first_set<T: std::fmt::Debug + Default + PartialEq>(residue: &T) -> Option<String> {
    let default = T::default();
    if *residue == default {
        return None;
    }
    let (a, b) = (format!("{residue:?}"), format!("{default:?}"));
    let fields_a = top_level_fields(&a);
    let fields_b = top_level_fields(&b);
    for (x, y) in fields_a.iter().zip(&fields_b) {
        if x != y {
            return Some(x.split(':').next().unwrap_or(x).trim().to_string());
        }
    }
    // A map's iteration order, or an enum's shape, hid the difference.
    Some("(a field)".into())
}

/// `Name { a: 1, b: Some(X { c: 2 }) }` → `["a: 1", "b: Some(X { c: 2 })"]`.
fn top_level_fields(debug: &str) -> Vec<&str> {
    let Some(open) = debug.find('{') else {
        return vec![debug];
    };
    let body = &debug[open + 1..debug.len().saturating_sub(1)];
    let mut out = Vec::new();
    let (mut depth, mut start, mut in_str, mut escaped) = (0i32, 0usize, false, false);
    for (i, c) in body.char_indices() {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(body[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = body[start..].trim();
    if !last.is_empty() {
        out.push(last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Inner {
        c: Vec<u32>,
    }

    #[derive(Debug, Default, PartialEq)]
    struct Msg {
        a: String,
        b: Option<Inner>,
        d: u32,
    }

    #[test]
    fn names_the_first_field_set() {
        assert_eq!(first_set(&Msg::default()), None);
        let m = Msg {
            a: "x, {y}\"".into(),
            d: 3,
            ..Msg::default()
        };
        assert_eq!(first_set(&m).as_deref(), Some("a"));
        let m = Msg {
            b: Some(Inner { c: vec![1, 2] }),
            d: 3,
            ..Msg::default()
        };
        assert_eq!(first_set(&m).as_deref(), Some("b"));
        let m = Msg {
            d: 3,
            ..Msg::default()
        };
        assert_eq!(first_set(&m).as_deref(), Some("d"));
    }
}
