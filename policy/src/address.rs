//! An endpoint's `url` as both sides read it: the control plane validates
//! the policy with [`EndpointUrl::parse`] and the sidecar connects with
//! what it returns, so a URL the control plane accepts is one every sidecar
//! can apply (one bad endpoint must never NACK a fleet).

/// What resolving, connecting and the upstream request need of a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    /// The host as the URL writes it (an IPv6 address in brackets).
    pub host: String,
    /// The URL's port, else the scheme's (80, 443).
    pub port: u16,
    /// The path prefix, without a trailing slash; empty for none.
    pub prefix: String,
    /// The `Host` header: the host, and the port unless it is the scheme's
    /// default.
    pub authority: String,
    /// `https`: TLS to the endpoint, verified against `server_name`.
    pub tls: bool,
    /// The host without IPv6 brackets: what DNS resolves, TLS sends as SNI
    /// and the certificate must name.
    pub server_name: String,
}

impl EndpointUrl {
    /// Parses and checks an endpoint URL; the error says what is wrong,
    /// for a policy error or a NACK.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let u = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
        let tls = match u.scheme() {
            "http" => false,
            "https" => true,
            s => return Err(format!("scheme must be http or https, got {s}")),
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("has no host")?
            .to_string();
        // The sidecar would drop them silently: keys belong in `credential`.
        if !u.username().is_empty() || u.password().is_some() {
            return Err("must not hold a user name or password (use `credential`)".into());
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err("must not have a query or fragment".into());
        }
        let port = u.port_or_known_default().ok_or("has no port")?;
        let server_name = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if tls && rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            return Err(format!(
                "the host {server_name:?} cannot be a TLS server name"
            ));
        }
        let prefix = u.path().trim_end_matches('/').to_string();
        // `Url` drops a port equal to the scheme's default (`:443`), so
        // the Host header carries one only when it is not.
        let authority = match u.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        Ok(EndpointUrl {
            host,
            port,
            prefix,
            authority,
            tls,
            server_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_path_and_host_header() {
        let u = EndpointUrl::parse("http://[::1]:8080/openai/").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.prefix.as_str(),
                u.authority.as_str()
            ),
            ("[::1]", 8080, "/openai", "[::1]:8080")
        );
        assert_eq!((u.server_name.as_str(), u.tls), ("::1", false));
        let u = EndpointUrl::parse("http://example.com").unwrap();
        assert_eq!(
            (u.port, u.prefix.as_str(), u.authority.as_str()),
            (80, "", "example.com")
        );
        let u = EndpointUrl::parse("https://API.example.com:443/v1x/").unwrap();
        assert_eq!(
            (u.port, u.authority.as_str(), u.server_name.as_str(), u.tls),
            (443, "api.example.com", "api.example.com", true)
        );
        let u = EndpointUrl::parse("https://10.0.0.5:8443").unwrap();
        assert_eq!((u.port, u.authority.as_str()), (8443, "10.0.0.5:8443"));
    }

    #[test]
    fn what_no_sidecar_could_use_is_refused() {
        for bad in [
            "ftp://example.com",
            "not a url",
            "http://",
            "https://user:pw@example.com",
            "http://user@example.com",
            "http://example.com/?q=1",
            "http://example.com/#f",
            "unix:/tmp/sock",
        ] {
            assert!(EndpointUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
