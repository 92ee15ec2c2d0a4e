//! The netavark plugin (podman 5): `wgexit create`, `setup NETNS`, `teardown NETNS` and
//! `info`, as netavark's plugin API (version [`API_VERSION`]) has them.

use serde_json::json;

use crate::cni::Outcome;

/// The plugin API version netavark 1.x and 2.x expect.
pub const API_VERSION: &str = "1.0.0";

/// `info`: the plugin's version and the API version it speaks.
pub fn info() -> Outcome {
    Outcome {
        stdout: json!({ "version": env!("CARGO_PKG_VERSION"), "api_version": API_VERSION })
            .to_string(),
        exit_code: 0,
    }
}
