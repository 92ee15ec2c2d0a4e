//! The commands' man pages, made from their clap definitions with `clap_mangen`: one page per
//! program covering every subcommand (a section per subcommand, with its synopsis and
//! options), so nothing a user can type is missing from the manual and nothing in it is
//! stale.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap_mangen::roff::{roman, Roff};
use clap_mangen::Man;

/// A program's page: its command line, and what the generated part cannot know.
pub struct Page {
    pub command: clap::Command,
    /// Sections after the commands (roff), written by hand: FILES, SEE ALSO.
    pub extra: &'static str,
}

/// The pages this crate writes, in `man8`.
pub fn pages() -> Vec<Page> {
    vec![
        Page {
            command: wgexit_plugin::cli::command(),
            extra: WGEXIT_EXTRA,
        },
        Page {
            command: wgexitd::cli::command(),
            extra: WGEXITD_EXTRA,
        },
    ]
}

const WGEXIT_EXTRA: &str = r#".SH ENVIRONMENT
.TP
.B CNI_COMMAND
ADD, DEL, CHECK, STATUS, GC or VERSION: run as a CNI plugin, with \fBCNI_CONTAINERID\fR,
\fBCNI_NETNS\fR, \fBCNI_IFNAME\fR and \fBCNI_ARGS\fR (\fBAPP=\fR\fIapp\fR\fB;REGION=\fR\fIregion\fR
for a private network's names) and the network config on standard input.
.TP
.B WGEXIT_TRACE
Set to 1: ADD prints how long each of its steps took, on standard error.
.SH FILES
.TP
/opt/cni/bin/wgexit
where CNI runtimes look for the plugin; a netavark plugin directory (e.g.
/usr/libexec/netavark) holds it, or a link to it, for podman 5
.TP
/etc/cni/net.d/90\-wgexit.conflist
the network config CNI runtimes read
.TP
/var/lib/cni/wgexit
each attachment's state and private key (\fBdataDir\fR)
.SH SEE ALSO
\fBwgexitd\fR(8), \fBwgexitd.toml\fR(5), \fBwg\-quick\fR(8), \fBpodman\-network\-create\fR(1);
the reference under docs/ in wgexit's sources (plugin.md, podman5.md, networks.md).
"#;

const WGEXITD_EXTRA: &str = r#".SH SIGNALS
SIGTERM and SIGINT stop \fBwgexitd serve\fR but leave the WireGuard interfaces, peers and
nftables rules in place, so a restart drops no tunnel; \fBwgexitd teardown\fR removes them.
SIGHUP makes the daemon re-read its token files at once (it also does within 5 s of a change).
.SH FILES
.TP
/etc/wgexitd/wgexitd.toml
the config, see \fBwgexitd.toml\fR(5)
.TP
\fIstate_dir\fR/leases.redb
the lease store of a single exit node
.TP
\fIstate_dir\fR/tls/ca.pem
the private CA created on first start; the plugin's \fIcaFile\fR
.TP
\fIstate_dir\fR/control.sock
the local control socket that \fBstatus\fR, \fBcheck-config\fR and \fBleases prune\fR use
.SH SEE ALSO
\fBwgexitd.toml\fR(5), \fBwgexit\fR(8), \fBwg\fR(8), \fBnft\fR(8);
the reference under docs/ in wgexit's sources (exit-node.md, operations.md, pools.md).
"#;

/// Every subcommand, depth first, as the path a user types (`leases prune`), with the command
/// that runs it. Commands that only group others (`leases`) are walked, not listed.
pub fn leaf_commands(command: &clap::Command) -> Vec<(String, clap::Command)> {
    let mut out = Vec::new();
    walk(command, "", &mut out);
    out
}

fn walk(command: &clap::Command, prefix: &str, out: &mut Vec<(String, clap::Command)>) {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let path = format!("{prefix}{} ", sub.get_name());
        if sub.has_subcommands() {
            walk(sub, &path, out);
        } else {
            out.push((path.trim_end().to_string(), sub.clone()));
        }
    }
}

/// The page of one program, in roff.
pub fn render(page: &Page, section: &str) -> io::Result<Vec<u8>> {
    let command = page.command.clone().disable_help_subcommand(true);
    let name = command.get_name().to_string();
    let man = Man::new(command.clone()).section(section);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    out.extend_from_slice(b".SH COMMANDS\n");
    for (path, sub) in leaf_commands(&command) {
        render_subcommand(&mut out, &format!("{name} {path}"), sub)?;
    }
    render_notes(&mut out, &command)?;
    man.render_version_section(&mut out)?;
    out.extend_from_slice(page.extra.as_bytes());
    Ok(out)
}

/// The text clap shows after the long help, as the page's NOTES.
fn render_notes(out: &mut Vec<u8>, command: &clap::Command) -> io::Result<()> {
    let Some(after) = command
        .get_after_long_help()
        .or_else(|| command.get_after_help())
    else {
        return Ok(());
    };
    let mut notes = Roff::default();
    notes.control("SH", ["NOTES"]);
    for paragraph in after.to_string().split("\n\n") {
        notes.text([roman(paragraph.trim())]);
        notes.control("PP", []);
    }
    notes.to_writer(out)
}

/// One subcommand as a subsection: its description, synopsis and options, the generator's
/// own sections turned into the subsection's paragraphs.
fn render_subcommand(out: &mut Vec<u8>, full_name: &str, sub: clap::Command) -> io::Result<()> {
    let mut heading = Roff::default();
    heading.control("SS", [full_name]);
    if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
        heading.text([roman(about.to_string())]);
    }
    heading.to_writer(out)?;
    let man = Man::new(sub.bin_name(full_name));
    let mut body = Vec::new();
    man.render_synopsis_section(&mut body)?;
    man.render_options_section(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    for line in body.lines() {
        let line = match line {
            ".SH SYNOPSIS" | ".SH OPTIONS" => ".PP",
            other => other,
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Writes every page under `dir/man8/`, returning the files written.
pub fn write_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let man8 = dir.join("man8");
    std::fs::create_dir_all(&man8)?;
    let mut written = Vec::new();
    for page in pages() {
        let path = man8.join(format!("{}.8", page.command.get_name()));
        std::fs::write(&path, render(&page, "8")?)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_has_a_section_per_subcommand() {
        for page in pages() {
            let text = String::from_utf8(render(&page, "8").unwrap()).unwrap();
            let name = page.command.get_name().to_string();
            let subs = leaf_commands(&page.command);
            assert!(!subs.is_empty());
            for (path, _) in subs {
                let heading = format!(".SS \"{name} {path}\"");
                assert!(text.contains(&heading), "{name}: no {heading} in\n{text}");
            }
        }
    }

    #[test]
    fn the_daemon_page_names_its_config_option() {
        let page = &pages()[1];
        let text = String::from_utf8(render(page, "8").unwrap()).unwrap();
        assert!(text.contains("wgexitd leases prune"), "{text}");
        assert!(text.contains("\\-\\-config"), "{text}");
    }
}
