#!/usr/bin/env bash
# Set up the machine (scripts/setup.sh), then run the workspace tests in
# release mode (default members: proto, agent, tests; the decoder is built and
# installed by setup.sh via cargo-pgrx). Extra arguments go to `cargo test`.
# Exits non-zero on any failure. Non-interactive (fine with CI=true).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

# The integration tests run the agent binary built by setup.sh and start
# throwaway clusters from the PostgreSQL 15 the extension was installed into.
export DECANT_BIN="$PWD/target/release/decant"
export DECANT_PG_BINDIR="${DECANT_PG_BINDIR:-/usr/lib/postgresql/15/bin}"

echo "test: cargo test --release $*"
cargo test --release "$@"
echo "test: all tests passed"
