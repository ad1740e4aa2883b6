#!/usr/bin/env bash
# CI's proof that scripts/setup.sh works on a bare machine, run by .ci/run before the tests.
#
# CI's machine already has everything, which once hid a set-up line that failed on every fresh
# machine. This runs scripts/setup.sh as a bare machine would meet it, as far as can be done
# without uninstalling anything:
#   - with a PATH in which no program of the Debian packages it installs
#     (scripts/apt-packages.txt) can be found, so nothing may use one before installing it;
#   - with a new SLUICE_CACHE: a fresh Python virtual environment (every requirement installed
#     from nothing; pip's download cache makes that a copy, not a download) and a fresh broker;
#   - without KAFKA_BOOTSTRAP, TANSU_BIN, REDIS_URL or SLUICE_VENV from the caller.
# Then it checks that what the set-up promised is there: torch 2.13.0 and the readers in the
# new environment, and a broker binary that starts and accepts connections.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d "${TMPDIR:-/tmp}/sluice-check-setup.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The programs to hide: everything the packages put in a bin folder.
mapfile -t packages < <(grep -v '^\s*#' scripts/apt-packages.txt | grep -v '^\s*$')
declare -A hide=()
for p in "${packages[@]}"; do
  while read -r f; do
    case "$f" in */bin/*) hide[$(basename "$f")]=1 ;; esac
  done < <(dpkg -L "$p" 2>/dev/null || true)
done

# Each PATH folder that holds one of them is replaced by a folder of links to its other entries.
newpath=""
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  shadow=""
  for b in "${!hide[@]}"; do
    if [ -e "$d/$b" ]; then shadow="$work/path/${d//\//_}"; break; fi
  done
  if [ -z "$shadow" ]; then newpath+="$d:"; continue; fi
  mkdir -p "$shadow"
  for f in "$d"/* "$d"/.[!.]*; do
    [ -e "$f" ] || continue
    b="$(basename "$f")"
    [ -n "${hide[$b]:-}" ] || ln -s "$f" "$shadow/$b"
  done
  newpath+="$shadow:"
done
newpath="${newpath%:}"
for b in "${!hide[@]}"; do
  if PATH="$newpath" command -v "$b" >/dev/null; then
    echo "check-setup: could not hide $b from PATH" >&2
    exit 1
  fi
done
echo "check-setup: running scripts/setup.sh with ${#hide[@]} programs of ${packages[*]} hidden from PATH and a new SLUICE_CACHE ($work/cache)" >&2

if ! env -u KAFKA_BOOTSTRAP -u TANSU_BIN -u REDIS_URL -u SLUICE_VENV -u CARGO_TARGET_DIR \
  PATH="$newpath" SLUICE_CACHE="$work/cache" \
  bash -c 'source scripts/setup.sh
    python3 -c "import sys, torch, pyarrow, duckdb, moto, boto3, pytz
assert sys.prefix == \"$SLUICE_VENV\", sys.prefix
assert torch.__version__.startswith(\"2.13.0\"), torch.__version__"
    port=$(free_port)
    "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ \
      >"$SLUICE_CACHE/tansu.log" 2>&1 &
    pid=$!
    wait_port "$port" || { echo "the broker did not start"; cat "$SLUICE_CACHE/tansu.log"; exit 1; }
    kill "$pid"'; then
  echo "check-setup: FAILED: scripts/setup.sh does not work on a bare machine (see above)" >&2
  exit 1
fi
echo "check-setup: scripts/setup.sh works with its packages hidden and a fresh environment: ok" >&2
