#!/usr/bin/env bash
# RUSTC_WRAPPER for `scripts/pg.sh check MAJOR`: compiles pgrx-pg-sys with
# `--cfg docsrs`, under which it includes the bindings it ships pre-generated
# for each major (src/include/pgNN.rs) instead of generating them from a
# pg_config's headers (its build script skips that when DOCS_RS=1). Every
# other crate compiles as usual: some of them turn nightly-only features on
# under docsrs, so the cfg cannot go into RUSTFLAGS.
rustc=$1
shift
for arg in "$@"; do
    if [[ $arg == pgrx_pg_sys ]]; then
        exec "$rustc" "$@" --cfg docsrs
    fi
done
exec "$rustc" "$@"
