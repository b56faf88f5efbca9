//! Renders a policy and a decision into the routing table sidecars apply.
//! Pure: no I/O, no clock; the caller supplies the version.
//!
//! Every endpoint of the policy is listed (killed ones too: listing routes
//! nothing); each class carries the decision's weights and fallback chain,
//! which never name a killed, drained or forbidden endpoint. An unroutable
//! class goes out with neither, so the sidecar refuses its requests with a
//! clear error instead of sending them anywhere.

use switchyard_policy::{ApiKind, Policy, Tier};
use switchyard_proto::v1 as pb;

use crate::weights::Decision;

fn api_pb(a: ApiKind) -> pb::ApiKind {
    match a {
        ApiKind::Openai => pb::ApiKind::Openai,
        ApiKind::Azure => pb::ApiKind::Azure,
        ApiKind::Anthropic => pb::ApiKind::Anthropic,
    }
}

fn tier_pb(t: Tier) -> pb::Tier {
    match t {
        Tier::Onprem => pb::Tier::Onprem,
        Tier::Burst => pb::Tier::Burst,
        Tier::Fallback => pb::Tier::Fallback,
    }
}

pub fn table(policy: &Policy, decision: &Decision, version: u64) -> pb::RoutingTable {
    let endpoints = policy
        .endpoints
        .iter()
        .map(|e| pb::Endpoint {
            name: e.name.clone(),
            url: e.url.clone(),
            api: api_pb(e.api) as i32,
            api_version: match e.api {
                ApiKind::Azure => e.azure_api_version().to_string(),
                ApiKind::Openai | ApiKind::Anthropic => String::new(),
            },
            tier: tier_pb(e.tier) as i32,
            models: e.models.iter().cloned().collect(),
            model_ids: e
                .models
                .mapped()
                .map(|(l, id)| (l.clone(), id.clone()))
                .collect(),
            price_input_per_mtok: e.price.input_per_mtok,
            price_output_per_mtok: e.price.output_per_mtok,
            price_cached_input_per_mtok: e.price.cached_input_per_mtok,
            price_cache_write_input_per_mtok: e.price.cache_write_input_per_mtok,
            credential: e.credential.clone().unwrap_or_default(),
            ca_file: e.ca_file.clone().unwrap_or_default(),
            client_cert: e.client_cert.clone().unwrap_or_default(),
            client_key: e.client_key.clone().unwrap_or_default(),
            capacity: e.capacity,
            over_budget: decision.over_spend_budget.contains_key(&e.name),
        })
        .collect();
    let classes = policy
        .classes
        .iter()
        .map(|c| {
            let d = decision.classes.get(&c.name);
            pb::RequestClass {
                name: c.name.clone(),
                routes: d.map_or_else(Vec::new, |d| {
                    d.routes
                        .iter()
                        .map(|(endpoint, weight)| pb::Route {
                            endpoint: endpoint.clone(),
                            weight: *weight,
                        })
                        .collect()
                }),
                fallback: d.map_or_else(Vec::new, |d| d.fallback.clone()),
                ttft_timeout_ms: c.ttft_timeout_ms,
                deadline_ms: c.deadline_ms,
                priority: c.priority,
                hedge: c.hedge,
                retry_ratio: c.retry_budget.as_ref().map_or(0.2, |r| r.ratio),
                retry_min_per_second: c.retry_budget.as_ref().map_or(10, |r| r.min_per_second),
                inter_token_timeout_ms: c.inter_token_timeout_ms.unwrap_or(0),
                default_max_tokens: c.default_max_tokens,
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
        weights_ttl_ms: policy.routing.weights_ttl_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Signals;
    use crate::weights::{self, Switches};

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

    fn cold(p: &Policy, sw: &Switches) -> Decision {
        weights::decide(p, sw, &Signals::default(), &Decision::default())
    }

    #[test]
    fn a_cold_table_goes_to_the_first_tier_and_fallback_follows_tier_then_price() {
        let p = Policy::parse(POLICY).unwrap();
        let t = table(&p, &cold(&p, &Switches::default()), 7);
        assert_eq!(t.version, 7);
        assert_eq!(t.endpoints.len(), 4);
        let std = &t.classes[0];
        let heaviest = std
            .routes
            .iter()
            .max_by(|a, b| a.weight.total_cmp(&b.weight))
            .unwrap();
        assert_eq!(heaviest.endpoint, "o");
        assert_eq!(std.fallback, ["o", "b1", "b2", "f"]);
        let off = &t.classes[1];
        assert!(
            off.routes.iter().all(|r| r.endpoint != "o"),
            "tier not allowed"
        );
        assert_eq!(off.fallback, ["b1", "b2", "f"]);
    }
}
