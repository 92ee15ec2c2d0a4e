//! Bad input, generated: the plugin's network config (with `prevResult` and everything a
//! runtime passes through), the exit node's config, and the API's request decoding (lease
//! request bodies, path keys). Every input is either accepted or refused with an error a
//! person can act on; nothing panics, hangs or overflows the stack.
//!
//! Runs on stable through proptest. In CI a bounded number of cases per target (a few
//! seconds); for a long run: `PROPTEST_CASES=1000000 cargo test --release --test fuzz`.
//! Seeds live in `fuzz/corpus/<target>/`; an input that once broke something goes there.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;

use wgexit_plugin::cni::config::{version_of, NetConf};
use wgexit_plugin::cni::error::CniError;
use wgexitd::api::http::{decode_lease_request, decode_path_key};
use wgexitd::api::tokens::{split_line, Tokens};
use wgexitd::config::Config as ExitConfig;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    corpus(target).into_iter().map(|(_, b)| b).collect()
}

fn cases() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A seed with a few random edits: bytes replaced, inserted, removed.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..8),
    )
        .prop_map(move |(i, edits)| {
            let mut b = seeds[i].clone();
            for (at, byte, kind) in edits {
                let pos = if b.is_empty() { 0 } else { at.index(b.len()) };
                match kind {
                    0 if !b.is_empty() => b[pos] = byte,
                    1 => b.insert(pos, byte),
                    _ if !b.is_empty() => {
                        b.remove(pos);
                    }
                    _ => b.push(byte),
                }
            }
            b
        })
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const NETCONF_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "servers",
    "egress",
    "tokenFile",
    "caFile",
    "backend",
    "mtu",
    "routes",
    "dataDir",
    "handshakeTimeout",
    "args",
    "prevResult",
    "runtimeConfig",
];

/// A refusal a person can act on: a spec code, a message, and JSON a runtime can read.
fn assert_clear(e: &CniError, input: &[u8]) {
    assert!(
        !e.msg.trim().is_empty(),
        "empty message for {:?}",
        String::from_utf8_lossy(input)
    );
    let v: Value = serde_json::from_str(&e.to_json(&version_of(input))).expect("error JSON");
    assert!(v["code"].as_u64().is_some_and(|c| c > 0), "{v}");
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

fn netconf(input: &[u8]) {
    match NetConf::parse(input) {
        Ok(c) => {
            assert!(!c.servers.is_empty() && c.servers.iter().all(|s| s.starts_with("https://")));
            assert!(c.egress.is_some() || c.network.is_some());
        }
        Err(e) => assert_clear(&e, input),
    }
}

fn lease_request(input: &[u8]) {
    if let Err(e) = decode_lease_request(input) {
        assert!(e.to_string().len() > 10, "{e}");
    }
}

fn path_key(input: &str) {
    match decode_path_key(input) {
        Ok(k) => assert_eq!(decode_path_key(&k.to_base64_url()).unwrap(), k),
        Err(e) => assert!(e.to_string().contains("not a WireGuard key"), "{e}"),
    }
}

fn exit_config(input: &str) {
    if let Err(e) = ExitConfig::parse(Path::new("fuzz.toml"), input) {
        assert!(e.to_string().starts_with("config fuzz.toml: "), "{e}");
    }
}

#[test]
fn corpus_inputs_are_accepted_or_clearly_refused() {
    for (p, b) in corpus("netconf") {
        eprintln!("{}", p.display());
        netconf(&b);
    }
    for (_, b) in corpus("lease_request") {
        lease_request(&b);
    }
    for (_, b) in corpus("path_key") {
        path_key(&String::from_utf8_lossy(&b));
    }
    for (_, b) in corpus("exit_config") {
        exit_config(&String::from_utf8_lossy(&b));
    }
    // The valid seeds are valid, the others refused.
    let seed = |t: &str, name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(t)
                .join(name),
        )
        .unwrap()
    };
    for name in ["valid.json", "prev_result.json", "old_version.json"] {
        assert!(NetConf::parse(&seed("netconf", name)).is_ok(), "{name}");
    }
    assert!(NetConf::parse(&seed("netconf", "invalid.json")).is_err());
    assert!(decode_lease_request(&seed("lease_request", "valid.json")).is_ok());
    assert!(decode_lease_request(&seed("lease_request", "zero_key.json")).is_err());
    assert!(decode_path_key("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw").is_ok());
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for depth in [200, 100_000] {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let conf =
            format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"wgexit","prevResult":{deep}}}"#);
        let e = NetConf::parse(conf.as_bytes()).unwrap_err();
        assert_clear(&e, conf.as_bytes());
        let body = format!(r#"{{"public_key":{deep}}}"#);
        assert!(decode_lease_request(body.as_bytes()).is_err());
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn netconf_from_any_bytes(input in prop::collection::vec(any::<u8>(), 0..512)) {
        netconf(&input);
    }

    #[test]
    fn netconf_from_mutated_seeds(input in mutated(seeds("netconf"))) {
        netconf(&input);
    }

    #[test]
    fn netconf_with_any_value_under_any_known_key(
        seed in 0..3usize,
        key in prop::sample::select(NETCONF_KEYS),
        value in json_value(),
    ) {
        let mut v: Value = serde_json::from_slice(&seeds("netconf")[seed]).unwrap();
        v[key] = value;
        let input = v.to_string().into_bytes();
        netconf(&input);
    }

    #[test]
    fn lease_requests_from_mutated_seeds(input in mutated(seeds("lease_request"))) {
        lease_request(&input);
    }

    #[test]
    fn lease_requests_with_any_attachment(value in json_value()) {
        let body = serde_json::json!({
            "public_key": "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
            "attachment": value,
        });
        lease_request(body.to_string().as_bytes());
    }

    #[test]
    fn path_keys_from_any_string(input in ".{0,64}") {
        path_key(&input);
    }

    #[test]
    fn path_keys_from_mutated_seeds(input in mutated(seeds("path_key"))) {
        path_key(&String::from_utf8_lossy(&input));
    }

    #[test]
    fn exit_configs_from_mutated_seeds(input in mutated(seeds("exit_config"))) {
        exit_config(&String::from_utf8_lossy(&input));
    }

    #[test]
    fn token_files_from_any_text(input in ".{0,200}") {
        match Tokens::parse(Path::new("t"), &input) {
            Ok(tokens) => {
                for line in input.lines().map(str::trim) {
                    if !line.is_empty() && !line.starts_with('#') {
                        prop_assert!(tokens.accepts(split_line(line).1));
                    }
                }
            }
            Err(e) => prop_assert!(e.to_string().starts_with("token file t")),
        }
    }
}
