//! A whole Switchyard on loopback for end-to-end tests: mocks, a control
//! plane and one sidecar, all real processes of the `switchyard` binary.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard::cluster::{self, PolicyEndpoint, Proc};
use switchyard_proto::v1 as pb;
use tokio::time::Instant;

pub mod pki;

pub const MODEL: &str = "llama-3-70b";

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub struct Mock {
    pub name: String,
    pub tier: String,
    pub addr: SocketAddr,
    pub proc: Proc,
    /// Serves TLS (started with `--tls-cert`): its URLs are https.
    pub tls: bool,
}

impl Mock {
    pub async fn start(dir: &Path, name: &str, tier: &str, extra: &[&str]) -> Mock {
        let mut a = args(&["mock", "--name", name, "--tier", tier, "--model", MODEL]);
        a.extend(args(extra));
        let (proc, addr) = Proc::spawn_announced(bin(), &a, dir, name)
            .await
            .expect("mock starts");
        Mock {
            name: name.into(),
            tier: tier.into(),
            addr,
            proc,
            tls: extra.contains(&"--tls-cert"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    pub async fn configure(&self, http: &reqwest::Client, patch: serde_json::Value) {
        let r = http
            .post(self.url("/admin/config"))
            .json(&patch)
            .send()
            .await
            .expect("mock admin");
        assert!(
            r.status().is_success(),
            "mock config refused: {}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn stats(&self, http: &reqwest::Client) -> serde_json::Value {
        http.get(self.url("/admin/stats"))
            .send()
            .await
            .expect("mock stats")
            .json()
            .await
            .expect("stats json")
    }

    pub async fn requests(&self, http: &reqwest::Client) -> u64 {
        self.stats(http).await["requests"]
            .as_u64()
            .expect("requests count")
    }
}

/// How a control plane runs, beyond `--listen`, `--policy`, `--state-dir`
/// (`state` in the run directory) and `--reload-ms 100`.
#[derive(Clone, Debug, Default)]
pub struct ControlConfig {
    /// More flags, such as `--interval-ms 200`.
    pub extra: Vec<String>,
    /// Passed as `--admin-token`; a stack's admin calls send it.
    pub admin_token: Option<String>,
}

impl ControlConfig {
    fn flags(&self) -> Vec<String> {
        let mut f = args(&["--reload-ms", "100"]);
        f.extend(self.extra.iter().cloned());
        if let Some(token) = &self.admin_token {
            f.extend(args(&["--admin-token", token]));
        }
        f
    }
}

pub struct Stack {
    pub dir: PathBuf,
    pub mocks: Vec<Mock>,
    pub policy: PathBuf,
    pub control: Proc,
    pub control_addr: SocketAddr,
    pub control_config: ControlConfig,
    pub sidecar: Proc,
    pub sidecar_addr: SocketAddr,
    pub http: reqwest::Client,
}

/// The policy's endpoint lines for `mocks`, each serving `model`, priced
/// (input, output per million tokens) by `price` of the mock's position.
pub fn endpoints_of<'a>(
    mocks: &'a [Mock],
    model: &'a str,
    price: impl Fn(usize) -> (f64, f64),
) -> Vec<PolicyEndpoint<'a>> {
    mocks
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (price_in, price_out) = price(i);
            PolicyEndpoint {
                name: &m.name,
                addr: m.addr,
                tier: &m.tier,
                model,
                price_in,
                price_out,
            }
        })
        .collect()
}

/// A policy over `mocks` with one class whose weights are given by name;
/// prices rise with the mock's position.
pub fn policy_text(mocks: &[Mock], weights: &[(&str, f64)]) -> String {
    let eps = endpoints_of(mocks, MODEL, |i| (i as f64, i as f64 * 2.0));
    cluster::policy_yaml(&eps, weights)
}

impl Stack {
    pub fn policy_text(&self, weights: &[(&str, f64)]) -> String {
        policy_text(&self.mocks, weights)
    }

    /// Mocks `(name, tier, extra mock args)`, the initial weights, and extra
    /// sidecar arguments.
    pub async fn start(
        label: &str,
        mocks: &[(&str, &str, &[&str])],
        weights: &[(&str, f64)],
        sidecar_extra: &[&str],
    ) -> Stack {
        Self::start_with(label, mocks, |m| policy_text(m, weights), sidecar_extra).await
    }

    /// Like `start`, with the policy written by `policy` from the started mocks.
    pub async fn start_with(
        label: &str,
        mocks: &[(&str, &str, &[&str])],
        policy: impl FnOnce(&[Mock]) -> String,
        sidecar_extra: &[&str],
    ) -> Stack {
        let control = ControlConfig::default();
        Self::start_with_control(label, mocks, policy, &control, sidecar_extra).await
    }

    /// Like `start_with`, with the control plane run as `control` says.
    pub async fn start_with_control(
        label: &str,
        mocks: &[(&str, &str, &[&str])],
        policy: impl FnOnce(&[Mock]) -> String,
        control: &ControlConfig,
        sidecar_extra: &[&str],
    ) -> Stack {
        let dir = cluster::run_dir(label).expect("run dir");
        let mut started = Vec::new();
        for (name, tier, extra) in mocks {
            started.push(Mock::start(&dir, name, tier, extra).await);
        }
        let text = policy(&started);
        let policy = dir.join("policy.yaml");
        cluster::write_atomic(&policy, &text).expect("policy");
        let control_config = control.clone();
        let (control, control_addr) =
            start_control_with(&dir, &policy, "127.0.0.1:0", &control_config).await;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(128)
            .build()
            .expect("http client");
        let mut extra = vec!["--id", label];
        extra.extend_from_slice(sidecar_extra);
        let (sidecar, sidecar_addr) =
            cluster::start_sidecar(bin(), &dir, control_addr, &extra, &http)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        Stack {
            dir,
            mocks: started,
            policy,
            control,
            control_addr,
            control_config,
            sidecar,
            sidecar_addr,
            http,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sidecar_addr)
    }

    pub fn mock(&self, name: &str) -> &Mock {
        self.mocks
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no mock {name}"))
    }

    /// The token the control plane's admin API wants, if it wants one.
    pub fn admin_token(&self) -> Option<&str> {
        self.control_config.admin_token.as_deref()
    }

    pub async fn status(&self) -> Option<pb::StatusResponse> {
        status_with(self.control_addr, self.admin_token()).await
    }

    /// The control plane's status; a control plane that does not answer
    /// fails the test, with its log.
    pub async fn expect_status(&self) -> pb::StatusResponse {
        self.status()
            .await
            .unwrap_or_else(|| panic!("no status\n{}", self.control.log_text()))
    }

    /// Polls `check` on fresh status every 50 ms until it returns `Some`;
    /// fails the test, with the last status and the control plane's log,
    /// when `within` passes first.
    pub async fn eventually<T>(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&pb::StatusResponse) -> Option<T>,
    ) -> T {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.status().await {
                if let Some(v) = check(&s) {
                    return v;
                }
                if Instant::now() > end {
                    panic!(
                        "{what}: not within {within:?}\nlast status: {s:#?}\n--- control log:\n{}",
                        log_tail(&self.control.log_text())
                    );
                }
            } else if Instant::now() > end {
                panic!("{what}: no status within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the sidecar routes on `version` or later.
    pub async fn acked(&self, version: u64) {
        self.eventually(
            &format!("sidecar ACK of {version}"),
            Duration::from_secs(20),
            |s| {
                s.sidecars
                    .iter()
                    .any(|c| c.connected && c.acked_version >= version)
                    .then_some(())
            },
        )
        .await;
    }

    /// Waits until the sidecar ACKed the control plane's current version;
    /// returns that version.
    pub async fn wait_acked_above(&self, above: u64) -> u64 {
        wait_acked_above(self.control_addr, self.admin_token(), above).await
    }

    /// Stops the control plane (SIGTERM, SIGKILL after 5 s) and starts it
    /// again on the same address, with the same flags and state directory.
    pub async fn restart_control(&mut self) {
        self.control
            .stop(Duration::from_secs(5))
            .await
            .expect("control stops");
        let listen = self.control_addr.to_string();
        let (control, addr) =
            start_control_with(&self.dir, &self.policy, &listen, &self.control_config).await;
        self.control = control;
        assert_eq!(addr, self.control_addr);
    }

    /// Runs `switchyard admin ARGS --control ADDR` against this control
    /// plane with `token` in `SWITCHYARD_ADMIN_TOKEN`; returns stdout, or
    /// stderr when the command fails.
    pub async fn cli(&self, a: &[&str], token: &str) -> Result<String, String> {
        let mut full = args(&["admin"]);
        full.extend(args(a));
        full.extend(args(&["--control", &self.control_addr.to_string()]));
        let out = tokio::process::Command::new(bin())
            .args(&full)
            .env("SWITCHYARD_ADMIN_TOKEN", token)
            .env("RUST_BACKTRACE", "0")
            .output()
            .await
            .expect("cli runs");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// The sidecar's whole `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of the sidecar's series `name` with exactly `labels`.
    /// A series that is not there fails the test: a renamed metric must
    /// not read as zero.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics_text().await;
        let scrape = parse_metrics(&text);
        let found: Vec<f64> = series(&scrape, name)
            .filter(|s| s.labels.len() == labels.len())
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(value)
            .collect();
        match found[..] {
            [v] => v,
            _ => panic!("no single series {name}{labels:?} in /metrics:\n{text}"),
        }
    }

    /// The sum of every series of `name` whose labels include `labels`.
    /// The metric itself must be declared (a family with no series yet
    /// sums to zero; a missing family fails the test).
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics_text().await;
        let scrape = parse_metrics(&text);
        let declared = text.lines().any(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|t| t.split_whitespace().next())
                .is_some_and(|family| name == family || name.strip_suffix("_total") == Some(family))
        });
        assert!(declared, "{name} is not declared in /metrics:\n{text}");
        series(&scrape, name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(value)
            .sum()
    }

    pub fn chat_body(&self, stream: bool) -> serde_json::Value {
        serde_json::json!({
            "model": MODEL,
            "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        })
    }

    /// Sends one chat completion and reads the whole answer; returns the
    /// status, the endpoint header and the body.
    pub async fn chat(&self, stream: bool) -> (u16, String, String) {
        let r = self
            .http
            .post(self.url("/v1/chat/completions"))
            .json(&self.chat_body(stream))
            .send()
            .await
            .expect("sidecar answers");
        let status = r.status().as_u16();
        let endpoint = header(&r, "x-switchyard-endpoint");
        let body = r.text().await.expect("body");
        (status, endpoint, body)
    }
}

/// A header of `r` as text; empty when it is missing or not text.
pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The last 6000 bytes of a log, for a failure message.
pub fn log_tail(log: &str) -> &str {
    let mut from = log.len().saturating_sub(6000);
    while !log.is_char_boundary(from) {
        from += 1;
    }
    &log[from..]
}

/// The endpoint `name` in a status answer; a missing one fails the test.
pub fn endpoint<'a>(s: &'a pb::StatusResponse, name: &str) -> &'a pb::EndpointStatus {
    s.endpoints
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no endpoint {name} in status"))
}

pub async fn start_control(dir: &Path, policy: &Path, listen: &str) -> (Proc, SocketAddr) {
    start_control_with(dir, policy, listen, &ControlConfig::default()).await
}

pub async fn start_control_with(
    dir: &Path,
    policy: &Path,
    listen: &str,
    config: &ControlConfig,
) -> (Proc, SocketAddr) {
    let flags = config.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    cluster::start_control(bin(), dir, policy, listen, &flags)
        .await
        .expect("control plane starts")
}

pub async fn status(control: SocketAddr) -> Option<pb::StatusResponse> {
    status_with(control, None).await
}

/// The control plane's status, asked with `token` as the bearer token when
/// one is given; `None` when it does not answer or refuses.
pub async fn status_with(control: SocketAddr, token: Option<&str>) -> Option<pb::StatusResponse> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let mut request = tonic::Request::new(pb::StatusRequest {});
    if let Some(token) = token {
        let bearer = format!("Bearer {token}").parse().ok()?;
        request.metadata_mut().insert("authorization", bearer);
    }
    pb::admin_client::AdminClient::new(channel)
        .status(request)
        .await
        .ok()
        .map(|r| r.into_inner())
}

pub async fn wait_acked_above(control: SocketAddr, token: Option<&str>, above: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = status_with(control, token).await {
            if s.table_version > above
                && s.sidecars
                    .iter()
                    .any(|c| c.connected && c.acked_version == s.table_version)
            {
                return s.table_version;
            }
        }
        assert!(
            Instant::now() < end,
            "no ACK of a version above {above} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Parses a `/metrics` page with a Prometheus text parser, strictly: every
/// line is a HELP, TYPE or sample line it understands (or OpenMetrics'
/// `# EOF`), and every sample belongs to a declared family.
pub fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    use prometheus_parse::LineInfo;
    let mut families: Vec<String> = Vec::new();
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Type { metric_name, .. } => families.push(metric_name),
            LineInfo::Sample { metric_name, .. } => assert!(
                families.iter().any(|f| metric_name.starts_with(f.as_str())),
                "sample of an undeclared family: {line}"
            ),
            LineInfo::Doc { .. } | LineInfo::Empty => {}
            LineInfo::Ignored => assert_eq!(line, "# EOF", "unparsed /metrics line: {line:?}"),
        }
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("metrics parse")
}

fn series<'a>(
    s: &'a prometheus_parse::Scrape,
    name: &'a str,
) -> impl Iterator<Item = &'a prometheus_parse::Sample> {
    s.samples.iter().filter(move |x| x.metric == name)
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{} is not a single value: {other:?}", s.metric),
    }
}

/// What the mock `mock` says it produced for completion `id`.
pub async fn mock_content(http: &reqwest::Client, mock: &Mock, id: &str) -> String {
    let v: serde_json::Value = http
        .get(mock.url(&format!("/admin/completions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["content"]
        .as_str()
        .unwrap_or_else(|| panic!("mock has no completion {id}: {v}"))
        .to_string()
}

/// An independent OpenAI client (async-openai) at `base` (`.../v1`) gets,
/// streamed and not, exactly the 40 tokens `mock` produced (the mock must
/// run with `--output-tokens 40`), with usage.
pub async fn openai_client_round_trip(base: &str, mock: &Mock, http: &reqwest::Client) {
    use async_openai::config::OpenAIConfig;
    use async_openai::types::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };
    use futures::StreamExt;

    let client = async_openai::Client::with_config(
        OpenAIConfig::new()
            .with_api_base(base)
            .with_api_key("app-key-not-for-providers"),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say something")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();

    let r = client
        .chat()
        .create(request.clone())
        .await
        .expect("non-streamed answer");
    let content = r.choices[0].message.content.clone().expect("content");
    assert_eq!(content, mock_content(http, mock, &r.id).await);
    assert_eq!(content.split(' ').count(), 40);
    assert_eq!(r.usage.expect("usage").completion_tokens, 40);

    let mut stream = client
        .chat()
        .create_stream(request)
        .await
        .expect("stream opens");
    let mut streamed = String::new();
    let mut id = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk parses");
        id = chunk.id.clone();
        chunks += 1;
        if let Some(c) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            streamed.push_str(&c);
        }
    }
    assert!(chunks > 40, "streamed chunk by chunk, got {chunks} chunks");
    assert_eq!(streamed, mock_content(http, mock, &id).await);
    assert_eq!(streamed.split(' ').count(), 40);
}

/// The model ids `GET {base}/v1/models` lists, in order.
pub async fn listed_models(http: &reqwest::Client, base: &str) -> Vec<String> {
    let v: serde_json::Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not a model list: {v}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `/readyz`'s status and text; status 0 while nothing listens there.
pub async fn readyz(http: &reqwest::Client, addr: SocketAddr) -> (u16, String) {
    match http.get(format!("http://{addr}/readyz")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}
