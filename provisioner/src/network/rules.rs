//! The host-side nftables table of one provisioner: what orders may reach, and their NAT.
//!
//! The whole table is a function of the configuration and the orders' links, so it is always
//! replaced as one transaction (`add`, `delete`, then the new table) and never edited rule by
//! rule: a reconcile that finds anything missing or changed just writes it again. Every rule
//! carries the hash of the table it belongs to, which is how a reconcile tells an intact table
//! from one someone edited by hand without parsing nft's own rendering of expressions.

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{self, Chain, NfListObject, Nftables, Rule, Set, SetType, SetTypeValue};
use nftables::stmt::{JumpTarget, Limit, Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::config::{NetRule, NetworkConfig, DENIED_RANGES, DENIED_TCP_PORTS};
use super::link::OrderLink;

const FAMILY: NfFamily = NfFamily::INet;

/// A chain: its name, its hook (with type and priority) if it is a base chain, its rules.
type ChainSpec = (
    &'static str,
    Option<(NfHook, NfChainType, i32)>,
    Vec<Vec<Statement<'static>>>,
);

/// The desired table: its name and the objects that make it.
pub struct Table {
    pub name: String,
    /// Hash of everything below; the comment on every rule.
    pub generation: String,
    objects: Vec<NfListObject<'static>>,
    rule_count: usize,
}

fn s(v: impl Into<String>) -> Cow<'static, str> {
    Cow::Owned(v.into())
}

fn str_expr(v: impl Into<String>) -> Expression<'static> {
    Expression::String(s(v))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn field(protocol: &str, name: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: s(protocol),
            field: s(name),
        },
    )))
}

fn is(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn cidr(net: &ipnet::Ipv4Net) -> Expression<'static> {
    if net.prefix_len() == 32 {
        str_expr(net.addr().to_string())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(str_expr(net.network().to_string())),
            len: u32::from(net.prefix_len()),
        }))
    }
}

fn ct_state(states: &[&str]) -> Statement<'static> {
    is(
        Expression::Named(NamedExpression::CT(nftables::expr::CT {
            key: s("state"),
            family: None,
            dir: None,
        })),
        Operator::IN,
        Expression::List(states.iter().map(|st| str_expr(*st)).collect()),
    )
}

fn goto(chain: &str) -> Statement<'static> {
    Statement::Goto(JumpTarget { target: s(chain) })
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

/// `meta l4proto {tcp, udp} th dport {ports}`; nothing for an empty port list.
fn ports_match(ports: &[u16]) -> Vec<Statement<'static>> {
    if ports.is_empty() {
        return Vec::new();
    }
    vec![
        is(
            meta(MetaKey::L4proto),
            Operator::IN,
            Expression::Named(NamedExpression::Set(vec![
                nftables::expr::SetItem::Element(str_expr("tcp")),
                nftables::expr::SetItem::Element(str_expr("udp")),
            ])),
        ),
        is(
            field("th", "dport"),
            Operator::IN,
            Expression::Named(NamedExpression::Set(
                ports
                    .iter()
                    .map(|p| nftables::expr::SetItem::Element(Expression::Number(u32::from(*p))))
                    .collect(),
            )),
        ),
    ]
}

fn sp_rule(rule: &NetRule, verdict: Statement<'static>) -> Vec<Statement<'static>> {
    let mut expr = vec![is(field("ip", "daddr"), Operator::EQ, cidr(&rule.cidr))];
    expr.extend(ports_match(&rule.ports));
    expr.push(verdict);
    expr
}

impl Table {
    /// The table for `links` (every order that holds a container) under `config`.
    pub fn build(
        name: &str,
        config: &NetworkConfig,
        dns: &[std::net::Ipv4Addr],
        links: &[OrderLink],
    ) -> Table {
        let mut chains: Vec<ChainSpec> = Vec::new();
        let orders_in = |ifkey| is(meta(ifkey), Operator::EQ, str_expr("@orders"));

        // Nothing an order sends is for the host itself: every address the host has, so every
        // service listening on 0.0.0.0, is refused.
        chains.push((
            "input",
            Some((NfHook::Input, NfChainType::Filter, 0)),
            vec![
                vec![
                    orders_in(MetaKey::Iifname),
                    ct_state(&["established", "related"]),
                    accept(),
                ],
                vec![orders_in(MetaKey::Iifname), goto("refuse")],
            ],
        ));
        // Into an order only replies go; out of an order, the egress policy.
        chains.push((
            "forward",
            Some((NfHook::Forward, NfChainType::Filter, 0)),
            vec![
                vec![
                    orders_in(MetaKey::Oifname),
                    ct_state(&["established", "related"]),
                    accept(),
                ],
                vec![orders_in(MetaKey::Oifname), goto("refuse")],
                vec![
                    orders_in(MetaKey::Iifname),
                    Statement::Jump(JumpTarget {
                        target: s("egress"),
                    }),
                ],
            ],
        ));
        let mut egress = vec![
            // IPv6 is off inside containers; nothing of it leaves.
            vec![
                is(meta(MetaKey::Nfproto), Operator::EQ, str_expr("ipv6")),
                goto("refuse"),
            ],
            // Each link carries only its own container's address: a tenant that binds or
            // forges another (IP_FREEBIND needs no privilege) is dropped.
            vec![
                is(
                    Expression::Named(NamedExpression::Concat(vec![
                        meta(MetaKey::Iifname),
                        field("ip", "saddr"),
                    ])),
                    Operator::NEQ,
                    str_expr("@sources"),
                ),
                Statement::Drop(None),
            ],
        ];
        if let Some(rate) = config.egress_bytes_per_sec {
            let rate = u32::try_from(rate).unwrap_or(u32::MAX);
            for link in links {
                egress.push(vec![
                    is(
                        meta(MetaKey::Iifname),
                        Operator::EQ,
                        str_expr(link.host_if.clone()),
                    ),
                    // No explicit burst: for byte limits the kernel's bucket holds the rate
                    // plus the burst, so the rate alone is already one second's worth.
                    Statement::Limit(Limit {
                        rate,
                        rate_unit: Some(s("bytes")),
                        per: Some(s("second")),
                        burst: None,
                        burst_unit: None,
                        inv: Some(true),
                    }),
                    Statement::Drop(None),
                ]);
            }
        }
        egress.push(vec![ct_state(&["established", "related"]), accept()]);
        // The resolvers are reachable on port 53 even when they sit on the SP's LAN.
        let mut dns_rule = vec![is(field("ip", "daddr"), Operator::EQ, str_expr("@dns"))];
        dns_rule.extend(ports_match(&[53]));
        dns_rule.push(accept());
        egress.push(dns_rule);
        for rule in &config.deny {
            egress.push(sp_rule(rule, goto("refuse")));
        }
        for rule in &config.allow {
            egress.push(sp_rule(rule, accept()));
        }
        egress.push(vec![
            is(field("ip", "daddr"), Operator::EQ, str_expr("@denied")),
            goto("refuse"),
        ]);
        egress.push(vec![
            is(meta(MetaKey::L4proto), Operator::EQ, str_expr("tcp")),
            is(
                field("th", "dport"),
                Operator::IN,
                Expression::Named(NamedExpression::Set(
                    DENIED_TCP_PORTS
                        .iter()
                        .map(|p| {
                            nftables::expr::SetItem::Element(Expression::Number(u32::from(*p)))
                        })
                        .collect(),
                )),
            ),
            goto("refuse"),
        ]);
        egress.push(vec![accept()]);
        chains.push(("egress", None, egress));
        // A refusal is immediate: a reset for TCP, "administratively prohibited" otherwise, so
        // a denied destination fails fast instead of hanging.
        chains.push((
            "refuse",
            None,
            vec![
                vec![
                    is(meta(MetaKey::L4proto), Operator::EQ, str_expr("tcp")),
                    Statement::Reject(Some(Reject {
                        _type: Some(RejectType::TCPReset),
                        expr: None,
                    })),
                ],
                vec![Statement::Reject(Some(Reject {
                    _type: Some(RejectType::ICMPX),
                    expr: Some(nftables::types::RejectCode::AdminProhibited),
                }))],
            ],
        ));
        chains.push((
            "nat",
            Some((NfHook::Postrouting, NfChainType::NAT, 100)),
            vec![vec![
                is(field("ip", "saddr"), Operator::EQ, cidr(&config.subnet)),
                is(meta(MetaKey::Oifname), Operator::NEQ, str_expr("@orders")),
                Statement::Masquerade(None),
            ]],
        ));

        // Interval sets refuse overlapping elements: the subnet joins only when no built-in
        // range holds it already.
        let mut ranges: Vec<ipnet::Ipv4Net> = DENIED_RANGES
            .iter()
            .map(|(net, _)| net.parse().expect("built-in ranges parse"))
            .collect();
        if !ranges.iter().any(|r| r.contains(&config.subnet)) {
            ranges.push(config.subnet);
        }
        let ranges = ipnet::Ipv4Net::aggregate(&ranges);
        let denied: Vec<Expression<'static>> = ranges.iter().map(cidr).collect();
        let sets: Vec<(&str, SetTypeValue<'static>, bool, Vec<Expression<'static>>)> = vec![
            (
                "orders",
                SetTypeValue::Single(SetType::Ifname),
                false,
                links.iter().map(|l| str_expr(l.host_if.clone())).collect(),
            ),
            (
                "sources",
                SetTypeValue::Concatenated(Cow::Owned(vec![SetType::Ifname, SetType::Ipv4Addr])),
                false,
                links
                    .iter()
                    .map(|l| {
                        Expression::Named(NamedExpression::Concat(vec![
                            str_expr(l.host_if.clone()),
                            str_expr(l.container_addr.to_string()),
                        ]))
                    })
                    .collect(),
            ),
            (
                "dns",
                SetTypeValue::Single(SetType::Ipv4Addr),
                false,
                dns.iter().map(|a| str_expr(a.to_string())).collect(),
            ),
            (
                "denied",
                SetTypeValue::Single(SetType::Ipv4Addr),
                true,
                denied,
            ),
        ];

        // The generation: a hash of the rules and sets as they will be written.
        let fingerprint = serde_json::to_string(&(
            chains.iter().map(|(n, _, r)| (n, r)).collect::<Vec<_>>(),
            sets.iter().map(|(n, _, _, e)| (n, e)).collect::<Vec<_>>(),
        ))
        .expect("rules serialize");
        let generation = crate::short_hash(fingerprint.as_bytes(), 16);

        let mut objects = vec![NfListObject::Table(schema::Table {
            family: FAMILY,
            name: s(name),
            handle: None,
        })];
        for (set_name, set_type, interval, elems) in sets {
            objects.push(NfListObject::Set(Box::new(Set {
                family: FAMILY,
                table: s(name),
                name: s(set_name),
                set_type,
                flags: interval.then(|| HashSet::from([schema::SetFlag::Interval])),
                elem: (!elems.is_empty()).then(|| Cow::Owned(elems)),
                ..Default::default()
            })));
        }
        let mut rule_count = 0;
        for (chain, hook, _) in &chains {
            objects.push(NfListObject::Chain(Chain {
                family: FAMILY,
                table: s(name),
                name: s(*chain),
                _type: hook.map(|h| h.1),
                hook: hook.map(|h| h.0),
                prio: hook.map(|h| h.2),
                policy: hook.map(|_| NfChainPolicy::Accept),
                ..Default::default()
            }));
        }
        for (chain, _, rules) in chains {
            for expr in rules {
                rule_count += 1;
                objects.push(NfListObject::Rule(Rule {
                    family: FAMILY,
                    table: s(name),
                    chain: s(chain),
                    expr: Cow::Owned(expr),
                    comment: Some(s(generation.clone())),
                    ..Default::default()
                }));
            }
        }
        Table {
            name: name.to_string(),
            generation,
            objects,
            rule_count,
        }
    }

    /// One transaction that replaces whatever table of this name exists with this one.
    pub fn replacing(&self) -> Nftables<'static> {
        let mut batch = Batch::new();
        let table = || {
            NfListObject::Table(schema::Table {
                family: FAMILY,
                name: s(self.name.clone()),
                handle: None,
            })
        };
        batch.add(table());
        batch.delete(table());
        for obj in &self.objects {
            batch.add(obj.clone());
        }
        batch.to_nftables()
    }

    /// Removes the table: one transaction that cannot fail because it is absent.
    pub fn removing(name: &str) -> Nftables<'static> {
        let mut batch = Batch::new();
        let table = || {
            NfListObject::Table(schema::Table {
                family: FAMILY,
                name: s(name.to_string()),
                handle: None,
            })
        };
        batch.add(table());
        batch.delete(table());
        batch.to_nftables()
    }

    /// Whether `current` (the kernel's listing of this table) is exactly this generation:
    /// every rule there, none added, all tagged with it.
    pub fn matches(&self, current: &Nftables<'_>) -> bool {
        let mut rules = 0;
        for obj in current.objects.iter() {
            if let schema::NfObject::ListObject(NfListObject::Rule(r)) = obj {
                if r.comment.as_deref() != Some(self.generation.as_str()) {
                    return false;
                }
                rules += 1;
            }
        }
        rules == self.rule_count && self.sets_match(current)
    }

    fn sets_match(&self, current: &Nftables<'_>) -> bool {
        let want = |name: &str| {
            self.objects.iter().find_map(|o| match o {
                NfListObject::Set(set) if set.name == name => {
                    Some(set.elem.as_ref().map_or(0, |e| e.len()))
                }
                _ => None,
            })
        };
        let mut seen = 0;
        for obj in current.objects.iter() {
            if let schema::NfObject::ListObject(NfListObject::Set(set)) = obj {
                // Interval sets hold aggregated prefixes, which nft lists back one for one.
                let have = set.elem.as_ref().map_or(0, |e| e.len());
                match want(&set.name) {
                    Some(n) if n == have => seen += 1,
                    _ => return false,
                }
            }
        }
        seen == 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(n: u32) -> Vec<OrderLink> {
        let cfg = NetworkConfig::default();
        (0..n)
            .map(|slot| {
                let (host_addr, container_addr) = cfg.link_addresses(slot);
                OrderLink {
                    host_if: format!("sh123456-{slot}"),
                    host_addr,
                    container_addr,
                }
            })
            .collect()
    }

    fn sample() -> Table {
        let cfg = NetworkConfig {
            allow: vec![NetRule {
                cidr: "192.168.1.20/32".parse().unwrap(),
                ports: vec![80, 443],
            }],
            deny: vec![NetRule {
                cidr: "198.51.100.0/24".parse().unwrap(),
                ports: vec![],
            }],
            egress_bytes_per_sec: Some(1_000_000),
            ..NetworkConfig::default()
        };
        Table::build(
            "shale_test",
            &cfg,
            &["10.255.255.53".parse().unwrap()],
            &links(2),
        )
    }

    #[test]
    fn the_generation_changes_with_the_orders_and_the_config() {
        let a = sample();
        let cfg = NetworkConfig::default();
        let b = Table::build("shale_test", &cfg, &[], &links(2));
        let c = Table::build("shale_test", &cfg, &[], &links(3));
        assert_ne!(a.generation, b.generation);
        assert_ne!(b.generation, c.generation);
        assert_eq!(
            b.generation,
            Table::build("shale_test", &cfg, &[], &links(2)).generation
        );
    }

    /// nft itself accepts the table (`--check` applies nothing); needs root and nftables.
    #[test]
    fn nft_accepts_the_table() {
        let ok = std::process::Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !(ok && nix::unistd::geteuid().is_root()) {
            eprintln!("SKIPPED: needs root and nftables");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI has root and nftables"
            );
            return;
        }
        let json = serde_json::to_string(&sample().replacing()).unwrap();
        let out = nftables::helper::apply_ruleset_raw(&json, None::<&str>, ["-c"]);
        assert!(out.is_ok(), "{out:?}\n{json}");
    }
}
