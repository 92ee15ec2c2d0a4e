//! Policy-routing rules that refuse packets (`ip rule … prohibit`), over the [`Netlink`] handle.

use futures::TryStreamExt;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::IpVersion;

use super::link::{nl_err, LinkError, Netlink};

/// `ip [-6] rule add pref PRIORITY iif IIF fwmark MARK/MASK prohibit`: packets arriving on
/// `iif` whose `mark & mask == mark` are refused by routing (ICMP administratively
/// prohibited), whatever the routing tables say.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProhibitRule {
    pub v6: bool,
    pub priority: u32,
    pub iif: String,
    pub mark: u32,
    pub mask: u32,
}

impl ProhibitRule {
    fn from_message(v6: bool, msg: &RuleMessage) -> Option<ProhibitRule> {
        if msg.header.action != RuleAction::Prohibit {
            return None;
        }
        let mut rule = ProhibitRule {
            v6,
            priority: 0,
            iif: String::new(),
            mark: 0,
            mask: 0,
        };
        for attr in &msg.attributes {
            match attr {
                RuleAttribute::Priority(p) => rule.priority = *p,
                RuleAttribute::Iifname(name) => rule.iif = name.clone(),
                RuleAttribute::FwMark(m) => rule.mark = *m,
                RuleAttribute::FwMask(m) => rule.mask = *m,
                _ => {}
            }
        }
        Some(rule)
    }

    fn describe(&self) -> String {
        format!(
            "ip{} rule pref {} iif {} fwmark {:#x}/{:#x} prohibit",
            if self.v6 { " -6" } else { "" },
            self.priority,
            self.iif,
            self.mark,
            self.mask
        )
    }
}

/// The kernel's `local` routing table (addresses of this host), consulted by the rule
/// `ip rule pref 0 lookup local` unless it was moved.
const LOCAL_TABLE: u32 = 255;

/// Whether `msg` is a rule that looks every packet up in the `local` table (no selector).
fn is_local_lookup(msg: &RuleMessage) -> bool {
    let table = msg.attributes.iter().find_map(|a| match a {
        RuleAttribute::Table(t) => Some(*t),
        _ => None,
    });
    let selective = msg.attributes.iter().any(|a| {
        matches!(
            a,
            RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::FwMark(_)
                | RuleAttribute::Source(_)
                | RuleAttribute::Destination(_)
        )
    });
    msg.header.action == RuleAction::ToTable
        && table.unwrap_or(u32::from(msg.header.table)) == LOCAL_TABLE
        && !selective
}

fn priority_of(msg: &RuleMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

impl Netlink {
    /// The priorities of the rules that look every packet up in the `local` table (one
    /// family): `[0]` on a host that never moved it.
    pub async fn local_lookup_priorities(&self, v6: bool) -> Result<Vec<u32>, LinkError> {
        let rules = self.rules(v6).await?;
        Ok(rules
            .iter()
            .filter(|m| is_local_lookup(m))
            .map(priority_of)
            .collect())
    }

    /// Every routing rule of one family (`ip [-6] rule`).
    async fn rules(&self, v6: bool) -> Result<Vec<RuleMessage>, LinkError> {
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        let mut stream = self.handle.rule().get(version).execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(nl_err("listing routing rules"))?
        {
            out.push(msg);
        }
        Ok(out)
    }

    /// `ip [-6] rule add pref PRIORITY lookup local`.
    pub async fn add_local_lookup(&self, v6: bool, priority: u32) -> Result<(), LinkError> {
        let request = self
            .handle
            .rule()
            .add()
            .table_id(LOCAL_TABLE)
            .priority(priority)
            .action(RuleAction::ToTable);
        let done = if v6 {
            request.v6().execute().await
        } else {
            request.v4().execute().await
        };
        let what = format!("adding ip rule pref {priority} lookup local");
        done.map_err(nl_err(what))
    }

    /// `ip [-6] rule del pref PRIORITY lookup local`; true if it was there.
    pub async fn delete_local_lookup(&self, v6: bool, priority: u32) -> Result<bool, LinkError> {
        for msg in self.rules(v6).await? {
            if is_local_lookup(&msg) && priority_of(&msg) == priority {
                return match self.handle.rule().del(msg).execute().await {
                    Ok(()) => Ok(true),
                    Err(e) if super::link::is_not_found(&e) => Ok(false),
                    Err(e) => Err(nl_err(format!(
                        "deleting ip rule pref {priority} lookup local"
                    ))(e)),
                };
            }
        }
        Ok(false)
    }

    /// Every `prohibit` rule of one family.
    pub async fn prohibit_rules(&self, v6: bool) -> Result<Vec<ProhibitRule>, LinkError> {
        let rules = self.rules(v6).await?;
        Ok(rules
            .iter()
            .flat_map(|m| ProhibitRule::from_message(v6, m))
            .collect())
    }

    pub async fn add_prohibit_rule(&self, rule: &ProhibitRule) -> Result<(), LinkError> {
        let mut request = self
            .handle
            .rule()
            .add()
            .table_id(0)
            .input_interface(&rule.iif);
        request.message_mut().header.action = RuleAction::Prohibit;
        request.message_mut().attributes.extend([
            RuleAttribute::Priority(rule.priority),
            RuleAttribute::FwMark(rule.mark),
            RuleAttribute::FwMask(rule.mask),
        ]);
        let done = if rule.v6 {
            request.v6().execute().await
        } else {
            request.v4().execute().await
        };
        done.map_err(nl_err(format!("adding {}", rule.describe())))
    }

    /// Deletes the rule; true if it was there.
    pub async fn delete_prohibit_rule(&self, rule: &ProhibitRule) -> Result<bool, LinkError> {
        let version = if rule.v6 {
            IpVersion::V6
        } else {
            IpVersion::V4
        };
        let mut stream = self.handle.rule().get(version).execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(nl_err("listing routing rules"))?
        {
            if ProhibitRule::from_message(rule.v6, &msg).as_ref() == Some(rule) {
                return match self.handle.rule().del(msg).execute().await {
                    Ok(()) => Ok(true),
                    Err(e) if super::link::is_not_found(&e) => Ok(false),
                    Err(e) => Err(nl_err(format!("deleting {}", rule.describe()))(e)),
                };
            }
        }
        Ok(false)
    }
}
