//! STATUS (spec 1.1.0): can the plugin serve an ADD now? Yes when an exit server answers for
//! the egress, accepts the token, and has addresses left.

use crate::cni::client::Client;
use crate::cni::config::NetConf;
use crate::cni::error::{CniError, Code};

pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |msg: String| CniError::new(Code::PluginNotAvailable, msg);
    let token = conf.token().map_err(|e| unavailable(e.to_string()))?;
    let client = Client::new(&conf.servers, &conf.ca_file, token)
        .map_err(|e| unavailable(format!("config key \"caFile\": {e}")))?;
    let info = client
        .egress_info(&conf.egress)
        .map_err(|e| unavailable(format!("egress {:?}: {e}", conf.egress)))?;
    if info.leases >= info.capacity {
        return Err(unavailable(format!(
            "egress {:?}: all {} addresses of pool {} are leased",
            conf.egress, info.capacity, info.pool
        )));
    }
    Ok(())
}
