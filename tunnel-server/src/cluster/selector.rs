//! Label selectors as `kubectl -l` writes them, parsed into kube's `Selector`.

use std::collections::BTreeSet;

use kube::core::{Expression, ParseExpressionError, Selector};

use crate::dns;

/// Parses a label selector as `kubectl -l` takes it: comma-separated `key=value`,
/// `key==value`, `key!=value`, `key`, `!key`, `key in (a,b)` and `key notin (a,b)`.
pub fn parse_selector(text: &str) -> Result<Selector, ParseExpressionError> {
    let bad = |why: String| ParseExpressionError(format!("{text:?}: {why}"));
    let mut expressions = Vec::new();
    for part in split_outside_parens(text) {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad("an empty requirement".into()));
        }
        let expression = if let Some(key) = part.strip_prefix('!') {
            Expression::DoesNotExist(label_key(key.trim()).map_err(bad)?)
        } else if let Some((key, value)) = part.split_once("!=") {
            Expression::NotEqual(
                label_key(key.trim()).map_err(bad)?,
                label_value(value.trim()).map_err(bad)?,
            )
        } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Expression::Equal(
                label_key(key.trim()).map_err(bad)?,
                label_value(value.trim()).map_err(bad)?,
            )
        } else if let Some((key, values)) = split_set(part, " notin ") {
            Expression::NotIn(
                label_key(key).map_err(bad)?,
                value_set(values).map_err(bad)?,
            )
        } else if let Some((key, values)) = split_set(part, " in ") {
            Expression::In(
                label_key(key).map_err(bad)?,
                value_set(values).map_err(bad)?,
            )
        } else {
            Expression::Exists(label_key(part).map_err(bad)?)
        };
        expressions.push(expression);
    }
    Ok(expressions.into_iter().collect())
}

/// `text` split at the commas that are not inside a `( )` set.
fn split_outside_parens(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn split_set<'a>(part: &'a str, operator: &str) -> Option<(&'a str, &'a str)> {
    let (key, values) = part.split_once(operator)?;
    Some((key.trim(), values.trim()))
}

fn value_set(values: &str) -> Result<BTreeSet<String>, String> {
    let inner = values
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| format!("{values:?} is not a (a,b) set"))?;
    inner.split(',').map(|v| label_value(v.trim())).collect()
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of up to 63 characters.
fn label_key(key: &str) -> Result<String, String> {
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let name_ok = !name.is_empty() && name.len() <= 63 && label_chars(name);
    let prefix_ok = prefix.is_empty() || dns::is_dns1123_subdomain(prefix);
    if name_ok && prefix_ok && !key.starts_with('/') {
        Ok(key.to_owned())
    } else {
        Err(format!("{key:?} is not a label key"))
    }
}

/// A label value: empty, or up to 63 characters.
fn label_value(value: &str) -> Result<String, String> {
    if value.is_empty() || (value.len() <= 63 && label_chars(value)) {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a label value"))
    }
}

/// Alphanumerics at both ends, `-`, `_` and `.` between.
fn label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::core::SelectorExt;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_parse_as_kubectl_takes_them() {
        let edge = parse_selector("alibabacloud.com/is-edge-worker=true").unwrap();
        assert!(edge.matches(&labels(&[("alibabacloud.com/is-edge-worker", "true")])));
        assert!(!edge.matches(&labels(&[("alibabacloud.com/is-edge-worker", "false")])));
        assert!(!edge.matches(&labels(&[])));

        let mixed = parse_selector("role in (edge, gateway), !cloud ,zone!=cn-1,tier").unwrap();
        assert!(mixed.matches(&labels(&[("role", "edge"), ("tier", "x")])));
        assert!(!mixed.matches(&labels(&[("role", "edge"), ("tier", "x"), ("cloud", "")])));
        assert!(!mixed.matches(&labels(&[("role", "db"), ("tier", "x")])));
        assert!(!mixed.matches(&labels(&[
            ("role", "edge"),
            ("tier", "x"),
            ("zone", "cn-1")
        ])));
        assert!(!mixed.matches(&labels(&[("role", "edge")])));
        let notin = parse_selector("role notin (cloud)").unwrap();
        assert!(notin.matches(&labels(&[("role", "edge")])));

        for bad in [
            "",
            "a=b,",
            "=x",
            "a=b c",
            "/x=y",
            "Not_A/x=1",
            "k in a,b",
            "a==b=c",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }
}
