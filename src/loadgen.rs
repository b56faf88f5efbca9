//! An open-loop load generator for the benches: requests leave at a fixed
//! rate whatever earlier ones did, and each one's latency counts from its
//! scheduled time, so a stall shows up in the numbers instead of hiding as
//! coordinated omission. [`burst`] instead sends many requests at once, to
//! hold that many streams open together.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// One request's fate.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was due, from the start of the run.
    pub due: Duration,
    /// Latency from its due time to the last byte of the answer.
    pub latency: Duration,
    /// HTTP status; 0 when the connection failed.
    pub status: u16,
    /// `x-switchyard-endpoint`, when present.
    pub endpoint: Option<String>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// POSTs `body` to `url` at `rate` per second for `length`; returns every
/// sample, ordered by due time.
pub async fn open_loop(
    http: &reqwest::Client,
    url: &str,
    body: Arc<Vec<u8>>,
    rate: u64,
    length: Duration,
) -> Vec<Sample> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let n = rate * length.as_millis() as u64 / 1000;
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate.max(1));
        tokio::time::sleep_until(due).await;
        let (http, url, body, samples) =
            (http.clone(), url.to_string(), body.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let (status, endpoint) = async {
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_vec())
                    .send()
                    .await
                    .ok()?;
                let status = r.status().as_u16();
                let endpoint = r
                    .headers()
                    .get("x-switchyard-endpoint")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                r.bytes().await.ok()?;
                Some((status, endpoint))
            }
            .await
            .unwrap_or((0, None));
            let latency = due.elapsed();
            samples.lock().push(Sample {
                due: due - start,
                latency,
                status,
                endpoint,
            });
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut out = std::mem::take(&mut *samples.lock());
    out.sort_by_key(|s| s.due);
    out
}

/// One request of a [`burst`], timed from the burst's start.
#[derive(Debug, Clone)]
pub struct Held {
    /// HTTP status; 0 when the connection failed.
    pub status: u16,
    /// When the answer's headers arrived (the stream was open from then on).
    pub headers: Duration,
    /// When its last byte arrived, or it failed.
    pub done: Duration,
}

impl Held {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// POSTs `body` to `url` `n` times at once and reads every answer to its
/// end; returns each request's timing, in no particular order.
pub async fn burst(http: &reqwest::Client, url: &str, body: Arc<Vec<u8>>, n: usize) -> Vec<Held> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (http, url, body) = (http.clone(), url.to_string(), body.clone());
            tokio::spawn(async move {
                let mut headers = None;
                let status = async {
                    let r = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.to_vec())
                        .send()
                        .await
                        .ok()?;
                    headers = Some(start.elapsed());
                    let status = r.status().as_u16();
                    r.bytes().await.ok()?;
                    Some(status)
                }
                .await
                .unwrap_or(0);
                let done = start.elapsed();
                Held {
                    status,
                    headers: headers.unwrap_or(done),
                    done,
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(h) = t.await {
            out.push(h);
        }
    }
    out
}

/// The most answered requests that were open at one time: streams between
/// their headers and their last byte.
pub fn max_open(held: &[Held]) -> usize {
    let mut edges: Vec<(Duration, i64)> = held
        .iter()
        .filter(|h| h.ok())
        .flat_map(|h| [(h.headers, 1), (h.done, -1)])
        .collect();
    // At equal times, closes count before opens: touching is not overlapping.
    edges.sort();
    let (mut open, mut most) = (0i64, 0i64);
    for (_, d) in edges {
        open += d;
        most = most.max(open);
    }
    most.max(0) as usize
}
