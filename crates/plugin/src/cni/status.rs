//! STATUS (spec 1.1.0): can the plugin serve an ADD now? Yes when an exit server answers for
//! the egress, accepts the token, and has addresses left, and the gateway answers for the
//! network with the token.

use crate::cni::config::NetConf;
use crate::cni::error::{CniError, Code};
use wgexit::client::Client;

pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |msg: String| CniError::new(Code::PluginNotAvailable, msg);
    let token = conf.token().map_err(|e| unavailable(e.to_string()))?;
    let client = Client::new(&conf.servers, &conf.ca_file, token)
        .map_err(|e| unavailable(format!("config key \"caFile\": {e}")))?;
    if let Some(egress) = &conf.egress {
        let info = client
            .egress_info(egress)
            .map_err(|e| unavailable(format!("egress {egress:?}: {e}")))?;
        if info.leases >= info.capacity {
            return Err(unavailable(format!(
                "egress {egress:?}: all {} addresses of pool {} are leased",
                info.capacity, info.pool
            )));
        }
    }
    if let Some(network) = &conf.network {
        client
            .network_info(network)
            .map_err(|e| unavailable(format!("network {network:?}: {e}")))?;
    }
    Ok(())
}
