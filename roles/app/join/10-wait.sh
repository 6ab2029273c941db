#!/usr/bin/env bash
# Join step of the app role: waits for what Nextcloud needs on this node before 20-install.sh
# uses it: MariaDB on the db primary (port open, then a login as `nextcloud` with the seed's
# password, which the db primary's join creates), the Redis sessions instance (port open, then
# AUTH with the seed's password) and the NFS mount of the data directory (owned by www-data).
# Each wait gives up after NCIMAGE_WAIT_TIMEOUT seconds (900) with a message naming host:port.
#
# Secrets never reach a command line: the database password goes to PHP (PDO) on its standard
# input, the Redis password to bash's /dev/tcp from a builtin.
#
# Test overrides (qemu-tests/join/app-join-selftest; never set in an image):
#   NCIMAGE_DB_PORT (3306), NCIMAGE_REDIS_PORT (6379), NCIMAGE_WAIT_TIMEOUT (900),
#   NCIMAGE_SKIP_MOUNT_CHECK=1 (the data directory is a plain folder, not an NFS mount).
# shellcheck source=/dev/null
source /usr/share/ncimage/join-lib.sh

timeout=${NCIMAGE_WAIT_TIMEOUT:-900}
data=/srv/nextcloud/data
db_host=$(var db_host)
db_port=${NCIMAGE_DB_PORT:-3306}
redis_host=$(var redis_host)
redis_port=${NCIMAGE_REDIS_PORT:-6379}
secret db_nextcloud_password >/dev/null || die "the seed has no secret db_nextcloud_password"
secret redis_sessions_password >/dev/null || die "the seed has no secret redis_sessions_password"

# until_ok SECONDS WHAT FUNCTION: like wait_for, but the failure message ends with the last
# error FUNCTION left in $why.
why=''
until_ok() {
    local timeout=$1 what=$2 fn=$3 start=$SECONDS
    until "$fn"; do
        if ((SECONDS - start >= timeout)); then
            die "waited ${timeout} s for $what: ${why:-no answer}"
        fi
        sleep 3
    done
}

# --- MariaDB ---------------------------------------------------------------------------------
log "waiting for MariaDB at $db_host:$db_port"
wait_for "$timeout" "MariaDB at $db_host:$db_port (TCP)" tcp_open "$db_host" "$db_port"

# The db primary's join creates the database and the user some time after its port opens.
db_login() {
    why=$(secret db_nextcloud_password | php -r '
        $password = rtrim((string)fgets(STDIN), "\r\n");
        try {
            new PDO("mysql:host={$argv[1]};port={$argv[2]};dbname=nextcloud;charset=utf8mb4",
                "nextcloud", $password, [PDO::ATTR_TIMEOUT => 5, PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
        } catch (Throwable $e) {
            echo str_replace("\n", " ", $e->getMessage());
            exit(1);
        }' -- "$db_host" "$db_port" 2>&1)
}
log "waiting for a login as nextcloud to database nextcloud at $db_host:$db_port"
until_ok "$timeout" "a login as nextcloud to database nextcloud at $db_host:$db_port" db_login

# --- Redis (sessions and locking) ------------------------------------------------------------
log "waiting for Redis (sessions) at $redis_host:$redis_port"
wait_for "$timeout" "Redis (sessions) at $redis_host:$redis_port (TCP)" tcp_open "$redis_host" "$redis_port"

# AUTH in RESP; the reply is +OK, or -WRONGPASS/-ERR while the instance is not configured yet.
redis_auth() {
    why=$(secret redis_sessions_password | LC_ALL=C timeout 10 bash -c '
        IFS= read -r password
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "*2\r\n\$4\r\nAUTH\r\n\$%d\r\n%s\r\n*1\r\n\$4\r\nQUIT\r\n" "${#password}" "$password" >&3
        IFS= read -r -t 5 reply <&3 || reply="no reply to AUTH"
        printf "%s" "$reply"' _ "$redis_host" "$redis_port" 2>&1 | tr -d '\r') || true
    why=${why//$'\n'/ }
    [ "$why" = +OK ]
}
log "waiting for Redis at $redis_host:$redis_port to accept the sessions password"
until_ok "$timeout" "Redis (sessions) at $redis_host:$redis_port to accept the password" redis_auth

# --- the data directory (NFS) ----------------------------------------------------------------
if [ "${NCIMAGE_SKIP_MOUNT_CHECK:-}" = 1 ]; then
    log "NCIMAGE_SKIP_MOUNT_CHECK=1: not checking that $data is a mount (test only)"
elif nfs_server=$(var nfs_server '') && [ -n "$nfs_server" ]; then
    # First boot starts the mount once; it fails if the NFS server was not up yet. Start it
    # again while waiting (PHP-FPM requires the mount, so it failed too: started below).
    nfs_mounted() {
        mountpoint -q "$data" && return 0
        local state
        state=$(systemctl is-active srv-nextcloud-data.mount 2>/dev/null) || true
        why="not mounted${state:+ (srv-nextcloud-data.mount: $state)}"
        systemctl start --no-block srv-nextcloud-data.mount 2>/dev/null || true
        return 1
    }
    log "waiting for the NFS mount of $nfs_server:/srv/nextcloud/data on $data"
    until_ok "$timeout" "the NFS mount of $nfs_server:/srv/nextcloud/data on $data (port 2049)" nfs_mounted
    owner=$(stat -c %u:%g "$data")
    [ "$owner" = 33:33 ] ||
        die "$data (NFS from $nfs_server) is owned by $owner, not www-data (33:33): check the nfs node"
    runuser -u www-data -- test -w "$data" ||
        die "www-data cannot write into $data (NFS from $nfs_server): check the export and its mode"
    if ! systemctl is-active --quiet php8.4-fpm.service; then
        log "starting php8.4-fpm (it requires the mount, which came up late)"
        systemctl start php8.4-fpm.service ||
            die "php8.4-fpm.service does not start: see journalctl -u php8.4-fpm.service"
    fi
else
    log "no NFS server in the seed: $data is a local folder"
fi
log "MariaDB, Redis and the data directory are ready"
