//! Verification by content: the table read back with `nft -j list table`, normalised (handles,
//! counter values and element order dropped), against the desired objects.

use std::collections::BTreeMap;

use nftables::schema::NfListObject;
use serde_json::Value;

use super::FirewallError;

/// Objects keyed by kind and name (rules: by chain, in order).
#[derive(Default, PartialEq)]
struct Canonical {
    objects: BTreeMap<(String, String), Value>,
    rules: BTreeMap<String, Vec<Value>>,
}

/// Drops what nft adds or changes by itself, in one `{"kind": {...}}` object.
fn normalise(kind: &str, body: &mut Value) {
    let Some(fields) = body.as_object_mut() else {
        return;
    };
    fields.remove("handle");
    if kind == "counter" {
        fields.remove("packets");
        fields.remove("bytes");
    }
    for key in ["elem", "flags"] {
        if let Some(Value::Array(items)) = fields.get_mut(key) {
            items.sort_by_cached_key(|v| v.to_string());
        }
    }
    if let Some(Value::Array(exprs)) = fields.get_mut("expr") {
        for stmt in exprs {
            if let Some(Value::Object(counter)) = stmt.get_mut("counter") {
                counter.insert("packets".into(), 0.into());
                counter.insert("bytes".into(), 0.into());
            }
        }
    }
}

fn canonical(objects: Vec<Value>) -> Result<Canonical, FirewallError> {
    let mut out = Canonical::default();
    for object in objects {
        let Value::Object(map) = object else {
            return Err(FirewallError::Unexpected(format!(
                "not an object: {object}"
            )));
        };
        for (kind, mut body) in map {
            if kind == "metainfo" {
                continue;
            }
            normalise(&kind, &mut body);
            let field = |name: &str| {
                body.get(name)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            if kind == "rule" {
                out.rules.entry(field("chain")).or_default().push(body);
            } else {
                out.objects.insert((kind, field("name")), body);
            }
        }
    }
    Ok(out)
}

/// An object for a log line, cut at about 300 characters.
fn show(kind: &str, body: Option<&Value>) -> String {
    let Some(body) = body else {
        return "nothing".to_owned();
    };
    let mut text = format!("{kind} {body}");
    if text.len() > 300 {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// `None` when `listed` (the output of `nft -j list table`) holds exactly `desired`; else what
/// differs first, for the log.
pub fn difference(desired: &[NfListObject], listed: &str) -> Result<Option<String>, FirewallError> {
    let want: Vec<Value> = desired
        .iter()
        .map(|o| serde_json::to_value(o).map_err(|e| FirewallError::Unexpected(e.to_string())))
        .collect::<Result<_, _>>()?;
    let have: Value = serde_json::from_str(listed)
        .map_err(|e| FirewallError::Unexpected(format!("nft printed invalid JSON: {e}")))?;
    let have = match have.get("nftables") {
        Some(Value::Array(objects)) => objects.clone(),
        _ => {
            return Err(FirewallError::Unexpected(
                "nft printed no \"nftables\" array".into(),
            ))
        }
    };
    let (want, have) = (canonical(want)?, canonical(have)?);
    if want == have {
        return Ok(None);
    }
    for key in want.objects.keys().chain(have.objects.keys()) {
        let (w, h) = (want.objects.get(key), have.objects.get(key));
        if w != h {
            let (kind, name) = key;
            return Ok(Some(format!(
                "{kind} {name}: expected {}, found {}",
                show(kind, w),
                show(kind, h)
            )));
        }
    }
    for chain in want.rules.keys().chain(have.rules.keys()) {
        let empty = Vec::new();
        let w = want.rules.get(chain).unwrap_or(&empty);
        let h = have.rules.get(chain).unwrap_or(&empty);
        for i in 0..w.len().max(h.len()) {
            if w.get(i) != h.get(i) {
                return Ok(Some(format!(
                    "chain {chain}, rule {i}: expected {}, found {}",
                    show("rule", w.get(i)),
                    show("rule", h.get(i))
                )));
            }
        }
    }
    Ok(Some("the table differs".into()))
}

#[cfg(test)]
mod tests {
    use super::super::tests::acme;
    use super::*;

    /// The desired objects as `nft -j list` would print them: with metainfo, handles, counter
    /// values and elements in another order.
    fn listed(desired: &[NfListObject]) -> Value {
        let mut objects = vec![serde_json::json!({"metainfo": {"json_schema_version": 1}})];
        for (handle, object) in desired.iter().enumerate() {
            let mut value = serde_json::to_value(object).unwrap();
            let (kind, body) = value.as_object_mut().unwrap().iter_mut().next().unwrap();
            body["handle"] = handle.into();
            if kind == "counter" {
                body["packets"] = 7.into();
                body["bytes"] = 5_000_000_000u64.into();
            }
            if let Some(Value::Array(elem)) = body.get_mut("elem") {
                elem.reverse();
            }
            for stmt in body
                .get_mut("expr")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(counter) = stmt.get_mut("counter").filter(|c| c.is_object()) {
                    *counter = serde_json::json!({"packets": 3, "bytes": 99});
                }
            }
            objects.push(value);
        }
        serde_json::json!({ "nftables": objects })
    }

    #[test]
    fn what_nft_adds_is_no_difference_and_a_changed_rule_is_named() {
        let desired = super::super::ruleset::build(
            "wgexitd",
            super::super::Spaces {
                egresses: &[acme()],
                networks: &[],
            },
        )
        .unwrap();
        let same = listed(&desired);
        assert_eq!(difference(&desired, &same.to_string()).unwrap(), None);

        let mut changed = same.clone();
        let rules = changed["nftables"].as_array_mut().unwrap();
        let at = rules
            .iter()
            .position(|o| o["rule"]["chain"] == "forward")
            .unwrap();
        rules[at]["rule"]["expr"][0]["match"]["right"] = "wgx-other".into();
        let what = difference(&desired, &changed.to_string()).unwrap().unwrap();
        assert!(what.starts_with("chain forward, rule 0"), "{what}");
        assert!(what.contains("wgx-other"), "{what}");

        let mut extra = same;
        let objects = extra["nftables"].as_array_mut().unwrap();
        objects
            .push(serde_json::json!({"set": {"family": "inet", "table": "wgexitd", "name": "x"}}));
        let what = difference(&desired, &extra.to_string()).unwrap().unwrap();
        assert!(what.starts_with("set x: expected nothing"), "{what}");
    }
}
