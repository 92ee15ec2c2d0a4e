//! The desired table, as typed nftables objects, built from [`EgressRules`].
//!
//! Everything is written in the form `nft -j list` prints, so what is read back compares equal.

use std::borrow::Cow;
use std::collections::HashSet;

use ipnet::IpNet;
use nftables::expr::{BinaryOperation, Expression, Map, Meta, MetaKey, NamedExpression, Payload};
use nftables::expr::{PayloadField, RTKey, TcpOption, CT, RT};
use nftables::schema::{Chain, Counter, NfListObject, Rule, Set, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{self, AnonymousCounter, JumpTarget, Mangle, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use super::elements::{self, Span};
use super::{EgressRules, FirewallError, NetworkRules, Policy, Spaces, Verdict, FORWARD_MARK};

/// The base chains: name, type, hook, priority.
const BASE_CHAINS: [(&str, NfChainType, NfHook, i32); 5] = [
    ("prerouting", NfChainType::Filter, NfHook::Prerouting, -150),
    ("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
    ("mangle_forward", NfChainType::Filter, NfHook::Forward, -150),
    ("forward", NfChainType::Filter, NfHook::Forward, 0),
    ("input", NfChainType::Filter, NfHook::Input, 0),
];

/// The name of the per-egress counter of refused packets.
pub fn refused_counter(egress: &str) -> String {
    format!("refused_{egress}")
}

/// The name of the per-network counter of packets dropped or rejected at the network's
/// tunnel (spoofed, leaving or entering the network, to the gateway itself).
pub fn dropped_counter(network: &str) -> String {
    format!("dropped_{network}")
}

/// Builds the objects of one table.
struct Builder {
    table: String,
    objects: Vec<NfListObject<'static>>,
}

/// The table `table` holding the rules of every space (the table object itself first).
pub fn build(table: &str, spaces: Spaces) -> Result<Vec<NfListObject<'static>>, FirewallError> {
    let mut b = Builder {
        table: table.to_owned(),
        objects: vec![NfListObject::Table(nftables::schema::Table {
            family: NfFamily::INet,
            name: table.to_owned().into(),
            ..Default::default()
        })],
    };
    for (name, kind, hook, prio) in BASE_CHAINS {
        b.chain(name, Some((kind, hook, prio)));
    }
    let private = crate::config::policy::private_nets();
    for v6 in [false, true] {
        let nets: Vec<IpNet> = private.iter().copied().filter(|n| is_v6(n) == v6).collect();
        b.set(
            &format!("private{}", fam(v6)),
            addr_type(v6),
            elements::addresses(&nets),
        );
    }
    for e in spaces.egresses {
        super::check(e)?;
        b.egress(e);
    }
    for n in spaces.networks {
        super::check_network(n)?;
    }
    b.networks(spaces.networks);
    Ok(b.objects)
}

fn is_v6(net: &IpNet) -> bool {
    matches!(net, IpNet::V6(_))
}

fn fam(v6: bool) -> &'static str {
    if v6 {
        "6"
    } else {
        "4"
    }
}

fn addr_type(v6: bool) -> SetType {
    if v6 {
        SetType::Ipv6Addr
    } else {
        SetType::Ipv4Addr
    }
}

fn ip_proto(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
    }
}

fn s(text: &str) -> Expression<'static> {
    Expression::String(text.to_owned().into())
}

fn set_ref(name: &str) -> Expression<'static> {
    s(&format!("@{name}"))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.to_owned().into(),
            field: field.to_owned().into(),
        },
    )))
}

fn is(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// `ct state`.
fn ct_state() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "state".into(),
        family: None,
        dir: None,
    }))
}

/// `ct mark`.
fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "mark".into(),
        family: None,
        dir: None,
    }))
}

/// The conntrack mark of flows `e`'s policy let through: a digest of everything that
/// decides what the policy allows (the rules, the exit node's addresses, the pools), never
/// 0 (an unmarked flow). A changed policy has another one, so flows it has not judged yet
/// go through it again on their next packet.
pub fn policy_generation(e: &EgressRules) -> u32 {
    let text = format!(
        "{}|{:?}|{:?}|{:?}",
        e.name, e.policy, e.exit_addresses, e.pools
    );
    // FNV-1a: stable across builds and runs, unlike std's hasher.
    let digest = text.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    digest.max(1)
}

/// What the policy's allowing verdicts do: mark the flow as judged by this policy, accept.
fn pass(generation: u32) -> Vec<Statement<'static>> {
    vec![
        Statement::Mangle(Mangle {
            key: ct_mark(),
            value: Expression::Number(generation),
        }),
        Statement::Accept(None),
    ]
}

fn iif(name: &str) -> Statement<'static> {
    is(meta(MetaKey::Iifname), Operator::EQ, s(name))
}

fn oif(name: &str) -> Statement<'static> {
    is(meta(MetaKey::Oifname), Operator::EQ, s(name))
}

fn counter() -> Statement<'static> {
    Statement::Counter(stmt::Counter::Anonymous(Some(AnonymousCounter {
        packets: Some(0),
        bytes: Some(0),
    })))
}

fn goto(chain: &str) -> Statement<'static> {
    Statement::Goto(JumpTarget {
        target: chain.to_owned().into(),
    })
}

/// What a policy set is keyed on.
#[derive(Debug, Clone, Copy)]
enum Key {
    /// `ip daddr` / `ip6 daddr` (v6).
    Addr(bool),
    /// `ip daddr . meta l4proto . th dport` (or ip6).
    AddrPorts(bool),
    /// `meta l4proto . th dport`.
    Ports,
}

impl Key {
    fn suffix(self) -> String {
        match self {
            Key::Addr(v6) => fam(v6).to_owned(),
            Key::AddrPorts(v6) => format!("p{}", fam(v6)),
            Key::Ports => "p".to_owned(),
        }
    }

    fn expr(self) -> Expression<'static> {
        let ports = [meta(MetaKey::L4proto), payload("th", "dport")];
        match self {
            Key::Addr(v6) => payload(ip_proto(v6), "daddr"),
            Key::AddrPorts(v6) => {
                let mut parts = vec![payload(ip_proto(v6), "daddr")];
                parts.extend(ports);
                Expression::Named(NamedExpression::Concat(parts))
            }
            Key::Ports => Expression::Named(NamedExpression::Concat(ports.into())),
        }
    }

    fn set_type(self) -> SetTypeValue<'static> {
        match self {
            Key::Addr(v6) => SetTypeValue::Single(addr_type(v6)),
            Key::AddrPorts(v6) => SetTypeValue::Concatenated(
                vec![addr_type(v6), SetType::InetProto, SetType::InetService].into(),
            ),
            Key::Ports => {
                SetTypeValue::Concatenated(vec![SetType::InetProto, SetType::InetService].into())
            }
        }
    }
}

impl Builder {
    fn chain(&mut self, name: &str, base: Option<(NfChainType, NfHook, i32)>) {
        self.objects.push(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            name: name.to_owned().into(),
            _type: base.map(|b| b.0),
            hook: base.map(|b| b.1),
            prio: base.map(|b| b.2),
            policy: base.map(|_| NfChainPolicy::Accept),
            ..Chain::default()
        }));
    }

    fn rule(&mut self, chain: &str, comment: Option<String>, expr: Vec<Statement<'static>>) {
        self.objects.push(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            chain: chain.to_owned().into(),
            expr: expr.into(),
            comment: comment.map(Cow::Owned),
            ..Rule::default()
        }));
    }

    /// An interval set, or with `data` an interval map.
    fn set_of(
        &mut self,
        name: &str,
        key: SetTypeValue<'static>,
        data: Option<SetTypeValue<'static>>,
        elem: Vec<Expression<'static>>,
    ) {
        let (table, name) = (self.table.clone().into(), name.to_owned().into());
        let flags = Some(HashSet::from([SetFlag::Interval]));
        let elem = (!elem.is_empty()).then(|| elem.into());
        self.objects.push(match data {
            None => NfListObject::Set(Box::new(Set {
                family: NfFamily::INet,
                table,
                name,
                set_type: key,
                flags,
                elem,
                ..Set::default()
            })),
            Some(map) => NfListObject::Map(Box::new(nftables::schema::Map {
                family: NfFamily::INet,
                table,
                name,
                set_type: key,
                map,
                flags,
                elem,
                ..Default::default()
            })),
        });
    }

    fn set(&mut self, name: &str, key: SetType, elem: Vec<Expression<'static>>) {
        self.set_of(name, SetTypeValue::Single(key), None, elem);
    }

    fn egress(&mut self, e: &EgressRules) {
        let n = &e.name;
        let families: Vec<bool> = [false, true]
            .into_iter()
            .filter(|&v6| e.pools.iter().any(|p| is_v6(p) == v6))
            .collect();
        for &v6 in &families {
            let pools: Vec<IpNet> = e.pools.iter().copied().filter(|p| is_v6(p) == v6).collect();
            self.set(
                &format!("pools{}_{n}", fam(v6)),
                addr_type(v6),
                elements::addresses(&pools),
            );
        }
        self.snat(e, &families);
        self.mark_and_clamp(e);
        self.forward(e, &families);
        self.input(e, &families);
        self.policy(n, &e.policy, &families, policy_generation(e));
        self.refuse(n);
    }

    /// `prerouting`: packets from `interface` get [`FORWARD_MARK`].
    fn mark(&mut self, comment: String, interface: &str) {
        let mark = Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            meta(MetaKey::Mark),
            Expression::Number(FORWARD_MARK),
        ])));
        let set_mark = Statement::Mangle(Mangle {
            key: meta(MetaKey::Mark),
            value: mark,
        });
        self.rule("prerouting", Some(comment), vec![iif(interface), set_mark]);
    }

    fn mark_and_clamp(&mut self, e: &EgressRules) {
        let n = &e.name;
        // From the tunnel: may be routed. From the uplink: the reverse-path check of a reply
        // on its way to the tunnel sees the mark too (with src_valid_mark).
        for (side, what) in [
            (&e.wg_interface, "mark from the tunnel"),
            (&e.uplink, "mark from the uplink"),
        ] {
            self.mark(format!("{n}: {what}"), side);
        }
        for (dir, side) in [("in", iif(&e.wg_interface)), ("out", oif(&e.wg_interface))] {
            let flags = Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                payload("tcp", "flags"),
                Expression::List(vec![s("syn"), s("rst")]),
            )));
            let mss = Expression::Named(NamedExpression::TcpOption(TcpOption {
                name: "maxseg".into(),
                field: Some("size".into()),
            }));
            let mtu = Expression::Named(NamedExpression::RT(RT {
                key: RTKey::MTU,
                family: None,
            }));
            self.rule(
                "mangle_forward",
                Some(format!("{n}: mss clamp {dir}")),
                vec![
                    side,
                    is(flags, Operator::EQ, s("syn")),
                    Statement::Mangle(Mangle {
                        key: mss,
                        value: mtu,
                    }),
                ],
            );
        }
    }

    /// Per family: SNAT through the map from source block to egress IP, then drop what no
    /// block covers, so nothing from the pools leaves with its overlay address.
    fn snat(&mut self, e: &EgressRules, families: &[bool]) {
        let n = &e.name;
        for &v6 in families {
            let map = format!("snat{}_{n}", fam(v6));
            let mut elem = Vec::new();
            for (block, ip) in e.snat.iter().filter(|(b, _)| is_v6(b) == v6) {
                elem.push(Expression::List(vec![
                    Span::of(*block).expr(),
                    s(&ip.to_string()),
                ]));
            }
            let addr = SetTypeValue::Single(addr_type(v6));
            self.set_of(&map, addr.clone(), Some(addr), elem);
            let saddr = payload(ip_proto(v6), "saddr");
            let from_pool = is(
                saddr.clone(),
                Operator::EQ,
                set_ref(&format!("pools{}_{n}", fam(v6))),
            );
            let nat = stmt::NAT {
                addr: Some(Expression::Named(NamedExpression::Map(Box::new(Map {
                    key: saddr,
                    data: set_ref(&map),
                })))),
                family: Some(if v6 {
                    stmt::NATFamily::IP6
                } else {
                    stmt::NATFamily::IP
                }),
                port: None,
                flags: None,
            };
            let snat = vec![
                oif(&e.uplink),
                from_pool.clone(),
                counter(),
                Statement::SNAT(Some(nat)),
            ];
            self.rule("postrouting", Some(format!("{n}: snat")), snat);
            let unmapped = vec![oif(&e.uplink), from_pool, counter(), Statement::Drop(None)];
            self.rule("postrouting", Some(format!("{n}: no egress IP")), unmapped);
        }
    }

    fn forward(&mut self, e: &EgressRules, families: &[bool]) {
        self.forward_from_tunnel(e, families);
        self.forward_back(e);
    }

    /// `exit4_E`/`exit6_E`: the exit nodes' own addresses the config names (every egress's
    /// endpoint and egress IPs), refused from the tunnel whatever the policy, also when
    /// another member of a pool holds them and the packet would leave by the uplink: no
    /// tenant reaches another's WireGuard endpoint or egress IPs through its tunnel.
    fn exit_addresses(&mut self, e: &EgressRules, families: &[bool]) {
        let n = &e.name;
        for &v6 in families {
            let nets: Vec<IpNet> = e
                .exit_addresses
                .iter()
                .filter(|a| a.is_ipv6() == v6)
                .map(|a| IpNet::from(*a))
                .collect();
            if nets.is_empty() {
                continue;
            }
            let set = format!("exit{}_{n}", fam(v6));
            self.set(&set, addr_type(v6), elements::addresses(&nets));
            let to_exit = is(payload(ip_proto(v6), "daddr"), Operator::EQ, set_ref(&set));
            let refuse = vec![iif(&e.wg_interface), to_exit, goto(&format!("refuse_{n}"))];
            self.rule("forward", Some(format!("{n}: exit node addresses")), refuse);
        }
    }

    fn forward_from_tunnel(&mut self, e: &EgressRules, families: &[bool]) {
        let (n, wg, up) = (&e.name, &e.wg_interface, &e.uplink);
        for &v6 in families {
            let spoofed = is(
                payload(ip_proto(v6), "saddr"),
                Operator::NEQ,
                set_ref(&format!("pools{}_{n}", fam(v6))),
            );
            let what = format!("{n}: anti-spoof{}", if v6 { " ipv6" } else { "" });
            self.rule(
                "forward",
                Some(what),
                vec![iif(wg), spoofed, counter(), Statement::Drop(None)],
            );
        }
        // A packet conntrack calls invalid (e.g. a TCP segment with a bad checksum) gets no
        // NAT: forwarded, it would leave with its overlay source. Counted and dropped.
        let invalid = vec![
            iif(wg),
            is(ct_state(), Operator::IN, s("invalid")),
            counter(),
            Statement::Drop(None),
        ];
        self.rule("forward", Some(format!("{n}: invalid")), invalid);
        // A flow this policy already let through goes on without the policy's lookups:
        // they run once per flow, not per packet. A changed policy has another mark.
        let judged = vec![
            iif(wg),
            oif(up),
            is(ct_state(), Operator::IN, s("established")),
            is(
                ct_mark(),
                Operator::EQ,
                Expression::Number(policy_generation(e)),
            ),
            Statement::Accept(None),
        ];
        self.rule("forward", Some(format!("{n}: allowed before")), judged);
        self.exit_addresses(e, families);
        let protos: Vec<Expression<'static>> = families
            .iter()
            .map(|&v6| s(if v6 { "ipv6" } else { "ipv4" }))
            .collect();
        let nfproto = match <[_; 1]>::try_from(protos) {
            Ok([one]) => one,
            Err(many) => Expression::Named(NamedExpression::Set(
                many.into_iter()
                    .map(nftables::expr::SetItem::Element)
                    .collect(),
            )),
        };
        let out = vec![
            iif(wg),
            oif(up),
            is(meta(MetaKey::Nfproto), Operator::EQ, nfproto),
            goto(&format!("policy_{n}")),
        ];
        self.rule("forward", Some(format!("{n}: to uplink")), out);
    }

    fn forward_back(&mut self, e: &EgressRules) {
        let (n, wg, up) = (&e.name, &e.wg_interface, &e.uplink);
        let state = ct_state();
        let established = Expression::List(vec![s("established"), s("related")]);
        let back = vec![
            iif(up),
            oif(wg),
            is(state, Operator::IN, established),
            Statement::Accept(None),
        ];
        self.rule("forward", Some(format!("{n}: replies")), back);
        let drop = |side| vec![side, counter(), Statement::Drop(None)];
        self.rule(
            "forward",
            Some(format!("{n}: no other forwarding in")),
            drop(iif(wg)),
        );
        self.rule(
            "forward",
            Some(format!("{n}: no other forwarding out")),
            drop(oif(wg)),
        );
    }

    fn input(&mut self, e: &EgressRules, families: &[bool]) {
        let (n, wg) = (&e.name, &e.wg_interface);
        for ip in &e.overlay_ips {
            let (proto, icmp) = if ip.is_ipv6() {
                ("ip6", "icmpv6")
            } else {
                ("ip", "icmp")
            };
            let ping = vec![
                iif(wg),
                is(payload(proto, "daddr"), Operator::EQ, s(&ip.to_string())),
                is(payload(icmp, "type"), Operator::EQ, s("echo-request")),
                Statement::Accept(None),
            ];
            self.rule("input", Some(format!("{n}: ping")), ping);
        }
        if families.contains(&true) {
            let nd = Expression::Named(NamedExpression::Set(vec![
                nftables::expr::SetItem::Element(s("nd-neighbor-solicit")),
                nftables::expr::SetItem::Element(s("nd-neighbor-advert")),
            ]));
            let rule = vec![
                iif(wg),
                is(payload("icmpv6", "type"), Operator::EQ, nd),
                Statement::Accept(None),
            ];
            self.rule("input", Some(format!("{n}: neighbour discovery")), rule);
        }
        let refuse = vec![iif(wg), counter(), goto(&format!("refuse_{n}"))];
        self.rule(
            "input",
            Some(format!("{n}: no access to the exit node")),
            refuse,
        );
    }

    /// `policy_<egress>`: allow sets, deny sets, private ranges, default; one lookup per
    /// kind of rule, whatever the number of rules.
    fn policy(&mut self, n: &str, policy: &Policy, families: &[bool], generation: u32) {
        let chain = format!("policy_{n}");
        let refuse = format!("refuse_{n}");
        self.chain(&chain, None);
        for (kind, rules, verdict) in [
            ("allow", &policy.allow, pass(generation)),
            ("deny", &policy.deny, vec![goto(&refuse)]),
        ] {
            for (key, elem) in rule_sets(rules, families) {
                let name = format!("{kind}{}_{n}", key.suffix());
                self.set_of(&name, key.set_type(), None, elem);
                let mut rule = vec![is(key.expr(), Operator::EQ, set_ref(&name))];
                rule.extend(verdict.iter().cloned());
                self.rule(&chain, None, rule);
            }
        }
        if policy.private == Verdict::Deny {
            for &v6 in families {
                let lookup = is(
                    payload(ip_proto(v6), "daddr"),
                    Operator::EQ,
                    set_ref(&format!("private{}", fam(v6))),
                );
                self.rule(
                    &chain,
                    Some(format!("{n}: private")),
                    vec![lookup, goto(&refuse)],
                );
            }
        }
        let last = match policy.default {
            Verdict::Allow => pass(generation),
            Verdict::Deny => vec![goto(&refuse)],
        };
        self.rule(&chain, Some(format!("{n}: default")), last);
    }

    /// A named counter object in the table.
    fn named_counter(&mut self, name: &str) {
        self.objects.push(NfListObject::Counter(Counter {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            name: name.to_string().into(),
            ..Counter::default()
        }));
    }

    /// `refuse_<egress>`: count, then a TCP reset or ICMP administratively prohibited.
    fn refuse(&mut self, n: &str) {
        let chain = format!("refuse_{n}");
        let name = refused_counter(n);
        self.named_counter(&name);
        self.chain(&chain, None);
        self.rule(
            &chain,
            None,
            vec![Statement::Counter(stmt::Counter::Named(name.into()))],
        );
        let tcp = is(meta(MetaKey::L4proto), Operator::EQ, s("tcp"));
        let reset = stmt::Reject::new(Some(stmt::RejectType::TCPReset), None);
        self.rule(&chain, None, vec![tcp, Statement::Reject(Some(reset))]);
        self.rule(&chain, None, vec![reject_prohibited()]);
    }
}

/// `reject with icmpx admin-prohibited`.
fn reject_prohibited() -> Statement<'static> {
    let icmpx = stmt::Reject::new(
        Some(stmt::RejectType::ICMPX),
        Some(RejectCode::AdminProhibited),
    );
    Statement::Reject(Some(icmpx))
}

/// Counts in network `n`'s [`dropped_counter`].
fn dropped(n: &str) -> Statement<'static> {
    Statement::Counter(stmt::Counter::Named(dropped_counter(n).into()))
}

/// `ip6 daddr ADDR`.
fn to6(addr: std::net::Ipv6Addr) -> Statement<'static> {
    is(payload("ip6", "daddr"), Operator::EQ, s(&addr.to_string()))
}

impl Builder {
    /// The private networks' rules (see the module of [`super::Firewall`]).
    fn networks(&mut self, networks: &[NetworkRules]) {
        for n in networks {
            let set = format!("net6_{}", n.name);
            let prefix = [IpNet::V6(n.prefix)];
            self.set(&set, SetType::Ipv6Addr, elements::addresses(&prefix));
            self.mark(format!("{}: mark from the tunnel", n.name), &n.wg_interface);
            self.named_counter(&dropped_counter(&n.name));
        }
        // In stages across all networks: spoofed sources, within a network, leaving one,
        // entering one.
        for n in networks {
            let spoofed = is(
                payload("ip6", "saddr"),
                Operator::NEQ,
                set_ref(&format!("net6_{}", n.name)),
            );
            let rule = vec![
                iif(&n.wg_interface),
                spoofed,
                counter(),
                dropped(&n.name),
                Statement::Drop(None),
            ];
            self.rule("forward", Some(format!("{}: spoofed source", n.name)), rule);
        }
        for n in networks {
            let within = is(
                payload("ip6", "daddr"),
                Operator::EQ,
                set_ref(&format!("net6_{}", n.name)),
            );
            let rule = vec![
                iif(&n.wg_interface),
                oif(&n.wg_interface),
                within,
                Statement::Accept(None),
            ];
            self.rule(
                "forward",
                Some(format!("{}: member to member", n.name)),
                rule,
            );
        }
        for (side, what) in [(true, "leaves the network"), (false, "enters the network")] {
            for n in networks {
                let at = if side {
                    iif(&n.wg_interface)
                } else {
                    oif(&n.wg_interface)
                };
                let rule = vec![at, counter(), dropped(&n.name), reject_prohibited()];
                self.rule("forward", Some(format!("{}: {what}", n.name)), rule);
            }
        }
        for n in networks {
            self.network_input(n);
        }
    }

    /// `input`: DNS to the resolver and ping of the gateway and resolver; nothing else.
    fn network_input(&mut self, n: &NetworkRules) {
        let (name, w) = (&n.name, &n.wg_interface);
        for (proto, what) in [("udp", "dns"), ("tcp", "dns over tcp")] {
            let port = is(
                payload(proto, "dport"),
                Operator::EQ,
                Expression::Number(53),
            );
            let rule = vec![iif(w), to6(n.resolver), port, Statement::Accept(None)];
            self.rule("input", Some(format!("{name}: {what}")), rule);
        }
        for addr in [n.gateway, n.resolver] {
            let ping = is(payload("icmpv6", "type"), Operator::EQ, s("echo-request"));
            let rule = vec![iif(w), to6(addr), ping, Statement::Accept(None)];
            self.rule("input", Some(format!("{name}: ping")), rule);
        }
        let rule = vec![iif(w), counter(), dropped(name), Statement::Drop(None)];
        self.rule("input", Some(format!("{name}: to the gateway")), rule);
    }
}

/// The non-empty sets a list of rules compiles to, with their elements.
fn rule_sets(
    rules: &[crate::config::policy::Rule],
    families: &[bool],
) -> Vec<(Key, Vec<Expression<'static>>)> {
    let mut out = Vec::new();
    for &v6 in families {
        let nets: Vec<IpNet> = rules
            .iter()
            .filter(|r| r.ports.is_none())
            .filter_map(|r| r.net)
            .filter(|n| is_v6(n) == v6)
            .collect();
        if !nets.is_empty() {
            out.push((Key::Addr(v6), elements::addresses(&nets)));
        }
        let boxes: Vec<_> = rules
            .iter()
            .filter_map(|r| Some((r.net.filter(|n| is_v6(n) == v6)?, r.ports?)))
            .map(|(net, (p, lo, hi))| (Span::of(net), p, lo, hi))
            .collect();
        if !boxes.is_empty() {
            out.push((Key::AddrPorts(v6), elements::addresses_and_ports(&boxes)));
        }
    }
    let ports: Vec<_> = rules
        .iter()
        .filter(|r| r.net.is_none())
        .filter_map(|r| r.ports)
        .collect();
    if !ports.is_empty() {
        out.push((Key::Ports, elements::ports(&ports)));
    }
    out
}
