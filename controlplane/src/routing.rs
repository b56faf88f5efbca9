//! Turns a policy into the routing table sidecars apply. Pure: no I/O, no
//! clock; the caller supplies the version.
//!
//! Weights come from the policy here: a class's explicit `weights`, or equal
//! weights over its first allowed tier that has endpoints. Its fallback chain
//! lists every endpoint the class may use, by tier order, then price.

use switchyard_proto::v1 as pb;

use crate::policy::{Policy, Tier};

fn tier_pb(t: Tier) -> pb::Tier {
    match t {
        Tier::Onprem => pb::Tier::Onprem,
        Tier::Burst => pb::Tier::Burst,
        Tier::Fallback => pb::Tier::Fallback,
    }
}

pub fn table(policy: &Policy, version: u64) -> pb::RoutingTable {
    let endpoints = policy
        .endpoints
        .iter()
        .map(|e| pb::Endpoint {
            name: e.name.clone(),
            url: e.url.clone(),
            api: pb::ApiKind::Openai as i32,
            tier: tier_pb(e.tier) as i32,
            models: e.models.clone(),
            price_input_per_mtok: e.price.input_per_mtok,
            price_output_per_mtok: e.price.output_per_mtok,
            capacity: e.capacity,
        })
        .collect();
    let tier_rank = |t: Tier| policy.tiers.iter().position(|x| *x == t);
    let classes = policy
        .classes
        .iter()
        .map(|c| {
            let mut allowed: Vec<_> = policy
                .endpoints
                .iter()
                .filter(|e| c.allows(e.tier) && tier_rank(e.tier).is_some())
                .collect();
            allowed.sort_by(|a, b| {
                tier_rank(a.tier)
                    .cmp(&tier_rank(b.tier))
                    .then(a.price.output_per_mtok.total_cmp(&b.price.output_per_mtok))
            });
            let routes = match &c.weights {
                Some(w) => w
                    .iter()
                    .map(|(name, weight)| pb::Route {
                        endpoint: name.clone(),
                        weight: *weight,
                    })
                    .collect(),
                None => {
                    let first = allowed.first().map(|e| e.tier);
                    allowed
                        .iter()
                        .filter(|e| Some(e.tier) == first)
                        .map(|e| pb::Route {
                            endpoint: e.name.clone(),
                            weight: 1.0,
                        })
                        .collect()
                }
            };
            pb::RequestClass {
                name: c.name.clone(),
                routes,
                fallback: allowed.iter().map(|e| e.name.clone()).collect(),
                ttft_timeout_ms: c.ttft_timeout_ms,
                deadline_ms: c.deadline_ms,
                priority: c.priority,
                hedge: c.hedge,
                retry_ratio: c.retry_budget.as_ref().map_or(0.2, |r| r.ratio),
                retry_min_per_second: c.retry_budget.as_ref().map_or(10, |r| r.min_per_second),
                inter_token_timeout_ms: c.inter_token_timeout_ms.unwrap_or(0),
                degrade: c.degrade.as_ref().map(|d| pb::Degrade {
                    action: Some(match (&d.model, d.max_tokens, &d.reject) {
                        (Some(m), _, _) => pb::degrade::Action::Model(m.clone()),
                        (_, Some(n), _) => pb::degrade::Action::MaxTokens(n),
                        (_, _, r) => pb::degrade::Action::Reject(r.clone().unwrap_or_default()),
                    }),
                }),
            }
        })
        .collect();
    pb::RoutingTable {
        version,
        endpoints,
        classes,
        default_class: policy.default_class.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
default_class: standard
endpoints:
  - { name: f, url: 'http://127.0.0.1:3', tier: fallback, models: [m], price: { input_per_mtok: 5, output_per_mtok: 5 } }
  - { name: b2, url: 'http://127.0.0.1:2', tier: burst, models: [m], price: { input_per_mtok: 3, output_per_mtok: 3 } }
  - { name: b1, url: 'http://127.0.0.1:4', tier: burst, models: [m], price: { input_per_mtok: 1, output_per_mtok: 1 } }
  - { name: o, url: 'http://127.0.0.1:1', tier: onprem, models: [m], price: { input_per_mtok: 0, output_per_mtok: 0 } }
classes:
  - { name: standard }
  - { name: offprem, tiers: [burst, fallback] }
";

    #[test]
    fn default_weights_go_to_the_first_tier_and_fallback_follows_tier_then_price() {
        let p = Policy::parse(POLICY).unwrap();
        let t = table(&p, 7);
        assert_eq!(t.version, 7);
        let std = &t.classes[0];
        assert_eq!(std.routes.len(), 1);
        assert_eq!(std.routes[0].endpoint, "o");
        assert_eq!(std.fallback, ["o", "b1", "b2", "f"]);
        let off = &t.classes[1];
        let routed: Vec<_> = off.routes.iter().map(|r| r.endpoint.as_str()).collect();
        assert_eq!(routed, ["b1", "b2"]);
        assert_eq!(off.fallback, ["b1", "b2", "f"]);
    }
}
