#!/usr/bin/env bash
# Runs every test: unit tests beside the code, and the black-box tests in integration-tests/
# against a real broker process (tansu on a free port, or KAFKA_BOOTSTRAP if set).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
say "Running the tests (a first build takes 10+ minutes on 2 cores)"
exec cargo test --locked --lib --bins --tests -- --test-threads "${SLUICE_TEST_THREADS:-3}"
