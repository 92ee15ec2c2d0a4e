//! The `.internal` names, answered from a [`Directory`] for one asking member;
//! the table of names, types and answers is in `docs/networks.md` (".internal names").
//!
//! A name that exists asked for another type answers no data; other `.internal` names do not
//! exist; names outside `.internal` are forwarded.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;

use super::directory::{Directory, Entry};

/// The types of question the resolver tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    Aaaa,
    Txt,
    /// Any other type: a name that exists answers with no data.
    Other,
}

/// One answer's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Aaaa(Ipv6Addr),
    /// One TXT record's value (split into 255-byte strings on the wire).
    Txt(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Records(Vec<Record>),
    /// The name exists, but has nothing of the type asked.
    NoData,
    NxDomain,
    /// Not an `.internal` name: for the upstreams.
    Forward,
}

/// What a name under `.internal` asks for, before looking anything up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name<'a> {
    Apps,
    Instances,
    Peers,
    Peer(&'a str),
    Regions(&'a str),
    Vms(&'a str),
    App(&'a str),
    Region(&'a str, &'a str),
    Nearest(usize, &'a str),
    Vm(&'a str, &'a str),
}

/// `name` (lowercase, with or without the final dot) as an `.internal` name; `Err(true)` for
/// another `.internal` name, `Err(false)` for a name outside `.internal`.
fn parse(name: &str) -> Result<Name<'_>, bool> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let Some(rest) = name.strip_suffix("internal") else {
        return Err(false);
    };
    let rest = match rest.strip_suffix('.') {
        Some(r) => r,
        None if rest.is_empty() => return Err(true),
        None => return Err(false),
    };
    let labels: Vec<&str> = rest.split('.').collect();
    Ok(match labels.as_slice() {
        ["_apps"] => Name::Apps,
        ["_instances"] => Name::Instances,
        ["_peer"] => Name::Peers,
        [peer, "_peer"] => Name::Peer(peer),
        ["regions", app] => Name::Regions(app),
        ["vms", app] => Name::Vms(app),
        ["global", app] => Name::App(app),
        [app] => Name::App(app),
        [region, app] => Name::Region(region, app),
        [id, "vm", app] => Name::Vm(id, app),
        [top, "nearest", "of", app] => match top.strip_prefix("top").map(str::parse::<usize>) {
            Some(Ok(n)) if n > 0 => Name::Nearest(n, app),
            _ => return Err(true),
        },
        _ => return Err(true),
    })
}

fn aaaa<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<Record> {
    entries.map(|e| Record::Aaaa(e.address)).collect()
}

fn txt(value: String) -> Vec<Record> {
    vec![Record::Txt(value)]
}

/// Records of the type asked, or no data; nothing at all: the name does not exist.
fn typed(question: Question, is_txt: bool, records: Vec<Record>) -> Answer {
    match (records.is_empty(), question) {
        (true, _) => Answer::NxDomain,
        (false, Question::Txt) if is_txt => Answer::Records(records),
        (false, Question::Aaaa) if !is_txt => Answer::Records(records),
        (false, _) => Answer::NoData,
    }
}

/// The answer to `question` about `name`, asked by `asker` (whose region orders `nearest`).
pub fn answer(dir: &Directory, asker: &Entry, name: &str, question: Question) -> Answer {
    let name = match parse(name) {
        Ok(n) => n,
        Err(true) => return Answer::NxDomain,
        Err(false) => return Answer::Forward,
    };
    let joined = |set: BTreeSet<String>| set.into_iter().collect::<Vec<_>>().join(",");
    match name {
        Name::Apps => {
            let apps = joined(dir.containers().map(|e| e.app.clone()).collect());
            nonempty_txt(question, apps)
        }
        Name::Instances => {
            let list: Vec<String> = dir
                .containers()
                .map(|e| {
                    format!(
                        "instance={},app={},ip={},region={}",
                        e.id, e.app, e.address, e.region
                    )
                })
                .collect();
            nonempty_txt(question, list.join(";"))
        }
        Name::Peers => nonempty_txt(
            question,
            joined(dir.peers().map(|e| e.name.clone()).collect()),
        ),
        Name::Peer(peer) => typed(
            question,
            false,
            aaaa(dir.peers().filter(|e| e.name == peer)),
        ),
        Name::Regions(app) => {
            let regions = joined(dir.app(app).map(|e| e.region.clone()).collect());
            typed(
                question,
                true,
                if dir.app(app).next().is_some() {
                    txt(regions)
                } else {
                    Vec::new()
                },
            )
        }
        Name::Vms(app) => {
            let vms: Vec<String> = dir
                .app(app)
                .map(|e| format!("{} {}", e.id, e.region))
                .collect();
            typed(
                question,
                true,
                if vms.is_empty() {
                    Vec::new()
                } else {
                    txt(vms.join(","))
                },
            )
        }
        Name::App(app) => typed(question, false, aaaa(dir.app(app))),
        Name::Region(region, app) => typed(
            question,
            false,
            aaaa(dir.app(app).filter(|e| e.region == region)),
        ),
        Name::Vm(id, app) => typed(
            question,
            false,
            aaaa(
                dir.app(app)
                    .filter(|e| !id.is_empty() && e.id.starts_with(id)),
            ),
        ),
        Name::Nearest(n, app) => {
            let (mut near, far): (Vec<&Entry>, Vec<&Entry>) =
                dir.app(app).partition(|e| e.region == asker.region);
            near.extend(far);
            typed(question, false, aaaa(near.into_iter().take(n)))
        }
    }
}

/// A list name (`_apps`, `_instances`, `_peer`): always there, no data when empty.
fn nonempty_txt(question: Question, value: String) -> Answer {
    match question {
        Question::Txt if !value.is_empty() => Answer::Records(txt(value)),
        _ => Answer::NoData,
    }
}

/// A TXT value as DNS character strings of at most 255 bytes (clients join them).
pub fn txt_strings(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in value.chars() {
        if current.len() + c.len_utf8() > 255 {
            out.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    out.push(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgexit::api::MemberKind;

    fn entry(n: u16, app: &str, region: &str, id: &str) -> Entry {
        Entry {
            address: Ipv6Addr::new(0xfdaa, 0, 1, 0, 0, 0, 0, 0x100 + n),
            kind: MemberKind::Container,
            app: app.into(),
            region: region.into(),
            id: id.into(),
            name: String::new(),
        }
    }

    fn world() -> (Directory, Entry) {
        let mut peer = entry(9, "", "", "");
        peer.kind = MemberKind::Peer;
        peer.name = "alice".into();
        let api = entry(4, "api", "ord", "aaaaaaaaaaaa");
        let dir = Directory {
            entries: vec![
                entry(1, "web", "ams", "111111111111"),
                entry(2, "web", "ord", "222222222222"),
                entry(3, "web", "ams", "333333333333"),
                api.clone(),
                peer,
            ],
        };
        (dir, api)
    }

    fn ask(name: &str, q: Question) -> Answer {
        let (dir, asker) = world();
        answer(&dir, &asker, name, q)
    }

    fn addrs(a: Answer) -> Vec<u16> {
        match a {
            Answer::Records(r) => r
                .into_iter()
                .map(|r| match r {
                    Record::Aaaa(a) => a.segments()[7] - 0x100,
                    Record::Txt(t) => panic!("TXT {t}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    fn text(a: Answer) -> String {
        match a {
            Answer::Records(r) => match &r[..] {
                [Record::Txt(t)] => t.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn app_region_global_vm_and_nearest() {
        assert_eq!(addrs(ask("web.internal", Question::Aaaa)), vec![1, 2, 3]);
        assert_eq!(addrs(ask("web.internal.", Question::Aaaa)), vec![1, 2, 3]);
        assert_eq!(
            addrs(ask("global.web.internal", Question::Aaaa)),
            vec![1, 2, 3]
        );
        assert_eq!(addrs(ask("ams.web.internal", Question::Aaaa)), vec![1, 3]);
        assert_eq!(
            addrs(ask("222222222222.vm.web.internal", Question::Aaaa)),
            vec![2]
        );
        // The asker (api) is in ord: ord's web first.
        assert_eq!(
            addrs(ask("top1.nearest.of.web.internal", Question::Aaaa)),
            vec![2]
        );
        assert_eq!(
            addrs(ask("top2.nearest.of.web.internal", Question::Aaaa)),
            vec![2, 1]
        );
        assert_eq!(
            ask("top0.nearest.of.web.internal", Question::Aaaa),
            Answer::NxDomain
        );
    }

    #[test]
    fn txt_lists() {
        assert_eq!(text(ask("regions.web.internal", Question::Txt)), "ams,ord");
        assert_eq!(
            text(ask("vms.web.internal", Question::Txt)),
            "111111111111 ams,222222222222 ord,333333333333 ams"
        );
        assert_eq!(text(ask("_apps.internal", Question::Txt)), "api,web");
        assert_eq!(text(ask("_peer.internal", Question::Txt)), "alice");
        assert_eq!(addrs(ask("alice._peer.internal", Question::Aaaa)), vec![9]);
        assert_eq!(
            text(ask("_instances.internal", Question::Txt)),
            "instance=111111111111,app=web,ip=fdaa:0:1::101,region=ams;\
             instance=222222222222,app=web,ip=fdaa:0:1::102,region=ord;\
             instance=333333333333,app=web,ip=fdaa:0:1::103,region=ams;\
             instance=aaaaaaaaaaaa,app=api,ip=fdaa:0:1::104,region=ord"
        );
    }

    #[test]
    fn missing_names_types_and_other_zones() {
        assert_eq!(ask("nope.internal", Question::Aaaa), Answer::NxDomain);
        assert_eq!(ask("fra.web.internal", Question::Aaaa), Answer::NxDomain);
        assert_eq!(ask("bob._peer.internal", Question::Aaaa), Answer::NxDomain);
        assert_eq!(ask("a.b.c.d.e.internal", Question::Aaaa), Answer::NxDomain);
        assert_eq!(ask("internal", Question::Aaaa), Answer::NxDomain);
        assert_eq!(ask("web.internal", Question::Other), Answer::NoData);
        assert_eq!(ask("web.internal", Question::Txt), Answer::NoData);
        assert_eq!(ask("regions.web.internal", Question::Aaaa), Answer::NoData);
        assert_eq!(ask("example.com.", Question::Aaaa), Answer::Forward);
        assert_eq!(ask("notinternal.", Question::Aaaa), Answer::Forward);
    }

    #[test]
    fn long_txt_values_are_split_into_character_strings() {
        let long = "x".repeat(600);
        let parts = txt_strings(&long);
        assert_eq!(
            parts.iter().map(String::len).collect::<Vec<_>>(),
            vec![255, 255, 90]
        );
        assert_eq!(parts.concat(), long);
        assert_eq!(txt_strings(""), vec![String::new()]);
    }
}
