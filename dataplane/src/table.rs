//! The routing table as the sidecar uses it: compiled once from the pushed
//! protobuf into lookups the hot path reads without allocating, then held
//! immutable behind `ArcSwap` until the next push replaces it whole.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use parking_lot::Mutex;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use switchyard_policy::tls::{self, TlsPaths};
use switchyard_policy::{ApiKind, EndpointUrl};
use switchyard_proto::v1 as pb;
use switchyard_wire::operation::Operation;
use switchyard_wire::usage::Prices;

use crate::balance::WeightedChoice;
use crate::health::{EndpointState, Endpoints};
use crate::metrics::{ClassCounters, Metrics, PairCounters};
use crate::retry::{RetryBudget, RetryBudgets};

/// State that outlives tables: endpoint health and retry budgets, by name.
#[derive(Debug, Default)]
pub struct Live {
    pub endpoints: Endpoints,
    pub retry_budgets: RetryBudgets,
    /// Where the table in force came from; whether its weights still hold.
    pub origin: crate::origin::Origin,
}

/// Where Anthropic's Messages API is, after the URL's own path prefix.
pub const MESSAGES_PATH: &str = "/v1/messages";

/// The path of `op` at an endpoint, after its URL's own prefix. Azure's
/// depends on the deployment, so it is built per request.
#[derive(Debug)]
pub enum Paths {
    /// OpenAI's: one per operation, rendered once.
    Openai([Bytes; 3]),
    /// Anthropic's: chat only.
    Anthropic(Bytes),
    /// `{prefix}/openai/deployments/{deployment}/{op}?api-version={version}`.
    Azure { prefix: String, api_version: String },
}

impl Paths {
    pub fn new(api: ApiKind, prefix: &str, api_version: &str) -> Paths {
        match api {
            ApiKind::Openai => Paths::Openai(
                Operation::ALL.map(|op| Bytes::from(format!("{prefix}{}", op.path()))),
            ),
            ApiKind::Anthropic => Paths::Anthropic(Bytes::from(format!("{prefix}{MESSAGES_PATH}"))),
            ApiKind::Azure => Paths::Azure {
                prefix: prefix.to_string(),
                api_version: api_version.to_string(),
            },
        }
    }

    /// The request path for `op` on the endpoint's own `model` id.
    pub fn get(&self, op: Operation, model: &str) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        match self {
            Paths::Openai(p) => {
                let i = Operation::ALL.iter().position(|o| *o == op).unwrap_or(0);
                Cow::Borrowed(p.get(i).map_or(&b""[..], |b| &b[..]))
            }
            Paths::Anthropic(p) => Cow::Borrowed(&p[..]),
            Paths::Azure {
                prefix,
                api_version,
            } => Cow::Owned(
                format!(
                    "{prefix}/openai/deployments/{model}/{}?api-version={api_version}",
                    op.azure_path()
                )
                .into_bytes(),
            ),
        }
    }
}

/// `max_tokens` for endpoints that need one, when neither the app nor the
/// class sets it.
const DEFAULT_MAX_TOKENS: u32 = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Gap allowed between two chunks of a streamed answer before the stream is
/// judged stalled.
const INTER_TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    #[error("the update carries no table")]
    Missing,
    #[error("endpoint {name:?}: {reason}")]
    Endpoint { name: String, reason: String },
    #[error("class {class:?}: {reason}")]
    Class { class: String, reason: String },
    #[error("default class {0:?} is not defined")]
    DefaultClass(String),
}

fn endpoint_err(name: &str, reason: impl Into<String>) -> TableError {
    TableError::Endpoint {
        name: name.to_string(),
        reason: reason.into(),
    }
}

fn class_err(class: &str, reason: impl Into<String>) -> TableError {
    TableError::Class {
        class: class.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug)]
pub struct Endpoint {
    /// Its position in the table; tells endpoints apart cheaply.
    pub id: usize,
    pub name: Arc<str>,
    /// `x-switchyard-endpoint`, rendered once.
    pub name_header: HeaderValue,
    pub tier: &'static str,
    pub peer: HttpPeer,
    /// `Host` header value sent upstream.
    pub authority: HeaderValue,
    /// The API it speaks.
    pub api: ApiKind,
    /// Where each operation is sent.
    pub paths: Paths,
    pub prices: Prices,
    /// The credential header sent to the provider (see `credential`); its
    /// value is sensitive, so `Debug` does not show it.
    pub credential: Option<(&'static str, HeaderValue)>,
    /// Concurrent requests this sidecar may have on the endpoint; 0: no limit.
    pub capacity: u32,
    /// Its own id for a logical model, where the two differ.
    pub model_ids: Vec<(String, String)>,
    /// The fleet's spend on it over the last hour reached its spend budget
    /// (the control plane judges; `request::admit` says what follows).
    pub over_spend_budget: bool,
    pub state: Arc<EndpointState>,
    pub ejections: Counter,
}

impl Endpoint {
    /// Available (not ejected, not throttled) and below capacity.
    pub fn usable(&self, now: std::time::Instant) -> bool {
        !self.at_capacity() && self.state.available(now)
    }

    /// Usable, and within its spend budget unless the request may exceed
    /// it.
    pub fn usable_for(&self, now: std::time::Instant, may_exceed_spend: bool) -> bool {
        (may_exceed_spend || !self.over_spend_budget) && self.usable(now)
    }

    pub fn at_capacity(&self) -> bool {
        self.capacity > 0 && self.state.in_flight() >= self.capacity
    }

    /// Its own id for the logical `model`, when it has one.
    pub fn model_id(&self, model: &str) -> Option<&str> {
        self.model_ids
            .iter()
            .find(|(logical, _)| logical == model)
            .map(|(_, id)| id.as_str())
    }

    /// Whether it offers `op`.
    pub fn offers(&self, op: Operation) -> bool {
        op == Operation::Chat || self.api.offers_completions_and_embeddings()
    }
}

/// What a class does when none of its weighted endpoints is healthy.
#[derive(Debug, Clone, PartialEq)]
pub enum Degrade {
    Model(String),
    MaxTokens(u32),
    Reject(String),
}

impl Degrade {
    pub fn label(&self) -> &'static str {
        match self {
            Degrade::Model(_) => "smaller-model",
            Degrade::MaxTokens(_) => "cap-max-tokens",
            Degrade::Reject(_) => "reject",
        }
    }
}

/// Where one class sends requests for one model.
#[derive(Debug)]
pub struct Route {
    /// Weighted first choice; `None` when the class gives no weight to any
    /// endpoint serving the model, in which case the fallback chain leads.
    pub choice: Option<WeightedChoice<Arc<Endpoint>>>,
    /// The first choice once the weights have expired: equal shares over
    /// the weighted endpoints, so local signals alone (peak-EWMA latency,
    /// in-flight requests, ejections) balance them. Endpoints given under a
    /// tenth of the largest weight (the control plane's exploration and
    /// standby shares) stay out: an expired table must not send half the
    /// traffic to a standby priced for emergencies.
    pub local: Option<WeightedChoice<Arc<Endpoint>>>,
    /// Endpoints serving the model that the class may use, in failover order.
    pub chain: Vec<Arc<Endpoint>>,
}

impl Route {
    /// The first choice: the pushed weights, or local balancing once they
    /// expired.
    pub fn first_choice(&self, weights_expired: bool) -> Option<&WeightedChoice<Arc<Endpoint>>> {
        if weights_expired {
            self.local.as_ref()
        } else {
            self.choice.as_ref()
        }
    }

    /// The endpoints the class prefers: the weighted ones, else the head of
    /// the chain.
    pub fn preferred(&self) -> &[Arc<Endpoint>] {
        match &self.choice {
            Some(c) => c.endpoints(),
            None => self.chain.get(..1).unwrap_or_default(),
        }
    }

    /// Every endpoint the route may use: the weighted ones, then the chain
    /// (which repeats them).
    pub fn candidates(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.choice
            .iter()
            .flat_map(|c| c.endpoints())
            .chain(&self.chain)
    }
}

#[derive(Debug)]
pub struct Class {
    /// Its position in the table.
    pub index: usize,
    pub name: Arc<str>,
    pub ttft_timeout: Duration,
    pub inter_token_timeout: Duration,
    pub deadline: Duration,
    pub priority: u32,
    pub hedge: bool,
    pub degrade: Option<Degrade>,
    pub retry: Arc<Mutex<RetryBudget>>,
    pub counters: ClassCounters,
    /// `max_tokens` for endpoints that need one when the app sets none.
    pub default_max_tokens: u32,
    /// Counters per endpoint, by endpoint id.
    pairs: Vec<PairCounters>,
    /// Routes for chat completions, by model.
    by_model: HashMap<String, Route>,
    /// Routes for completions and embeddings: the same, over the endpoints
    /// whose API offers them.
    by_model_plain: HashMap<String, Route>,
}

impl Class {
    /// This class's counters for `ep`.
    pub fn pair(&self, ep: &Endpoint) -> Option<&PairCounters> {
        self.pairs.get(ep.id)
    }
}

#[derive(Debug)]
pub struct Table {
    pub version: u64,
    /// `x-switchyard-table-version`, rendered once.
    pub version_header: HeaderValue,
    pub endpoints: Vec<Arc<Endpoint>>,
    classes: Vec<Class>,
    class_index: HashMap<String, usize>,
    default_class: usize,
    models: BTreeSet<String>,
    /// Highest class priority, for queue shares.
    pub max_priority: u32,
    /// `/v1/models` answer, rendered once per table.
    pub models_json: Bytes,
    /// How long the weights hold without the control plane; `None`: forever.
    pub weights_ttl: Option<Duration>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteError<'a> {
    UnknownClass(&'a str),
    /// No endpoint in the table serves the model.
    UnknownModel,
    /// Endpoints serve the model, but the class may use none of them.
    NoRoute,
    /// The class may use endpoints for the model, but none whose API
    /// offers the operation.
    NotOffered,
}

/// An endpoint's URL, read as the control plane validated it (one parser
/// for both, so they agree on what is valid).
fn endpoint_url(e: &pb::Endpoint) -> Result<EndpointUrl, TableError> {
    EndpointUrl::parse(&e.url).map_err(|r| endpoint_err(&e.name, format!("url: {r}")))
}

/// The connection to an https endpoint: TLS with SNI and the name checked
/// against the URL's host, certificate verification on, the `ca_file`'s
/// certificates as the only trust anchors when it names one (else the
/// system's, which the connector loaded once), and the client certificate
/// for mutual TLS. The files are read here, at each table, so a rotated
/// file takes effect with the next table; one that cannot be used NACKs
/// the table with the endpoint and the file named. An http endpoint naming
/// TLS files is refused too, as the control plane refuses it.
fn tls_peer(e: &pb::Endpoint, url: &EndpointUrl, addr: SocketAddr) -> Result<HttpPeer, TableError> {
    let paths = TlsPaths {
        ca_file: Some(e.ca_file.as_str()),
        client_cert: Some(e.client_cert.as_str()),
        client_key: Some(e.client_key.as_str()),
    };
    if !url.tls {
        if paths.any() {
            return Err(endpoint_err(
                &e.name,
                "ca_file, client_cert and client_key are for https endpoints only",
            ));
        }
        return Ok(HttpPeer::new(addr, false, String::new()));
    }
    let material = tls::load(&paths).map_err(|f| endpoint_err(&e.name, f.to_string()))?;
    let mut peer = HttpPeer::new(addr, true, url.server_name.clone());
    peer.options.verify_cert = true;
    peer.options.verify_hostname = true;
    if let Some(ca) = material.ca {
        // `tls::load` parsed each certificate with pingora's own parser,
        // which panics on one it cannot read.
        let ca: Vec<WrappedX509> = ca
            .into_iter()
            .map(|c| WrappedX509::new(c.to_vec(), parse_x509))
            .collect();
        peer.options.ca = Some(Arc::from(ca));
    }
    if let Some(id) = material.client {
        let chain = id.chain.iter().map(|c| c.to_vec()).collect();
        peer.client_cert_key = Some(Arc::new(CertKey::new(chain, id.key.secret_der().to_vec())));
    }
    // The pool keys idle connections by the peer's reuse hash, which covers
    // the address, SNI and client certificate but not the CA: with the
    // files' contents in it, a connection verified under an old CA is never
    // reused under a new one.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    material.fingerprint.hash(&mut h);
    peer.group_key = h.finish();
    Ok(peer)
}

/// Resolves every endpoint's host. Runs on the control thread, never on the
/// request path, so requests never wait for DNS.
pub async fn resolve(table: &pb::RoutingTable) -> Result<HashMap<String, SocketAddr>, TableError> {
    let mut out = HashMap::with_capacity(table.endpoints.len());
    for e in &table.endpoints {
        let url = endpoint_url(e)?;
        let (host, port) = (url.server_name.as_str(), url.port);
        // Bounded: a resolver that hangs must not hold the control thread
        // (and with it reconnecting, or a start from the saved table).
        let addr = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| {
                endpoint_err(
                    &e.name,
                    format!("resolving {host} took over {} s", RESOLVE_TIMEOUT.as_secs()),
                )
            })?
            .map_err(|err| endpoint_err(&e.name, format!("cannot resolve {host}: {err}")))?
            .next()
            .ok_or_else(|| endpoint_err(&e.name, format!("{host} resolves to no address")))?;
        out.insert(e.name.clone(), addr);
    }
    Ok(out)
}

impl Table {
    /// Checks and compiles a pushed table. Pure given the resolved addresses;
    /// any error becomes the NACK's reason.
    pub fn compile(
        t: &pb::RoutingTable,
        addrs: &HashMap<String, SocketAddr>,
        live: &Live,
        metrics: &Metrics,
    ) -> Result<Table, TableError> {
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::with_capacity(t.endpoints.len());
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut models = BTreeSet::new();
        for e in &t.endpoints {
            if e.name.is_empty() {
                return Err(endpoint_err(&e.name, "has no name"));
            }
            if index.insert(&e.name, endpoints.len()).is_some() {
                return Err(endpoint_err(&e.name, "is defined twice"));
            }
            let url = endpoint_url(e)?;
            let addr = *addrs
                .get(&e.name)
                .ok_or_else(|| endpoint_err(&e.name, "address not resolved"))?;
            if e.models.is_empty() {
                return Err(endpoint_err(&e.name, "serves no model"));
            }
            let prices = Prices {
                input: e.price_input_per_mtok,
                cached_input: e
                    .price_cached_input_per_mtok
                    .unwrap_or(e.price_input_per_mtok),
                cache_write: e
                    .price_cache_write_input_per_mtok
                    .unwrap_or(e.price_input_per_mtok),
                output: e.price_output_per_mtok,
            };
            for p in [
                prices.input,
                prices.cached_input,
                prices.cache_write,
                prices.output,
            ] {
                if !p.is_finite() || p < 0.0 {
                    return Err(endpoint_err(&e.name, format!("invalid price {p}")));
                }
            }
            let api = match pb::ApiKind::try_from(e.api) {
                Ok(pb::ApiKind::Openai) => ApiKind::Openai,
                Ok(pb::ApiKind::Azure) => ApiKind::Azure,
                Ok(pb::ApiKind::Anthropic) => ApiKind::Anthropic,
                _ => {
                    return Err(endpoint_err(
                        &e.name,
                        format!("unsupported API kind {}", e.api),
                    ))
                }
            };
            if api == ApiKind::Azure && e.api_version.is_empty() {
                return Err(endpoint_err(
                    &e.name,
                    "an azure endpoint needs an api_version",
                ));
            }
            let credential = crate::credential::resolve(api, &e.credential)
                .map_err(|c| endpoint_err(&e.name, c.to_string()))?;
            let tier = match pb::Tier::try_from(e.tier) {
                Ok(pb::Tier::Onprem) => "onprem",
                Ok(pb::Tier::Burst) => "burst",
                Ok(pb::Tier::Fallback) => "fallback",
                _ => return Err(endpoint_err(&e.name, format!("unknown tier {}", e.tier))),
            };
            let mut model_ids: Vec<(String, String)> = e
                .model_ids
                .iter()
                .map(|(l, id)| (l.clone(), id.clone()))
                .collect();
            model_ids.sort();
            for (logical, id) in &model_ids {
                if !e.models.contains(logical) {
                    return Err(endpoint_err(
                        &e.name,
                        format!("maps model {logical:?}, which it does not serve"),
                    ));
                }
                if id.trim().is_empty() {
                    return Err(endpoint_err(
                        &e.name,
                        format!("maps model {logical:?} to an empty id"),
                    ));
                }
            }
            models.extend(e.models.iter().cloned());
            let mut peer = tls_peer(e, &url, addr)?;
            // Bounds the TCP connect and, apart, the TLS handshake.
            peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
            let authority = HeaderValue::try_from(url.authority.as_str())
                .map_err(|_| endpoint_err(&e.name, "the URL's host cannot be a Host header"))?;
            let name: Arc<str> = Arc::from(e.name.as_str());
            let name_header = HeaderValue::try_from(e.name.as_str())
                .map_err(|_| endpoint_err(&e.name, "the name cannot be a header value"))?;
            endpoints.push(Arc::new(Endpoint {
                id: endpoints.len(),
                name_header,
                ejections: metrics.ejections(&name),
                name,
                tier,
                peer,
                authority,
                api,
                paths: Paths::new(api, &url.prefix, &e.api_version),
                prices,
                credential,
                capacity: e.capacity,
                model_ids,
                over_spend_budget: e.over_budget,
                state: live.endpoints.get(&e.name),
            }));
        }
        let by_index = |i: usize| endpoints.get(i).cloned();

        let mut classes = Vec::with_capacity(t.classes.len());
        let mut class_index = HashMap::with_capacity(t.classes.len());
        for c in &t.classes {
            if class_index.insert(c.name.clone(), classes.len()).is_some() {
                return Err(class_err(&c.name, "is defined twice"));
            }
            let lookup = |name: &str| {
                index
                    .get(name)
                    .copied()
                    .ok_or_else(|| class_err(&c.name, format!("unknown endpoint {name:?}")))
            };
            let mut weights = Vec::with_capacity(c.routes.len());
            for r in &c.routes {
                if !r.weight.is_finite() || r.weight < 0.0 {
                    return Err(class_err(
                        &c.name,
                        format!("invalid weight {} for {:?}", r.weight, r.endpoint),
                    ));
                }
                weights.push((lookup(&r.endpoint)?, r.weight));
            }
            let mut chain = Vec::with_capacity(c.fallback.len());
            for name in &c.fallback {
                chain.push(lookup(name)?);
            }
            // A weighted endpoint missing from the chain still gets a place
            // in it, so failover can reach every endpoint the class routes to.
            for (i, _) in &weights {
                if !chain.contains(i) {
                    chain.push(*i);
                }
            }
            let serves = |i: &usize, m: &str| {
                t.endpoints
                    .get(*i)
                    .is_some_and(|e| e.models.iter().any(|x| x == m))
            };
            // The routes over the endpoints `usable` keeps, by model.
            let routes = |usable: &dyn Fn(usize) -> bool| -> HashMap<String, Route> {
                models
                    .iter()
                    .map(|m| {
                        let weighted = || {
                            weights
                                .iter()
                                .filter(|(i, _)| serves(i, m) && usable(*i))
                                .filter_map(|(i, w)| Some((by_index(*i)?, *w)))
                        };
                        let choice = WeightedChoice::new(weighted());
                        let top = weighted().map(|(_, w)| w).fold(0.0, f64::max);
                        let local = WeightedChoice::new(
                            weighted()
                                .filter(|(_, w)| *w > 0.0 && *w >= top * 0.1)
                                .map(|(e, _)| (e, 1.0)),
                        );
                        let chain = chain
                            .iter()
                            .filter(|i| serves(i, m) && usable(**i))
                            .filter_map(|i| by_index(*i))
                            .collect();
                        (
                            m.clone(),
                            Route {
                                choice,
                                local,
                                chain,
                            },
                        )
                    })
                    .collect()
            };
            let by_model = routes(&|_| true);
            let by_model_plain = routes(&|i| {
                endpoints
                    .get(i)
                    .is_some_and(|e| e.api.offers_completions_and_embeddings())
            });
            let ms = |v: u32, default: Duration| {
                if v == 0 {
                    default
                } else {
                    Duration::from_millis(v.into())
                }
            };
            let deadline = ms(c.deadline_ms, Duration::from_secs(120));
            let degrade = match c.degrade.as_ref().and_then(|d| d.action.as_ref()) {
                None => None,
                Some(pb::degrade::Action::Model(m)) => {
                    if !models.contains(m) {
                        return Err(class_err(
                            &c.name,
                            format!("degrade model {m:?} is not served"),
                        ));
                    }
                    Some(Degrade::Model(m.clone()))
                }
                Some(pb::degrade::Action::MaxTokens(n)) => Some(Degrade::MaxTokens(*n)),
                Some(pb::degrade::Action::Reject(r)) => Some(Degrade::Reject(r.clone())),
            };
            if !c.retry_ratio.is_finite() || c.retry_ratio < 0.0 {
                return Err(class_err(
                    &c.name,
                    format!("invalid retry ratio {}", c.retry_ratio),
                ));
            }
            let name: Arc<str> = Arc::from(c.name.as_str());
            classes.push(Class {
                index: classes.len(),
                counters: metrics.class(&name, degrade.as_ref().map(Degrade::label)),
                // The endpoints the class routes to show their counters at
                // zero from the start; others (there are none today) would
                // appear on first use.
                pairs: endpoints
                    .iter()
                    .map(|e| {
                        if chain.contains(&e.id) {
                            metrics.pair(&name, &e.name)
                        } else {
                            PairCounters::default()
                        }
                    })
                    .collect(),
                name,
                ttft_timeout: ms(c.ttft_timeout_ms, Duration::from_secs(10)).min(deadline),
                inter_token_timeout: ms(c.inter_token_timeout_ms, INTER_TOKEN_TIMEOUT)
                    .min(deadline),
                deadline,
                priority: c.priority,
                hedge: c.hedge,
                degrade,
                retry: live
                    .retry_budgets
                    .get(&c.name, c.retry_ratio, c.retry_min_per_second),
                by_model,
                by_model_plain,
                default_max_tokens: if c.default_max_tokens == 0 {
                    DEFAULT_MAX_TOKENS
                } else {
                    c.default_max_tokens
                },
            });
        }
        let default_class = *class_index
            .get(&t.default_class)
            .ok_or_else(|| TableError::DefaultClass(t.default_class.clone()))?;
        let data: Vec<_> = models
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "switchyard"}))
            .collect();
        let models_json = Bytes::from(json!({"object": "list", "data": data}).to_string());
        Ok(Table {
            max_priority: t.classes.iter().map(|c| c.priority).max().unwrap_or(0),
            version: t.version,
            version_header: HeaderValue::from(t.version),
            endpoints,
            classes,
            class_index,
            default_class,
            models,
            models_json,
            weights_ttl: (t.weights_ttl_ms > 0)
                .then(|| Duration::from_millis(t.weights_ttl_ms.into())),
        })
    }

    /// The class (the named one, else the default) and its route for a
    /// model's `op`.
    pub fn route<'a>(
        &self,
        class: Option<&'a str>,
        model: &str,
        op: Operation,
    ) -> Result<(&Class, &Route), RouteError<'a>> {
        let i = match class {
            Some(name) => *self
                .class_index
                .get(name)
                .ok_or(RouteError::UnknownClass(name))?,
            None => self.default_class,
        };
        let c = self.classes.get(i).ok_or(RouteError::NoRoute)?;
        if !self.models.contains(model) {
            return Err(RouteError::UnknownModel);
        }
        let routable = |r: &&Route| r.choice.is_some() || !r.chain.is_empty();
        let any = c.by_model.get(model).filter(routable);
        if op == Operation::Chat {
            return any.map(|r| (c, r)).ok_or(RouteError::NoRoute);
        }
        match c.by_model_plain.get(model).filter(routable) {
            Some(r) => Ok((c, r)),
            None if any.is_some() => Err(RouteError::NotOffered),
            None => Err(RouteError::NoRoute),
        }
    }

    /// A class by its position in the table (`Class::index`), as the
    /// request's state keeps it.
    pub fn class_at(&self, index: usize) -> Option<&Class> {
        self.classes.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    fn ep(name: &str, port: u16, tier: pb::Tier, models: &[&str]) -> pb::Endpoint {
        pb::Endpoint {
            name: name.into(),
            url: format!("http://127.0.0.1:{port}/prefix/"),
            api: pb::ApiKind::Openai as i32,
            tier: tier as i32,
            models: models.iter().map(|m| m.to_string()).collect(),
            price_input_per_mtok: 1.0,
            price_output_per_mtok: 2.0,
            capacity: 0,
            price_cached_input_per_mtok: None,
            credential: String::new(),
            over_budget: false,
            model_ids: Default::default(),
            ..Default::default()
        }
    }

    fn table() -> pb::RoutingTable {
        pb::RoutingTable {
            version: 3,
            endpoints: vec![
                ep("a", 1, pb::Tier::Onprem, &["m1"]),
                ep("b", 2, pb::Tier::Burst, &["m1", "m2"]),
                ep("c", 3, pb::Tier::Fallback, &["m3"]),
            ],
            classes: vec![
                pb::RequestClass {
                    name: "std".into(),
                    routes: vec![
                        pb::Route {
                            endpoint: "a".into(),
                            weight: 1.0,
                        },
                        pb::Route {
                            endpoint: "b".into(),
                            weight: 0.0,
                        },
                    ],
                    fallback: vec!["a".into(), "b".into()],
                    ttft_timeout_ms: 0,
                    deadline_ms: 5000,
                    ..Default::default()
                },
                pb::RequestClass {
                    name: "onprem-only".into(),
                    routes: vec![pb::Route {
                        endpoint: "a".into(),
                        weight: 1.0,
                    }],
                    fallback: vec!["a".into()],
                    ttft_timeout_ms: 100,
                    deadline_ms: 1000,
                    ..Default::default()
                },
            ],
            default_class: "std".into(),
            weights_ttl_ms: 0,
        }
    }

    fn addrs(t: &pb::RoutingTable) -> HashMap<String, SocketAddr> {
        t.endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    e.name.clone(),
                    SocketAddr::from(([127, 0, 0, 1], i as u16 + 1)),
                )
            })
            .collect()
    }

    fn compile(t: &pb::RoutingTable) -> Result<Table, TableError> {
        Table::compile(t, &addrs(t), &Live::default(), &Metrics::new())
    }

    fn names(eps: &[Arc<Endpoint>]) -> Vec<&str> {
        eps.iter().map(|e| &*e.name).collect()
    }

    #[test]
    fn completions_and_embeddings_route_only_to_apis_that_offer_them() {
        let mut t = table();
        // a (weighted, on-prem) speaks Anthropic's API, b OpenAI's.
        t.endpoints[0].api = pb::ApiKind::Anthropic as i32;
        let c = compile(&t).unwrap();
        let (_, chat) = c.route(None, "m1", Operation::Chat).unwrap();
        assert_eq!(names(&chat.chain), ["a", "b"]);
        for op in [Operation::Embeddings, Operation::Completions] {
            let (_, r) = c.route(None, "m1", op).unwrap();
            assert!(r.choice.is_none(), "a's weight goes with it");
            assert_eq!(names(&r.chain), ["b"]);
            assert_eq!(
                c.route(Some("onprem-only"), "m1", op).unwrap_err(),
                RouteError::NotOffered
            );
        }
        // An azure endpoint needs its api-version.
        t.endpoints[1].api = pb::ApiKind::Azure as i32;
        assert!(matches!(compile(&t), Err(TableError::Endpoint { name, .. }) if name == "b"));
        t.endpoints[1].api_version = "2024-10-21".into();
        let c = compile(&t).unwrap();
        assert_eq!(
            c.endpoints[1].paths.get(Operation::Embeddings, "dep-1"),
            &b"/prefix/openai/deployments/dep-1/embeddings?api-version=2024-10-21"[..]
        );
    }

    #[test]
    fn routes_by_class_and_model() {
        let t = table();
        let c = compile(&t).unwrap();
        assert_eq!(
            c.endpoints[0].paths.get(Operation::Chat, "m1"),
            &b"/prefix/v1/chat/completions"[..]
        );
        assert_eq!(c.endpoints[0].authority, "127.0.0.1:1");
        assert_eq!(c.version_header, "3");
        let (class, r) = c.route(None, "m1", Operation::Chat).unwrap();
        assert_eq!(&*class.name, "std");
        assert_eq!(class.ttft_timeout, Duration::from_secs(5));
        assert_eq!(names(r.choice.as_ref().unwrap().endpoints()), ["a"]);
        assert_eq!(names(&r.chain), ["a", "b"]);
        assert_eq!(names(r.preferred()), ["a"]);
        // m2 is only on b, which has weight 0: the chain leads.
        let (_, r) = c.route(None, "m2", Operation::Chat).unwrap();
        assert!(r.choice.is_none());
        assert_eq!(names(&r.chain), ["b"]);
        assert_eq!(names(r.preferred()), ["b"]);
        assert_eq!(
            c.route(Some("onprem-only"), "m2", Operation::Chat)
                .unwrap_err(),
            RouteError::NoRoute
        );
        assert_eq!(
            c.route(None, "m3", Operation::Chat).unwrap_err(),
            RouteError::NoRoute
        );
        assert_eq!(
            c.route(None, "zzz", Operation::Chat).unwrap_err(),
            RouteError::UnknownModel
        );
        assert_eq!(
            c.route(Some("x"), "m1", Operation::Chat).unwrap_err(),
            RouteError::UnknownClass("x")
        );
        let models: serde_json::Value = serde_json::from_slice(&c.models_json).unwrap();
        assert_eq!(models["data"].as_array().unwrap().len(), 3);
        // Each endpoint's id is its place in the table.
        assert!(c.endpoints.iter().enumerate().all(|(i, e)| e.id == i));
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let mut t = table();
        t.endpoints[1].url = "ht!tp://nope".into();
        let e = compile(&t).unwrap_err();
        assert!(
            matches!(&e, TableError::Endpoint { name, .. } if name == "b"),
            "{e}"
        );

        let mut t = table();
        t.classes[0].routes[0].weight = f64::NAN;
        assert!(matches!(compile(&t), Err(TableError::Class { .. })));

        let mut t = table();
        t.classes[0].fallback.push("ghost".into());
        let e = compile(&t).unwrap_err();
        assert!(e.to_string().contains("ghost"), "{e}");

        let mut t = table();
        t.default_class = "none".into();
        assert!(matches!(compile(&t), Err(TableError::DefaultClass(_))));

        let mut t = table();
        t.endpoints[2].name = "a".into();
        assert!(compile(&t).is_err());

        let mut t = table();
        t.classes[1].name = "std".into();
        assert!(compile(&t).unwrap_err().to_string().contains("twice"));

        let mut t = table();
        t.endpoints[0].price_cached_input_per_mtok = Some(-0.5);
        let e = compile(&t).unwrap_err();
        assert!(e.to_string().contains("invalid price -0.5"), "{e}");
    }

    #[test]
    fn expired_weights_share_equally_over_the_weighted_endpoints_only() {
        let mut t = table();
        t.classes[0].routes[0].weight = 0.9;
        t.classes[0].routes[1].weight = 0.1;
        let c = compile(&t).unwrap();
        let (_, r) = c.route(Some("std"), "m1", Operation::Chat).unwrap();
        assert_eq!(names(r.first_choice(true).unwrap().endpoints()), ["a", "b"]);
        // A standby share (under a tenth of the largest) stays out.
        t.classes[0].routes[1].weight = 0.05;
        let c = compile(&t).unwrap();
        let (_, r) = c.route(Some("std"), "m1", Operation::Chat).unwrap();
        assert_eq!(names(r.first_choice(true).unwrap().endpoints()), ["a"]);
        assert_eq!(
            names(r.first_choice(false).unwrap().endpoints()),
            ["a", "b"]
        );
        // Nothing weighted: nothing revived, the chain leads.
        t.classes[0].routes[0].weight = 0.0;
        t.classes[0].routes[1].weight = 0.0;
        let c = compile(&t).unwrap();
        let (_, r) = c.route(Some("std"), "m1", Operation::Chat).unwrap();
        assert!(r.first_choice(true).is_none() && r.first_choice(false).is_none());
    }

    #[test]
    fn model_ids_map_only_models_the_endpoint_serves() {
        let mut t = table();
        let m = t.endpoints[0].models[0].clone();
        t.endpoints[0]
            .model_ids
            .insert(m.clone(), "org/model-70b".into());
        let c = compile(&t).unwrap();
        assert_eq!(c.endpoints[0].model_id(&m), Some("org/model-70b"));
        assert_eq!(c.endpoints[1].model_id(&m), None);

        t.endpoints[0]
            .model_ids
            .insert("unserved".into(), "x".into());
        let e = compile(&t).unwrap_err().to_string();
        assert!(e.contains("does not serve"), "{e}");

        let mut t = table();
        t.endpoints[0].model_ids.insert(m, " ".into());
        let e = compile(&t).unwrap_err().to_string();
        assert!(e.contains("empty id"), "{e}");
    }

    #[test]
    fn cached_input_costs_the_input_price_unless_priced_apart() {
        let mut t = table();
        t.endpoints[1].price_cached_input_per_mtok = Some(0.25);
        let c = compile(&t).unwrap();
        let p = |i: usize| c.endpoints[i].prices;
        assert_eq!(
            (p(0).input, p(0).cached_input, p(0).output),
            (1.0, 1.0, 2.0)
        );
        assert_eq!(
            (p(1).input, p(1).cached_input, p(1).output),
            (1.0, 0.25, 2.0)
        );
    }

    #[test]
    fn urls_split_into_address_path_and_host_header() {
        let mut t = table();
        t.endpoints[0].url = "http://[::1]:8080/openai/".into();
        t.endpoints[1].url = "https://127.0.0.1/".into();
        let c = compile(&t).unwrap();
        let (a, b) = (&c.endpoints[0], &c.endpoints[1]);
        assert_eq!(
            a.paths.get(Operation::Chat, "m1"),
            &b"/openai/v1/chat/completions"[..]
        );
        assert_eq!(a.authority, "[::1]:8080");
        assert!(!a.peer.is_tls());
        // https: TLS, SNI from the URL, verification on, default port
        // left out of the Host header.
        assert_eq!(b.authority, "127.0.0.1");
        assert!(b.peer.is_tls() && b.peer.sni == "127.0.0.1");
        assert!(b.peer.options.verify_cert && b.peer.options.verify_hostname);
        assert!(b.peer.options.ca.is_none() && b.peer.client_cert_key.is_none());
        for bad in ["ftp://example.com", "not a url", "http://u:p@example.com"] {
            t.endpoints[0].url = bad.into();
            let e = compile(&t).unwrap_err();
            assert!(
                matches!(&e, TableError::Endpoint { name, .. } if name == "a"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn tls_files_that_cannot_be_used_nack_naming_endpoint_and_file() {
        let dir = std::env::temp_dir().join(format!("switchyard-table-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let junk = junk.to_str().unwrap().to_string();

        let mut t = table();
        t.endpoints[1].url = "https://127.0.0.1:2/".into();
        t.endpoints[1].ca_file = junk.clone();
        let e = compile(&t).unwrap_err().to_string();
        assert!(
            e.contains("\"b\"") && e.contains("ca_file") && e.contains(&junk),
            "{e}"
        );

        t.endpoints[1].ca_file = "/nonexistent/ca.pem".into();
        let e = compile(&t).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("cannot be read"),
            "{e}"
        );

        t.endpoints[1].ca_file = String::new();
        t.endpoints[1].client_cert = junk.clone();
        let e = compile(&t).unwrap_err().to_string();
        assert!(e.contains("client_key"), "{e}");

        // Good files: the CA is the peer's only trust anchor, the client
        // pair is presented, and another CA makes another pool key.
        let pem = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_string()
        };
        let issue = |label: &str| {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_key = KeyPair::generate().unwrap();
            let ca = ca.self_signed(&ca_key).unwrap();
            let key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec!["sidecar".to_string()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            (
                pem(&format!("{label}-ca.pem"), ca.pem()),
                pem(&format!("{label}-client.pem"), leaf.pem()),
                pem(&format!("{label}-client.key"), key.serialize_pem()),
            )
        };
        let (ca, cert, key) = issue("one");
        t.endpoints[1].ca_file = ca;
        t.endpoints[1].client_cert = cert;
        t.endpoints[1].client_key = key;
        let c = compile(&t).unwrap();
        let peer = &c.endpoints[1].peer;
        assert_eq!(peer.options.ca.as_ref().map(|ca| ca.len()), Some(1));
        assert!(peer.client_cert_key.is_some());
        let (other_ca, _, _) = issue("two");
        t.endpoints[1].ca_file = other_ca;
        let c2 = compile(&t).unwrap();
        assert_ne!(
            peer.reuse_hash(),
            c2.endpoints[1].peer.reuse_hash(),
            "connections verified under one CA are not pooled under another"
        );

        // TLS files on an http endpoint: refused, as the control plane does.
        let mut t = table();
        t.endpoints[0].ca_file = junk;
        let e = compile(&t).unwrap_err().to_string();
        assert!(e.contains("https endpoints only"), "{e}");
    }
}
