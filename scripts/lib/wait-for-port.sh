# Sourced by the scripts that start servers in the background: wait until such a server
# answers before using it. (A fresh machine starts Python far more slowly than a warm one;
# a script that does not wait fails there with "connection refused".)
#
#   wait_for_port [-n NETNS] [-p PID] [-t SECONDS] HOST PORT
#
# Returns 0 as soon as a TCP connection to HOST:PORT (made inside NETNS, when given)
# succeeds, trying every 20 ms. Returns 1 with a message on stderr naming what it waited for
# when SECONDS (default 30; decimals allowed) pass without an answer, or at once when the
# server's process PID has exited.

wait_for_port() {
  local netns="" pid="" limit=30 opt OPTIND=1
  while getopts n:p:t: opt; do
    case $opt in
      n) netns=$OPTARG ;;
      p) pid=$OPTARG ;;
      t) limit=$OPTARG ;;
      *) return 2 ;;
    esac
  done
  shift $((OPTIND - 1))
  if (($# != 2)); then
    echo "usage: wait_for_port [-n NETNS] [-p PID] [-t SECONDS] HOST PORT" >&2
    return 2
  fi
  local where="$1:$2"
  [ -n "$netns" ] && where+=" in network namespace $netns"
  local enter=()
  [ -n "$netns" ] && enter=(ip netns exec "$netns")
  # One shell inside the namespace runs the whole loop: entering it once, not per try.
  "${enter[@]}" bash -c "$(declare -f _wait_for_port_micros _wait_for_port_exited _wait_for_port_loop)
    _wait_for_port_loop \"\$@\"" _ "$1" "$2" "$limit" "$pid" "$where"
}

# Microseconds since the epoch (EPOCHREALTIME without its locale's decimal separator).
_wait_for_port_micros() {
  echo "${EPOCHREALTIME//[!0-9]/}"
}

# Whether process $1 has exited (gone, or a zombie not yet reaped by its parent).
_wait_for_port_exited() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [ "${stat%% *}" = Z ]
}

_wait_for_port_loop() {
  local host=$1 port=$2 limit=$3 pid=$4 where=$5
  local whole=${limit%%.*} frac=0
  [[ $limit == *.* ]] && frac=${limit#*.}
  if ! [[ ${whole:-0} =~ ^[0-9]+$ && $frac =~ ^[0-9]+$ ]]; then
    echo "wait_for_port: -t $limit is not a number of seconds" >&2
    return 2
  fi
  frac="${frac}000000"
  local deadline=$(($(_wait_for_port_micros) + 10#${whole:-0} * 1000000 + 10#${frac:0:6}))
  while :; do
    # A connect to a port nobody listens on is refused at once; `timeout` bounds a try
    # whose SYN goes unanswered.
    if timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null; then
      return 0
    fi
    if [ -n "$pid" ] && _wait_for_port_exited "$pid"; then
      echo "wait_for_port: the server (pid $pid) exited before $where answered" >&2
      return 1
    fi
    if (($(_wait_for_port_micros) >= deadline)); then
      echo "wait_for_port: nothing answered on $where within $limit s" >&2
      return 1
    fi
    sleep 0.02
  done
}
