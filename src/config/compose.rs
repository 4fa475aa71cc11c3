//! A config in layers: the file (or a `POST /config` body) below, the
//! resources a control plane pushed above.
//!
//! What must hold: the dynamic layer only adds listeners and clusters; a
//! name defined in the file cannot be replaced from above (the operator's
//! file wins, and the push naming it is refused); the composed config goes
//! through the same validation as a file, so nothing reaches a worker that
//! a file could not have said. With no dynamic layer the file parses
//! exactly as it always has, errors and all.

use std::path::Path;

use serde::Serialize;

use super::{Config, ConfigError};

/// Listeners and clusters from a control plane, each a table in the
/// config file's own shape (so that one validator checks everything).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Dynamic {
    pub listeners: Vec<toml::Table>,
    pub clusters: Vec<toml::Table>,
}

impl Dynamic {
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.clusters.is_empty()
    }
}

/// Parses `text` (named `file` in errors) with `dynamic` added.
pub fn compose(file: &Path, text: &str, dynamic: &Dynamic) -> Result<Config, ConfigError> {
    if dynamic.is_empty() {
        return Config::parse(file, text);
    }
    let mut table: toml::Table = toml::from_str(text)
        .map_err(|e| ConfigError::at(file, text, e.span(), None, e.message().trim().to_string()))?;
    for (key, kind, list) in [
        ("listeners", "listener", &dynamic.listeners),
        ("clusters", "cluster", &dynamic.clusters),
    ] {
        let slot = table
            .entry(key)
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        let Some(array) = slot.as_array_mut() else {
            return Err(ConfigError::whole_file(
                file,
                format!("`{key}` must be an array of tables"),
            ));
        };
        let name_of = |v: &toml::Value| {
            v.get("name")
                .and_then(toml::Value::as_str)
                .map(str::to_string)
        };
        let fixed: Vec<String> = array.iter().filter_map(name_of).collect();
        for item in list {
            let name = item
                .get("name")
                .and_then(toml::Value::as_str)
                .unwrap_or_default();
            if fixed.iter().any(|f| f == name) {
                return Err(ConfigError::whole_file(
                    file,
                    format!(
                        "{kind} {name:?} from the control plane has the name of a static {kind} in this file; a static name cannot be replaced"
                    ),
                ));
            }
            array.push(toml::Value::Table(item.clone()));
        }
    }
    let composed = toml::to_string(&table)
        .map_err(|e| ConfigError::whole_file(file, format!("cannot compose: {e}")))?;
    Config::parse(
        format!("{} + control-plane resources", file.display()),
        &composed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[admin]
socket = "/tmp/x.sock"

[[clusters]]
name = "static"
endpoints = ["127.0.0.1:9000"]
"#;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn adds_dynamic_resources_and_keeps_static_names() {
        let dynamic = Dynamic {
            clusters: vec![table("name = \"orders\"\nendpoints = [\"127.0.0.1:9001\"]")],
            listeners: vec![table(
                "name = \"in\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ncluster = \"static\"",
            )],
        };
        let c = compose(Path::new("b.toml"), BASE, &dynamic).unwrap();
        let names: Vec<_> = c.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["static", "orders"]);
        assert_eq!(c.listeners[0].name, "in");

        let clash = Dynamic {
            clusters: vec![table("name = \"static\"\nendpoints = []")],
            ..Dynamic::default()
        };
        let e = compose(Path::new("b.toml"), BASE, &clash)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"static\"") && e.contains("cannot be replaced"),
            "{e}"
        );
    }

    #[test]
    fn a_dynamic_resource_goes_through_validation() {
        let bad = Dynamic {
            clusters: vec![table("name = \"x\"\nendpoints = [\"nowhere\"]")],
            ..Dynamic::default()
        };
        let e = compose(Path::new("b.toml"), BASE, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoints") && e.contains("nowhere"), "{e}");
    }
}
