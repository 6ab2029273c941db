#!/bin/bash
# nfs join: SSH trust and file replication.
#   Every NFS node: the peers' files first boot rendered (sshd_config.d/60-ncimage-nfs.conf,
#   /etc/ssh/ncimage_authorized_keys/root) are there, sshd lets root in from each peer with
#   forced commands only, and the running sshd has them loaded (reload).
#   The primary (node.vars.nfs_secondary): waits up to 900 s (NCIMAGE_WAIT_TIMEOUT) for the
#   secondary's SSH (port: ssh -G, i.e. 22 unless ssh_config says otherwise), records its
#   host key in root's known_hosts, waits (same deadline) until the secondary accepts the lsyncd
#   key (its own join step loads the key), then starts lsyncd unless it runs and waits until it
#   is active. lsyncd's first run copies the whole data directory; later starts resync it.
source /usr/share/ncimage/join-lib.sh

dropin=/etc/ssh/sshd_config.d/60-ncimage-nfs.conf
keys=/etc/ssh/ncimage_authorized_keys/root
lsyncd_key=/etc/ncimage/keys/lsyncd_ed25519
secondary=$(var nfs_secondary "")
peer=$(var nfs_peer "")
backups=$(var backup_addresses "[]" | jq -r '.[]')

# --- sshd: root from the peers, with forced commands only ---------------------------------------
# The secondary takes the primary's lsyncd; both take the backup server.
peers=$backups
[ -z "$secondary" ] && [ -n "$peer" ] && peers="$peer $peers"
[ -n "${peers// /}" ] || die "node.vars has neither nfs_peer nor backup_addresses: the seed names no peers"
[ -s "$dropin" ] || die "$dropin is missing: first boot did not render the peers' Match block"
[ -s "$keys" ] || die "$keys is missing: first boot did not render root's authorized keys"
out=$(sshd -t 2>&1) || die "sshd -t: $(tail -n1 <<<"$out")"
for a in $peers; do
    prl=$(sshd -T -C "addr=$a,user=root,host=$a,laddr=$(node address),lport=22" | awk '$1 == "permitrootlogin" {print $2}')
    [ "$prl" = forced-commands-only ] || die "sshd lets root in from $a with '$prl', not forced-commands-only"
    grep -q "^from=\"\([^\"]*,\)\?${a//./\\.}[,\"].*,restrict,command=" "$keys" ||
        die "$keys has no restricted key from $a"
done
# sshd reads its configuration at start and on reload (first boot reloads it when it renders).
wait_for 60 "ssh.service to be active" systemctl is-active --quiet ssh.service
systemctl reload ssh.service || die "could not reload ssh.service"
# shellcheck disable=SC2086 # the addresses are words
log "sshd: root only from $(echo $peers | tr ' ' ','), with forced commands only"

[ -n "$secondary" ] || { log "secondary: the primary ($peer) replicates into this node"; exit 0; }

# --- the primary: reach the secondary, then lsyncd ----------------------------------------------
deadline=$((SECONDS + ${NCIMAGE_WAIT_TIMEOUT:-900}))
left() { local l=$((deadline - SECONDS)); echo $((l > 1 ? l : 1)); }
port=$(ssh -G "$secondary" | awk '$1 == "port" {print $2}')
wait_for "$(left)" "SSH of the NFS secondary $secondary:$port" tcp_open "$secondary" "$port"

# Trust on first use, on the private network: the host keys were made by the secondary's first boot.
host=$secondary
[ "$port" = 22 ] || host="[$secondary]:$port"
record_host_key() {
    local found
    found=$(ssh-keyscan -p "$port" "$secondary" 2>/dev/null) && [ -n "$found" ] || return 1
    install -d -m 0700 /root/.ssh
    printf '%s\n' "$found" >>/root/.ssh/known_hosts
}
if ! ssh-keygen -F "$host" >/dev/null 2>&1; then
    wait_for "$(left)" "the host key of $secondary:$port (ssh-keyscan)" record_host_key
    log "recorded the host key of $secondary"
fi

lsyncd_ssh() {
    ssh -i "$lsyncd_key" -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 "root@$secondary" "$@"
}
# On failure the reason is ssh's own last word (Permission denied, Host key verification failed, ...).
(wait_for "$(left)" "the NFS secondary $secondary to accept the lsyncd key" lsyncd_ssh true) ||
    die "waited for the NFS secondary $secondary to accept the lsyncd key: $(lsyncd_ssh true 2>&1 | tr -d '\r' | tail -n1)"

[ -s /etc/lsyncd/lsyncd.conf.lua ] || die "/etc/lsyncd/lsyncd.conf.lua is missing: first boot did not render it"
if ! systemctl is-active --quiet lsyncd.service; then
    systemctl reset-failed lsyncd.service 2>/dev/null || true
    systemctl start lsyncd.service || die "lsyncd.service did not start (journalctl -u lsyncd.service)"
fi
wait_for 60 "lsyncd.service to be active (journalctl -u lsyncd.service, /var/log/lsyncd/lsyncd.log)" \
    systemctl is-active --quiet lsyncd.service
log "lsyncd mirrors /srv/nextcloud/data to $secondary"
