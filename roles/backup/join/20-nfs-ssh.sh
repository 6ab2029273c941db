#!/bin/bash
# backup join: the NFS nodes accept this server's key (backup_ssh_key) for what the backup needs.
# Waits up to 900 s (NCIMAGE_WAIT_TIMEOUT; both nodes together) for each NFS node's SSH (port:
# ssh -G, i.e. 22 unless ssh_config says otherwise), records its host key in root's
# known_hosts (trust on first use, on the private network), then until the node accepts the key:
# the primary answers `systemctl is-active lsyncd.service` (its forced command allows stop, start
# and is-active), the secondary a read-only rsync listing of its data directory (rrsync -ro).
# Nothing is stopped or copied here.
source /usr/share/ncimage/join-lib.sh

key=/etc/ncimage/keys/backup_ed25519
primary=$(var nfs_primary)
secondary=$(var nfs_secondary)
[ -s "$key" ] || die "$key is missing: first boot did not render the backup key"
deadline=$((SECONDS + ${NCIMAGE_WAIT_TIMEOUT:-900}))
left() { local l=$((deadline - SECONDS)); echo $((l > 1 ? l : 1)); }

ssh_opts=(-i "$key" -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10)
record_host_key() { # HOST PORT
    local found
    found=$(ssh-keyscan -p "$2" "$1" 2>/dev/null) && [ -n "$found" ] || return 1
    install -d -m 0700 /root/.ssh
    printf '%s\n' "$found" >>/root/.ssh/known_hosts
}
trust() { # HOST WHAT
    local host=$1 port entry
    port=$(ssh -G "$host" | awk '$1 == "port" {print $2}')
    wait_for "$(left)" "SSH of the $2 $host:$port" tcp_open "$host" "$port"
    entry=$host
    [ "$port" = 22 ] || entry="[$host]:$port"
    if ! ssh-keygen -F "$entry" >/dev/null 2>&1; then
        wait_for "$(left)" "the host key of $host:$port (ssh-keyscan)" record_host_key "$host" "$port"
        log "recorded the host key of the $2 $host"
    fi
}
primary_accepts() {
    local state
    state=$(ssh "${ssh_opts[@]}" "root@$primary" systemctl is-active lsyncd.service) || true
    [[ $state =~ ^(active|inactive|activating|deactivating|failed|reloading)$ ]]
}
secondary_accepts() {
    rsync --list-only -e "ssh ${ssh_opts[*]}" "root@$secondary:/" >/dev/null
}

trust "$primary" "NFS primary"
trust "$secondary" "NFS secondary"
# On failure the reason is the last word of ssh or of the forced command.
(wait_for "$(left)" "the NFS primary $primary to accept the backup key" primary_accepts) ||
    die "waited for the NFS primary $primary to accept the backup key (systemctl is-active lsyncd.service):" \
        "$(ssh "${ssh_opts[@]}" "root@$primary" systemctl is-active lsyncd.service 2>&1 | tr -d '\r' | tail -n1)"
(wait_for "$(left)" "the NFS secondary $secondary to accept the backup key" secondary_accepts) ||
    die "waited for the NFS secondary $secondary to accept the backup key (read-only rsync):" \
        "$(rsync --list-only -e "ssh ${ssh_opts[*]}" "root@$secondary:/" 2>&1 >/dev/null | tr -d '\r' | head -n1)"
log "the NFS primary $primary and secondary $secondary accept the backup key"
