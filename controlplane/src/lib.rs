//! The Switchyard control plane: reads the policy, turns it into versioned
//! routing tables, streams them to every sidecar, takes in their telemetry
//! and answers operators.
#![forbid(unsafe_code)]

pub mod policy;
pub mod publish;
pub mod registry;
pub mod routing;
pub mod services;
pub mod signals;
pub mod weights;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use publish::LoadError;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub policy: PathBuf,
    /// How often the policy file is checked for edits.
    pub reload_every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    config: ControlConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControlError> {
    let (publisher, tables) = publish::Publisher::load(&config.policy)?;
    tokio::spawn(publisher.watch_file(config.reload_every));
    let state = services::State {
        tables,
        registry: Arc::new(registry::Registry::default()),
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(pb::routing_discovery_server::RoutingDiscoveryServer::new(
            services::Discovery(state.clone()),
        ))
        .add_service(pb::telemetry_server::TelemetryServer::new(
            services::Telemetry(state.clone()),
        ))
        .add_service(pb::admin_server::AdminServer::new(services::Admin(state)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
