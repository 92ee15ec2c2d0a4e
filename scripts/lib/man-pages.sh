# Sourced by scripts/test: checks the man pages scripts/install put under a staging root.
#
#   check_man_pages STAGE
#
# Each page is installed, `man -l` renders it with no warning, each command's page names
# every subcommand its binary's --help lists (read from the binary, not from the generator),
# and wgexitd.toml(5) names every table and every key of the example config. Returns 1 with a
# message on stderr naming what is missing.

# subcommand_paths BIN [SUB...]: the subcommands `BIN SUB... --help` lists, recursively, one
# path a line ("status", "leases prune").
subcommand_paths() {
  local bin=$1 sub nested
  shift
  for sub in $("$bin" "$@" --help | awk '/^Commands:/ {on = 1; next}
                                         on && !/^  / {on = 0}
                                         on && $1 != "help" {print $1}'); do
    nested=$(subcommand_paths "$bin" "$@" "$sub")
    if [ -n "$nested" ]; then echo "$nested"; else echo "$* $sub" | sed 's/^ //'; fi
  done
}

# installed_binary STAGE NAME: where scripts/install put the program.
installed_binary() {
  case $2 in
    wgexit) echo "$1/opt/cni/bin/wgexit" ;;
    *) echo "$1/usr/local/bin/$2" ;;
  esac
}

# render_man_page FILE: the page as man shows it, plain text; fails on any warning.
render_man_page() {
  local out err
  err=$(mktemp)
  out=$(MANWIDTH=200 man --warnings -l "$1" 2>"$err" | col -b) || { cat "$err" >&2; rm -f "$err"; return 1; }
  if [ -s "$err" ]; then
    echo "man -l $1 warns:" >&2; cat "$err" >&2; rm -f "$err"; return 1
  fi
  rm -f "$err"
  printf '%s\n' "$out"
}

check_man_pages() {
  local stage=$1 man=$1/usr/local/share/man bin text path table key
  for bin in wgexit wgexitd; do
    [ -e "$man/man8/$bin.8" ] || { echo "scripts/install did not install man8/$bin.8" >&2; return 1; }
    text=$(render_man_page "$man/man8/$bin.8") || return 1
    local paths
    paths=$(subcommand_paths "$(installed_binary "$stage" "$bin")")
    [ -n "$paths" ] || { echo "$bin --help lists no subcommand" >&2; return 1; }
    while IFS= read -r path; do
      grep -qF "$bin $path" <<<"$text" || { echo "$bin(8) does not cover \`$bin $path\`" >&2; return 1; }
    done <<<"$paths"
  done
  [ -e "$man/man5/wgexitd.toml.5" ] || { echo "scripts/install did not install man5/wgexitd.toml.5" >&2; return 1; }
  text=$(render_man_page "$man/man5/wgexitd.toml.5") || return 1
  for table in '[api]' '[metrics]' '[[egress]]' '[egress.policy]' '[[network]]' '[cluster]' 'TOP-LEVEL KEYS'; do
    grep -qxF "$table" <<<"$text" || { echo "wgexitd.toml(5) has no section $table" >&2; return 1; }
  done
  for key in $(grep -oE '^#? ?[a-z_0-9]+ *=' plugin-configs/wgexitd.toml | sed -E 's/^# ?//; s/ *=//' | sort -u) \
      persistent_keepalive peer_timeout first_handshake_timeout collect_interval reconcile_interval \
      max_leases_per_owner attribution_days; do
    grep -qw -- "$key" <<<"$text" || { echo "wgexitd.toml(5) does not describe the key $key" >&2; return 1; }
  done
}
