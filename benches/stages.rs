//! Microbench of the request path's pure stages, on a table of 50
//! endpoints: admission (the preferred endpoints' facts and the decision),
//! the first pick (weighted power of two choices), the next attempt after
//! a failure, and reading a typical request body. Each should take well
//! under a microsecond. `cargo bench --bench stages`.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard_dataplane::metrics::Metrics;
use switchyard_dataplane::request::{admit, pick};
use switchyard_dataplane::table::{Live, Table};
use switchyard_proto::v1 as pb;

const ENDPOINTS: usize = 50;

fn table() -> Table {
    let endpoints: Vec<pb::Endpoint> = (0..ENDPOINTS)
        .map(|i| pb::Endpoint {
            name: format!("ep-{i}"),
            url: format!("http://127.0.0.1:{}", 10_000 + i),
            api: pb::ApiKind::Openai as i32,
            tier: [pb::Tier::Onprem, pb::Tier::Burst, pb::Tier::Fallback][i % 3] as i32,
            models: vec!["m".into()],
            price_input_per_mtok: i as f64,
            price_output_per_mtok: i as f64,
            capacity: 64,
            ..Default::default()
        })
        .collect();
    let names: Vec<String> = endpoints.iter().map(|e| e.name.clone()).collect();
    let t = pb::RoutingTable {
        version: 1,
        classes: vec![pb::RequestClass {
            name: "standard".into(),
            routes: names
                .iter()
                .enumerate()
                .map(|(i, n)| pb::Route {
                    endpoint: n.clone(),
                    weight: 1.0 + (i % 7) as f64,
                })
                .collect(),
            fallback: names.clone(),
            ttft_timeout_ms: 5000,
            deadline_ms: 30_000,
            ..Default::default()
        }],
        default_class: "standard".into(),
        weights_ttl_ms: 0,
        endpoints,
    };
    let addrs: HashMap<String, SocketAddr> = t
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                e.name.clone(),
                SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
            )
        })
        .collect();
    Table::compile(&t, &addrs, &Live::default(), &Metrics::new()).expect("table compiles")
}

fn stages(c: &mut Criterion) {
    let table = table();
    let (class, route) = table
        .route(None, "m", switchyard_wire::operation::Operation::Chat)
        .expect("route");
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "stream": true,
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant that answers briefly."},
            {"role": "user", "content": "What is the capital of France, and why is it famous?"},
        ],
    }))
    .expect("json");

    c.bench_function("intake: read and check a chat request", |b| {
        b.iter(|| switchyard_wire::chat::parse(black_box(&body)).map(|r| r.messages))
    });
    c.bench_function("admit: 50-endpoint route", |b| {
        b.iter(|| {
            let now = Instant::now();
            let p = admit::preferred(black_box(route), now);
            let room = admit::room(route, now);
            matches!(
                admit::admit(p, class.degrade.as_ref(), false, room),
                admit::Admit::Go
            )
        })
    });
    c.bench_function("pick: first of 50 weighted endpoints", |b| {
        let now = pick::Now {
            at: Instant::now(),
            may_exceed_spend: false,
        };
        let mut u = 0.0f64;
        b.iter(|| {
            u = (u + 0.618_033_988_7) % 1.0;
            pick::first(
                route.choice.as_ref(),
                &route.chain,
                [u, 1.0 - u, u],
                black_box(&now),
            )
            .map(|e| e.id)
        })
    });
    c.bench_function("pick: next attempt after a failure", |b| {
        let now = pick::Now {
            at: Instant::now(),
            may_exceed_spend: false,
        };
        let failed = &route.chain[0];
        let mut tried = pick::Tried::default();
        tried.push(failed.id);
        b.iter(|| {
            match pick::next_attempt(
                failed,
                false,
                false,
                &tried,
                &route.chain,
                false,
                black_box(&now),
            ) {
                pick::Next::Fallback(e) | pick::Next::Reconnect(e) | pick::Next::Wait(e) => e.id,
                pick::Next::Stop(_) => usize::MAX,
            }
        })
    });
}

criterion_group!(benches, stages);
criterion_main!(benches);
