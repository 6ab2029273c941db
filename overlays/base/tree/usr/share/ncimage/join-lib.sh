# Sourced by the roles' join steps (/usr/share/ncimage/join/<role>/*.sh), run as root by
# `ncimage join`. The node's seed is $NCIMAGE_NODE (/etc/ncimage/node.json, 0600): read it with
# the functions below, never print secrets.
set -euo pipefail

NCIMAGE_NODE=${NCIMAGE_NODE:-/etc/ncimage/node.json}

# node FIELD: name, role, address, network
node() { jq -er --arg f "$1" '.node[$f]' "$NCIMAGE_NODE"; }
# var KEY [DEFAULT]: node.vars.KEY (strings raw, other JSON compact)
var() {
    local v
    if v=$(jq -ec --arg k "$1" '.node.vars[$k] // empty' "$NCIMAGE_NODE" 2>/dev/null); then
        jq -r 'if type == "string" then . else tojson end' <<<"$v"
    elif [ $# -ge 2 ]; then
        printf '%s\n' "$2"
    else
        echo "node.vars.$1 is not in the seed" >&2
        return 1
    fi
}
# secret NAME: a secret of this role
secret() { jq -er --arg k "$1" '.secrets[$k]' "$NCIMAGE_NODE"; }
# cluster JQ-PATH: e.g. cluster '.roles.db[0].address'
cluster() { jq -er ".cluster$1" "$NCIMAGE_NODE"; }
log() { echo "join[$(node name)]: $*"; }
die() { echo "$*" >&2; exit 1; }

# wait_for SECONDS WHAT COMMAND...: runs COMMAND until it succeeds, or fails with WHAT.
wait_for() {
    local timeout=$1 what=$2; shift 2
    local start=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS - start >= timeout )); then
            die "waited ${timeout} s for $what"
        fi
        sleep 3
    done
}
# tcp_open HOST PORT
tcp_open() { timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }
