//! The few rtnetlink operations both backends need: find a link by name, delete it.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};

use super::WgError;

/// Opens an rtnetlink connection bound to the current thread's network namespace.
/// The socket keeps talking to that namespace whichever thread later polls it.
pub(crate) fn route_connection() -> Result<rtnetlink::Handle, WgError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| WgError::NoRuntime)?;
    // Creating the connection registers its socket with the runtime's reactor.
    let _guard = runtime.enter();
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| WgError::Io {
        name: "rtnetlink".to_string(),
        source,
    })?;
    runtime.spawn(connection);
    Ok(handle)
}

pub(crate) fn netlink_err(name: &str, e: impl std::fmt::Display) -> WgError {
    WgError::Netlink {
        name: name.to_string(),
        detail: e.to_string(),
    }
}

/// The errno of a netlink error reply, as a positive number.
pub(crate) fn rtnl_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

/// A link found by name.
pub(crate) struct Link {
    pub index: u32,
    pub kind: Option<InfoKind>,
}

/// Looks a link up by name; `None` when there is none in this namespace.
pub(crate) async fn find(handle: &rtnetlink::Handle, name: &str) -> Result<Option<Link>, WgError> {
    let result = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    match result {
        Ok(Some(msg)) => {
            let kind = msg.attributes.iter().find_map(|attr| match attr {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.clone()),
                    _ => None,
                }),
                _ => None,
            });
            Ok(Some(Link {
                index: msg.header.index,
                kind,
            }))
        }
        Ok(None) => Ok(None),
        Err(e) if rtnl_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink_err(name, e)),
    }
}

/// Deletes link `name`; returns whether there was one.
pub(crate) async fn delete(handle: &rtnetlink::Handle, name: &str) -> Result<bool, WgError> {
    let Some(link) = find(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        // Gone in between (e.g. its wireguard-go exited).
        Err(e) if rtnl_errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(netlink_err(name, e)),
    }
}
