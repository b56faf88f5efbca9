//! The policy file: endpoints, request classes and tier order, parsed from
//! YAML and validated with errors that name the field and its line.
//!
//! One entry point, [`Policy::parse`], takes any text and returns either a
//! valid policy or a [`PolicyError`]; it never panics, so a fuzzer can call
//! it on anything. The crate has no I/O (but for reading a provider key,
//! `CredentialRef::read_key`, and an endpoint's TLS files, `tls::load` and
//! [`Policy::check_files`], when a caller asks) and no gRPC, database or
//! runtime dependency: the control plane, a standalone sidecar or a fuzz
//! target can all use it cheaply.
#![forbid(unsafe_code)]

pub mod address;
pub mod credential;
pub mod tls;

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;

pub use address::EndpointUrl;
pub use credential::CredentialRef;

/// An endpoint's models: logical names, as apps ask for them, each with
/// the endpoint's own id for it (the same name when the policy lists them
/// plainly). In the policy's order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Models(Vec<(String, String)>);

impl Models {
    /// The logical names.
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(logical, _)| logical)
    }

    pub fn contains(&self, logical: &str) -> bool {
        self.iter().any(|m| m == logical)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The endpoint's own id for `logical`, when it differs from it.
    pub fn mapped(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0
            .iter()
            .filter(|(l, id)| l != id)
            .map(|(l, id)| (l, id))
    }

    /// Every (logical, id) pair.
    pub fn pairs(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(l, id)| (l, id))
    }
}

impl<'de> Deserialize<'de> for Models {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "a list of model names, or a map from the name apps use to the endpoint's own id"
        )]
        enum Form {
            List(Vec<String>),
            Map(serde_yaml::Mapping),
        }
        Ok(Models(match Form::deserialize(d)? {
            Form::List(names) => names.into_iter().map(|n| (n.clone(), n)).collect(),
            Form::Map(map) => {
                let mut pairs = Vec::with_capacity(map.len());
                for (k, v) in map {
                    match (k, v) {
                        (serde_yaml::Value::String(k), serde_yaml::Value::String(v)) => {
                            pairs.push((k, v))
                        }
                        _ => {
                            return Err(serde::de::Error::custom(
                                "each model maps a name to an id, both strings",
                            ))
                        }
                    }
                }
                pairs
            }
        }))
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Onprem,
    Burst,
    Fallback,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Onprem => "onprem",
            Tier::Burst => "burst",
            Tier::Fallback => "fallback",
        }
    }
}

/// The API an endpoint speaks. Apps always speak OpenAI's; the sidecar
/// translates for the others.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ApiKind {
    /// OpenAI's API, passed through (OpenAI, vLLM, SGLang, TGI, llama.cpp,
    /// Ollama and the rest).
    Openai,
    /// Azure OpenAI: deployment paths with `api-version`, the `api-key`
    /// header; the models an endpoint lists (or maps to) are deployments.
    Azure,
    /// Anthropic's Messages API, translated both ways. Chat only.
    Anthropic,
}

/// The `anthropic-version` header the sidecar (and the probes) send.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The Azure OpenAI `api-version` used when an endpoint names none.
pub const AZURE_API_VERSION: &str = "2024-10-21";

impl ApiKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKind::Openai => "openai",
            ApiKind::Azure => "azure",
            ApiKind::Anthropic => "anthropic",
        }
    }

    /// The header that carries a provider key, and its value for `key`.
    pub fn credential_header(self, key: &str) -> (&'static str, String) {
        match self {
            ApiKind::Openai => ("authorization", format!("Bearer {key}")),
            ApiKind::Azure => ("api-key", key.to_string()),
            ApiKind::Anthropic => ("x-api-key", key.to_string()),
        }
    }

    /// Headers every request to such an endpoint carries.
    pub fn fixed_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ApiKind::Anthropic => &[("anthropic-version", ANTHROPIC_VERSION)],
            ApiKind::Openai | ApiKind::Azure => &[],
        }
    }

    /// Whether it offers legacy completions and embeddings (Anthropic's
    /// API has neither).
    pub fn offers_completions_and_embeddings(self) -> bool {
        !matches!(self, ApiKind::Anthropic)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Prompt tokens read from the provider's prompt cache; the input price
    /// when absent.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
    /// Prompt tokens written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`, billed above the input price); the
    /// input price when absent.
    #[serde(default)]
    pub cache_write_input_per_mtok: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    #[serde(default = "default_api")]
    pub api: ApiKind,
    pub tier: Tier,
    /// The models it serves: a list of names (the endpoint knows them by
    /// the names apps use), or a map from the logical name apps use to the
    /// endpoint's own id for it (`chat-large: meta-llama/Llama-3.1-70B-Instruct`).
    pub models: Models,
    pub price: Price,
    /// Concurrent requests; 0 when unknown.
    #[serde(default)]
    pub capacity: u32,
    /// Who runs the endpoint; a kill switch can name a provider to stop all
    /// of its endpoints at once.
    #[serde(default)]
    pub provider: Option<String>,
    /// Prometheus text endpoint of a vLLM server, scraped for queue depth
    /// (`vllm:num_requests_waiting`) and KV-cache use.
    #[serde(default)]
    pub metrics_url: Option<String>,
    /// The endpoint's spend budget: a cap over any rolling hour, in USD,
    /// summed over every sidecar. Past it the endpoint is over its spend
    /// budget: it takes traffic only when nothing within its spend budget
    /// can, and classes degrade (see `degrade`).
    #[serde(default)]
    pub budget_usd_per_hour: Option<f64>,
    /// Where each sidecar finds the provider key: `env:NAME` or
    /// `file:/path`. A reference only; the key never passes through here.
    #[serde(default)]
    pub credential: Option<String>,
    /// What the control plane's health probes ask for with `GET`, under
    /// `url` (as the chat path is): `/v1/models` when absent. Must cost no
    /// tokens; a path such as `/health` on vLLM.
    #[serde(default)]
    pub health_path: Option<String>,
    /// Azure OpenAI only: the `api-version` query parameter;
    /// [`AZURE_API_VERSION`] when absent.
    #[serde(default)]
    pub api_version: Option<String>,
    /// https only: a PEM bundle of CA certificates, the endpoint's only
    /// trust anchors instead of the system's (an on-prem server behind an
    /// internal CA). A path each sidecar reads, as a `file:` credential.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// https only: a PEM client certificate (chain, leaf first) the sidecar
    /// presents to the endpoint (mutual TLS); needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// https only: the PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
}

impl Endpoint {
    /// The Azure `api-version` this endpoint is called with.
    pub fn azure_api_version(&self) -> &str {
        self.api_version.as_deref().unwrap_or(AZURE_API_VERSION)
    }

    /// What health probes ask for under `url`: the policy's `health_path`,
    /// else the model list of the endpoint's API, which costs no tokens.
    pub fn probe_path(&self) -> String {
        match (&self.health_path, self.api) {
            (Some(p), _) => p.clone(),
            (None, ApiKind::Openai | ApiKind::Anthropic) => "/v1/models".into(),
            (None, ApiKind::Azure) => {
                format!("/openai/models?api-version={}", self.azure_api_version())
            }
        }
    }

    /// The TLS files it names.
    pub fn tls_paths(&self) -> tls::TlsPaths<'_> {
        tls::TlsPaths {
            ca_file: self.ca_file.as_deref(),
            client_cert: self.client_cert.as_deref(),
            client_key: self.client_key.as_deref(),
        }
    }
}

fn default_api() -> ApiKind {
    ApiKind::Openai
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Class {
    pub name: String,
    /// Tiers this class may use; all of them when absent.
    #[serde(default)]
    pub tiers: Option<Vec<Tier>>,
    #[serde(default = "default_ttft_ms")]
    pub ttft_timeout_ms: u32,
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u32,
    /// SLA: the p95 time to first token an endpoint must be predicted to
    /// meet to get this class's traffic. Absent: `ttft_timeout_ms`.
    #[serde(default)]
    pub ttft_p95_ms: Option<u32>,
    /// SLA: the error rate above which an endpoint is taken out for this
    /// class.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// Latency-sensitive: among endpoints of close cost, prefer low RTT.
    #[serde(default)]
    pub interactive: bool,
    /// Models the class may be served; any when absent. Endpoints serving
    /// none of them get none of the class's traffic.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Static weights by endpoint name. Absent: equal weights over the
    /// class's first tier (in the policy's tier order) that has endpoints.
    #[serde(default)]
    pub weights: Option<BTreeMap<String, f64>>,
    /// Longest gap between two streamed chunks; the sidecar default when absent.
    #[serde(default)]
    pub inter_token_timeout_ms: Option<u32>,
    /// Load shedding order: lower priorities are refused first.
    #[serde(default)]
    pub priority: u32,
    /// Hedge slow first tokens with a second endpoint.
    #[serde(default)]
    pub hedge: bool,
    /// The class's retry budget: how many retries it may add.
    #[serde(default)]
    pub retry_budget: Option<RetryBudget>,
    /// What to do when none of the class's weighted endpoints is healthy and
    /// within its spend budget.
    #[serde(default)]
    pub degrade: Option<Degrade>,
    /// `max_tokens` sent to endpoints that require one (Anthropic's) when
    /// the app sets none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
}

fn default_max_tokens() -> u32 {
    4096
}

/// A class's retry budget: retries may add `ratio` of recent requests plus
/// `min_per_second`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    #[serde(default = "default_retry_ratio")]
    pub ratio: f64,
    #[serde(default = "default_retry_min")]
    pub min_per_second: u32,
}

fn default_retry_ratio() -> f64 {
    0.2
}

fn default_retry_min() -> u32 {
    10
}

/// Exactly one of: serve with a smaller `model`, cap `max_tokens`, or
/// `reject` with a reason.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Degrade {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub reject: Option<String>,
}

fn default_ttft_ms() -> u32 {
    10_000
}

fn default_deadline_ms() -> u32 {
    120_000
}

fn default_max_error_rate() -> f64 {
    0.1
}

/// How the control plane turns telemetry into weights. Every field has a
/// default, so the block is optional.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Routing {
    /// Sliding window of telemetry the weights are computed from.
    pub window_ms: u32,
    /// Requests an endpoint needs in the window before its latency and error
    /// rate are judged; with fewer it is given the benefit of the doubt.
    pub min_requests: u32,
    /// Utilisation (in-flight / capacity) up to which a tier is filled before
    /// traffic overflows to the next one.
    pub burst_utilisation: f64,
    /// Scraped `vllm:num_requests_waiting` per endpoint above which it counts
    /// as full, whatever its capacity says. Absent: queue depth is shown but
    /// not acted on.
    pub burst_queue_depth: Option<f64>,
    /// Share of a class's traffic given to each standby endpoint so its
    /// signals stay fresh; 0 turns exploration off.
    pub exploration: f64,
    /// The most any weight moves in one computation.
    pub max_step: f64,
    /// Moves smaller than this are not made, so noise does not churn tables.
    pub hysteresis: f64,
    /// First ejection of an endpoint that breaks a class's SLA lasts this long;
    /// each repeat doubles it, up to `max_ejection_ms`.
    pub min_ejection_ms: u32,
    pub max_ejection_ms: u32,
    /// Endpoints whose blended prices are within this fraction of each other
    /// count as equally cheap (and interactive classes order them by RTT).
    pub cost_tolerance: f64,
    /// How long sidecars trust pushed weights once the control plane is
    /// away; past it they balance by their own signals over the same
    /// endpoints. 0: forever.
    pub weights_ttl_ms: u32,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            window_ms: 10_000,
            min_requests: 10,
            burst_utilisation: 0.8,
            burst_queue_depth: None,
            exploration: 0.02,
            max_step: 0.1,
            hysteresis: 0.02,
            min_ejection_ms: 10_000,
            max_ejection_ms: 120_000,
            cost_tolerance: 0.1,
            weights_ttl_ms: 60_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Failover order of the tiers.
    #[serde(default = "default_tiers")]
    pub tiers: Vec<Tier>,
    pub default_class: String,
    pub endpoints: Vec<Endpoint>,
    pub classes: Vec<Class>,
    #[serde(default)]
    pub routing: Routing,
}

fn default_tiers() -> Vec<Tier> {
    vec![Tier::Onprem, Tier::Burst, Tier::Fallback]
}

/// A policy error: what is wrong, at which field, on which line (1-based,
/// when it can be located).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct PolicyError {
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl Policy {
    pub fn parse(src: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = serde_yaml::from_str(src).map_err(|e| {
            let line = e.location().map(|l| l.line());
            // serde_yaml prefixes the message with the path ("endpoints[1].tier: ..").
            let msg = e.to_string();
            let (field, message) = match msg.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
                _ => ("policy".to_string(), msg),
            };
            let message = match message.rsplit_once(" at line ") {
                Some((m, _)) => m.to_string(),
                None => message,
            };
            PolicyError {
                field,
                line,
                message,
            }
        })?;
        policy.validate().map_err(|(field, message)| PolicyError {
            line: locate(src, &field),
            field,
            message,
        })?;
        Ok(policy)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: String, msg: String| Err((field, msg));
        let mut seen = HashSet::new();
        for t in &self.tiers {
            if !seen.insert(*t) {
                return err("tiers".into(), format!("{} is listed twice", t.as_str()));
            }
        }
        if self.endpoints.is_empty() {
            return err("endpoints".into(), "at least one endpoint is needed".into());
        }
        let mut names = HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let at = |f: &str| format!("endpoints[{i}].{f}");
            if e.name.trim().is_empty() {
                return err(at("name"), "must not be empty".into());
            }
            if !names.insert(e.name.as_str()) {
                return err(
                    at("name"),
                    format!("{:?} is used by another endpoint", e.name),
                );
            }
            let url = match EndpointUrl::parse(&e.url) {
                Ok(u) => u,
                Err(m) => return err(at("url"), m),
            };
            if let Err((f, m)) = check_tls_fields(e, url.tls) {
                return err(at(f), m);
            }
            if !self.tiers.contains(&e.tier) {
                return err(
                    at("tier"),
                    format!("{} is not in the policy's tiers", e.tier.as_str()),
                );
            }
            if e.models.is_empty()
                || e.models
                    .pairs()
                    .any(|(m, id)| m.trim().is_empty() || id.trim().is_empty())
            {
                return err(
                    at("models"),
                    "must list at least one non-empty model".into(),
                );
            }
            if e.provider.as_ref().is_some_and(|p| p.trim().is_empty()) {
                return err(at("provider"), "must not be empty".into());
            }
            if let Some(c) = &e.credential {
                if let Err(m) = CredentialRef::parse(c) {
                    return err(at("credential"), m);
                }
            }
            if let Some(m) = &e.metrics_url {
                if let Err(msg) = check_url(m) {
                    return err(at("metrics_url"), msg);
                }
            }
            if let Some(h) = &e.health_path {
                if let Err(msg) = check_health_path(h) {
                    return err(at("health_path"), msg);
                }
            }
            if let Err((f, m)) = check_api(e) {
                return err(at(f), m);
            }
            for (f, v) in [
                ("price.input_per_mtok", Some(e.price.input_per_mtok)),
                ("price.output_per_mtok", Some(e.price.output_per_mtok)),
                ("price.cached_input_per_mtok", e.price.cached_input_per_mtok),
                (
                    "price.cache_write_input_per_mtok",
                    e.price.cache_write_input_per_mtok,
                ),
            ] {
                let Some(v) = v else { continue };
                if !v.is_finite() || v < 0.0 {
                    return err(at(f), format!("must be a non-negative number, got {v}"));
                }
            }
            if let Some(b) = e.budget_usd_per_hour {
                if !b.is_finite() || b <= 0.0 {
                    return err(
                        at("budget_usd_per_hour"),
                        format!("must be a positive number, got {b}"),
                    );
                }
            }
        }
        let mut classes = HashSet::new();
        for (i, c) in self.classes.iter().enumerate() {
            let at = |f: &str| format!("classes[{i}].{f}");
            if !classes.insert(c.name.as_str()) {
                return err(at("name"), format!("{:?} is used by another class", c.name));
            }
            if c.default_max_tokens == 0 {
                return err(at("default_max_tokens"), "must be positive".into());
            }
            if c.ttft_timeout_ms == 0 || c.deadline_ms == 0 {
                return err(at("deadline_ms"), "timeouts must be positive".into());
            }
            if c.ttft_timeout_ms > c.deadline_ms {
                return err(
                    at("ttft_timeout_ms"),
                    format!(
                        "{} ms is longer than the deadline ({} ms)",
                        c.ttft_timeout_ms, c.deadline_ms
                    ),
                );
            }
            if c.ttft_p95_ms == Some(0) {
                return err(at("ttft_p95_ms"), "must be positive".into());
            }
            if !(c.max_error_rate > 0.0 && c.max_error_rate <= 1.0) {
                return err(
                    at("max_error_rate"),
                    format!("must be within (0, 1], got {}", c.max_error_rate),
                );
            }
            if let Some(models) = &c.models {
                if models.is_empty() {
                    return err(at("models"), "must list at least one model".into());
                }
                if let Some(m) = models
                    .iter()
                    .find(|m| !self.endpoints.iter().any(|e| e.models.contains(m)))
                {
                    return err(at("models"), format!("no endpoint serves {m:?}"));
                }
            }
            if let Some(tiers) = &c.tiers {
                if let Some(t) = tiers.iter().find(|t| !self.tiers.contains(t)) {
                    return err(
                        at("tiers"),
                        format!("{} is not in the policy's tiers", t.as_str()),
                    );
                }
            }
            if let Some(r) = &c.retry_budget {
                if !r.ratio.is_finite() || !(0.0..=10.0).contains(&r.ratio) {
                    return err(
                        at("retry_budget.ratio"),
                        format!("must be within [0, 10], got {}", r.ratio),
                    );
                }
            }
            if let Some(d) = &c.degrade {
                let set = [
                    d.model.is_some(),
                    d.max_tokens.is_some(),
                    d.reject.is_some(),
                ];
                if set.iter().filter(|x| **x).count() != 1 {
                    return err(
                        at("degrade"),
                        "set exactly one of model, max_tokens, reject".into(),
                    );
                }
                if let Some(m) = &d.model {
                    let served = self
                        .endpoints
                        .iter()
                        .any(|e| c.allows(e.tier) && e.models.contains(m));
                    if !served {
                        return err(
                            at("degrade.model"),
                            format!("no endpoint this class may use serves {m:?}"),
                        );
                    }
                }
                if d.max_tokens == Some(0) {
                    return err(at("degrade.max_tokens"), "must be positive".into());
                }
            }
            if let Some(w) = &c.weights {
                for (name, v) in w {
                    let field = format!("classes[{i}].weights.{name}");
                    let Some(e) = self.endpoints.iter().find(|e| &e.name == name) else {
                        return err(field, format!("no endpoint is named {name:?}"));
                    };
                    if !c.allows(e.tier) {
                        return err(
                            field,
                            format!("endpoint's tier {} is not allowed", e.tier.as_str()),
                        );
                    }
                    if !v.is_finite() || *v < 0.0 {
                        return err(field, format!("must be a non-negative number, got {v}"));
                    }
                }
                if w.values().all(|v| *v == 0.0) {
                    return err(at("weights"), "at least one weight must be positive".into());
                }
            }
        }
        self.routing.validate()?;
        if !classes.contains(self.default_class.as_str()) {
            return err(
                "default_class".into(),
                format!("no class is named {:?}", self.default_class),
            );
        }
        Ok(())
    }
}

impl Class {
    pub fn allows(&self, tier: Tier) -> bool {
        self.tiers.as_ref().is_none_or(|t| t.contains(&tier))
    }

    /// Whether the class may be sent to `e` at all: its tier and models.
    pub fn may_use(&self, e: &Endpoint) -> bool {
        self.allows(e.tier)
            && self
                .models
                .as_ref()
                .is_none_or(|ms| ms.iter().any(|m| e.models.contains(m)))
    }

    /// The p95 TTFT the class's endpoints must meet, in milliseconds.
    pub fn ttft_target_ms(&self) -> u32 {
        self.ttft_p95_ms.unwrap_or(self.ttft_timeout_ms)
    }
}

impl Routing {
    fn validate(&self) -> Result<(), (String, String)> {
        let at = |f: &str| format!("routing.{f}");
        let within = |f: &str, v: f64, lo: f64, hi: f64| {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                Err((at(f), format!("must be within [{lo}, {hi}], got {v}")))
            }
        };
        if self.window_ms < 1000 {
            return Err((at("window_ms"), "must be at least 1000 (one report)".into()));
        }
        if self.burst_utilisation <= 0.0 {
            return Err((at("burst_utilisation"), "must be positive".into()));
        }
        within("burst_utilisation", self.burst_utilisation, 0.0, 1.0)?;
        if let Some(q) = self.burst_queue_depth {
            within("burst_queue_depth", q, 0.0, 1e9)?;
        }
        within("exploration", self.exploration, 0.0, 0.2)?;
        within("max_step", self.max_step, 0.001, 1.0)?;
        within("hysteresis", self.hysteresis, 0.0, 0.5)?;
        if self.hysteresis >= self.max_step {
            return Err((
                at("hysteresis"),
                format!(
                    "must be smaller than max_step ({}), or weights never move",
                    self.max_step
                ),
            ));
        }
        within("cost_tolerance", self.cost_tolerance, 0.0, 10.0)?;
        if self.weights_ttl_ms != 0 && self.weights_ttl_ms < 1000 {
            return Err((
                at("weights_ttl_ms"),
                "must be 0 (never expire) or at least 1000: a shorter TTL expires between two reconnects".into(),
            ));
        }
        if self.min_ejection_ms == 0 || self.min_ejection_ms > self.max_ejection_ms {
            return Err((
                at("min_ejection_ms"),
                format!(
                    "must be positive and at most max_ejection_ms ({})",
                    self.max_ejection_ms
                ),
            ));
        }
        Ok(())
    }
}

/// What can be known of an endpoint's TLS files without reading them:
/// named only for https, absolute paths (the sidecars read them, from
/// wherever they run), client certificate and key together.
fn check_tls_fields(e: &Endpoint, https: bool) -> Result<(), (&'static str, String)> {
    for (f, v) in [
        ("ca_file", &e.ca_file),
        ("client_cert", &e.client_cert),
        ("client_key", &e.client_key),
    ] {
        let Some(path) = v else { continue };
        if !https {
            return Err((
                f,
                "only an https endpoint uses TLS files; its url is http".into(),
            ));
        }
        if !path.starts_with('/') {
            return Err((
                f,
                format!("{path:?} must be an absolute path (each sidecar reads it)"),
            ));
        }
    }
    match (&e.client_cert, &e.client_key) {
        (Some(_), None) => Err((
            "client_cert",
            "needs client_key: mutual TLS takes both".into(),
        )),
        (None, Some(_)) => Err((
            "client_key",
            "needs client_cert: mutual TLS takes both".into(),
        )),
        _ => Ok(()),
    }
}

/// A TLS file the control plane could not read, so only the sidecars
/// check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unchecked {
    pub field: String,
    pub reason: String,
}

impl Policy {
    /// Reads the TLS files every endpoint names and checks them as the
    /// sidecars will (`tls::load`), so a file they would refuse is refused
    /// here, with its field and line, before any table names it. A file
    /// absent or unreadable here (it may live beside the sidecars only) is
    /// returned as unchecked instead. `src` is the policy's text, for lines.
    pub fn check_files(&self, src: &str) -> Result<Vec<Unchecked>, PolicyError> {
        let mut unchecked = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let paths = e.tls_paths();
            if !paths.any() {
                continue;
            }
            // Each file alone first, so one the control plane cannot read
            // does not keep the others unchecked.
            let single = [
                tls::TlsPaths {
                    ca_file: paths.ca_file,
                    ..Default::default()
                },
                tls::TlsPaths {
                    client_cert: paths.client_cert,
                    client_key: paths.client_key,
                    ..Default::default()
                },
            ];
            for p in single.iter().filter(|p| p.any()) {
                match tls::load(p) {
                    Ok(_) => {}
                    Err(err) if err.unreadable_here() => unchecked.push(Unchecked {
                        field: format!("endpoints[{i}].{}", err.field()),
                        reason: err.to_string(),
                    }),
                    Err(err) => {
                        let field = format!("endpoints[{i}].{}", err.field());
                        return Err(PolicyError {
                            line: locate(src, &field),
                            field,
                            message: err.to_string(),
                        });
                    }
                }
            }
        }
        Ok(unchecked)
    }
}

fn check_url(raw: &str) -> Result<(), String> {
    let u = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("scheme must be http or https, got {}", u.scheme()));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(())
}

/// A health path is appended to the endpoint's URL as it stands, so it is
/// a plain absolute path: no scheme or host (probes go to the endpoint
/// itself), no query or fragment, nothing a URL would have to escape.
/// What an endpoint's API kind asks of the rest of its fields: an Azure
/// endpoint's models are deployment names, which go into its URL path, and
/// its `api-version` into the query; no other kind has an `api-version`.
fn check_api(e: &Endpoint) -> Result<(), (&'static str, String)> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match e.api {
        ApiKind::Azure => {
            if let Some(v) = &e.api_version {
                if !plain(v) {
                    return Err(("api_version", format!("{v:?} is not an api-version")));
                }
            }
            if let Some((_, d)) = e.models.pairs().find(|(_, d)| !plain(d)) {
                return Err((
                    "models",
                    format!(
                        "{d:?} cannot be an Azure deployment name (letters, digits, '-', '_', '.')"
                    ),
                ));
            }
        }
        ApiKind::Openai | ApiKind::Anthropic => {
            if e.api_version.is_some() {
                return Err((
                    "api_version",
                    format!(
                        "only azure endpoints have one, this one is {}",
                        e.api.as_str()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_health_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.starts_with("//") {
        return Err(format!("{p:?} must be an absolute path such as /health"));
    }
    if p.contains(['?', '#']) {
        return Err("must not have a query or fragment".into());
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not hold spaces or control characters".into());
    }
    if p.contains("/chat/") || p.contains("/completions") || p.contains("/embeddings") {
        return Err(format!(
            "{p:?} looks like an inference route; probes must cost no tokens"
        ));
    }
    Ok(())
}

/// Finds the line of a dotted field path (`classes[1].weights.a`) in
/// block-style YAML by walking keys and list items by indentation. Returns
/// the deepest line it could reach; `None` only when not even the top key
/// is found.
pub fn locate(src: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = src.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let meaningful = |l: &str| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with('#')
    };
    // Lines `from..to`, numbered from 0.
    let span = |from: usize, to: usize| lines.iter().copied().enumerate().take(to).skip(from);
    // The block being searched: [start, end) lines and the minimum indent.
    let (mut start, mut end, mut min_indent) = (0usize, lines.len(), 0usize);
    let mut found = None;
    for seg in path.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let key_colon = format!("{key}:");
        // A key not found (say, inside a flow mapping `price: { ... }`)
        // leaves the line of its parent.
        let Some((key_line, key_text)) = span(start, end).find(|&(_, l)| {
            meaningful(l)
                && indent(l) >= min_indent
                && l.trim_start()
                    .trim_start_matches("- ")
                    .starts_with(&key_colon)
        }) else {
            return found;
        };
        found = Some(key_line + 1);
        let key_indent = indent(key_text);
        let block_end = span(key_line + 1, end)
            .find(|&(_, l)| meaningful(l) && indent(l) <= key_indent)
            .map_or(end, |(i, _)| i);
        start = key_line + 1;
        end = block_end;
        min_indent = key_indent + 1;
        if let Some(n) = index {
            let items: Vec<(usize, &str)> = span(start, end)
                .filter(|(_, l)| l.trim_start().starts_with("- "))
                .collect();
            let Some(&(_, first)) = items.first() else {
                return found;
            };
            let item_indent = indent(first);
            let mut items = items
                .into_iter()
                .filter(|&(_, l)| indent(l) == item_indent)
                .map(|(i, _)| i)
                .skip(n);
            let Some(item) = items.next() else {
                return found;
            };
            found = Some(item + 1);
            end = items.next().unwrap_or(end);
            start = item;
            min_indent = item_indent;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
default_class: standard
endpoints:
  - name: a
    url: http://127.0.0.1:9001
    tier: onprem
    models: [m]
    price: { input_per_mtok: 0.1, output_per_mtok: 0.2 }
  - name: b
    url: http://127.0.0.1:9002
    tier: burst
    models: [m]
    price: { input_per_mtok: 1.0, output_per_mtok: 2.0 }
classes:
  - name: standard
    weights:
      a: 1
      b: 0
";

    #[test]
    fn a_good_policy_parses() {
        let p = Policy::parse(GOOD).expect("valid");
        assert_eq!(p.endpoints.len(), 2);
        assert_eq!(p.classes[0].deadline_ms, 120_000);
    }

    #[test]
    fn api_kinds_check_their_own_fields_with_field_and_line() {
        let azure = GOOD.replace(
            "    tier: burst\n",
            "    tier: burst\n    api: azure\n    api_version: 2024-10-21\n",
        );
        let p = Policy::parse(&azure).unwrap();
        assert_eq!(p.endpoints[1].api, ApiKind::Azure);
        assert_eq!(
            p.endpoints[1].probe_path(),
            "/openai/models?api-version=2024-10-21"
        );
        assert_eq!(p.endpoints[0].probe_path(), "/v1/models");
        // A deployment name goes into the URL path.
        let bad = azure.replace(
            "models: [m]\n    price: { input_per_mtok: 1.0",
            "models: { m: my/deploy }\n    price: { input_per_mtok: 1.0",
        );
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("endpoints[1].models", Some(13))
        );
        let bad = azure.replace("2024-10-21", "2024 10 21");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("endpoints[1].api_version", Some(12))
        );
        // Only Azure endpoints have an api-version.
        let bad = azure.replace("api: azure", "api: anthropic");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("endpoints[1].api_version", Some(12))
        );
        let bad = GOOD.replace("tier: burst", "tier: burst\n    api: bedrock");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("endpoints[1].api", Some(11)));
        assert_eq!(
            ApiKind::Anthropic.credential_header("k"),
            ("x-api-key", "k".to_string())
        );
        assert!(!ApiKind::Anthropic.offers_completions_and_embeddings());
        let bad = GOOD.replace(
            "  - name: standard\n",
            "  - name: standard\n    default_max_tokens: 0\n",
        );
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(e.field, "classes[0].default_max_tokens");
    }

    #[test]
    fn type_errors_name_field_and_line() {
        let bad = GOOD.replace("tier: burst", "tier: orbit");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(e.field, "endpoints[1].tier");
        assert_eq!(e.line, Some(10));
    }

    #[test]
    fn semantic_errors_name_field_and_line() {
        let bad = GOOD.replace("b: 0", "c: 0");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(e.field, "classes[0].weights.c");
        assert_eq!(e.line, Some(17));
        assert!(e.message.contains("no endpoint"), "{e}");

        let bad = GOOD.replace("http://127.0.0.1:9002", "ftp://x");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("endpoints[1].url", Some(9)));

        let bad = GOOD.replace("name: b", "name: a");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("endpoints[1].name", Some(8)));
    }

    #[test]
    fn a_credential_is_a_reference_and_a_pasted_key_is_refused_unechoed() {
        let with = |c: &str| {
            GOOD.replace(
                "    tier: burst\n",
                &format!("    tier: burst\n    credential: {c}\n"),
            )
        };
        let p = Policy::parse(&with("env:BURST_KEY")).unwrap();
        assert_eq!(p.endpoints[1].credential.as_deref(), Some("env:BURST_KEY"));
        assert_eq!(p.endpoints[0].credential, None);
        let e = Policy::parse(&with("sk-live-abc123")).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("endpoints[1].credential", Some(11))
        );
        assert!(!e.to_string().contains("sk-live-abc123"), "{e}");
    }

    #[test]
    fn a_health_path_is_optional_and_must_be_a_cheap_plain_path() {
        let with = |h: &str| {
            GOOD.replace(
                "    tier: burst\n",
                &format!("    tier: burst\n    health_path: {h:?}\n"),
            )
        };
        assert_eq!(Policy::parse(GOOD).unwrap().endpoints[1].health_path, None);
        let p = Policy::parse(&with("/health")).unwrap();
        assert_eq!(p.endpoints[1].health_path.as_deref(), Some("/health"));
        for bad in [
            "health",
            "//evil.example/x",
            "/health?x=1",
            "/a b",
            "/v1/chat/completions",
            "/v1/completions",
        ] {
            let e = Policy::parse(&with(bad)).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.line),
                ("endpoints[1].health_path", Some(11)),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn tls_files_are_for_https_only_absolute_and_the_client_pair_goes_together() {
        let https = GOOD.replace("http://127.0.0.1:9002", "https://gpu.internal:8443");
        let with =
            |extra: &str| https.replace("    tier: burst\n", &format!("    tier: burst\n{extra}"));
        let p = Policy::parse(&with(
            "    ca_file: /etc/ca.pem\n    client_cert: /etc/c.pem\n    client_key: /etc/c.key\n",
        ))
        .unwrap();
        assert_eq!(p.endpoints[1].ca_file.as_deref(), Some("/etc/ca.pem"));
        assert!(p.endpoints[1].tls_paths().any() && !p.endpoints[0].tls_paths().any());

        let cases = [
            (
                GOOD.replace(
                    "    tier: burst\n",
                    "    tier: burst\n    ca_file: /etc/ca.pem\n",
                ),
                "endpoints[1].ca_file",
                "https",
            ),
            (
                with("    client_cert: /etc/c.pem\n"),
                "endpoints[1].client_cert",
                "client_key",
            ),
            (
                with("    client_key: /etc/c.key\n"),
                "endpoints[1].client_key",
                "client_cert",
            ),
            (
                with("    ca_file: ca.pem\n"),
                "endpoints[1].ca_file",
                "absolute",
            ),
        ];
        for (src, field, says) in cases {
            let e = Policy::parse(&src).unwrap_err();
            assert_eq!((e.field.as_str(), e.line), (field, Some(11)), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn tls_files_readable_here_are_checked_at_load_with_field_and_line() {
        let dir =
            std::env::temp_dir().join(format!("switchyard-policy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let src = GOOD
            .replace("http://127.0.0.1:9002", "https://127.0.0.1:9002")
            .replace(
                "    tier: burst\n",
                &format!("    tier: burst\n    ca_file: {}\n", junk.display()),
            );
        let p = Policy::parse(&src).unwrap();
        let e = p.check_files(&src).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("endpoints[1].ca_file", Some(11))
        );
        assert!(e.message.contains("no PEM certificate"), "{e}");

        // Not on this host: left to the sidecars, and said.
        let absent = src.replace(&junk.display().to_string(), "/nonexistent/ca.pem");
        let p = Policy::parse(&absent).unwrap();
        let unchecked = p.check_files(&absent).unwrap();
        assert_eq!(unchecked.len(), 1);
        assert_eq!(unchecked[0].field, "endpoints[1].ca_file");
        assert_eq!(Policy::parse(GOOD).unwrap().check_files(GOOD), Ok(vec![]));
    }

    #[test]
    fn a_cached_input_price_is_optional_and_checked() {
        let p = Policy::parse(GOOD).unwrap();
        assert_eq!(p.endpoints[1].price.cached_input_per_mtok, None);
        let cached = GOOD.replace(
            "output_per_mtok: 2.0 }",
            "output_per_mtok: 2.0, cached_input_per_mtok: 0.25 }",
        );
        let p = Policy::parse(&cached).unwrap();
        assert_eq!(p.endpoints[1].price.cached_input_per_mtok, Some(0.25));

        let bad = cached.replace("0.25", "-1");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(e.field, "endpoints[1].price.cached_input_per_mtok");
        assert_eq!(e.line, Some(12));
        assert!(e.message.contains("non-negative"), "{e}");
    }

    #[test]
    fn decision_fields_are_optional_and_validated_with_their_line() {
        let p = Policy::parse(GOOD).unwrap();
        assert_eq!(p.routing, Routing::default());
        assert_eq!(p.classes[0].ttft_target_ms(), 10_000);
        assert!(!p.classes[0].interactive);

        let tuned = format!(
            "{GOOD}routing:\n  window_ms: 3000\n  exploration: 0\n  burst_queue_depth: 2\n"
        )
        .replace("    url: http://127.0.0.1:9001\n", "    url: http://127.0.0.1:9001\n    provider: acme\n    metrics_url: http://127.0.0.1:9001/metrics\n")
        .replace("  - name: standard\n", "  - name: standard\n    ttft_p95_ms: 500\n    interactive: true\n    models: [m]\n");
        let p = Policy::parse(&tuned).expect("valid");
        assert_eq!(p.routing.window_ms, 3000);
        assert_eq!(p.routing.exploration, 0.0);
        assert_eq!(p.routing.max_step, Routing::default().max_step);
        assert_eq!(p.endpoints[0].provider.as_deref(), Some("acme"));
        assert_eq!(p.classes[0].ttft_target_ms(), 500);
        assert!(p.classes[0].may_use(&p.endpoints[0]));

        let bad = tuned.replace("exploration: 0", "exploration: 0.9");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("routing.exploration", Some(25))
        );

        let bad = tuned.replace("models: [m]\n    weights", "models: [zz]\n    weights");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("classes[0].models", Some(19)));
        assert!(e.message.contains("zz"), "{e}");

        let bad = tuned.replace("metrics_url: http", "metrics_url: ftp");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.line),
            ("endpoints[0].metrics_url", Some(6))
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = GOOD.replace("    tier: onprem", "    tier: onprem\n    colour: red");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(e.field, "endpoints[0]");
        assert!(e.message.contains("colour"), "{e}");
        assert_eq!(e.line, Some(6));
    }

    #[test]
    fn a_spend_budget_must_be_positive() {
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

    // `Policy::parse` is the fuzzing entry point: whatever the text, it
    // answers Ok or Err and never panics; the same for `locate`.
    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        /// GOOD with one line replaced, dropped or repeated, or with text
        /// spliced in: mostly near-valid YAML, which reaches validation.
        fn mutated() -> impl Strategy<Value = String> {
            let n = GOOD.lines().count();
            (
                0..n,
                0..4u8,
                "[ -~\\n]{0,24}",
                prop::sample::select(vec![
                    "- ", ": ", "[", "]", "{", "}", "0", "-1", "1e400", ".nan", "~", "&a", "*a",
                    "!!str", "'", "\"", "  ", "\t", "weights", "a", "é",
                ]),
            )
                .prop_map(move |(at, how, text, token)| {
                    let mut lines: Vec<String> = GOOD.lines().map(str::to_string).collect();
                    match (how, lines.get_mut(at)) {
                        (0, Some(l)) => *l = text,
                        (1, _) => {
                            lines.remove(at);
                        }
                        (2, Some(l)) => {
                            let l = l.clone();
                            lines.insert(at, l);
                        }
                        (_, Some(l)) => {
                            let cut = l.len().min(text.len());
                            l.insert_str(cut, token);
                        }
                        _ => {}
                    }
                    lines.join("\n")
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn on_any_text(src in "\\PC{0,200}") {
                let _ = Policy::parse(&src);
            }

            #[test]
            fn on_near_valid_policies(src in mutated()) {
                if let Err(e) = Policy::parse(&src) {
                    prop_assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
                    if let Some(l) = e.line {
                        prop_assert!(l >= 1 && l <= src.lines().count() + 1, "{e} in\n{src}");
                    }
                }
            }

            #[test]
            fn locate_on_any_path(
                src in mutated(),
                path in "[a-z_]{1,8}(\\[[0-9]{1,22}\\])?(\\.[a-z_]{0,8}(\\[[0-9]{1,22}\\])?){0,3}",
            ) {
                if let Some(l) = locate(&src, &path) {
                    prop_assert!(l >= 1 && l <= src.lines().count());
                }
            }
        }
    }
}
