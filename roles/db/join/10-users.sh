#!/bin/bash
# ncimage db role, join step 1, on the primary only (node.vars.db_replica = false): the Nextcloud
# database and the cluster's database users, made before the replica seeds itself from a dump of
# this server (20-replica.sh waits until the `repl` login works):
#   nextcloud@<each app server>   ALL on nextcloud.* only             db_nextcloud_password
#   repl@<each db node>           replication, and the seed dump      db_replication_password
#   backup@<each backup server>   mariadb-dump --single-transaction   backup_db_password
#                                 --dump-slave=2 --gtid on the replica
# The users reach the replica in its seed dump and then by replication. repl exists for every db
# node, this one included, so that after a promotion the old primary can follow the new one.
# Idempotent and a no-op when all is in place: nothing is written (no binlog event) unless the
# database, a user, a password or a grant is missing. Passwords reach the server on stdin, never
# in argv or output.
#
# Environment, for tests (the image uses the default): DB_SOCKET (/run/mysqld/mysqld.sock).
source /usr/share/ncimage/join-lib.sh

DB_SOCKET=${DB_SOCKET:-/run/mysqld/mysqld.sock}

if [ "$(var db_replica false)" = true ]; then
    log "db: a replica: the users come from the primary"
    exit 0
fi

# sql [OPTIONS]: as root over the local socket (unix_socket authentication), SQL on stdin.
sql() { mariadb --socket="$DB_SOCKET" -N -B "$@"; }
# lit STRING: STRING as an SQL string literal.
lit() {
    local s=${1//\\/\\\\}
    printf "'%s'" "${s//\'/\'\'}"
}
# addresses ROLE: the private addresses of the role's nodes in the topology (none if absent).
addresses() {
    jq -r --arg r "$1" '(.cluster.roles[$r] // [])[] | .address' "$NCIMAGE_NODE" | sort -u
}

wait_for 900 "the local MariaDB (socket $DB_SOCKET)" sql -e 'SELECT 1'

# A node that replicates (demoted after a promotion) or is read-only takes no writes.
if [ -n "$(sql -e 'SHOW SLAVE STATUS')" ]; then
    log "db: this node replicates from another one (demoted?): the users come from its primary"
    exit 0
fi
[ "$(sql -e 'SELECT @@read_only')" = 0 ] ||
    die "db: read_only is ON on the primary (node.vars.db_replica = false): check 70-node.cnf"

nc_password=$(secret db_nextcloud_password)
repl_password=$(secret db_replication_password)
backup_password=$(secret backup_db_password)

# Global privileges by their canonical MariaDB 11.8 names, as SHOW GRANTS and
# information_schema.USER_PRIVILEGES spell them (SLAVE MONITOR = REPLICA MONITOR, BINLOG MONITOR
# = REPLICATION CLIENT, REPLICATION SLAVE = REPLICATION REPLICA).
# repl: the replication stream, and 20-replica.sh's seed dump (mariadb-dump --single-transaction
# --master-data=1 --gtid --system=users: a consistent read, the binlog position, the accounts).
repl_privs=(SELECT RELOAD "LOCK TABLES" "REPLICATION SLAVE" "BINLOG MONITOR" "SHOW VIEW" EVENT TRIGGER
    "SLAVE MONITOR")
# backup: mariadb-dump --single-transaction --dump-slave=2 --gtid --all-databases --routines
# --events on the replica (SHOW SLAVE STATUS, STOP/START SLAVE SQL_THREAD, a consistent read).
backup_privs=(SELECT RELOAD "LOCK TABLES" "BINLOG MONITOR" "SHOW VIEW" EVENT TRIGGER
    "REPLICATION SLAVE ADMIN" "SLAVE MONITOR")

todo=()     # SQL statements still needed
changed=()  # accounts they create or repair (for the log)
present=()  # accounts already in place

if [ "$(sql <<<"SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'nextcloud'")" = 0 ]; then
    todo+=("CREATE DATABASE IF NOT EXISTS nextcloud CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;")
    changed+=("database nextcloud")
fi

# has_global_privs_of ARRAY USER HOST: the account has every global privilege in ARRAY.
has_global_privs_of() {
    local -n privs=$1
    local list="" p
    for p in "${privs[@]}"; do list+="${list:+, }$(lit "$p")"; done
    [ "$(sql <<<"SELECT COUNT(DISTINCT PRIVILEGE_TYPE) FROM information_schema.USER_PRIVILEGES
        WHERE GRANTEE = $(lit "'$2'@'$3'") AND PRIVILEGE_TYPE IN ($list)")" = ${#privs[@]} ]
}
# has_all_on_nextcloud USER HOST
has_all_on_nextcloud() {
    sql <<<"SHOW GRANTS FOR $(lit "$1")@$(lit "$2")" | grep -qF "GRANT ALL PRIVILEGES ON \`nextcloud\`.* TO "
}
# want USER HOST PASSWORD GRANT CHECK...: queues what the account lacks (the password is checked
# against its stored hash, the grant with CHECK USER HOST).
want() {
    local user=$1 host=$2 password=$3 grant=$4 account; shift 4
    account="$(lit "$user")@$(lit "$host")"
    if [ "$(sql <<<"SELECT COUNT(*) FROM mysql.user WHERE User = $(lit "$user") AND Host = $(lit "$host")
        AND plugin = 'mysql_native_password' AND authentication_string = PASSWORD($(lit "$password"))")" = 1 ] &&
        "$@" "$user" "$host"; then
        present+=("$user@$host")
        return
    fi
    todo+=("CREATE USER IF NOT EXISTS $account IDENTIFIED BY $(lit "$password");"
        "ALTER USER $account IDENTIFIED BY $(lit "$password");"
        "$grant TO $account;")
    changed+=("$user@$host")
}
join_privs() { local IFS=,; echo "$*" | sed 's/,/, /g'; }

apps=$(addresses app)
[ -n "$apps" ] || log "db: no app servers in the topology: no nextcloud user"
for host in $apps; do
    want nextcloud "$host" "$nc_password" "GRANT ALL PRIVILEGES ON nextcloud.*" has_all_on_nextcloud
done
for host in $(addresses db); do
    want repl "$host" "$repl_password" "GRANT $(join_privs "${repl_privs[@]}") ON *.*" \
        has_global_privs_of repl_privs
done
backups=$(addresses backup)
[ -n "$backups" ] || log "db: no backup server in the topology: no backup user"
for host in $backups; do
    want backup "$host" "$backup_password" "GRANT $(join_privs "${backup_privs[@]}") ON *.*" \
        has_global_privs_of backup_privs
done

if [ ${#todo[@]} -eq 0 ]; then
    log "db: database nextcloud and users in place (${present[*]}): nothing to do"
    exit 0
fi
printf '%s\n' "${todo[@]}" | sql
log "db: created or repaired: ${changed[*]}${present[*]:+; already in place: ${present[*]}}"
