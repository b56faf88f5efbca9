//! Health probes that spend no tokens: every interval the control plane
//! sends each endpoint `GET {url}/v1/models` (Azure's model list for an
//! azure endpoint, or the endpoint's `health_path`), with the endpoint's
//! credential in its API's header, and feeds the results to
//! the probe state machine in `health`. Never a completion: a probe must
//! not cost money or take a serving slot from real traffic.
//!
//! The credential reference is resolved in the control plane's own
//! environment. Keys usually live beside the sidecars only; when the
//! reference cannot be resolved here the probe goes without it, and that is
//! said once in the log (a provider that refuses unauthenticated probes then
//! shows the refusal as the probe's error). The key itself is never logged.
//!
//! https endpoints are probed with the TLS the sidecars use: the system's
//! roots, or the endpoint's `ca_file` alone, and its client certificate.
//! When those files are not on this host the endpoint is not probed (a
//! probe trusting other roots would judge a healthy endpoint down), and
//! that is said once; its health then rests on the sidecars' reports.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use reqwest::header::HeaderValue;
use switchyard_policy::credential::KeyError;
use switchyard_policy::{tls, ApiKind, CredentialRef, Endpoint};
use tokio::sync::watch;

use crate::health::{ProbeRule, ProbeState, Turn};
use crate::publish::Published;
use crate::signals::Aggregator;

/// How probes run.
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    pub every: Duration,
    /// A probe not answered within this failed.
    pub timeout: Duration,
    pub rule: ProbeRule,
}

/// Why an endpoint's credential cannot be used by the probes. The messages
/// name the reference, never the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("the credential reference is invalid: {0}")]
    Invalid(String),
    #[error("{0} in the control plane's environment")]
    Key(KeyError),
    #[error("the credential holds characters a header cannot carry")]
    NotAHeader,
}

/// The credential header for an endpoint's API kind and credential
/// reference (`Authorization: Bearer`, Azure's `api-key`, Anthropic's
/// `x-api-key`), its value sensitive (never printed by `Debug`).
pub fn credential(
    api: ApiKind,
    reference: &str,
) -> Result<(&'static str, HeaderValue), CredentialError> {
    let key = CredentialRef::parse(reference)
        .map_err(CredentialError::Invalid)?
        .read_key()
        .map_err(CredentialError::Key)?;
    let (name, value) = api.credential_header(&key);
    let mut value = HeaderValue::try_from(value).map_err(|_| CredentialError::NotAHeader)?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// Where an endpoint is probed.
pub fn probe_url(e: &Endpoint) -> Result<String, String> {
    let base = e.url.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err("not an http or https URL".into());
    }
    Ok(format!("{base}{}", e.probe_path()))
}

/// A client for probing `e`: `shared` (the system's roots) when it names
/// no TLS files, else one built from them, kept in `own` while the files
/// stay the same. An error says why the endpoint cannot be probed.
fn client_for(
    e: &Endpoint,
    shared: &reqwest::Client,
    own: &mut BTreeMap<String, (Vec<u8>, reqwest::Client)>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let paths = e.tls_paths();
    if !paths.any() {
        own.remove(&e.name);
        return Ok(shared.clone());
    }
    let material = tls::load(&paths).map_err(|err| format!("its TLS files: {err}"))?;
    if let Some((fingerprint, c)) = own.get(&e.name) {
        if *fingerprint == material.fingerprint {
            return Ok(c.clone());
        }
    }
    let mut b = builder(timeout);
    if let Some(ca) = &material.ca {
        b = b.tls_built_in_root_certs(false);
        for c in ca {
            let c = reqwest::Certificate::from_der(c.as_ref()).map_err(|err| err.to_string())?;
            b = b.add_root_certificate(c);
        }
    }
    if let (Some(cert), Some(key)) = (&e.client_cert, &e.client_key) {
        // `tls::load` checked both files; reqwest takes them as one PEM.
        let mut pem = std::fs::read(cert).map_err(|err| format!("client_cert: {err}"))?;
        pem.push(b'\n');
        pem.extend(std::fs::read(key).map_err(|err| format!("client_key: {err}"))?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|err| err.to_string())?;
        b = b.identity(id);
    }
    let c = b.build().map_err(|err| err.to_string())?;
    own.insert(e.name.clone(), (material.fingerprint, c.clone()));
    Ok(c)
}

/// Every probe client's settings: bounded, no redirects, and rustls only
/// (the same TLS stack, and verification, as the sidecars).
fn builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .use_rustls_tls()
}

/// A failed request said as an operator reads it: the cause, not the URL
/// or a chain of wrappers.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {} ms", timeout.as_millis());
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // A refused handshake: what TLS refused (an unknown issuer, a
        // certificate for another name).
        if let Some(t) = s.downcast_ref::<rustls::Error>() {
            return format!("TLS handshake failed: {t}");
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return format!("TLS handshake failed: {t}");
            }
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                kind => format!("{kind}"),
            };
        }
        source = s.source();
    }
    if e.is_connect() {
        "cannot connect".into()
    } else {
        "request failed".into()
    }
}

/// What an answer to a probe says. Any 2xx passes. So does 401 or 403
/// when the endpoint's key could not be read here and the probe went
/// without it: keys usually live beside the sidecars only, and a server
/// that answers "who are you?" is up; judging it down would take a healthy
/// endpoint away from every sidecar. Pure.
pub fn judge_answer(status: u16, key_withheld: bool) -> Result<(), String> {
    match status {
        200..=299 => Ok(()),
        401 | 403 if key_withheld => Ok(()),
        s => Err(format!("HTTP {s}")),
    }
}

/// One probe.
async fn probe(
    client: &reqwest::Client,
    url: &str,
    api: ApiKind,
    auth: Option<(&'static str, HeaderValue)>,
    key_withheld: bool,
    timeout: Duration,
) -> Result<(), String> {
    let mut req = client.get(url);
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    for (name, value) in api.fixed_headers() {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.map_err(|e| describe(&e, timeout))?;
    judge_answer(resp.status().as_u16(), key_withheld)
}

/// Probes every endpoint of the policy in force each `config.every`, until
/// the process ends, and keeps the aggregator's probe states current.
pub async fn run(
    tables: watch::Receiver<Arc<Published>>,
    aggregator: Arc<Mutex<Aggregator>>,
    config: ProbeConfig,
) {
    let timeout = config
        .timeout
        .min(config.every)
        .max(Duration::from_millis(1));
    let client = match builder(timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client; endpoints will not be probed");
            return;
        }
    };
    let mut states: BTreeMap<String, ProbeState> = BTreeMap::new();
    // What was already said about each endpoint, so it is said once.
    let mut unprobed: BTreeSet<String> = BTreeSet::new();
    let mut no_credential: BTreeMap<String, String> = BTreeMap::new();
    let mut tls_clients = BTreeMap::new();
    let mut tick = tokio::time::interval(config.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let endpoints: Vec<Endpoint> = tables.borrow().policy.endpoints.clone();
        let mut targets = Vec::new();
        for e in &endpoints {
            let target = probe_url(e)
                .and_then(|u| Ok((u, client_for(e, &client, &mut tls_clients, timeout)?)));
            let (url, client) = match target {
                Ok(t) => {
                    unprobed.remove(&e.name);
                    t
                }
                Err(why) => {
                    if unprobed.insert(e.name.clone()) {
                        tracing::info!(endpoint = %e.name, reason = %why, "endpoint not probed");
                    }
                    continue;
                }
            };
            let (auth, withheld) = match e.credential.as_deref().map(|c| credential(e.api, c)) {
                None => (None, false),
                Some(Ok(h)) => {
                    no_credential.remove(&e.name);
                    (Some(h), false)
                }
                Some(Err(why)) => {
                    let why = why.to_string();
                    if no_credential.get(&e.name) != Some(&why) {
                        tracing::warn!(endpoint = %e.name, reason = %why,
                            "probing without the endpoint's credential; a 401 or 403 then counts as up");
                        no_credential.insert(e.name.clone(), why);
                    }
                    (None, true)
                }
            };
            targets.push((e.name.clone(), url, client, e.api, auth, withheld));
        }
        tls_clients.retain(|name, _| endpoints.iter().any(|e| &e.name == name));
        let results = futures::future::join_all(targets.into_iter().map(
            |(name, url, client, api, auth, withheld)| async move {
                let r = probe(&client, &url, api, auth, withheld, timeout).await;
                (name, r)
            },
        ))
        .await;
        let probed: BTreeSet<&String> = results.iter().map(|(n, _)| n).collect();
        let gone: Vec<String> = states
            .keys()
            .filter(|n| !probed.contains(n))
            .cloned()
            .collect();
        let mut agg_updates: Vec<(String, Option<ProbeState>)> = Vec::new();
        for name in gone {
            states.remove(&name);
            agg_updates.push((name, None));
        }
        for (name, r) in results {
            let st = states.entry(name.clone()).or_default();
            match st.record(r, &config.rule) {
                Some(Turn::Down) => tracing::warn!(endpoint = %name, reason = %st.last_error,
                    failures = st.failures, "endpoint down: its probes fail"),
                Some(Turn::Up) => {
                    tracing::info!(endpoint = %name, "endpoint probes pass again")
                }
                None => {}
            }
            agg_updates.push((name, Some(st.clone())));
        }
        let mut agg = aggregator.lock();
        for (name, st) in agg_updates {
            agg.set_probe(&name, st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_passes_when_2xx_or_refused_for_a_key_withheld() {
        assert_eq!(judge_answer(200, false), Ok(()));
        assert_eq!(judge_answer(204, true), Ok(()));
        assert_eq!(judge_answer(401, true), Ok(()));
        assert_eq!(judge_answer(403, true), Ok(()));
        assert_eq!(judge_answer(401, false), Err("HTTP 401".into()));
        assert_eq!(judge_answer(404, true), Err("HTTP 404".into()));
        assert_eq!(judge_answer(503, false), Err("HTTP 503".into()));
    }

    fn endpoint(url: &str, health_path: Option<&str>) -> Endpoint {
        let src = format!(
            "default_class: standard\nendpoints:\n  - name: e\n    url: {url}\n    tier: onprem\n    models: [m]\n    price: {{ input_per_mtok: 1, output_per_mtok: 1 }}\n{}classes:\n  - name: standard\n",
            health_path.map_or(String::new(), |p| format!("    health_path: {p}\n"))
        );
        switchyard_policy::Policy::parse(&src)
            .unwrap()
            .endpoints
            .remove(0)
    }

    #[test]
    fn probes_go_to_the_models_list_or_the_health_path_under_the_url() {
        assert_eq!(
            probe_url(&endpoint("http://10.0.0.1:8000", None)),
            Ok("http://10.0.0.1:8000/v1/models".into())
        );
        assert_eq!(
            probe_url(&endpoint("http://h/openai/", Some("/health"))),
            Ok("http://h/openai/health".into())
        );
        assert_eq!(
            probe_url(&endpoint("https://api.example.com/v1x", None)),
            Ok("https://api.example.com/v1x/v1/models".into())
        );
    }

    #[test]
    fn credentials_resolve_here_and_errors_never_hold_the_key() {
        let dir = std::env::temp_dir().join(format!("switchyard-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "sk-probe-secret\n").unwrap();
        let file = format!("file:{}", path.display());
        let (name, h) = credential(ApiKind::Openai, &file).unwrap();
        assert_eq!(
            (name, h.to_str().unwrap()),
            ("authorization", "Bearer sk-probe-secret")
        );
        let (name, a) = credential(ApiKind::Anthropic, &file).unwrap();
        assert_eq!(
            (name, a.to_str().unwrap()),
            ("x-api-key", "sk-probe-secret")
        );
        let (name, _) = credential(ApiKind::Azure, &file).unwrap();
        assert_eq!(name, "api-key");
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("sk-probe"));
        let missing =
            credential(ApiKind::Openai, "env:SWITCHYARD_PROBE_TEST_UNSET_VAR").unwrap_err();
        assert_eq!(
            missing,
            CredentialError::Key(KeyError::EnvMissing(
                "SWITCHYARD_PROBE_TEST_UNSET_VAR".into()
            ))
        );
        let pasted = credential(ApiKind::Openai, "sk-live-pasted").unwrap_err();
        assert!(!pasted.to_string().contains("sk-live"), "{pasted}");
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(
            credential(ApiKind::Openai, &file),
            Err(CredentialError::Key(KeyError::Empty))
        );
    }
}
