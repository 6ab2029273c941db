#!/usr/bin/env bash
# Join step of the app role: Nextcloud is installed once for the cluster and every app server
# runs with the same config/config.php.
#
# The first app server (node.vars.run_cron, i.e. the first of cluster.roles.app) installs
# Nextcloud with `occ maintenance:install` into database `nextcloud` on the db primary (data
# directory: the NFS export), sets background jobs to cron, and publishes the config.php that
# installation wrote on the shared data directory: /srv/nextcloud/data/.ncimage/config.php
# (www-data, 0640, folder 0750), atomically (rename). The other app servers wait for that file
# (up to 1200 s) and install it as their config/config.php. A first app server that was
# reinstalled finds the file published and adopts it instead of installing again.
#
# On every node config/ncimage.config.php (rendered at first boot from the seed) is merged
# over config.php, so instanceid, passwordsalt, secret, database and Redis settings are the
# seed's: the step ends by checking that occ reports installed:true and the seed's instanceid.
# When config.php changed, PHP-FPM is reloaded (opcache revalidates only every 60 s).
#
# Every run finds its work done and changes nothing (ncimage join runs the steps at each boot).
# Files on the data directory are read and written as www-data: the export squashes root.
#
# Secrets: `occ maintenance:install` takes the database and admin passwords only as options
# (or at an interactive prompt); Nextcloud reads them from no file and no environment
# variable. So that they never appear on a command line (ps, /proc/PID/cmdline), occ runs with
# /usr/share/ncimage/app/occ-args-stdin.php as auto_prepend_file, which appends the options jq
# writes to its standard input (JSON) to occ's argv. In ps there is only
#   runuser -u www-data -- php -d auto_prepend_file=/usr/share/ncimage/app/occ-args-stdin.php \
#       occ maintenance:install --no-interaction
#   jq -c --arg host DBHOST --arg data /srv/nextcloud/data [ ... .secrets.… ] /etc/ncimage/node.json
# occ's output is printed with the passwords replaced by [redacted].
#
# Test overrides (qemu-tests/join/app-join-selftest; never set in an image):
#   NC_ROOT (/var/www/nextcloud), NCIMAGE_DB_PORT (3306), NCIMAGE_PUBLISH_TIMEOUT (1200).
# shellcheck source=/dev/null
source /usr/share/ncimage/join-lib.sh

nc=${NC_ROOT:-/var/www/nextcloud}
config=$nc/config/config.php
data=/srv/nextcloud/data
shared=$data/.ncimage
published=$shared/config.php
helper=/usr/share/ncimage/app/occ-args-stdin.php
db_host=$(var db_host)
db_port=${NCIMAGE_DB_PORT:-3306}
publish_timeout=${NCIMAGE_PUBLISH_TIMEOUT:-1200}
me=$(node name)
first_app=$(cluster '.roles.app[0].name' 2>/dev/null || true)
first=false
if [ "$(var run_cron false)" = true ] || [ "$first_app" = "$me" ]; then
    first=true
fi

cd "$nc" || die "no Nextcloud webroot at $nc"
[ -f occ ] || die "no occ in $nc: the image carries no Nextcloud release"
[ -f config/ncimage.config.php ] ||
    die "$nc/config/ncimage.config.php is missing: first boot did not render it (see ncimage-firstboot.service)"

as_www() { runuser -u www-data -- "$@"; }
occ() { as_www php occ "$@"; }

# installed: whether occ status says installed:true; dies when occ gives no status.
installed() {
    local out state
    out=$(occ status --output=json 2>&1) || die "occ status fails: $(tail -n1 <<<"$out")"
    # Only the JSON line: occ may print warnings before it.
    state=$(jq -Rrn '[inputs | fromjson? | objects | select(has("installed"))] | last | if . == null then "none" else .installed end' <<<"$out")
    case $state in
        true) return 0 ;;
        false) return 1 ;;
        *) die "occ status --output=json printed no status: $(tail -n1 <<<"$out")" ;;
    esac
}

published_exists() { as_www test -s "$published"; }
same_as_published() { as_www cmp -s "$published" "$config"; }

# redact TEXT: TEXT with the passwords of this step replaced.
redact() {
    local text=$1 name value
    for name in db_nextcloud_password nextcloud_admin_password; do
        value=$(secret "$name") || continue
        text=${text//"$value"/[redacted]}
    done
    printf '%s\n' "$text"
}

changed=false

install_nextcloud() {
    local host=$db_host out rc=0
    [ "$db_port" = 3306 ] || host=$db_host:$db_port
    secret db_nextcloud_password >/dev/null || die "the seed has no secret db_nextcloud_password"
    secret nextcloud_admin_password >/dev/null ||
        die "the seed has no secret nextcloud_admin_password: the cluster's secrets file predates it; add it and write the seeds again"
    log "installing Nextcloud: occ maintenance:install (database nextcloud at $host, user admin, data in $data)"
    out=$(jq -c --arg host "$host" --arg data "$data" '[
            "--database=mysql", "--database-name=nextcloud", "--database-host=\($host)",
            "--database-user=nextcloud", "--database-pass=\(.secrets.db_nextcloud_password)",
            "--admin-user=admin", "--admin-pass=\(.secrets.nextcloud_admin_password)",
            "--data-dir=\($data)"]' "$NCIMAGE_NODE" |
        as_www php -d "auto_prepend_file=$helper" occ maintenance:install --no-interaction 2>&1) || rc=$?
    out=$(redact "$out")
    sed 's/^/  occ: /' <<<"$out"
    if [ $rc -ne 0 ]; then
        die "occ maintenance:install failed (exit $rc): $(grep -v '^[[:space:]]*$' <<<"$out" | tail -n1)"
    fi
    changed=true
}

# adopt: installs the published config.php as this node's config/config.php (www-data 0640).
adopt() {
    local tmp=$nc/config/.config.php.ncimage.$$
    as_www php -r 'include $argv[1]; exit(is_array($CONFIG ?? null) && ($CONFIG["installed"] ?? false) === true ? 0 : 1);' \
        -- "$published" >/dev/null 2>&1 ||
        die "$published is not a config.php of an installed Nextcloud: republish it from $first_app (rerun its join)"
    if ! { as_www install -m 0640 "$published" "$tmp" && as_www mv -f "$tmp" "$config"; }; then
        as_www rm -f "$tmp" || true
        die "cannot install $published as $config"
    fi
    changed=true
    log "installed the cluster's config.php from $published"
}

# publish: this node's config.php on the data directory, for the other app servers.
publish() {
    local tmp=$shared/.config.php.$me.$$
    if ! { as_www install -d -m 0750 "$shared" && as_www install -m 0640 "$config" "$tmp" &&
        as_www mv -f "$tmp" "$published"; }; then
        as_www rm -f "$tmp" || true
        die "cannot publish config.php on $shared (as www-data)"
    fi
    log "published config.php on $published for the other app servers"
}

if $first; then
    if installed; then
        log "Nextcloud is installed"
    elif published_exists; then
        log "Nextcloud is not installed here but the cluster has a published config.php: adopting it (node reinstalled?)"
        adopt
    else
        install_nextcloud
    fi
    occ background:cron >/dev/null || die "occ background:cron failed"
else
    if ! installed && ! published_exists; then
        log "waiting up to $publish_timeout s for ${first_app:-the first app server} to install Nextcloud and publish $published"
        wait_for "$publish_timeout" "${first_app:-the first app server} to install Nextcloud and publish $published" published_exists
    fi
    if ! published_exists; then
        log "warning: $published is gone; keeping this node's config.php"
    elif same_as_published; then
        log "config.php is the cluster's"
    else
        adopt
    fi
fi

if $changed; then
    if systemctl is-active --quiet php8.4-fpm.service 2>/dev/null; then
        systemctl reload php8.4-fpm.service || die "reloading php8.4-fpm.service failed"
        log "reloaded php8.4-fpm (opcache) for the new config.php"
    else
        log "php8.4-fpm is not running: nothing to reload"
    fi
fi

installed || die "occ status does not say installed:true after installation"
want="oc$(secret nextcloud_instanceid)" || die "the seed has no secret nextcloud_instanceid"
got=$(occ config:system:get instanceid 2>/dev/null | tail -n1) || true
[ "$got" = "$want" ] ||
    die "occ reports another instanceid than the seed's (oc + nextcloud_instanceid): is config/ncimage.config.php rendered and readable by www-data?"

if $first; then
    if published_exists && same_as_published; then
        log "the published config.php is this node's"
    else
        publish
    fi
fi
log "Nextcloud is installed and configured for the cluster"
