//! `trellis.system.v1.SystemService`: what this server is. No I/O and no
//! credentials, so it doubles as the benchmarks' no-op path.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tonic::{Request, Response, Status};
use trellis_proto::system::v1::system_service_server::{SystemService, SystemServiceServer};
use trellis_proto::system::v1::{GetInfoRequest, GetInfoResponse};

/// The build this binary came from: version, git revision when known, profile.
pub fn build_id() -> String {
    let rev = option_env!("TRELLIS_GIT_REV").unwrap_or("unknown");
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!("{rev} ({profile})")
}

#[derive(Debug)]
struct Info {
    services: Vec<String>,
    enabled: Vec<String>,
    started: Instant,
    started_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct System {
    info: Arc<Info>,
}

impl System {
    pub fn new(services: Vec<String>, enabled: Vec<String>) -> System {
        System {
            info: Arc::new(Info {
                services,
                enabled,
                started: Instant::now(),
                started_at: SystemTime::now(),
            }),
        }
    }

    pub fn into_server(self, max_message_bytes: usize) -> SystemServiceServer<System> {
        SystemServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl SystemService for System {
    async fn get_info(
        &self,
        _: Request<GetInfoRequest>,
    ) -> Result<Response<GetInfoResponse>, Status> {
        let uptime = self.info.started.elapsed();
        Ok(Response::new(GetInfoResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            build: build_id(),
            services: self.info.services.clone(),
            uptime: prost_types::Duration::try_from(uptime).ok(),
            start_time: Some(prost_types::Timestamp::from(self.info.started_at)),
            enabled_services: self.info.enabled.clone(),
        }))
    }
}
