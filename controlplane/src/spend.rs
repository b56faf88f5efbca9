//! Spend budgets per endpoint: which endpoints spent their hourly spend
//! budget (`budget_usd_per_hour`). Pure: the spend comes from the ledger
//! (`store`), summed over every sidecar's reports, so a spend budget is one
//! for the fleet, not one per replica.
//!
//! Enforcement lags spend by the telemetry period plus one computation and
//! one push (about two seconds with the defaults): requests started in that
//! time still run, so a spend budget can be overshot by that much traffic.

use std::collections::BTreeMap;

use switchyard_policy::Policy;

/// Endpoint → why it is over its spend budget, for every endpoint with a
/// spend budget that its spend over the last hour reached.
pub fn over_spend_budget(
    policy: &Policy,
    spent_last_hour: &BTreeMap<String, f64>,
) -> BTreeMap<String, String> {
    policy
        .endpoints
        .iter()
        .filter_map(|e| {
            let cap_usd = e.budget_usd_per_hour?;
            let spent = spent_last_hour.get(&e.name).copied().unwrap_or(0.0);
            (spent >= cap_usd).then(|| {
                (
                    e.name.clone(),
                    format!("spent ${spent:.4} of its ${cap_usd:.4} budget in the last hour"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_endpoints_that_reached_their_spend_budget_are_over() {
        let p = Policy::parse(
            "\
default_class: standard
endpoints:
  - { name: a, url: 'http://127.0.0.1:1', tier: onprem, models: [m], price: { input_per_mtok: 1, output_per_mtok: 1 }, budget_usd_per_hour: 2 }
  - { name: b, url: 'http://127.0.0.1:2', tier: burst, models: [m], price: { input_per_mtok: 1, output_per_mtok: 1 }, budget_usd_per_hour: 5 }
  - { name: c, url: 'http://127.0.0.1:3', tier: burst, models: [m], price: { input_per_mtok: 1, output_per_mtok: 1 } }
classes:
  - { name: standard }
",
        )
        .unwrap();
        let spent: BTreeMap<String, f64> =
            [("a".into(), 2.0), ("b".into(), 4.99), ("c".into(), 1e9)].into();
        let over = over_spend_budget(&p, &spent);
        assert_eq!(over.keys().collect::<Vec<_>>(), ["a"]);
        assert!(
            over["a"].contains("$2.0000 of its $2.0000"),
            "{}",
            over["a"]
        );
        assert!(over_spend_budget(&p, &BTreeMap::new()).is_empty());
    }
}
