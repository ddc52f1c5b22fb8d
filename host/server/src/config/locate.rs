//! Where a key is written in a config file's text: the line an error points at.

/// The 1-based line of the last segment of `path` (`["event_broker", "redis", "port"]`) in
/// `text`, found by walking the segments in order: each is the first line after the previous
/// segment's that names it (`name:` in YAML, `name =` in TOML, or a TOML table header ending in
/// it). `None` when the first segment is not in the file (the value came from elsewhere).
pub(crate) fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let mut from = 0;
    let mut found = None;
    for segment in path {
        let at = text
            .lines()
            .enumerate()
            .skip(from)
            .find(|(_, line)| names(line, segment))
            .map(|(index, _)| index);
        match at {
            Some(index) => {
                found = Some(index + 1);
                from = index + 1;
            }
            // Deeper segments may be written inline (`tls: { required: true }`): the
            // deepest line found is still where the value is.
            None => break,
        }
    }
    found
}

/// Whether `line` writes key `name`: `name:` (YAML), `name =` (TOML), or `[… .name]`.
fn names(line: &str, name: &str) -> bool {
    let line = line.trim_start().trim_start_matches("- ");
    if let Some(header) = line.strip_prefix('[') {
        let header = header.trim_start_matches('[');
        let inner = header.split(']').next().unwrap_or("");
        return inner.split('.').any(|part| part.trim() == name);
    }
    let Some(rest) = line
        .strip_prefix(name)
        .or_else(|| line.strip_prefix(&format!("\"{name}\"")))
    else {
        return false;
    };
    let rest = rest.trim_start();
    rest.starts_with(':') || rest.starts_with('=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_yaml_and_toml_keys_by_path() {
        let yaml =
            "server:\n  listen: x\nevent_broker:\n  worker_count: 0\n  redis:\n    port: 1\n";
        assert_eq!(line_of(yaml, &["event_broker", "worker_count"]), Some(4));
        assert_eq!(line_of(yaml, &["event_broker", "redis", "port"]), Some(6));
        assert_eq!(line_of(yaml, &["log", "level"]), None);
        let toml = "[event_broker]\nworker_count = 0\n\n[event_broker.redis]\nport = 1\n";
        assert_eq!(line_of(toml, &["event_broker", "redis", "port"]), Some(5));
        assert_eq!(line_of(toml, &["event_broker", "worker_count"]), Some(2));
    }
}
