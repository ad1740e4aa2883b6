//! `${VAR}` and `${VAR:-default}` substitution in pipeline files.
//!
//! Substitution happens on parsed string values, never on raw TOML text, so a value that
//! contains quotes cannot break the file's syntax. An unset variable without a default is an
//! error, never an empty string: a missing secret must stop the start, not connect anonymously.
//! `$$` writes a literal `$`.

/// Expands every `${...}` in `text` using `lookup`; returns the first problem found.
pub fn substitute(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in {text:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expr, None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!("invalid variable name {name:?} in `${{{expr}}}`"));
            }
            match (lookup(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set and `${{{name}}}` has no default \
                         (write `${{{name}:-default}}` to give one)"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("kafka:9092".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_and_defaults() {
        assert_eq!(substitute("${HOST}", env).unwrap(), "kafka:9092");
        assert_eq!(substitute("a-${NOPE:-x}-b", env).unwrap(), "a-x-b");
        assert_eq!(substitute("${EMPTY:-x}", env).unwrap(), "");
        assert_eq!(substitute("${NOPE:-}", env).unwrap(), "");
        assert_eq!(substitute("cost $5 $$HOME", env).unwrap(), "cost $5 $HOME");
        assert_eq!(substitute("no vars", env).unwrap(), "no vars");
    }

    #[test]
    fn unset_without_default_is_an_error() {
        let err = substitute("pw=${SECRET}", env).unwrap_err();
        assert!(err.contains("SECRET is not set"), "{err}");
        assert!(substitute("${HOST", env).is_err());
        assert!(substitute("${1X}", env).is_err());
    }
}
