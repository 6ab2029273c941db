#!/usr/bin/env bash
# Join step of the collabora role: this node has joined when Collabora answers the way the app
# servers reach it, through nginx on 443 (TLS, the office domain's name) from the container,
# with a WOPI discovery document. collabora.service loads the image archive into Docker (or
# pulls the image) and starts the container after first boot; with the real CODE image that
# takes minutes, so the wait gives up only after NCIMAGE_WAIT_TIMEOUT seconds (900).
# shellcheck source=/dev/null
source /usr/share/ncimage/join-lib.sh

timeout=${NCIMAGE_WAIT_TIMEOUT:-900}
address=$(node address)
domain=$(var office_domain)

discovery() {
    curl -fsSk --max-time 10 -H "Host: $domain" "https://$address/hosting/discovery" |
        grep -q '<wopi-discovery'
}

log "waiting for Collabora's discovery through nginx (https://$address/hosting/discovery, Host $domain)"
wait_for "$timeout" "Collabora's discovery document through nginx at https://$address (is collabora.service running? journalctl -u collabora)" discovery
log "Collabora answers through nginx"
