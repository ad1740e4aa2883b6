#!/usr/bin/env bash
# Runs every test: unit tests beside the code, and the black-box tests in integration-tests/
# against a real broker process (tansu on a free port, or KAFKA_BOOTSTRAP if set), real
# redis-server processes and the real sluice binary. The tests are built with the release
# profile, the same build as the demo's, so that a machine builds the dependencies once.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
step build-tests "cargo test --release --no-run (12 minutes on 2 cores the first time, 1 after the demo's build, seconds after)" \
  cargo test --release --locked --lib --bins --tests --no-run
say "Running the tests (about 11 minutes on 2 cores)"
exec cargo test --release --locked --lib --bins --tests -- --test-threads "${SLUICE_TEST_THREADS:-3}"
