//! The command line of `wgexit`: its subcommands, each documented, as clap parses them and as
//! the wgexit(8) man page shows them ([`command`]). Run without arguments and with
//! `CNI_COMMAND` set, `wgexit` is a CNI plugin and none of this is parsed.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// The whole command line: `wgexit [SUBCOMMAND]`.
#[derive(Debug, Parser)]
#[command(
    name = "wgexit",
    version,
    about = "Containers' WireGuard link to a wgexit exit node or gateway: CNI plugin, OCI hook, netavark plugin, peer tool",
    long_about = "wgexit gives a container a WireGuard interface whose default route leads to a \
wgexitd exit node (a static egress IP) and whose organisation's private IPv6 prefix leads to a \
wgexitd gateway (a private network with .internal DNS). The key pair is made on the host and \
only its public key leaves it.\n\n\
As a CNI plugin, wgexit is run without arguments by a CNI runtime (containerd, podman 4 with \
CNI, CRI-O): CNI_COMMAND (ADD, DEL, CHECK, STATUS, GC or VERSION), CNI_CONTAINERID, CNI_NETNS, \
CNI_IFNAME and CNI_ARGS in the environment, the network config (JSON) on standard input, the \
result or a CNI error (JSON) on standard output. Run by hand with neither arguments nor \
CNI_COMMAND, it prints the CNI versions it speaks.\n\n\
As a netavark plugin (podman 5), the same binary answers netavark's create, setup, teardown \
and info; `podman network create -d wgexit -o servers=URL -o egress=NAME -o token_file=FILE \
-o ca_file=FILE NAME` makes a network of it.\n\n\
oci-hook attaches and detaches containers from OCI runtime hooks (runc, runsc) without a CNI \
runtime; peer makes WireGuard configs for laptops joining a private network.",
    after_long_help = "Files: dataDir (CNI) or data_dir (netavark), default /var/lib/cni/wgexit, \
holds each attachment's state and private key (0600). Errors carry codes: the CNI spec's \
(1, 4, 6, 7, 11, 50, 51) and wgexit's own 100-107 (token refused, TLS verification, lease \
refused, netlink, WireGuard, no handshake, state, check failed)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `wgexit`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attaches (add) or detaches (del) a container from an OCI runtime hook
    #[command(
        long_about = "Runs the CNI plugin's ADD or DEL from an OCI runtime hook, for runc or runsc \
without containerd or podman. `add` belongs in the createRuntime (or prestart) hook, `del` in \
poststop. The runtime writes the container's state (JSON) on standard input; the network \
namespace is the one the bundle's config.json names, else the container process's."
    )]
    OciHook {
        #[command(subcommand)]
        phase: HookPhase,
    },
    /// WireGuard peers (laptops) of a private network: create, list, remove
    #[command(
        long_about = "WireGuard peers (laptops, or any WireGuard device) of a private network. \
Peers are never collected as idle; `peer remove` takes one out."
    )]
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// netavark plugin: checks a new network's options (podman network create -d wgexit)
    #[command(
        long_about = "netavark plugin API, run by `podman network create -d wgexit -o KEY=VALUE …`: \
reads the network (JSON) on standard input, checks its options (the CNI config keys in \
snake_case, as strings: servers (comma-separated), egress, network, token_file, ca_file, app, \
region, backend, mtu, routes, data_dir, handshake_timeout, report_mac, gvisor, \
stale_sweep_interval, log_file, log_level, log_max_bytes) and that the token and CA files can be \
read, and prints the network to store. An error ({\"error\": …}, exit status 1) names the option."
    )]
    Create,
    /// netavark plugin: attaches a container (what the CNI plugin's ADD does)
    #[command(
        long_about = "netavark plugin API, run by netavark when a container on a wgexit network \
starts: reads the container's network options (JSON) on standard input, does what the CNI \
plugin's ADD does in the namespace NETNS, and prints netavark's status block: the interface and \
its addresses, and a private network's resolver."
    )]
    Setup {
        /// The container's network namespace (a path such as /run/netns/NAME)
        #[arg(value_name = "NETNS")]
        netns: PathBuf,
    },
    /// netavark plugin: detaches a container (what the CNI plugin's DEL does)
    #[command(
        long_about = "netavark plugin API, run by netavark when a container on a wgexit network \
stops: reads the container's network options (JSON) on standard input and does what the CNI \
plugin's DEL does: the link is removed and the leases released. Idempotent."
    )]
    Teardown {
        /// The container's network namespace (it may be gone already)
        #[arg(value_name = "NETNS")]
        netns: PathBuf,
    },
    /// Warm spare links of the userspace backend: list, clear
    #[command(
        long_about = "With the userspace backend, ADD takes a warm spare link (a wireguard-go already \
serving a TUN device named wgs… in the host namespace, without a key) instead of starting \
wireguard-go, and afterwards starts a replacement in the background, keeping spareLinks \
(default 1) ready per state directory. Spares belong to no container: DEL and GC leave them. \
`spares list` shows them; `spares clear` removes them and their wireguard-go (run it when \
removing wgexit from a host, or set spareLinks to 0 first so that the next ADD makes none)."
    )]
    Spares {
        #[command(subcommand)]
        command: SparesCommand,
    },
    /// netavark plugin: prints the plugin's version and netavark API version (JSON)
    #[command(
        long_about = "netavark plugin API: prints {\"version\": ..., \"api_version\": \"1.0.0\"} on \
standard output. netavark and podman run it to learn about the plugin."
    )]
    Info,
}

/// `wgexit oci-hook add|del`.
#[derive(Debug, Subcommand)]
pub enum HookPhase {
    /// Attaches the container (createRuntime or prestart hook)
    #[command(
        long_about = "Attaches the container: the CNI plugin's ADD, in the container's network \
namespace. Use it in the createRuntime (or prestart) hook."
    )]
    Add(HookArgs),
    /// Detaches the container (poststop hook)
    #[command(
        long_about = "Detaches the container: the CNI plugin's DEL (idempotent; succeeds when the \
namespace is already gone). Use it in the poststop hook."
    )]
    Del(HookArgs),
}

/// What an OCI hook needs besides the state on standard input.
#[derive(Debug, Args)]
pub struct HookArgs {
    /// The plugin's network config: a file holding its JSON, or a conflist with a plugin of
    /// type "wgexit"
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The interface's name in the container
    #[arg(long, value_name = "NAME", default_value = "eth0")]
    pub ifname: String,
}

/// `wgexit spares list|clear` (and `refill`, which ADD runs).
#[derive(Debug, Subcommand)]
pub enum SparesCommand {
    /// Lists the spare links of a state directory: name, wireguard-go pid, whether it serves
    List(SparesArgs),
    /// Removes every spare link of a state directory, with its wireguard-go, socket and log
    Clear(SparesArgs),
    /// Starts spare links until COUNT are ready (run by ADD in the background)
    #[command(hide = true)]
    Refill {
        #[command(flatten)]
        dir: SparesArgs,
        /// How many spares to keep ready
        #[arg(long, value_name = "COUNT")]
        count: u32,
        /// The plugin's log (logFile), where errors go
        #[arg(long, value_name = "FILE")]
        log_file: Option<PathBuf>,
        /// The log's cap (logMaxBytes)
        #[arg(long, value_name = "BYTES", default_value_t = crate::cni::log::DEFAULT_MAX_BYTES)]
        log_max_bytes: u64,
    },
}

/// Which state directory `wgexit spares` works on.
#[derive(Debug, Args)]
pub struct SparesArgs {
    /// The plugin's state directory: the network config's dataDir (netavark: data_dir)
    #[arg(long, value_name = "DIR", default_value = crate::cni::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// Where and as whom `wgexit peer` talks to the gateway.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The gateway's API, e.g. https://198.51.100.2:7443
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The gateway's CA certificate (its state_dir/tls/ca.pem)
    #[arg(long, value_name = "FILE")]
    pub ca_file: PathBuf,
    /// A file holding a token of the network
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// The private network
    #[arg(long, value_name = "NAME")]
    pub network: String,
}

/// `wgexit peer create|list|remove`.
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Makes a key pair here, joins the network with its public key, and writes a wg-quick
    /// config (0600; an existing file is never overwritten)
    Create {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// The peer's name: it answers as <name>._peer.internal
        #[arg(long, value_name = "PEER")]
        name: String,
        /// Where to write the config (default: ./<network>.conf; wg-quick names the
        /// interface after the file)
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Lists the network's peers: name, address, public key
    List {
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Takes a peer out of the network
    Remove {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// The peer's name, as `peer create --name` gave it
        #[arg(long, value_name = "PEER")]
        name: String,
    },
}

/// `wgexit`'s command line, for parsing and for the man page (clap_mangen).
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    /// Every subcommand and option is documented: the man page shows each.
    #[test]
    fn everything_is_documented() {
        fn check(cmd: &clap::Command, path: &str) {
            let path = format!("{path} {}", cmd.get_name());
            assert!(cmd.get_about().is_some(), "{path} has no about");
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                assert!(
                    builtin || arg.get_help().is_some(),
                    "{path} {} has no help",
                    arg.get_id()
                );
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                check(sub, &path);
            }
        }
        check(&command(), "");
    }

    #[test]
    fn parses_the_subcommands() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        assert!(matches!(parse(&["wgexit"]), Ok(None)));
        let hook = parse(&["wgexit", "oci-hook", "add", "--config", "/etc/w.conflist"]);
        match hook {
            Ok(Some(Command::OciHook {
                phase: HookPhase::Add(args),
            })) => assert_eq!(args.ifname, "eth0"),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["wgexit", "oci-hook", "add"]).is_err());
        assert!(matches!(
            parse(&["wgexit", "info"]),
            Ok(Some(Command::Info))
        ));
        match parse(&["wgexit", "setup", "/run/netns/c1"]) {
            Ok(Some(Command::Setup { netns })) => assert_eq!(netns.to_str(), Some("/run/netns/c1")),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["wgexit", "teardown"]).is_err());
        match parse(&["wgexit", "spares", "clear"]) {
            Ok(Some(Command::Spares {
                command: SparesCommand::Clear(args),
            })) => assert_eq!(args.data_dir.to_str(), Some("/var/lib/cni/wgexit")),
            other => panic!("{other:?}"),
        }
        let refill = [
            "wgexit",
            "spares",
            "refill",
            "--data-dir",
            "/d",
            "--count",
            "2",
        ];
        assert!(matches!(
            parse(&refill),
            Ok(Some(Command::Spares {
                command: SparesCommand::Refill { count: 2, .. }
            }))
        ));
        let mut cmd = command();
        let spares = cmd
            .find_subcommand_mut("spares")
            .map(|s| s.render_long_help());
        let spares = spares.map(|h| h.to_string()).unwrap_or_default();
        assert!(
            spares.contains("clear") && !spares.contains("refill"),
            "{spares}"
        );
        let help = command().render_long_help().to_string();
        for sub in [
            "oci-hook", "peer", "create", "setup", "teardown", "info", "spares",
        ] {
            assert!(help.contains(sub), "{help}");
        }
    }
}
