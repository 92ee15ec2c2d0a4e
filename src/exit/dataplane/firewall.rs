//! The exit node's nftables rules, written through netlink (libnftnl via the `nftnl` crate),
//! all inside one `inet` table that wgexitd alone owns (default name [`DEFAULT_TABLE`]).
//!
//! Per egress the table holds:
//!
//! * `postrouting` (nat, srcnat): `meta nfproto ipv4 oifname UP ip saddr POOL counter snat ip to EIP`
//! * `mangle_forward` (filter, forward, mangle): the TCP MSS clamp on SYNs in and out of `WG`
//!   (`tcp flags & (syn|rst) == syn tcp option maxseg size set rt mtu`)
//! * `forward` (filter, forward, 0): drop spoofed sources from `WG`, accept `WG` → `UP` (IPv4),
//!   accept established/related `UP` → `WG`, drop anything else in or out of `WG`
//! * `input` (filter, input, 0): accept ICMP echo requests from `WG` to the overlay address,
//!   drop anything else from `WG`
//!
//! Every rule carries a comment naming its egress and purpose; drop rules and the SNAT rule carry
//! counters. The table's comment holds a digest of the whole desired rule set: [`Firewall::apply`]
//! uses it, with the chain and rule layout read back from the kernel, to leave an up-to-date table
//! untouched, and otherwise replaces the table in one atomic netlink batch.
//!
//! Netlink sockets belong to the network namespace of the thread that opens them; each call of
//! [`Firewall`] opens its own socket, so it acts on the namespace of the calling thread.

use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use ipnet::Ipv4Net;
use nftnl::expr::{
    Bitwise, Cmp, CmpOp, Conntrack, Counter, Expression, Immediate, Ipv4HeaderField, Meta, Nat,
    NatType, NetworkHeaderField, Payload, Register, TransportHeaderField, Verdict,
};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, NlMsg, Policy, ProtoFamily, Rule, Table};
use nftnl_sys::{self as sys, libc};
use sha2::{Digest, Sha256};

/// The table name wgexitd uses unless told otherwise.
pub const DEFAULT_TABLE: &str = "wgexitd";

/// What the rules of one egress are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRules {
    /// The egress name from the config (used in rule comments / for diagnostics).
    pub name: String,
    /// The exit node's WireGuard interface for this egress.
    pub wg_interface: String,
    /// Where egress traffic leaves (the `interface` key).
    pub uplink: String,
    /// The overlay pool leased to containers.
    pub pool: Ipv4Net,
    /// The exit node's own overlay address (first host of the pool).
    pub overlay_ip: Ipv4Addr,
    /// The static egress IP: SNAT source.
    pub egress_ip: Ipv4Addr,
}

/// Why the exit node's rules could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// The rules asked for cannot be expressed (bad interface name, table name, ...).
    #[error("invalid firewall configuration: {0}")]
    Invalid(String),
    /// The kernel refused for lack of privilege.
    #[error(
        "nftables netlink: permission denied while {what}; run wgexitd as root (it needs CAP_NET_ADMIN)"
    )]
    PermissionDenied {
        /// What was being done.
        what: String,
    },
    /// The kernel lacks a needed nf_tables feature (a chain type or an expression).
    #[error(
        "the kernel lacks nf_tables support for {what} ({source}); wgexitd needs nf_tables with \
         nat, conntrack, rt and exthdr support (modules nf_tables, nft_chain_nat, nft_nat, nft_ct, \
         nft_rt, nft_exthdr)"
    )]
    Unsupported {
        /// The object the kernel could not create.
        what: String,
        /// The kernel's error.
        source: io::Error,
    },
    /// The kernel refused an object for another reason.
    #[error("nftables: the kernel rejected {what}: {source}")]
    Rejected {
        /// The object the kernel refused.
        what: String,
        /// The kernel's error.
        source: io::Error,
    },
    /// Talking to netlink failed (socket, send, receive).
    #[error("nftables netlink: {what}: {source}")]
    Netlink {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The kernel's answer made no sense to us.
    #[error("nftables netlink: unexpected reply: {0}")]
    Protocol(String),
}

/// The nftables table that holds the exit node's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    table: String,
}

impl Default for Firewall {
    fn default() -> Self {
        Firewall::new(DEFAULT_TABLE)
    }
}

impl Firewall {
    /// A handle on the `inet` table named `table` (nothing is read or written yet).
    pub fn new(table: &str) -> Firewall {
        Firewall {
            table: table.to_owned(),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Makes the table hold exactly the rules for `egresses`.
    ///
    /// Idempotent: if the table already holds exactly these rules (same digest in the table
    /// comment, same chains, same rules in the same order) it is left untouched, so counters keep
    /// counting. Otherwise the table is replaced atomically in one netlink batch (create if
    /// missing, delete, add table, chains and rules), so there is never a moment without rules.
    pub fn apply(&self, egresses: &[EgressRules]) -> Result<(), NatError> {
        let desired = Desired::build(&self.table, egresses)?;
        let mut conn = Conn::open()?;
        if let Some(observed) = conn.observe(&desired.table_name)? {
            if desired.matches(&observed) {
                return Ok(());
            }
        }
        let mut batch = Batch::new();
        let mut what = Vec::new();
        let table = Table::new(&desired.table_name, ProtoFamily::Inet);
        // Adding an existing table is a no-op, so the delete that follows cannot fail with ENOENT.
        batch.add(&TableMsg::new(&desired.table_name, None), MsgType::Add);
        what.push(format!("table inet {}", self.table));
        batch.add(&TableMsg::new(&desired.table_name, None), MsgType::Del);
        what.push(format!("deletion of table inet {}", self.table));
        batch.add(
            &TableMsg::new(&desired.table_name, Some(&desired.comment)),
            MsgType::Add,
        );
        what.push(format!("table inet {}", self.table));
        let chains: Vec<Chain<'_>> = CHAINS
            .iter()
            .map(|spec| {
                let mut chain = Chain::new(spec.c_name(), &table);
                chain.set_hook(spec.hook, spec.priority);
                chain.set_type(spec.chain_type);
                chain.set_policy(Policy::Accept);
                chain
            })
            .collect();
        for (chain, spec) in chains.iter().zip(CHAINS) {
            batch.add(chain, MsgType::Add);
            what.push(format!("chain {} ({})", spec.name, spec.describe()));
        }
        for rule in &desired.rules {
            let chain = &chains[rule.chain];
            let mut nft_rule = Rule::new(chain);
            for expr in &rule.exprs {
                nft_rule.add_expr(expr);
            }
            nft_rule
                .set_comment(&rule.comment)
                .map_err(|e| NatError::Invalid(format!("rule comment {:?}: {e}", rule.comment)))?;
            batch.add(&nft_rule, MsgType::Add);
            what.push(format!(
                "rule \"{}\" in chain {}",
                rule.comment.to_string_lossy(),
                CHAINS[rule.chain].name
            ));
        }
        conn.send_batch(batch, &what)
    }

    /// Deletes the table if present (no error if absent).
    pub fn teardown(&self) -> Result<(), NatError> {
        let name = table_cname(&self.table)?;
        let mut conn = Conn::open()?;
        let mut batch = Batch::new();
        batch.add(&TableMsg::new(&name, None), MsgType::Add);
        batch.add(&TableMsg::new(&name, None), MsgType::Del);
        let what = [
            format!("table inet {}", self.table),
            format!("deletion of table inet {}", self.table),
        ];
        conn.send_batch(batch, &what)
    }

    /// Whether the table exists.
    pub fn exists(&self) -> Result<bool, NatError> {
        let name = table_cname(&self.table)?;
        Ok(Conn::open()?.get_table(&name)?.is_some())
    }
}

// ---------------------------------------------------------------------------------------------
// The desired rule set.

/// The kernel's `NFT_RT_TCPMSS` (`rt mtu`), missing from the libc crate.
const NFT_RT_TCPMSS: u32 = 3;
/// The kernel's `NFT_EXTHDR_OP_TCPOPT`, missing from the libc crate.
const NFT_EXTHDR_OP_TCPOPT: u32 = 1;
/// TCP option kind of the maximum segment size.
const TCPOPT_MAXSEG: u8 = 2;
const IFNAMSIZ: usize = 16;
/// Bumped whenever the meaning of the rules changes without their encoding changing.
const RULESET_VERSION: &str = "wgexitd-nat-v1";

struct ChainSpec {
    name: &'static str,
    hook: Hook,
    priority: i32,
    chain_type: ChainType,
}

impl ChainSpec {
    fn c_name(&self) -> CString {
        // The names are constants without NUL bytes.
        CString::new(self.name).unwrap_or_default()
    }

    fn describe(&self) -> &'static str {
        match self.chain_type {
            ChainType::Nat => "type nat",
            ChainType::Filter => "type filter",
            ChainType::Route => "type route",
        }
    }

    fn type_name(&self) -> &'static str {
        match self.chain_type {
            ChainType::Nat => "nat",
            ChainType::Filter => "filter",
            ChainType::Route => "route",
        }
    }
}

const POSTROUTING: usize = 0;
const MANGLE_FORWARD: usize = 1;
const FORWARD: usize = 2;
const INPUT: usize = 3;

const CHAINS: &[ChainSpec] = &[
    ChainSpec {
        name: "postrouting",
        hook: Hook::PostRouting,
        priority: 100,
        chain_type: ChainType::Nat,
    },
    ChainSpec {
        name: "mangle_forward",
        hook: Hook::Forward,
        priority: -150,
        chain_type: ChainType::Filter,
    },
    ChainSpec {
        name: "forward",
        hook: Hook::Forward,
        priority: 0,
        chain_type: ChainType::Filter,
    },
    ChainSpec {
        name: "input",
        hook: Hook::In,
        priority: 0,
        chain_type: ChainType::Filter,
    },
];

/// What a register gets loaded from by `meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaKey {
    IifName,
    OifName,
    NfProto,
    L4Proto,
}

/// One nftables expression, as the rules below use them. Registers are always `reg 1`, like nft.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Meta(MetaKey),
    Cmp {
        neq: bool,
        data: Vec<u8>,
    },
    IpSaddr,
    IpDaddr,
    /// A byte of the transport header.
    TransportByte(u32),
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    CtState,
    Counter,
    Accept,
    Drop,
    LoadIpv4(Ipv4Addr),
    SnatIpv4,
    RtTcpMss,
    /// `byteorder reg 1 = hton(reg 1, 2, 2)`
    Hton16,
    /// `exthdr write tcpopt reg 1 => 2b @ KIND + 2`
    WriteTcpOpt16(u8),
}

impl Expression for Expr {
    fn to_expr(&self, rule: &Rule) -> NonNull<sys::nftnl_expr> {
        match self {
            Expr::Meta(key) => match key {
                MetaKey::IifName => Meta::IifName.to_expr(rule),
                MetaKey::OifName => Meta::OifName.to_expr(rule),
                MetaKey::NfProto => Meta::NfProto.to_expr(rule),
                MetaKey::L4Proto => Meta::L4Proto.to_expr(rule),
            },
            Expr::Cmp { neq, data } => {
                let op = if *neq { CmpOp::Neq } else { CmpOp::Eq };
                Cmp::new(op, data.as_slice()).to_expr(rule)
            }
            Expr::IpSaddr => {
                Payload::Network(NetworkHeaderField::Ipv4(Ipv4HeaderField::Saddr)).to_expr(rule)
            }
            Expr::IpDaddr => {
                Payload::Network(NetworkHeaderField::Ipv4(Ipv4HeaderField::Daddr)).to_expr(rule)
            }
            Expr::TransportByte(offset) => Payload::Transport(TransportHeaderField::Raw {
                offset_bits: *offset,
                length_bits: 1,
            })
            .to_expr(rule),
            Expr::Bitwise { mask, xor } => {
                Bitwise::new(mask.as_slice(), xor.as_slice()).to_expr(rule)
            }
            Expr::CtState => Conntrack::State.to_expr(rule),
            Expr::Counter => Counter.to_expr(rule),
            Expr::Accept => Verdict::Accept.to_expr(rule),
            Expr::Drop => Verdict::Drop.to_expr(rule),
            Expr::LoadIpv4(addr) => Immediate::new(addr.octets(), Register::Reg1).to_expr(rule),
            Expr::SnatIpv4 => Nat {
                nat_type: NatType::SNat,
                family: ProtoFamily::Ipv4,
                ip_register: Register::Reg1,
                port_register: None,
            }
            .to_expr(rule),
            Expr::RtTcpMss => raw_expr(
                c"rt",
                &[
                    (sys::NFTNL_EXPR_RT_KEY, NFT_RT_TCPMSS),
                    (sys::NFTNL_EXPR_RT_DREG, libc::NFT_REG_1 as u32),
                ],
            ),
            Expr::Hton16 => raw_expr(
                c"byteorder",
                &[
                    (sys::NFTNL_EXPR_BYTEORDER_SREG, libc::NFT_REG_1 as u32),
                    (sys::NFTNL_EXPR_BYTEORDER_DREG, libc::NFT_REG_1 as u32),
                    (
                        sys::NFTNL_EXPR_BYTEORDER_OP,
                        libc::NFT_BYTEORDER_HTON as u32,
                    ),
                    (sys::NFTNL_EXPR_BYTEORDER_LEN, 2),
                    (sys::NFTNL_EXPR_BYTEORDER_SIZE, 2),
                ],
            ),
            Expr::WriteTcpOpt16(kind) => raw_expr(
                c"exthdr",
                &[
                    (sys::NFTNL_EXPR_EXTHDR_SREG, libc::NFT_REG_1 as u32),
                    (sys::NFTNL_EXPR_EXTHDR_OP, NFT_EXTHDR_OP_TCPOPT),
                    (sys::NFTNL_EXPR_EXTHDR_TYPE, u32::from(*kind)),
                    (sys::NFTNL_EXPR_EXTHDR_OFFSET, 2),
                    (sys::NFTNL_EXPR_EXTHDR_LEN, 2),
                ],
            ),
        }
    }
}

/// An expression nftnl has no wrapper for (`rt`, `byteorder`, `exthdr`), made of integer
/// attributes: all u32 except the `exthdr` type, which libnftnl stores as a u8.
fn raw_expr(name: &std::ffi::CStr, attrs: &[(u32, u32)]) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is NUL-terminated; the attribute ids are libnftnl's for this expression.
    let expr = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    let Some(expr) = NonNull::new(expr) else {
        // Out of memory (or an unknown name, which libnftnl allocates anyway): nothing sane to do.
        std::process::abort();
    };
    for &(attr, value) in attrs {
        if name == c"exthdr" && attr == sys::NFTNL_EXPR_EXTHDR_TYPE {
            // SAFETY: as above; libnftnl stores a u8 for the exthdr type.
            unsafe { sys::nftnl_expr_set_u8(expr.as_ptr(), attr as u16, value as u8) };
        } else {
            // SAFETY: as above.
            unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value) };
        }
    }
    expr
}

struct DesiredRule {
    chain: usize,
    comment: CString,
    exprs: Vec<Expr>,
}

struct Desired {
    table_name: CString,
    /// The table comment: the digest of everything below.
    comment: String,
    rules: Vec<DesiredRule>,
}

fn table_cname(table: &str) -> Result<CString, NatError> {
    if table.is_empty() || table.len() > 255 {
        return Err(NatError::Invalid(format!(
            "table name {table:?} must be 1 to 255 bytes"
        )));
    }
    CString::new(table)
        .map_err(|_| NatError::Invalid(format!("table name {table:?} contains a NUL byte")))
}

/// The name as `meta iifname`/`oifname` compares it: NUL padded to IFNAMSIZ.
fn ifname(name: &str, egress: &str) -> Result<Vec<u8>, NatError> {
    let valid = !name.is_empty()
        && name.len() < IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace());
    if !valid {
        return Err(NatError::Invalid(format!(
            "egress {egress:?}: interface name {name:?} is not a valid Linux interface name \
             (1 to 15 bytes, no '/', whitespace or NUL)"
        )));
    }
    let mut padded = name.as_bytes().to_vec();
    padded.resize(IFNAMSIZ, 0);
    Ok(padded)
}

fn iif(name: &[u8]) -> [Expr; 2] {
    [
        Expr::Meta(MetaKey::IifName),
        Expr::Cmp {
            neq: false,
            data: name.to_vec(),
        },
    ]
}

fn oif(name: &[u8]) -> [Expr; 2] {
    [
        Expr::Meta(MetaKey::OifName),
        Expr::Cmp {
            neq: false,
            data: name.to_vec(),
        },
    ]
}

fn nfproto_ipv4() -> [Expr; 2] {
    [
        Expr::Meta(MetaKey::NfProto),
        Expr::Cmp {
            neq: false,
            data: vec![libc::NFPROTO_IPV4 as u8],
        },
    ]
}

fn l4proto(proto: u8) -> [Expr; 2] {
    [
        Expr::Meta(MetaKey::L4Proto),
        Expr::Cmp {
            neq: false,
            data: vec![proto],
        },
    ]
}

/// `ip saddr [!=] NET` (the caller adds the `meta nfproto ipv4` dependency).
fn saddr_in(net: Ipv4Net, neq: bool) -> Vec<Expr> {
    let mut exprs = vec![Expr::IpSaddr];
    if net.prefix_len() < 32 {
        exprs.push(Expr::Bitwise {
            mask: net.netmask().octets().to_vec(),
            xor: vec![0; 4],
        });
    }
    exprs.push(Expr::Cmp {
        neq,
        data: net.network().octets().to_vec(),
    });
    exprs
}

impl Desired {
    fn build(table: &str, egresses: &[EgressRules]) -> Result<Desired, NatError> {
        let table_name = table_cname(table)?;
        let mut rules = Vec::new();
        for egress in egresses {
            let wg = ifname(&egress.wg_interface, &egress.name)?;
            let up = ifname(&egress.uplink, &egress.name)?;
            let pool = egress.pool.trunc();
            let label = comment_label(&egress.name);
            let mut add = |chain: usize, what: &str, exprs: Vec<Expr>| -> Result<(), NatError> {
                let comment = CString::new(format!("{label}: {what}")).map_err(|_| {
                    NatError::Invalid(format!("egress name {:?} contains a NUL byte", egress.name))
                })?;
                rules.push(DesiredRule {
                    chain,
                    comment,
                    exprs,
                });
                Ok(())
            };

            // postrouting: meta nfproto ipv4 oifname UP ip saddr POOL counter snat ip to EIP
            let mut snat = nfproto_ipv4().to_vec();
            snat.extend(oif(&up));
            snat.extend(saddr_in(pool, false));
            snat.extend([
                Expr::Counter,
                Expr::LoadIpv4(egress.egress_ip),
                Expr::SnatIpv4,
            ]);
            add(POSTROUTING, "snat", snat)?;

            // mangle_forward: [iif|oif]name WG tcp flags & (syn|rst) == syn
            //                 tcp option maxseg size set rt mtu
            for (dir, side) in [("in", iif(&wg)), ("out", oif(&wg))] {
                let mut clamp = side.to_vec();
                clamp.extend(l4proto(libc::IPPROTO_TCP as u8));
                clamp.extend([
                    Expr::TransportByte(13),
                    Expr::Bitwise {
                        mask: vec![0x02 | 0x04],
                        xor: vec![0],
                    },
                    Expr::Cmp {
                        neq: false,
                        data: vec![0x02],
                    },
                    Expr::RtTcpMss,
                    Expr::Hton16,
                    Expr::WriteTcpOpt16(TCPOPT_MAXSEG),
                ]);
                add(MANGLE_FORWARD, &format!("mss clamp {dir}"), clamp)?;
            }

            // forward: iifname WG ip saddr != POOL counter drop
            let mut spoof = iif(&wg).to_vec();
            spoof.extend(nfproto_ipv4());
            spoof.extend(saddr_in(pool, true));
            spoof.extend([Expr::Counter, Expr::Drop]);
            add(FORWARD, "anti-spoof", spoof)?;

            // forward: iifname WG oifname UP meta nfproto ipv4 accept
            let mut out = iif(&wg).to_vec();
            out.extend(oif(&up));
            out.extend(nfproto_ipv4());
            out.push(Expr::Accept);
            add(FORWARD, "to uplink", out)?;

            // forward: iifname UP oifname WG ct state established,related accept
            let mut back = iif(&up).to_vec();
            back.extend(oif(&wg));
            back.extend([
                Expr::CtState,
                Expr::Bitwise {
                    mask: (nftnl::expr::States::ESTABLISHED | nftnl::expr::States::RELATED)
                        .bits()
                        .to_ne_bytes()
                        .to_vec(),
                    xor: vec![0; 4],
                },
                Expr::Cmp {
                    neq: true,
                    data: vec![0; 4],
                },
                Expr::Accept,
            ]);
            add(FORWARD, "replies", back)?;

            // forward: iifname WG counter drop; oifname WG counter drop
            let mut from_wg = iif(&wg).to_vec();
            from_wg.extend([Expr::Counter, Expr::Drop]);
            add(FORWARD, "no other forwarding in", from_wg)?;
            let mut to_wg = oif(&wg).to_vec();
            to_wg.extend([Expr::Counter, Expr::Drop]);
            add(FORWARD, "no other forwarding out", to_wg)?;

            // input: iifname WG ip daddr OVL icmp type echo-request accept
            let mut ping = iif(&wg).to_vec();
            ping.extend(nfproto_ipv4());
            ping.extend([
                Expr::IpDaddr,
                Expr::Cmp {
                    neq: false,
                    data: egress.overlay_ip.octets().to_vec(),
                },
            ]);
            ping.extend(l4proto(libc::IPPROTO_ICMP as u8));
            ping.extend([
                Expr::TransportByte(0),
                Expr::Cmp {
                    neq: false,
                    data: vec![8],
                },
                Expr::Accept,
            ]);
            add(INPUT, "ping", ping)?;

            // input: iifname WG counter drop
            let mut input_drop = iif(&wg).to_vec();
            input_drop.extend([Expr::Counter, Expr::Drop]);
            add(INPUT, "no access to the exit node", input_drop)?;
        }

        let mut hasher = Sha256::new();
        hasher.update(RULESET_VERSION.as_bytes());
        hasher.update([0]);
        hasher.update(table.as_bytes());
        for spec in CHAINS {
            hasher.update(format!(
                "\0{}:{:?}:{}:{}",
                spec.name,
                spec.hook,
                spec.priority,
                spec.type_name()
            ));
        }
        for rule in &rules {
            hasher.update(format!(
                "\0{}:{:?}:{:?}",
                rule.chain, rule.comment, rule.exprs
            ));
        }
        let comment = format!(
            "{RULESET_VERSION} sha256:{}",
            hex::encode(hasher.finalize())
        );
        Ok(Desired {
            table_name,
            comment,
            rules,
        })
    }

    /// Whether what the kernel holds is exactly this rule set.
    fn matches(&self, observed: &Observed) -> bool {
        if observed.flags != 0 || observed.comment.as_deref() != Some(self.comment.as_str()) {
            return false;
        }
        let mut want_chains: Vec<ObservedChain> = CHAINS
            .iter()
            .map(|spec| ObservedChain {
                name: spec.name.to_owned(),
                hook: Some(spec.hook as u32),
                priority: Some(spec.priority),
                chain_type: Some(spec.type_name().to_owned()),
                policy: Some(libc::NF_ACCEPT as u32),
            })
            .collect();
        want_chains.sort();
        let mut have_chains = observed.chains.clone();
        have_chains.sort();
        if want_chains != have_chains {
            return false;
        }
        let mut want_rules: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
        for rule in &self.rules {
            want_rules
                .entry(CHAINS[rule.chain].name.to_owned())
                .or_default()
                .push(Some(rule.comment.to_string_lossy().into_owned()));
        }
        want_rules == observed.rules
    }
}

/// The egress name as rule comments show it (comments are limited to 128 bytes).
fn comment_label(name: &str) -> &str {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

// ---------------------------------------------------------------------------------------------
// Netlink plumbing.

/// A table message with an optional comment, which `nftnl::Table` cannot carry.
struct TableMsg {
    table: NonNull<sys::nftnl_table>,
}

/// `NFTNL_UDATA_TABLE_COMMENT` / `NFTNL_UDATA_RULE_COMMENT`: the TLV type nft uses for comments.
const UDATA_COMMENT: u8 = 0;

impl TableMsg {
    fn new(name: &CString, comment: Option<&str>) -> TableMsg {
        // SAFETY: plain allocation; aborts below if it failed.
        let table = unsafe { sys::nftnl_table_alloc() };
        let Some(table) = NonNull::new(table) else {
            std::process::abort();
        };
        let udata = comment.map(|comment| {
            // One TLV as nft writes it: type, length, NUL-terminated string. Our comments are
            // ASCII and well under 255 bytes.
            let mut value = comment.as_bytes().to_vec();
            value.truncate(254);
            value.push(0);
            let mut tlv = vec![UDATA_COMMENT, value.len() as u8];
            tlv.extend(value);
            tlv
        });
        // SAFETY: `table` is valid; libnftnl copies the name and the user data.
        unsafe {
            sys::nftnl_table_set_u32(
                table.as_ptr(),
                sys::NFTNL_TABLE_FAMILY as u16,
                ProtoFamily::Inet as u32,
            );
            sys::nftnl_table_set_str(table.as_ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_set_u32(table.as_ptr(), sys::NFTNL_TABLE_FLAGS as u16, 0);
            if let Some(udata) = &udata {
                sys::nftnl_table_set_data(
                    table.as_ptr(),
                    sys::NFTNL_TABLE_USERDATA as u16,
                    udata.as_ptr().cast::<c_void>(),
                    udata.len() as u32,
                );
            }
        }
        TableMsg { table }
    }
}

// SAFETY: a table message is far smaller than the largest netlink message.
unsafe impl NlMsg for TableMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let raw_type = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWTABLE,
            MsgType::Del => libc::NFT_MSG_DELTABLE,
        };
        let flags = match msg_type {
            MsgType::Add => libc::NLM_F_CREATE | libc::NLM_F_ACK,
            MsgType::Del => libc::NLM_F_ACK,
        };
        // SAFETY: the caller gives a buffer of nft_nlmsg_maxsize() bytes.
        unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast(),
                raw_type as u16,
                ProtoFamily::Inet as u16,
                flags as u16,
                seq,
            );
            sys::nftnl_table_nlmsg_build_payload(header, self.table.as_ptr());
        }
    }
}

impl Drop for TableMsg {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once.
        unsafe { sys::nftnl_table_free(self.table.as_ptr()) };
    }
}

/// A netlink message buffer aligned for `nlmsghdr`.
struct AlignedBuf(Vec<u64>);

impl AlignedBuf {
    fn new(bytes: usize) -> AlignedBuf {
        AlignedBuf(vec![0; bytes.div_ceil(8)])
    }

    fn from_bytes(bytes: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::new(bytes.len());
        buf.bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        buf
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: u64 storage viewed as bytes, same length in bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 8) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.0.len() * 8)
        }
    }

    fn header(&self) -> *const libc::nlmsghdr {
        self.0.as_ptr().cast()
    }
}

/// One netlink message of a reply.
struct Reply<'a> {
    kind: u16,
    seq: u32,
    bytes: &'a [u8],
}

const NLMSG_HDRLEN: usize = 16;

impl Reply<'_> {
    /// The errno of an `NLMSG_ERROR` or `NLMSG_DONE` message (0 for an ack).
    fn errno(&self) -> Option<i32> {
        let status = self.bytes.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)?;
        let status = i32::from_ne_bytes(status.try_into().ok()?);
        Some(-status)
    }

    fn nft_type(&self) -> Option<i32> {
        ((self.kind >> 8) as i32 == libc::NFNL_SUBSYS_NFTABLES).then_some((self.kind & 0xff) as i32)
    }
}

fn split_replies(buf: &[u8]) -> Result<Vec<Reply<'_>>, NatError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(NatError::Protocol(format!(
                "netlink message length {len} with {} bytes left",
                rest.len()
            )));
        }
        out.push(Reply {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
            bytes: &rest[..len],
        });
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(out)
}

/// How long to wait for the kernel's answer; it answers batches synchronously, so this only
/// guards against a reply that never comes.
const REPLY_TIMEOUT_MS: i32 = 5000;

fn kernel_error(errno: i32, what: &str) -> NatError {
    let source = io::Error::from_raw_os_error(errno);
    match errno {
        libc::EPERM | libc::EACCES => NatError::PermissionDenied {
            what: format!("writing {what}"),
        },
        libc::EOPNOTSUPP | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT => NatError::Unsupported {
            what: what.to_owned(),
            source,
        },
        libc::ENOENT if what.starts_with("chain") || what.starts_with("rule") => {
            NatError::Unsupported {
                what: what.to_owned(),
                source,
            }
        }
        _ => NatError::Rejected {
            what: what.to_owned(),
            source,
        },
    }
}

/// What the kernel holds in our table.
#[derive(Debug, Default)]
struct Observed {
    flags: u32,
    comment: Option<String>,
    chains: Vec<ObservedChain>,
    /// Rule comments per chain, in chain order.
    rules: BTreeMap<String, Vec<Option<String>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObservedChain {
    name: String,
    hook: Option<u32>,
    priority: Option<i32>,
    chain_type: Option<String>,
    policy: Option<u32>,
}

/// The comment out of nft-style user data (a run of type/length/value records).
fn udata_comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_COMMENT {
            let value = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        rest = &rest[2 + len..];
    }
    None
}

/// A netlink socket on the netfilter bus, in the calling thread's network namespace.
struct Conn {
    socket: mnl::Socket,
    buf: AlignedBuf,
}

impl Conn {
    fn open() -> Result<Conn, NatError> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(|source| {
            if source.raw_os_error() == Some(libc::EPERM) {
                NatError::PermissionDenied {
                    what: "opening a netfilter netlink socket".into(),
                }
            } else {
                NatError::Netlink {
                    what: "opening a netfilter netlink socket",
                    source,
                }
            }
        })?;
        Ok(Conn {
            socket,
            buf: AlignedBuf::new(nftnl::nft_nlmsg_maxsize() as usize * 2),
        })
    }

    /// Waits up to `timeout_ms` for data and reads one datagram; `None` on timeout.
    fn recv(&mut self, timeout_ms: i32) -> Result<Option<usize>, NatError> {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NatError::Netlink {
                    what: "waiting for the kernel's reply",
                    source: err,
                });
            }
            if ready == 0 {
                return Ok(None);
            }
            let buf = self.buf.bytes_mut();
            // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
            let n = unsafe {
                libc::recv(
                    pfd.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                let what = if err.raw_os_error() == Some(libc::ENOBUFS) {
                    "reading the kernel's reply (the socket buffer overflowed: too many rules \
                     for net.core.rmem_max; the change may or may not have been applied)"
                } else {
                    "reading the kernel's reply"
                };
                return Err(NatError::Netlink { what, source: err });
            }
            return Ok(Some(n as usize));
        }
    }

    /// Sends a batch as one datagram (the kernel wants a batch's begin and end in the same
    /// one), growing the socket buffers first if the batch or its acks would not fit.
    fn send_parts(&self, parts: &[&[u8]], messages: usize) -> Result<(), NatError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // Below this both fit the kernel's default buffers with room to spare.
        const SMALL: usize = 64 * 1024;
        if total > SMALL {
            self.grow_buffer(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, total + SMALL);
        }
        // The kernel queues one ack per message before we read any, each a small datagram that
        // the receive buffer accounts for at its full allocation size (under 1 KiB, as nft
        // reckons too).
        if messages * 1024 > SMALL {
            self.grow_buffer(
                libc::SO_RCVBUFFORCE,
                libc::SO_RCVBUF,
                messages * 1024 + SMALL,
            );
        }
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr().cast_mut().cast(),
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: all-zero is a valid sockaddr_nl and msghdr.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut kernel).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        loop {
            // SAFETY: `msg` points at live iovecs over `parts` and at `kernel`.
            let sent = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, 0) };
            if sent >= 0 {
                if sent as usize == total {
                    return Ok(());
                }
                return Err(NatError::Netlink {
                    what: "sending to the kernel",
                    source: io::Error::other("short write"),
                });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EPERM) => {
                    return Err(NatError::PermissionDenied {
                        what: "sending to netfilter".into(),
                    })
                }
                _ => {
                    return Err(NatError::Netlink {
                        what: "sending the nftables batch",
                        source: err,
                    })
                }
            }
        }
    }

    /// Raises a socket buffer to `bytes`: with the privileged option if allowed, else within
    /// the system's limit. Failing is not fatal: the send or receive then reports the problem.
    fn grow_buffer(&self, forced: libc::c_int, plain: libc::c_int, bytes: usize) {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        for option in [forced, plain] {
            // SAFETY: an int option on our own socket.
            let rc = unsafe {
                libc::setsockopt(
                    self.socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&raw const value).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                return;
            }
        }
    }

    fn send(&self, bytes: &[u8]) -> Result<(), NatError> {
        match self.socket.send(bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(_) => Err(NatError::Netlink {
                what: "sending to the kernel",
                source: io::Error::other("short write"),
            }),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(NatError::PermissionDenied {
                what: "sending to netfilter".into(),
            }),
            Err(source) => Err(NatError::Netlink {
                what: "sending to the kernel",
                source,
            }),
        }
    }

    /// Sends a batch and reads every answer; `what[i]` names the i-th message for errors.
    fn send_batch(&mut self, batch: Batch, what: &[String]) -> Result<(), NatError> {
        let batch = batch.finalize();
        let seqs = batch.sequence_numbers();
        // The range covers the begin/end markers too when the kernel acknowledges them.
        let first_msg_seq = if seqs.len() == what.len() + 2 {
            seqs.start + 1
        } else {
            seqs.start
        };
        let describe = |seq: u32| -> String {
            seq.checked_sub(first_msg_seq)
                .and_then(|i| what.get(i as usize))
                .cloned()
                .unwrap_or_else(|| "the nftables batch".to_owned())
        };
        let parts: Vec<&[u8]> = batch.iter().collect();
        self.send_parts(&parts, seqs.len())?;
        let mut pending: Vec<u32> = seqs.collect();
        let mut first_error: Option<NatError> = None;
        while !pending.is_empty() {
            // The kernel answers a batch while we send it: once an error has been seen, whatever
            // is not already queued will not come.
            let timeout = if first_error.is_some() {
                0
            } else {
                REPLY_TIMEOUT_MS
            };
            let Some(n) = self.recv(timeout)? else {
                break;
            };
            for reply in split_replies(&self.buf.bytes()[..n])? {
                if reply.kind != libc::NLMSG_ERROR as u16 {
                    continue;
                }
                pending.retain(|&s| s != reply.seq);
                match reply.errno() {
                    Some(0) => {}
                    Some(errno) => {
                        if first_error.is_none() {
                            first_error = Some(kernel_error(errno, &describe(reply.seq)));
                        }
                    }
                    None => {
                        return Err(NatError::Protocol("truncated netlink error message".into()))
                    }
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None if pending.is_empty() => Ok(()),
            None => Err(NatError::Protocol(format!(
                "no answer from the kernel within {REPLY_TIMEOUT_MS} ms"
            ))),
        }
    }

    /// Sends one request and collects the nf_tables messages of the answer, up to the ack (or
    /// the end of a dump). `Ok(None)` when the kernel answers ENOENT.
    fn request(&mut self, request: &[u8], what: &str) -> Result<Option<Vec<AlignedBuf>>, NatError> {
        self.send(request)?;
        let seq = split_replies(request)?
            .first()
            .map(|r| r.seq)
            .ok_or_else(|| NatError::Protocol("empty request".into()))?;
        let mut messages = Vec::new();
        loop {
            let Some(n) = self.recv(REPLY_TIMEOUT_MS)? else {
                return Err(NatError::Protocol(format!(
                    "no answer from the kernel within {REPLY_TIMEOUT_MS} ms while {what}"
                )));
            };
            for reply in split_replies(&self.buf.bytes()[..n])? {
                if reply.seq != seq {
                    continue;
                }
                if reply.kind == libc::NLMSG_ERROR as u16 || reply.kind == libc::NLMSG_DONE as u16 {
                    return match reply.errno() {
                        Some(0) => Ok(Some(messages)),
                        Some(libc::ENOENT) => Ok(None),
                        Some(libc::EPERM) | Some(libc::EACCES) => {
                            Err(NatError::PermissionDenied { what: what.into() })
                        }
                        Some(errno) if reply.kind == libc::NLMSG_ERROR as u16 => {
                            Err(NatError::Netlink {
                                what: "reading nftables state",
                                source: io::Error::from_raw_os_error(errno),
                            })
                        }
                        // A dump's DONE may carry no status at all.
                        _ if reply.kind == libc::NLMSG_DONE as u16 => Ok(Some(messages)),
                        _ => Err(NatError::Protocol("truncated netlink error message".into())),
                    };
                }
                if reply.nft_type().is_some() {
                    messages.push(AlignedBuf::from_bytes(reply.bytes));
                }
            }
        }
    }

    /// The table's flags and comment, or `None` if there is no such table.
    fn get_table(&mut self, name: &CString) -> Result<Option<(u32, Option<String>)>, NatError> {
        let request = build_request(libc::NFT_MSG_GETTABLE, libc::NLM_F_ACK, |header| {
            let table = TableMsg::new(name, None);
            // SAFETY: `header` was just built in a buffer of maximum message size.
            unsafe { sys::nftnl_table_nlmsg_build_payload(header, table.table.as_ptr()) };
        });
        let what = format!("reading table inet {}", name.to_string_lossy());
        let Some(messages) = self.request(&request, &what)? else {
            return Ok(None);
        };
        for message in messages {
            // SAFETY: a fresh table object, filled by libnftnl from a complete, aligned message
            // and freed below; the pointers read from it live until then.
            unsafe {
                let table = sys::nftnl_table_alloc();
                let Some(table) = NonNull::new(table) else {
                    std::process::abort();
                };
                let table = table.as_ptr();
                let parsed = sys::nftnl_table_nlmsg_parse(message.header(), table);
                let result = (parsed >= 0).then(|| {
                    let flags = sys::nftnl_table_get_u32(table, sys::NFTNL_TABLE_FLAGS as u16);
                    let mut len = 0u32;
                    let data = sys::nftnl_table_get_data(
                        table,
                        sys::NFTNL_TABLE_USERDATA as u16,
                        &mut len,
                    );
                    let comment = if data.is_null() {
                        None
                    } else {
                        udata_comment(std::slice::from_raw_parts(data.cast::<u8>(), len as usize))
                    };
                    (flags, comment)
                });
                sys::nftnl_table_free(table);
                if let Some(found) = result {
                    return Ok(Some(found));
                }
            }
        }
        Err(NatError::Protocol(format!(
            "kernel's answer for {what} held no table"
        )))
    }

    /// Everything in the table that `Desired::matches` compares, or `None` with no table.
    fn observe(&mut self, name: &CString) -> Result<Option<Observed>, NatError> {
        let Some((flags, comment)) = self.get_table(name)? else {
            return Ok(None);
        };
        let mut observed = Observed {
            flags,
            comment,
            ..Observed::default()
        };
        let table_name = name.to_string_lossy().into_owned();

        let request = build_request(libc::NFT_MSG_GETCHAIN, libc::NLM_F_DUMP, |_| {});
        let chains = self
            .request(&request, "listing chains")?
            .unwrap_or_default();
        for message in chains {
            // SAFETY: as in `get_table`, for a chain object.
            unsafe {
                let Some(chain) = NonNull::new(sys::nftnl_chain_alloc()) else {
                    std::process::abort();
                };
                let chain = chain.as_ptr();
                if sys::nftnl_chain_nlmsg_parse(message.header(), chain) >= 0 {
                    let str_attr = |attr: u32| -> Option<String> {
                        if !sys::nftnl_chain_is_set(chain, attr as u16) {
                            return None;
                        }
                        let s = sys::nftnl_chain_get_str(chain, attr as u16);
                        (!s.is_null())
                            .then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
                    };
                    let u32_attr = |attr: u32| -> Option<u32> {
                        sys::nftnl_chain_is_set(chain, attr as u16)
                            .then(|| sys::nftnl_chain_get_u32(chain, attr as u16))
                    };
                    let family = u32_attr(sys::NFTNL_CHAIN_FAMILY);
                    if str_attr(sys::NFTNL_CHAIN_TABLE).as_deref() == Some(table_name.as_str())
                        && family == Some(libc::NFPROTO_INET as u32)
                    {
                        observed.chains.push(ObservedChain {
                            name: str_attr(sys::NFTNL_CHAIN_NAME).unwrap_or_default(),
                            hook: u32_attr(sys::NFTNL_CHAIN_HOOKNUM),
                            priority: sys::nftnl_chain_is_set(chain, sys::NFTNL_CHAIN_PRIO as u16)
                                .then(|| {
                                    sys::nftnl_chain_get_s32(chain, sys::NFTNL_CHAIN_PRIO as u16)
                                }),
                            chain_type: str_attr(sys::NFTNL_CHAIN_TYPE),
                            policy: u32_attr(sys::NFTNL_CHAIN_POLICY),
                        });
                    }
                }
                sys::nftnl_chain_free(chain);
            }
        }

        let request = build_request(libc::NFT_MSG_GETRULE, libc::NLM_F_DUMP, |header| {
            // Ask the kernel for this table's rules only.
            // SAFETY: a fresh rule object, only used to write the table filter, then freed.
            unsafe {
                let Some(rule) = NonNull::new(sys::nftnl_rule_alloc()) else {
                    std::process::abort();
                };
                sys::nftnl_rule_set_str(rule.as_ptr(), sys::NFTNL_RULE_TABLE as u16, name.as_ptr());
                sys::nftnl_rule_nlmsg_build_payload(header, rule.as_ptr());
                sys::nftnl_rule_free(rule.as_ptr());
            }
        });
        let rules = self.request(&request, "listing rules")?.unwrap_or_default();
        for message in rules {
            // SAFETY: as in `get_table`, for a rule object.
            unsafe {
                let Some(rule) = NonNull::new(sys::nftnl_rule_alloc()) else {
                    std::process::abort();
                };
                let rule = rule.as_ptr();
                if sys::nftnl_rule_nlmsg_parse(message.header(), rule) >= 0 {
                    let get = |attr: u32| -> Option<String> {
                        if !sys::nftnl_rule_is_set(rule, attr as u16) {
                            return None;
                        }
                        let s = sys::nftnl_rule_get_str(rule, attr as u16);
                        (!s.is_null())
                            .then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
                    };
                    let family = sys::nftnl_rule_get_u32(rule, sys::NFTNL_RULE_FAMILY as u16);
                    if get(sys::NFTNL_RULE_TABLE).as_deref() == Some(table_name.as_str())
                        && family == libc::NFPROTO_INET as u32
                    {
                        let mut len = 0u32;
                        let data = sys::nftnl_rule_get_data(
                            rule,
                            sys::NFTNL_RULE_USERDATA as u16,
                            &mut len,
                        );
                        let comment = if data.is_null() {
                            None
                        } else {
                            udata_comment(std::slice::from_raw_parts(
                                data.cast::<u8>(),
                                len as usize,
                            ))
                        };
                        observed
                            .rules
                            .entry(get(sys::NFTNL_RULE_CHAIN).unwrap_or_default())
                            .or_default()
                            .push(comment);
                    }
                }
                sys::nftnl_rule_free(rule);
            }
        }
        Ok(Some(observed))
    }
}

/// A request message for the `inet` family; `payload` adds attributes after the header.
fn build_request(msg_type: i32, flags: i32, payload: impl FnOnce(*mut libc::nlmsghdr)) -> Vec<u8> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1 << 20);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut buf = AlignedBuf::new(nftnl::nft_nlmsg_maxsize() as usize);
    let header = buf.bytes_mut().as_mut_ptr();
    // SAFETY: the buffer holds the largest possible message and is aligned for nlmsghdr.
    let header = unsafe {
        sys::nftnl_nlmsg_build_hdr(
            header.cast(),
            msg_type as u16,
            ProtoFamily::Inet as u16,
            flags as u16,
            seq,
        )
    };
    payload(header);
    // SAFETY: `header` points into `buf`, which libnftnl just wrote a complete header to.
    let len = unsafe { (*header).nlmsg_len } as usize;
    buf.bytes()[..len].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// A network namespace made for one test and removed when dropped, even on failure.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new(tag: &str) -> Netns {
            let name = format!("wgx-nat-{tag}-{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .unwrap();
            assert!(out.status.success(), "ip netns add {name}: {out:?}");
            Netns { name }
        }

        /// Moves the calling thread (and so every netlink socket it opens) into the namespace.
        fn enter(&self) {
            let path = format!("/var/run/netns/{}", self.name);
            let file = File::open(&path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let want = file.metadata().unwrap().ino();
            let have = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
            assert_eq!(want, have, "thread did not enter {path}");
        }

        /// Runs a command inside the namespace and returns its stdout; panics on failure.
        fn run(&self, args: &[&str]) -> String {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }

        fn nft_list(&self, table: &str) -> String {
            self.run(&["nft", "-a", "list", "table", "inet", table])
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }

    fn acme() -> EgressRules {
        EgressRules {
            name: "acme".into(),
            wg_interface: "wgx-acme".into(),
            uplink: "isp0".into(),
            pool: "100.64.0.0/10".parse().unwrap(),
            overlay_ip: Ipv4Addr::new(100, 64, 0, 1),
            egress_ip: Ipv4Addr::new(203, 0, 113, 77),
        }
    }

    fn globex() -> EgressRules {
        EgressRules {
            name: "globex".into(),
            wg_interface: "wgx-globex".into(),
            uplink: "isp1".into(),
            pool: "198.18.16.0/20".parse().unwrap(),
            overlay_ip: Ipv4Addr::new(198, 18, 16, 1),
            egress_ip: Ipv4Addr::new(203, 0, 113, 78),
        }
    }

    /// Drops the `# handle N` annotations nft -a adds.
    fn without_handles(listing: &str) -> String {
        listing
            .lines()
            .map(|l| l.split(" # handle").next().unwrap_or(l).trim_end())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn assert_has(listing: &str, want: &str) {
        assert!(
            without_handles(listing).contains(want),
            "missing {want:?} in:\n{listing}"
        );
    }

    #[test]
    fn apply_writes_the_rules() {
        let ns = Netns::new("apply");
        ns.enter();
        let fw = Firewall::new(DEFAULT_TABLE);
        assert!(!fw.exists().unwrap());
        fw.apply(&[acme()]).unwrap();
        assert!(fw.exists().unwrap());

        let listing = ns.nft_list("wgexitd");
        println!("{listing}");
        for want in [
            "type nat hook postrouting priority srcnat; policy accept;",
            "oifname \"isp0\" ip saddr 100.64.0.0/10 counter packets 0 bytes 0 snat ip to 203.0.113.77 comment \"acme: snat\"",
            "type filter hook forward priority mangle; policy accept;",
            "iifname \"wgx-acme\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu comment \"acme: mss clamp in\"",
            "oifname \"wgx-acme\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu comment \"acme: mss clamp out\"",
            "type filter hook forward priority filter; policy accept;",
            "iifname \"wgx-acme\" ip saddr != 100.64.0.0/10 counter packets 0 bytes 0 drop comment \"acme: anti-spoof\"",
            "iifname \"wgx-acme\" oifname \"isp0\" meta nfproto ipv4 accept comment \"acme: to uplink\"",
            "iifname \"isp0\" oifname \"wgx-acme\" ct state established,related accept comment \"acme: replies\"",
            "iifname \"wgx-acme\" counter packets 0 bytes 0 drop comment \"acme: no other forwarding in\"",
            "oifname \"wgx-acme\" counter packets 0 bytes 0 drop comment \"acme: no other forwarding out\"",
            "type filter hook input priority filter; policy accept;",
            "iifname \"wgx-acme\" ip daddr 100.64.0.1 icmp type echo-request accept comment \"acme: ping\"",
            "iifname \"wgx-acme\" counter packets 0 bytes 0 drop comment \"acme: no access to the exit node\"",
            "comment \"wgexitd-nat-v1 sha256:",
        ] {
            assert_has(&listing, want);
        }
        // Forward rules in the documented order.
        let text = without_handles(&listing);
        let pos = |s: &str| text.find(s).unwrap();
        assert!(pos("acme: anti-spoof") < pos("acme: to uplink"));
        assert!(pos("acme: to uplink") < pos("acme: replies"));
        assert!(pos("acme: replies") < pos("acme: no other forwarding in"));
        assert!(pos("acme: no other forwarding in") < pos("acme: no other forwarding out"));
        // nft itself can read everything back.
        ns.run(&["nft", "-j", "list", "table", "inet", "wgexitd"]);
    }

    #[test]
    fn apply_twice_leaves_the_table_alone() {
        let ns = Netns::new("idem");
        ns.enter();
        let fw = Firewall::new(DEFAULT_TABLE);
        fw.apply(&[acme(), globex()]).unwrap();
        let before = ns.nft_list("wgexitd");
        fw.apply(&[acme(), globex()]).unwrap();
        let after = ns.nft_list("wgexitd");
        assert_eq!(before, after, "handles changed: the table was rewritten");
    }

    #[test]
    fn apply_replaces_a_changed_or_tampered_table() {
        let ns = Netns::new("replace");
        ns.enter();
        let fw = Firewall::new(DEFAULT_TABLE);
        fw.apply(&[acme()]).unwrap();
        let first = ns.nft_list("wgexitd");

        let mut moved = acme();
        moved.egress_ip = Ipv4Addr::new(203, 0, 113, 99);
        fw.apply(&[moved.clone()]).unwrap();
        let second = ns.nft_list("wgexitd");
        assert_ne!(first, second);
        assert_has(&second, "snat ip to 203.0.113.99");
        assert!(!second.contains("203.0.113.77"), "{second}");

        fw.apply(&[moved.clone(), globex()]).unwrap();
        let third = ns.nft_list("wgexitd");
        assert_has(&third, "oifname \"isp1\" ip saddr 198.18.16.0/20");
        assert_has(&third, "iifname \"wgx-globex\" ip saddr != 198.18.16.0/20");

        // A rule added by hand is removed by the next apply.
        ns.run(&[
            "nft", "insert", "rule", "inet", "wgexitd", "forward", "accept",
        ]);
        fw.apply(&[moved.clone(), globex()]).unwrap();
        let fourth = ns.nft_list("wgexitd");
        assert_eq!(without_handles(&third), without_handles(&fourth));
        assert_ne!(third, fourth, "the tampered table was left alone");

        // A deleted chain comes back too.
        ns.run(&["nft", "flush", "chain", "inet", "wgexitd", "input"]);
        ns.run(&["nft", "delete", "chain", "inet", "wgexitd", "input"]);
        fw.apply(&[moved.clone(), globex()]).unwrap();
        assert_eq!(
            without_handles(&third),
            without_handles(&ns.nft_list("wgexitd"))
        );

        // No egress: the chains stay, without rules.
        fw.apply(&[]).unwrap();
        let empty = ns.nft_list("wgexitd");
        assert!(!empty.contains("acme"), "{empty}");
        assert_has(&empty, "chain forward");
    }

    #[test]
    fn teardown_removes_the_table_and_may_repeat() {
        let ns = Netns::new("teardown");
        ns.enter();
        let fw = Firewall::new("wgexitd-test");
        fw.teardown().unwrap();
        fw.apply(&[acme()]).unwrap();
        assert!(fw.exists().unwrap());
        fw.teardown().unwrap();
        assert!(!fw.exists().unwrap());
        assert!(!ns.run(&["nft", "list", "tables"]).contains("wgexitd-test"));
        fw.teardown().unwrap();
        assert!(!fw.exists().unwrap());
    }

    #[test]
    fn bad_interface_names_are_refused_before_touching_the_kernel() {
        let fw = Firewall::new(DEFAULT_TABLE);
        let mut long = acme();
        long.wg_interface = "wgx-a-very-long-name".into();
        let err = Desired::build(fw.table(), &[long]).err().unwrap();
        assert!(matches!(err, NatError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("wgx-a-very-long-name"), "{err}");
        let mut slash = acme();
        slash.uplink = "isp/0".into();
        assert!(Desired::build(fw.table(), &[slash]).is_err());
        assert!(Desired::build("bad\0table", &[acme()]).is_err());
    }

    #[test]
    fn a_failed_batch_names_the_object_and_changes_nothing() {
        let ns = Netns::new("reject");
        ns.enter();
        let name = CString::new("wgexitd-reject").unwrap();
        let table = Table::new(&name, ProtoFamily::Inet);
        let mut batch = Batch::new();
        batch.add(&TableMsg::new(&name, None), MsgType::Add);
        // A nat chain on the forward hook is refused by the kernel.
        let mut chain = Chain::new(c"bogus", &table);
        chain.set_hook(Hook::Forward, 0);
        chain.set_type(ChainType::Nat);
        batch.add(&chain, MsgType::Add);
        let what = [
            "table inet wgexitd-reject".to_owned(),
            "chain bogus".to_owned(),
        ];
        let err = Conn::open().unwrap().send_batch(batch, &what).unwrap_err();
        assert!(err.to_string().contains("chain bogus"), "{err}");
        // All or nothing: the table of the same batch was not created either.
        assert!(!Firewall::new("wgexitd-reject").exists().unwrap());

        // Deleting a missing table on its own is an error the kernel reports by name.
        let mut batch = Batch::new();
        batch.add(&TableMsg::new(&name, None), MsgType::Del);
        let what = ["deletion of table inet wgexitd-reject".to_owned()];
        let err = Conn::open().unwrap().send_batch(batch, &what).unwrap_err();
        assert!(
            matches!(&err, NatError::Rejected { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("deletion of table inet wgexitd-reject"),
            "{err}"
        );
    }

    /// Drops every effective capability of the calling thread (capabilities are per thread).
    fn drop_effective_caps() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and two data words, for this thread only.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            data[0].effective = 0;
            data[1].effective = 0;
            assert_eq!(
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                0
            );
        }
    }

    #[test]
    fn without_cap_net_admin_the_error_says_so() {
        let ns = Netns::new("perm");
        ns.enter();
        drop_effective_caps();
        let fw = Firewall::new(DEFAULT_TABLE);
        let err = fw.exists().unwrap_err();
        assert!(matches!(err, NatError::PermissionDenied { .. }), "{err:?}");
        assert!(err.to_string().contains("run wgexitd as root"), "{err}");
        let err = fw.apply(&[acme()]).unwrap_err();
        assert!(matches!(err, NatError::PermissionDenied { .. }), "{err:?}");
    }

    /// The packet counter of the rule with this comment.
    fn counter(listing: &str, comment: &str) -> u64 {
        let line = listing
            .lines()
            .find(|l| l.contains(&format!("comment \"{comment}\"")))
            .unwrap_or_else(|| panic!("no rule {comment:?} in:\n{listing}"));
        let rest = &line[line.find("packets ").unwrap() + "packets ".len()..];
        rest.split(' ').next().unwrap().parse().unwrap()
    }

    /// Runs `f` on a new thread inside the namespace.
    fn in_netns<T: Send + 'static>(
        ns: &Netns,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", ns.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    /// Sends one UDP datagram from `from` and waits briefly for an answer.
    fn udp_exchange(from: Ipv4Addr, to: &str) -> Option<String> {
        let socket = std::net::UdpSocket::bind((from, 0)).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(700)))
            .unwrap();
        socket.send_to(b"hello", to).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn traffic_is_snatted_and_spoofed_sources_are_dropped() {
        let exit = Netns::new("trf-x");
        let client = Netns::new("trf-c");
        let isp = Netns::new("trf-i");
        // client c0 <-> exit wgx-t (stands in for the WireGuard interface)
        exit.run(&[
            "ip",
            "link",
            "add",
            "wgx-t",
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            &client.name,
        ]);
        exit.run(&[
            "ip", "link", "add", "up0", "type", "veth", "peer", "name", "i0", "netns", &isp.name,
        ]);
        exit.run(&["ip", "addr", "add", "100.64.0.1/10", "dev", "wgx-t"]);
        exit.run(&["ip", "addr", "add", "203.0.113.1/24", "dev", "up0"]);
        exit.run(&["ip", "addr", "add", "203.0.113.77/32", "dev", "up0"]);
        exit.run(&["ip", "link", "set", "wgx-t", "up"]);
        exit.run(&["ip", "link", "set", "up0", "up"]);
        exit.run(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.wgx-t.rp_filter=0",
        ]);
        client.run(&["ip", "addr", "add", "100.64.0.2/10", "dev", "c0"]);
        client.run(&["ip", "addr", "add", "198.18.5.2/32", "dev", "c0"]);
        client.run(&["ip", "link", "set", "c0", "up"]);
        client.run(&["ip", "route", "add", "default", "via", "100.64.0.1"]);
        // The isp knows nothing of the overlay: only SNATed traffic can be answered.
        isp.run(&["ip", "addr", "add", "203.0.113.50/24", "dev", "i0"]);
        isp.run(&["ip", "link", "set", "i0", "up"]);
        isp.run(&["ip", "link", "set", "lo", "up"]);

        exit.enter();
        let egress = EgressRules {
            name: "acme".into(),
            wg_interface: "wgx-t".into(),
            uplink: "up0".into(),
            pool: "100.64.0.0/10".parse().unwrap(),
            overlay_ip: Ipv4Addr::new(100, 64, 0, 1),
            egress_ip: Ipv4Addr::new(203, 0, 113, 77),
        };
        Firewall::new(DEFAULT_TABLE).apply(&[egress]).unwrap();

        // An echo server in the isp that answers with the source address it saw.
        let server = in_netns(&isp, || {
            let socket = std::net::UdpSocket::bind("203.0.113.50:7777").unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                if &buf[..n] == b"stop" {
                    break;
                }
                seen.push(peer.ip());
                let _ = socket.send_to(peer.ip().to_string().as_bytes(), peer);
            }
            seen
        });
        std::thread::sleep(std::time::Duration::from_millis(100));

        let answers = in_netns(&client, || {
            (
                udp_exchange(Ipv4Addr::new(100, 64, 0, 2), "203.0.113.50:7777"),
                udp_exchange(Ipv4Addr::new(198, 18, 5, 2), "203.0.113.50:7777"),
                udp_exchange(Ipv4Addr::new(100, 64, 0, 2), "203.0.113.1:7777"),
            )
        })
        .join()
        .unwrap();
        let _ = in_netns(&isp, || {
            let s = std::net::UdpSocket::bind("203.0.113.50:0").unwrap();
            s.send_to(b"stop", "203.0.113.50:7777").unwrap();
        })
        .join();
        let seen = server.join().unwrap();

        let listing = exit.nft_list(DEFAULT_TABLE);
        assert_eq!(
            answers.0.as_deref(),
            Some("203.0.113.77"),
            "pool traffic not SNATed to the egress IP; isp saw {seen:?}\n{listing}"
        );
        assert_eq!(answers.1, None, "spoofed source got through");
        assert_eq!(answers.2, None, "container reached the exit node itself");
        assert!(
            !seen.iter().any(|ip| ip.to_string() == "198.18.5.2"),
            "{seen:?}"
        );
        assert!(counter(&listing, "acme: anti-spoof") >= 1, "{listing}");
        assert!(counter(&listing, "acme: snat") >= 1, "{listing}");
        assert!(
            counter(&listing, "acme: no access to the exit node") >= 1,
            "{listing}"
        );
    }

    #[test]
    fn many_egresses_fit_in_one_batch() {
        let ns = Netns::new("many");
        ns.enter();
        let egresses: Vec<EgressRules> = (0..300u32)
            .map(|i| EgressRules {
                name: format!("tenant-{i}"),
                wg_interface: format!("wgx-e{i}"),
                uplink: "isp0".into(),
                pool: Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + (i << 8)), 24).unwrap(),
                overlay_ip: Ipv4Addr::from(0x6440_0001 + (i << 8)),
                egress_ip: Ipv4Addr::from(0xcb00_7100 + (i % 250)),
            })
            .collect();
        let fw = Firewall::new(DEFAULT_TABLE);
        fw.apply(&egresses).unwrap();
        let listing = ns.nft_list(DEFAULT_TABLE);
        assert_eq!(listing.matches("comment \"tenant-").count(), 300 * 10);
        assert_has(
            &listing,
            "comment \"tenant-299: no access to the exit node\"",
        );
        // Reading the whole table back (a multi-part dump) still finds it up to date.
        fw.apply(&egresses).unwrap();
        assert_eq!(listing, ns.nft_list(DEFAULT_TABLE));
        fw.apply(&egresses[..10]).unwrap();
        assert_eq!(
            ns.nft_list(DEFAULT_TABLE)
                .matches("comment \"tenant-")
                .count(),
            10 * 10
        );
    }
}
