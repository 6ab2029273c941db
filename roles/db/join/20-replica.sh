#!/bin/bash
# ncimage db role, join step 2, on the replica only (node.vars.db_replica = true): seed this
# server from a dump of the primary (node.vars.db_primary) once, then replicate from it by GTID.
#
# Never seeded (no primary in SHOW SLAVE STATUS): wait for the primary's port and for the `repl`
# login (the primary's 10-users.sh makes it), stream
#   mariadb-dump --all-databases --ignore-database=mysql --system=users --insert-ignore
#                --single-transaction --gtid --master-data=1 --routines --events --triggers
# into the local server without binlogging it (sql_log_bin=0: the replica's binlog keeps only
# what it replicates, as gtid_strict_mode needs), then CHANGE MASTER ... MASTER_USE_GTID=slave_pos
# and START SLAVE. The dump sets gtid_slave_pos to the primary's position at the snapshot.
# Why not the `mysql` schema's tables: their raw rows would replace this server's privilege
# tables without reloading them (new users absent until a restart) and drop and recreate
# mysql.gtid_slave_pos under a running server. --system=users instead writes the accounts as
# CREATE USER IF NOT EXISTS + GRANT statements: the primary's users (nextcloud, repl, backup) work
# at once. The node-local accounts (root, mysql, mariadb.sys @localhost) are filtered out of them:
# this server keeps its own, so root@localhost keeps its unix_socket login exactly as installed.
# Users made later (and any later change to an account) arrive by replication.
# Seeded already: a no-op when both threads run; else wait (up to 900 s) for the primary and
# restart replication with the seed's password. Then wait (up to 120 s) for Slave_IO_Running and
# Slave_SQL_Running = Yes, or fail with the last IO/SQL error.
#
# A replica whose read_only is OFF was promoted (ncimage-db-promote): it is left alone. An
# unseeded replica whose binlog holds GTIDs of its own (root wrote without sql_log_bin=0) drops
# them (RESET MASTER) before seeding; one holding another server's GTIDs but naming no primary
# (RESET SLAVE ALL by hand) fails: point it at the primary by hand.
# Passwords reach the tools in a 0600 option file and on stdin, never in argv or output.
#
# Environment, for tests (the image uses the defaults): DB_SOCKET (/run/mysqld/mysqld.sock), the
# local server; DB_PORT (3306), the primary's port.
source /usr/share/ncimage/join-lib.sh

DB_SOCKET=${DB_SOCKET:-/run/mysqld/mysqld.sock}
DB_PORT=${DB_PORT:-3306}

if [ "$(var db_replica false)" != true ]; then
    log "db: the primary: nothing to replicate"
    exit 0
fi
primary=$(var db_primary)

# sql [OPTIONS]: as root over the local socket (unix_socket authentication), SQL on stdin.
sql() { mariadb --socket="$DB_SOCKET" -N -B "$@"; }
lit() {
    local s=${1//\\/\\\\}
    printf "'%s'" "${s//\'/\'\'}"
}
# status FIELD: a field of SHOW SLAVE STATUS (empty when no replication is configured).
status() { sed -n "s/^ *$1: //p" <<<"$slave_status"; }
read_status() { slave_status=$(mariadb --socket="$DB_SOCKET" -e 'SHOW SLAVE STATUS\G'); }

wait_for 900 "the local MariaDB (socket $DB_SOCKET)" sql -e 'SELECT 1'

if [ "$(sql -e 'SELECT @@read_only')" != 1 ]; then
    if [ -e /etc/mysql/mariadb.conf.d/75-promoted.cnf ]; then
        log "db: promoted to primary (75-promoted.cnf): not replicating"
        exit 0
    fi
    die "db: read_only is OFF on the replica (node.vars.db_replica = true): check 70-node.cnf"
fi

read_status
master=$(status Master_Host)
if [ -n "$master" ] && { [ "$master" != "$primary" ] || [ "$(status Master_Port)" != "$DB_PORT" ]; }; then
    die "db: this replica follows $master:$(status Master_Port), the seed names $primary:$DB_PORT: re-point it by hand (CHANGE MASTER TO)"
fi
if [ -n "$master" ] && [ "$(status Slave_IO_Running)" = Yes ] && [ "$(status Slave_SQL_Running)" = Yes ]; then
    log "db: replicating from $primary:$DB_PORT (at $(sql -e 'SELECT @@gtid_slave_pos')): nothing to do"
    exit 0
fi

password=$(secret db_replication_password)
umask 077
work=$(mktemp -d /run/ncimage-db-join.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$work"' EXIT
# The repl login, for the client tools (an option file: the password stays out of argv).
s=${password//\\/\\\\}
printf '[client]\nuser=repl\npassword="%s"\nhost=%s\nport=%s\n' "${s//\"/\\\"}" "$primary" "$DB_PORT" >"$work/repl.cnf"
repl() { "$1" --defaults-extra-file="$work/repl.cnf" "${@:2}"; }

# change_master: (re)point at the primary with the seed's password, and start.
change_master() {
    sql <<SQL
STOP SLAVE;
CHANGE MASTER TO MASTER_HOST = $(lit "$primary"), MASTER_PORT = $DB_PORT, MASTER_USER = 'repl',
    MASTER_PASSWORD = $(lit "$password"), MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 10;
START SLAVE;
SQL
}

if [ -z "$master" ]; then
    log "db: not seeded yet: waiting (up to 900 s) for the primary $primary:$DB_PORT and the repl login"
else
    log "db: replication from $primary:$DB_PORT is configured but not running ($(status Slave_IO_Running)/$(status Slave_SQL_Running)): waiting (up to 900 s) for the primary and the repl login"
fi
start=$SECONDS
until err=$(repl mariadb -N -B -e 'SELECT 1' 2>&1 >/dev/null); do
    if (( SECONDS - start >= 900 )); then
        die "db: waited 900 s for the repl login on the primary $primary:$DB_PORT: ${err##*$'\n'}"
    fi
    sleep 5
done

if [ -z "$master" ]; then
    # An unseeded replica's binlog holds nothing, or only its own GTIDs (root wrote without
    # sql_log_bin=0): those would clash with the primary's in strict mode, and the seed replaces
    # the data they wrote, so they go. GTIDs of another server mean it did replicate: no guessing.
    own=$(sql -e 'SELECT @@gtid_binlog_pos')
    if [ -n "$own" ]; then
        id=$(sql -e 'SELECT @@server_id')
        if tr ',' '\n' <<<"$own" | grep -vqE "^[0-9]+-$id-[0-9]+\$"; then
            die "db: no primary is configured but the binlog holds replicated GTIDs ($own): point this replica at $primary by hand (CHANGE MASTER TO ... MASTER_USE_GTID = slave_pos)"
        fi
        log "db: dropping this unseeded replica's own binlog (its GTIDs $own)"
        sql <<<"RESET MASTER;"
    fi
    log "db: seeding from a dump of $primary:$DB_PORT"
    # The statements of --system=users about the node-local accounts (root, mysql, mariadb.sys
    # @localhost), which this server has from its own installation, are left out of the seed.
    q="[\`']"
    local_accounts="^(CREATE USER IF NOT EXISTS |GRANT .* TO |/\\*M!100005 SET DEFAULT ROLE NONE FOR |/\\*!80001 ALTER USER )$q[^\`']*$q@${q}localhost$q"
    t=$SECONDS
    sql <<<"STOP SLAVE;"  # the dump's CHANGE MASTER needs a stopped replica
    if ! repl mariadb-dump --all-databases --ignore-database=mysql --system=users --insert-ignore \
        --single-transaction --gtid --master-data=1 --routines --events --triggers 2>"$work/dump.err" |
        grep -vE "$local_accounts" | sql --init-command='SET SESSION sql_log_bin = 0' 2>"$work/import.err"; then
        die "db: seeding from $primary failed: $(cat "$work/dump.err" "$work/import.err" | grep -v '^$' | tail -n1)"
    fi
    seeded=$(sql -e 'SELECT @@gtid_slave_pos')
    [ -n "$seeded" ] || die "db: the dump of $primary set no GTID position (was it taken with --gtid --master-data?)"
    log "db: seeded in $((SECONDS - t)) s at GTID $seeded; starting replication"
else
    log "db: restarting replication (the seed's password and primary)"
fi
change_master

start=$SECONDS
while :; do
    read_status
    io=$(status Slave_IO_Running) sq=$(status Slave_SQL_Running)
    [ "$io" = Yes ] && [ "$sq" = Yes ] && break
    if (( SECONDS - start >= 120 )); then
        why=$(printf '%s\n' "$(status Last_IO_Error)" "$(status Last_SQL_Error)" | grep -v '^$' | paste -sd';' || true)
        die "db: replication from $primary:$DB_PORT not running after 120 s (IO $io, SQL $sq): ${why:-no error reported}"
    fi
    sleep 2
done
log "db: replicating from $primary:$DB_PORT (IO and SQL threads running, at $(sql -e 'SELECT @@gtid_slave_pos'))"
