//! Set elements in the form `nft -j list` prints them, so a read-back compares equal.
//!
//! nftables refuses overlapping intervals in a set, so overlapping rules are merged first:
//! plain address sets are aggregated, and concatenated `address . protocol . port` sets are cut
//! into disjoint boxes (address segments, each with the merged port ranges of the rules
//! covering it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nftables::expr::{Expression, NamedExpression, Prefix, Range};

use crate::config::policy::Proto;

/// An inclusive address range of one family, as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub v6: bool,
    pub first: u128,
    pub last: u128,
}

impl Span {
    pub fn of(net: IpNet) -> Span {
        match net {
            IpNet::V4(n) => Span {
                v6: false,
                first: u32::from(n.network()).into(),
                last: u32::from(n.broadcast()).into(),
            },
            IpNet::V6(n) => Span {
                v6: true,
                first: u128::from(n.network()),
                last: u128::from(n.broadcast()),
            },
        }
    }

    fn addr(&self, value: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(value))
        } else {
            // Spans of IPv4 networks never exceed u32.
            IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX)))
        }
    }

    fn bits(&self) -> u32 {
        if self.v6 {
            128
        } else {
            32
        }
    }

    /// The address, the prefix or the range, whichever nft prints for it.
    pub fn expr(&self) -> Expression<'static> {
        let size = self.last - self.first;
        if size == 0 {
            return Expression::String(self.addr(self.first).to_string().into());
        }
        let host_bits = 128 - (size.leading_zeros());
        let is_prefix = size.count_ones() == host_bits && self.first.trailing_zeros() >= host_bits;
        if is_prefix {
            return Expression::Named(NamedExpression::Prefix(Prefix {
                addr: Box::new(Expression::String(self.addr(self.first).to_string().into())),
                len: self.bits() - host_bits,
            }));
        }
        range(
            Expression::String(self.addr(self.first).to_string().into()),
            Expression::String(self.addr(self.last).to_string().into()),
        )
    }
}

fn range(a: Expression<'static>, b: Expression<'static>) -> Expression<'static> {
    Expression::Range(Box::new(Range { range: [a, b] }))
}

/// A port or a port range, as nft prints it.
fn ports_expr(lo: u16, hi: u16) -> Expression<'static> {
    if lo == hi {
        Expression::Number(lo.into())
    } else {
        range(Expression::Number(lo.into()), Expression::Number(hi.into()))
    }
}

/// Sorted, disjoint, non-adjacent ranges covering the same values.
pub fn merge<T: Ord + Copy>(mut ranges: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Vec<(T, T)> {
    ranges.sort();
    let mut out: Vec<(T, T)> = Vec::new();
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if next(last.1).is_none_or(|n| lo <= n) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Elements of a plain address set: the networks, aggregated.
pub fn addresses(nets: &[IpNet]) -> Vec<Expression<'static>> {
    IpNet::aggregate(&nets.to_vec())
        .into_iter()
        .map(|n| Span::of(n).expr())
        .collect()
}

/// Elements of an `inet_proto . inet_service` set.
pub fn ports(rules: &[(Proto, u16, u16)]) -> Vec<Expression<'static>> {
    let mut out = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let ranges = rules
            .iter()
            .filter(|r| r.0 == proto)
            .map(|r| (r.1, r.2))
            .collect();
        for (lo, hi) in merge(ranges, |p: u16| p.checked_add(1)) {
            out.push(concat(vec![proto_expr(proto), ports_expr(lo, hi)]));
        }
    }
    out
}

fn proto_expr(proto: Proto) -> Expression<'static> {
    Expression::String(proto.name().into())
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// One disjoint piece of an `address . protocol . port` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub addr: Span,
    pub proto: Proto,
    pub ports: (u16, u16),
}

/// Consecutive addresses with the same merged port ranges.
struct Segment {
    first: u128,
    last: u128,
    ports: Vec<(u16, u16)>,
}

/// The address segments between the boundaries of `rules` (of one protocol), each with the
/// merged port ranges of the rules covering it; neighbours with the same ports joined.
fn segments(rules: &[&(Span, Proto, u16, u16)]) -> Vec<Segment> {
    let mut cuts: Vec<u128> = rules
        .iter()
        .flat_map(|r| [Some(r.0.first), r.0.last.checked_add(1)])
        .flatten()
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<Segment> = Vec::new();
    for (i, &first) in cuts.iter().enumerate() {
        let last = cuts.get(i + 1).map_or(u128::MAX, |next| next - 1);
        let covering: Vec<(u16, u16)> = rules
            .iter()
            .filter(|r| r.0.first <= first && first <= r.0.last)
            .map(|r| (r.2, r.3))
            .collect();
        if covering.is_empty() {
            continue;
        }
        let ports = merge(covering, |p: u16| p.checked_add(1));
        match out.last_mut() {
            Some(prev) if prev.last.checked_add(1) == Some(first) && prev.ports == ports => {
                prev.last = last
            }
            _ => out.push(Segment { first, last, ports }),
        }
    }
    out
}

/// Cuts `(network, protocol, ports)` rules of one family into disjoint pieces covering the
/// same packets.
pub fn disjoint(rules: &[(Span, Proto, u16, u16)]) -> Vec<Piece> {
    let mut out = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let mine: Vec<_> = rules.iter().filter(|r| r.1 == proto).collect();
        let Some(v6) = mine.first().map(|r| r.0.v6) else {
            continue;
        };
        for Segment { first, last, ports } in segments(&mine) {
            for p in ports {
                out.push(Piece {
                    addr: Span { v6, first, last },
                    proto,
                    ports: p,
                });
            }
        }
    }
    out
}

/// Elements of an `address . inet_proto . inet_service` set.
pub fn addresses_and_ports(rules: &[(Span, Proto, u16, u16)]) -> Vec<Expression<'static>> {
    disjoint(rules)
        .into_iter()
        .map(|p| {
            concat(vec![
                p.addr.expr(),
                proto_expr(p.proto),
                ports_expr(p.ports.0, p.ports.1),
            ])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(s: &str) -> Span {
        Span::of(s.parse().unwrap())
    }

    fn json(e: &Expression) -> String {
        serde_json::to_string(e).unwrap()
    }

    #[test]
    fn spans_print_as_nft_does() {
        assert_eq!(
            json(&span("10.0.0.0/8").expr()),
            r#"{"prefix":{"addr":"10.0.0.0","len":8}}"#
        );
        assert_eq!(json(&span("10.0.0.5/32").expr()), r#""10.0.0.5""#);
        assert_eq!(
            json(&span("::/0").expr()),
            r#"{"prefix":{"addr":"::","len":0}}"#
        );
        assert_eq!(
            json(&span("0.0.0.0/0").expr()),
            r#"{"prefix":{"addr":"0.0.0.0","len":0}}"#
        );
        let odd = Span {
            v6: false,
            first: 10,
            last: 20,
        };
        assert_eq!(json(&odd.expr()), r#"{"range":["0.0.0.10","0.0.0.20"]}"#);
        assert_eq!(json(&ports_expr(443, 443)), "443");
        assert_eq!(json(&ports_expr(1, 100)), r#"{"range":[1,100]}"#);
    }

    #[test]
    fn overlapping_networks_and_ports_merge() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(
            json(&Expression::List(addresses(&nets))),
            r#"[{"prefix":{"addr":"10.0.0.0","len":7}}]"#
        );
        let p = ports(&[
            (Proto::Tcp, 25, 25),
            (Proto::Tcp, 20, 30),
            (Proto::Tcp, 31, 31),
            (Proto::Udp, 53, 53),
        ]);
        assert_eq!(
            json(&Expression::List(p)),
            r#"[{"concat":["tcp",{"range":[20,31]}]},{"concat":["udp",53]}]"#
        );
    }

    /// Every (address, port) sample is covered by the pieces exactly when a rule covers it,
    /// and by at most one piece.
    #[test]
    fn disjoint_pieces_cover_the_rules_exactly_once() {
        let rules = vec![
            (span("10.0.0.0/8"), Proto::Tcp, 1, 100),
            (span("10.1.0.0/16"), Proto::Tcp, 50, 60),
            (span("10.1.0.0/16"), Proto::Tcp, 90, 200),
            (span("10.1.2.3/32"), Proto::Tcp, 443, 443),
            (span("10.1.2.3/32"), Proto::Udp, 53, 53),
            (span("0.0.0.0/0"), Proto::Udp, 5000, 5100),
        ];
        let pieces = disjoint(&rules);
        let samples_a = [
            0u128,
            0x0a00_0000,
            0x0a01_0000,
            0x0a01_0203,
            0x0a01_ffff,
            0x0b00_0000,
        ];
        for a in samples_a {
            for proto in [Proto::Tcp, Proto::Udp] {
                for port in [1u16, 50, 99, 100, 101, 150, 200, 201, 443, 53, 5000, 5100] {
                    let want = rules.iter().any(|r| {
                        r.1 == proto
                            && r.0.first <= a
                            && a <= r.0.last
                            && (r.2..=r.3).contains(&port)
                    });
                    let hits = pieces
                        .iter()
                        .filter(|p| {
                            p.proto == proto
                                && p.addr.first <= a
                                && a <= p.addr.last
                                && (p.ports.0..=p.ports.1).contains(&port)
                        })
                        .count();
                    assert_eq!(
                        hits,
                        usize::from(want),
                        "{a:#x} {proto:?} {port}: {pieces:?}"
                    );
                }
            }
        }
        let v6 = disjoint(&[
            (span("::/0"), Proto::Tcp, 1, 2),
            (span("2001:db8::/32"), Proto::Tcp, 2, 3),
        ]);
        assert_eq!(v6.len(), 3, "{v6:?}");
        assert_eq!(v6[2].addr.last, u128::MAX);
    }
}
