#!/usr/bin/env bash
# Prepare a Debian bookworm machine to build and test decant (run as root).
#
#   1. apt packages (PostgreSQL 15 server/client/dev, wal2json, decoderbufs,
#      pgcopydb, libclang, protoc, ...) -- `apt-get update` + install only if
#      something is missing;
#   2. cargo-pgrx 0.18.1 (cargo install --locked) unless already that version;
#   3. `cargo pgrx init` for pg15 against the system PostgreSQL, unless the
#      pgrx config already has a pg15 entry;
#   4. build + install the `decant` extension into PostgreSQL 15
#      (skipped when the installed decant.so is newer than the sources);
#   5. `cargo build --release -p decant-agent` -> target/release/decant.
#
# Idempotent: a second run does no installs and finishes quickly.
# Does not need (or start) a PostgreSQL cluster.
#
# Environment:
#   DECANT_SETUP_SKIP_BUILD=1   stop after step 3 (no extension / agent build).
#   DECANT_SETUP_FORCE_BUILD=1  reinstall the extension even if it looks current.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_MAJOR=15
PG_CONFIG="/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config"
PGRX_VERSION=0.18.1
APT_PACKAGES=(
    "postgresql-${PG_MAJOR}"
    "postgresql-client-${PG_MAJOR}"
    "postgresql-server-dev-${PG_MAJOR}"
    libclang-dev
    pgcopydb
    "postgresql-${PG_MAJOR}-wal2json"
    "postgresql-${PG_MAJOR}-decoderbufs"
    protobuf-compiler
    pkg-config
    build-essential
    ca-certificates
    openssl
    curl
)

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# --- 1. apt packages ---------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} > 0)); then
    [[ $(id -u) -eq 0 ]] || die "missing apt packages (${missing[*]}); run this script as root"
    say "installing apt packages: ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${APT_PACKAGES[@]}"
else
    say "apt packages: all present"
fi
[[ -x $PG_CONFIG ]] || die "$PG_CONFIG not found after installing postgresql-server-dev-${PG_MAJOR}"

# --- Rust toolchain ----------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install a Rust toolchain (rustup) first"

# --- 2. cargo-pgrx -----------------------------------------------------------
have_pgrx=$(cargo pgrx --version 2>/dev/null || true)
if [[ $have_pgrx != "cargo-pgrx ${PGRX_VERSION}" ]]; then
    say "installing cargo-pgrx ${PGRX_VERSION} (found: ${have_pgrx:-none})"
    cargo install cargo-pgrx --version "${PGRX_VERSION}" --locked
else
    say "cargo-pgrx ${PGRX_VERSION}: present"
fi

# --- 3. cargo pgrx init --------------------------------------------------------
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if [[ -f $pgrx_config ]] && grep -Eq "^[[:space:]]*pg${PG_MAJOR}[[:space:]]*=" "$pgrx_config"; then
    say "pgrx: pg${PG_MAJOR} already configured in $pgrx_config"
else
    say "pgrx: cargo pgrx init --pg${PG_MAJOR} $PG_CONFIG"
    cargo pgrx init "--pg${PG_MAJOR}" "$PG_CONFIG"
fi

if [[ ${DECANT_SETUP_SKIP_BUILD:-} == 1 ]]; then
    say "DECANT_SETUP_SKIP_BUILD=1: skipping extension and agent builds"
    exit 0
fi

# --- 4. the decant extension ---------------------------------------------------
installed_so="$("$PG_CONFIG" --pkglibdir)/decant.so"
if [[ ${DECANT_SETUP_FORCE_BUILD:-} != 1 && -f $installed_so ]] \
    && [[ -z $(find decoder proto Cargo.toml Cargo.lock -newer "$installed_so" -print -quit) ]]; then
    say "extension: $installed_so is up to date"
else
    say "extension: cargo pgrx install --release (pg${PG_MAJOR})"
    (cd decoder && cargo pgrx install --release --pg-config "$PG_CONFIG")
fi

# --- 5. the agent --------------------------------------------------------------
say "agent: cargo build --release -p decant-agent"
cargo build --release -p decant-agent
[[ -x target/release/decant ]] || die "target/release/decant was not built"
say "done"
