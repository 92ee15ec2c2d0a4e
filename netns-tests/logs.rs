//! The plugin's log file: one line per command, from the real plugin run as a runtime runs
//! it; stdout keeps nothing but the CNI answer.

use serde_json::json;

use crate::world::World;

fn log_lines(w: &World) -> Vec<String> {
    std::fs::read_to_string(w.path("log/wgexit.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn each_command_leaves_a_line_and_a_failed_add_names_container_and_code() {
    let mut w = World::new();
    let mut conf = w.net_conf("acme");
    conf["logFile"] = json!(w.path("log/wgexit.log"));
    let mut wrong_token = conf.clone();
    wrong_token["tokenFile"] = json!(w.path("other.token"));

    let refused = w.container("refused");
    let out = w.cni("ADD", &refused, &wrong_token);
    // stdout is the CNI error and nothing else (err() parses all of it as one JSON value).
    assert_eq!(out.err().0, 100, "{out:?}");
    let lines = log_lines(&w);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    println!("{line}");
    for part in [
        " ADD ",
        &format!("container={}", refused.id),
        "ifname=eth0",
        "egress=acme",
        "result=error code=100 msg=",
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }

    let c = w.container("ok");
    let result = w.cni("ADD", &c, &conf).ok();
    let address = result["ips"][0]["address"].as_str().unwrap().to_string();
    w.cni("DEL", &c, &conf).ok_empty();
    let lines = log_lines(&w);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, command) in lines[1..].iter().zip(["ADD", "DEL"]) {
        println!("{line}");
        assert!(
            line.contains(&format!(" {command} container={} ", c.id)),
            "{line}"
        );
        assert!(line.contains(&format!("address={address} ")), "{line}");
        assert!(line.ends_with(" result=ok"), "{line}");
    }

    // With logLevel "error", a success leaves no line.
    conf["logLevel"] = json!("error");
    let quiet = w.container("quiet");
    w.cni("ADD", &quiet, &conf).ok();
    w.cni("DEL", &quiet, &conf).ok_empty();
    assert_eq!(log_lines(&w).len(), 3);
}
