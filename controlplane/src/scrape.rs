//! Scrapes on-prem vLLM servers' Prometheus pages for what only the server
//! knows: requests waiting in its queue, requests running, and KV-cache use.
//! Endpoints opt in with `metrics_url` in the policy.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::publish::{now_ms, Published};
use crate::signals::{Aggregator, Queue};

const TIMEOUT: Duration = Duration::from_secs(1);

/// Reads the vLLM gauges out of Prometheus text. Gauges with several label
/// sets (one per model) are summed; KV-cache use is averaged. Both the old
/// (`gpu_cache_usage_perc`) and new (`kv_cache_usage_perc`) names count.
pub fn parse(text: &str) -> Option<Queue> {
    let (mut waiting, mut running) = (None::<f64>, None::<f64>);
    let (mut kv_sum, mut kv_n) = (0.0, 0u32);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, rest)) = line
            .find(['{', ' ', '\t'])
            .and_then(|i| line.split_at_checked(i))
        else {
            continue;
        };
        // Label values may hold spaces; the value follows the closing brace.
        let rest = match rest.rsplit_once('}') {
            Some((_, value)) if rest.starts_with('{') => value,
            _ => rest,
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        match name {
            "vllm:num_requests_waiting" => *waiting.get_or_insert(0.0) += value,
            "vllm:num_requests_running" => *running.get_or_insert(0.0) += value,
            "vllm:gpu_cache_usage_perc" | "vllm:kv_cache_usage_perc" => {
                kv_sum += value;
                kv_n += 1;
            }
            _ => {}
        }
    }
    let waiting = waiting?;
    Some(Queue {
        waiting,
        running: running.unwrap_or(0.0),
        kv_cache: (kv_n > 0).then(|| kv_sum / f64::from(kv_n)),
    })
}

/// Scrapes every endpoint with a `metrics_url` each `every`, until the
/// process ends. A failed scrape is logged at debug level and the old value
/// ages out of the signals on its own.
pub async fn run(
    tables: watch::Receiver<Arc<Published>>,
    aggregator: Arc<Mutex<Aggregator>>,
    every: Duration,
) {
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client; vLLM metrics will not be scraped");
            return;
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets: Vec<(String, String)> = tables
            .borrow()
            .policy
            .endpoints
            .iter()
            .filter_map(|e| e.metrics_url.clone().map(|u| (e.name.clone(), u)))
            .collect();
        if targets.is_empty() {
            continue;
        }
        let scrapes = targets.into_iter().map(|(name, url)| {
            let client = client.clone();
            async move {
                let text = async {
                    client
                        .get(&url)
                        .send()
                        .await?
                        .error_for_status()?
                        .text()
                        .await
                }
                .await;
                (name, url, text)
            }
        });
        for (name, url, text) in futures::future::join_all(scrapes).await {
            match text.map(|t| parse(&t)) {
                Ok(Some(q)) => aggregator.lock().set_queue(&name, q, now_ms()),
                Ok(None) => {
                    tracing::debug!(endpoint = %name, %url, "no vLLM queue gauges on the metrics page")
                }
                Err(e) => tracing::debug!(endpoint = %name, %url, error = %e, "scrape failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_gauges_are_read_across_label_sets() {
        let text = r#"
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama 3"} 3.0
vllm:num_requests_waiting{engine="1",model_name="llama 3"} 2
vllm:num_requests_running{model_name="x"} 7 1712345678
vllm:gpu_cache_usage_perc{model_name="x"} 0.5
vllm:kv_cache_usage_perc{model_name="y"} 0.7
vllm:num_requests_waiting_total 99
"#;
        let q = parse(text).unwrap();
        assert_eq!(q.waiting, 5.0);
        assert_eq!(q.running, 7.0);
        assert!((q.kv_cache.unwrap() - 0.6).abs() < 1e-9);
        assert!(parse("up 1\n").is_none(), "not a vLLM page");
        assert_eq!(parse("vllm:num_requests_waiting 0\n").unwrap().waiting, 0.0);
    }
}
