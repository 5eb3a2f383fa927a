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

# The version matrix (agent/tests/versions.rs): destinations of these majors
# besides the system's 15, installed once by scripts/pg.sh into its cache
# (about 2.5 s and 21 MB of download each the first time, nothing later).
export DECANT_PG_VERSIONS="${DECANT_PG_VERSIONS:-12,13,15,18}"
IFS=, read -ra pg_majors <<<"$DECANT_PG_VERSIONS"
for major in "${pg_majors[@]}"; do
    major=${major// /}
    [[ -n $major && $major != 15 ]] || continue
    echo "test: PostgreSQL $major in $(./scripts/pg.sh install "$major")"
    # The decant plugin for that server (pgrx supports 13 and later; 15 is
    # the system server setup.sh installed it into). The first run builds
    # the headers and the plugin (measured on 2 cores: see the README's
    # "PostgreSQL versions"), later runs reuse them from the cache.
    # Exit status 3: no Debian source package of that major (14, 16), so no
    # plugin; decoder_versions.rs leaves the major out and says so.
    if ((major >= 13)); then
        status=0
        ./scripts/pg.sh plugin "$major" >/dev/null || status=$?
        if ((status == 3)); then
            echo "test: no decant plugin for PostgreSQL $major (no Debian source package)"
        elif ((status != 0)); then
            exit "$status"
        fi
    fi
done

echo "test: cargo test --release $*"
cargo test --release "$@"
echo "test: all tests passed"
