//! Spend budgets per endpoint: which endpoints spent their hourly budget.
//! Pure: the spend comes from the ledger (`store`), summed over every
//! sidecar's reports, so a budget is one budget for the fleet, not one per
//! replica.
//!
//! Enforcement lags spend by the telemetry period plus one computation and
//! one push (about two seconds with the defaults): requests started in that
//! time still run, so a budget can be overshot by that much traffic.

use std::collections::BTreeMap;

use switchyard_policy::Policy;

/// Endpoint → why it is over budget, for every endpoint with a budget
/// whose spend over the last hour reached it.
pub fn over_budget(
    policy: &Policy,
    spent_last_hour: &BTreeMap<String, f64>,
) -> BTreeMap<String, String> {
    policy
        .endpoints
        .iter()
        .filter_map(|e| {
            let budget = e.budget_usd_per_hour?;
            let spent = spent_last_hour.get(&e.name).copied().unwrap_or(0.0);
            (spent >= budget).then(|| {
                (
                    e.name.clone(),
                    format!("spent ${spent:.4} of its ${budget:.4} budget in the last hour"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_endpoints_with_a_budget_they_reached_are_over() {
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
        let over = over_budget(&p, &spent);
        assert_eq!(over.keys().collect::<Vec<_>>(), ["a"]);
        assert!(
            over["a"].contains("$2.0000 of its $2.0000"),
            "{}",
            over["a"]
        );
        assert!(over_budget(&p, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_budget_must_be_positive() {
        let e = Policy::parse(
            "\
default_class: standard
endpoints:
  - { name: a, url: 'http://127.0.0.1:1', tier: onprem, models: [m], price: { input_per_mtok: 1, output_per_mtok: 1 }, budget_usd_per_hour: 0 }
classes:
  - { name: standard }
",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("endpoints[0].budget_usd_per_hour"), "{e}");
    }
}
