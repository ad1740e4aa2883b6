#!/usr/bin/env bash
# Installs what sluice's demo, tests and benchmarks need, skipping what is already there.
# Sourced by scripts/demo.sh, scripts/test.sh and scripts/bench.sh; safe to run again.
#
#   SLUICE_CACHE   where builds and tools are kept between runs (default ~/.cache/sluice)
#   KAFKA_BOOTSTRAP  use this broker instead of starting tansu (then tansu is not built)
set -euo pipefail

export SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
mkdir -p "$SLUICE_CACHE"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_apt=()
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
command -v g++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
command -v curl >/dev/null || need_apt+=(curl)
command -v redis-server >/dev/null || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "Installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import pyarrow, duckdb, pytz, moto, boto3' 2>/dev/null; then
  say "Installing Python packages for the independent readers (pyarrow, DuckDB) and S3 tests (moto)"
  python3 -m pip install -q --disable-pip-version-check -r "$(dirname "${BASH_SOURCE[0]}")/../integration-tests/requirements.txt"
fi

# libtorch for the tch crate (scoring): PyTorch 2.13.0 from PyPI, which tch 0.26 is built
# against (about 5 GB with its CUDA libraries; it runs on the CPU where there is no GPU). The
# build links it through this Python (LIBTORCH_USE_PYTORCH) and gives the binaries an rpath to
# it, so they run without LD_LIBRARY_PATH.
if ! python3 -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
  say "Installing PyTorch 2.13.0 (libtorch for sluice's models; about 5 GB, a few minutes)"
  python3 -m pip install -q --disable-pip-version-check torch==2.13.0
fi
export LIBTORCH_USE_PYTORCH=1

# A Kafka-protocol broker: tansu, built once from crates.io (15-20 minutes on 2 cores).
export TANSU_BIN="${TANSU_BIN:-$SLUICE_CACHE/tansu/bin/tansu}"
if [ -z "${KAFKA_BOOTSTRAP:-}" ] && [ ! -x "$TANSU_BIN" ]; then
  say "Building the tansu broker (first run only, 15-20 minutes on 2 cores)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$SLUICE_CACHE/tansu" >&2
fi

# Prints a free loopback port.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts tansu on a free loopback port, its files in $1, with storage engine $2 (default SQLite);
# sets KAFKA_BOOTSTRAP and TANSU_PID. Does nothing if KAFKA_BOOTSTRAP is already set.
start_broker() {
  local dir="$1" engine="${2:-sqlite://tansu.db}"
  if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then return; fi
  local port
  port=$(free_port)
  mkdir -p "$dir"
  (cd "$dir" && exec "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$engine" \
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
