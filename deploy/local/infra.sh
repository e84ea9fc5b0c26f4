#!/usr/bin/env bash
# Local infrastructure for Terranoha: a single-node Apache Kafka broker (KRaft)
# and a PostgreSQL server, both bound to 127.0.0.1, with all state kept in
# <repo>/.local. Used by tests, CI and the demo.
#
#   deploy/local/infra.sh up            install if needed, start, wait until healthy
#   deploy/local/infra.sh down          stop both (downloads and data are kept)
#   deploy/local/infra.sh down --purge  stop both and delete data and logs
#   deploy/local/infra.sh status        print whether each is up (exit 0 only if both are)
#   deploy/local/infra.sh env           print the export lines for the connection settings
#
# See deploy/local/README.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"
LOCAL_DIR="${TERRANOHA_LOCAL_DIR:-$REPO_ROOT/.local}"

# ---------------------------------------------------------------- settings --
KAFKA_HOST=127.0.0.1
KAFKA_PORT="${TERRANOHA_KAFKA_PORT:-29092}"
KAFKA_CONTROLLER_PORT="${TERRANOHA_CONTROLLER_PORT:-29093}"
KAFKA_BOOTSTRAP="$KAFKA_HOST:$KAFKA_PORT"
# Optional second client listener for a test proxy: the broker listens on
# TERRANOHA_KAFKA_PROXIED_PORT and advertises TERRANOHA_KAFKA_PROXY_PORT, where
# the proxy forwards to it. Both or neither; unset by default.
KAFKA_PROXIED_PORT="${TERRANOHA_KAFKA_PROXIED_PORT:-}"
KAFKA_PROXY_PORT="${TERRANOHA_KAFKA_PROXY_PORT:-}"
KAFKA_START_TIMEOUT="${TERRANOHA_KAFKA_START_TIMEOUT:-90}"
KAFKA_STOP_TIMEOUT=30
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"

PG_HOST=127.0.0.1
PG_PORT="${TERRANOHA_PG_PORT:-25432}"
PG_USER=terranoha
PG_PASSWORD=terranoha
PG_DB=terranoha
PG_DSN="postgresql://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DB"
PG_OS_USER=postgres
PG_START_TIMEOUT=60

KAFKA_SRC="$SCRIPT_DIR/kafka"
KAFKA_POM="$KAFKA_SRC/pom.xml"
KAFKA_TEMPLATE="$KAFKA_SRC/server.properties"
KAFKA_LOG4J="$KAFKA_SRC/log4j2.properties"
KAFKA_PROBE="$KAFKA_SRC/kafka_ready.py"

KAFKA_DIR="$LOCAL_DIR/kafka"
KAFKA_LIB="$KAFKA_DIR/lib"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_LOGS="$KAFKA_DIR/logs"
KAFKA_CONF="$KAFKA_DIR/server.properties"
KAFKA_PIDFILE="$KAFKA_DIR/kafka.pid"
KAFKA_CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
KAFKA_MARKER="$KAFKA_LIB/.version"

PG_DIR="$LOCAL_DIR/pg"
PG_DATA="$PG_DIR/data"
PG_LOG_DIR="$PG_DIR/log"
PG_LOG="$PG_LOG_DIR/postgresql.log"
PG_RUN="$PG_DIR/run"

ENV_FILE="$LOCAL_DIR/infra.env"
LOCK_FILE="$LOCAL_DIR/.infra.lock"

MVN_DEPENDENCY_PLUGIN=3.8.1
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM" | head -n1)"

# ----------------------------------------------------------------- helpers --
log() { printf 'infra: %s\n' "$*" >&2; }
die() { printf 'infra: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

env_lines() {
  printf 'export TERRANOHA_KAFKA=%s\n' "$KAFKA_BOOTSTRAP"
  printf 'export TERRANOHA_POSTGRES=%s\n' "$PG_DSN"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Best-effort description of who listens on a port, for error messages.
port_owner() {
  if command -v ss >/dev/null 2>&1; then
    ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:(\(.*\))/\1/p' | head -n1
  fi
}

tail_file() {
  local file="$1" lines="${2:-25}"
  if [[ -s "$file" ]]; then
    printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
    tail -n "$lines" "$file" >&2
    printf -- '-----\n' >&2
  fi
}

take_lock() {
  mkdir -p "$LOCAL_DIR"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCK_FILE"
    flock -w 300 9 || die "another infra.sh run holds $LOCK_FILE for more than 300 s"
  fi
}

# Checks everything `up` needs before touching anything, and names all that is
# missing in one message.
check_prerequisites() {
  local missing=()
  if ! command -v java >/dev/null 2>&1; then
    missing+=("java: a Java 17+ runtime (Debian: apt-get install -y openjdk-17-jre-headless)")
  else
    local major
    major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
    if [[ -z "$major" || "$major" -lt 17 ]]; then
      missing+=("java 17+: found '$(java -version 2>&1 | head -n1)' (Kafka $KAFKA_VERSION needs Java 17 or newer)")
    fi
  fi
  if ! command -v python3 >/dev/null 2>&1; then
    missing+=("python3: used for the Kafka readiness check (Debian: apt-get install -y python3)")
  fi
  if ! kafka_jars_present && ! command -v mvn >/dev/null 2>&1; then
    missing+=("mvn: Apache Maven, needed once to download Kafka $KAFKA_VERSION from Maven Central (Debian: apt-get install -y maven)")
  fi
  if [[ -z "$(pg_find_bindir)" ]]; then
    if ! command -v apt-get >/dev/null 2>&1; then
      missing+=("PostgreSQL server (/usr/lib/postgresql/<version>/bin/postgres) and apt-get to install it")
    elif [[ $EUID -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
      missing+=("PostgreSQL server (/usr/lib/postgresql/<version>/bin/postgres); run as root or install it: apt-get install -y postgresql")
    fi
  fi
  if [[ $EUID -eq 0 ]] && ! command -v runuser >/dev/null 2>&1; then
    missing+=("runuser (util-linux), needed to run PostgreSQL as the '$PG_OS_USER' user")
  fi
  if ((${#missing[@]})); then
    printf 'infra: ERROR: missing prerequisites:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
  fi
}

# ------------------------------------------------------------------- kafka --
kafka_jars_present() {
  [[ -f "$KAFKA_MARKER" && "$(cat "$KAFKA_MARKER")" == "$KAFKA_VERSION" ]]
}

kafka_fetch() {
  if kafka_jars_present; then
    return 0
  fi
  [[ -n "$KAFKA_VERSION" ]] || die "cannot read <kafka.version> from $KAFKA_POM"
  command -v mvn >/dev/null 2>&1 || die "missing: mvn (Apache Maven), needed to download Kafka $KAFKA_VERSION"
  local tmp="$KAFKA_DIR/lib.download" mvn_log="$KAFKA_DIR/download.log"
  mkdir -p "$KAFKA_DIR"
  rm -rf "$tmp"
  log "kafka: downloading Kafka $KAFKA_VERSION from Maven Central (log: $mvn_log)"
  # Fully qualified goal: no plugin-prefix lookup, the version is pinned.
  if ! mvn -B -Dstyle.color=never -f "$KAFKA_POM" \
      "org.apache.maven.plugins:maven-dependency-plugin:$MVN_DEPENDENCY_PLUGIN:copy-dependencies" \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvn_log" 2>&1 9>&-; then
    tail_file "$mvn_log" 20
    rm -rf "$tmp"
    die "downloading Kafka $KAFKA_VERSION with Maven failed (is Maven Central reachable?); full log: $mvn_log"
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] \
    || die "Maven finished but $tmp/kafka_2.13-$KAFKA_VERSION.jar is missing; see $mvn_log"
  echo "$KAFKA_VERSION" >"$tmp/.version"
  rm -rf "$KAFKA_LIB"
  mv "$tmp" "$KAFKA_LIB"
  log "kafka: $(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars in $KAFKA_LIB"
}

# Prints the broker pid if our broker process is alive.
kafka_pid() {
  local pid
  [[ -f "$KAFKA_PIDFILE" ]] || return 1
  pid="$(cat "$KAFKA_PIDFILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka $KAFKA_CONF" || return 1
  echo "$pid"
}

kafka_probe() {
  python3 "$KAFKA_PROBE" --bootstrap "$KAFKA_BOOTSTRAP" --timeout 3
}

kafka_java() {
  local heap=()
  read -r -a heap <<<"$1"
  shift
  java "${heap[@]}" -Djava.awt.headless=true \
    -Dkafka.logs.dir="$KAFKA_LOGS" -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
    -cp "$KAFKA_LIB/*" "$@"
}

kafka_write_config() {
  grep -q '^log\.dirs=' "$KAFKA_TEMPLATE" || die "$KAFKA_TEMPLATE has no log.dirs= line"
  # The template names the default ports; TERRANOHA_KAFKA_PORT and
  # TERRANOHA_CONTROLLER_PORT move a second instance next to the first.
  # With a proxy (TERRANOHA_KAFKA_PROXIED_PORT), clients that bootstrap through it
  # learn the proxy's address from a PROXIED listener; the inter-broker listener
  # (and so the transaction markers) stays the direct PLAINTEXT one.
  awk -v dir="$KAFKA_DATA" -v broker="$KAFKA_HOST:$KAFKA_PORT" \
      -v controller="$KAFKA_HOST:$KAFKA_CONTROLLER_PORT" \
      -v proxied="${KAFKA_PROXIED_PORT:+$KAFKA_HOST:$KAFKA_PROXIED_PORT}" \
      -v proxy="${KAFKA_PROXY_PORT:+$KAFKA_HOST:$KAFKA_PROXY_PORT}" '
    /^log\.dirs=/ { print "log.dirs=" dir; next }
    { gsub(/127\.0\.0\.1:29092/, broker); gsub(/127\.0\.0\.1:29093/, controller) }
    proxied != "" && /^listeners=/ { $0 = $0 ",PROXIED://" proxied }
    proxied != "" && /^advertised\.listeners=/ { $0 = $0 ",PROXIED://" proxy }
    proxied != "" && /^listener\.security\.protocol\.map=/ { $0 = $0 ",PROXIED:PLAINTEXT" }
    { print }' \
    "$KAFKA_TEMPLATE" >"$KAFKA_CONF.tmp"
  mv "$KAFKA_CONF.tmp" "$KAFKA_CONF"
}

kafka_format() {
  if [[ -f "$KAFKA_DATA/meta.properties" ]]; then
    return 0
  fi
  local cluster_id
  if [[ -s "$KAFKA_CLUSTER_ID_FILE" ]]; then
    cluster_id="$(cat "$KAFKA_CLUSTER_ID_FILE")"
  else
    cluster_id="$(kafka_java "-Xmx256m" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_LOGS/format.log" | tail -n1)"
    [[ -n "$cluster_id" ]] || die "kafka: could not generate a cluster id; see $KAFKA_LOGS/format.log"
    echo "$cluster_id" >"$KAFKA_CLUSTER_ID_FILE"
  fi
  log "kafka: formatting $KAFKA_DATA (cluster id $cluster_id)"
  mkdir -p "$KAFKA_DATA"
  if ! kafka_java "-Xmx256m" kafka.tools.StorageTool format --config "$KAFKA_CONF" \
      --cluster-id "$cluster_id" --standalone >>"$KAFKA_LOGS/format.log" 2>&1; then
    tail_file "$KAFKA_LOGS/format.log"
    die "kafka: formatting the storage failed; see $KAFKA_LOGS/format.log"
  fi
}

# Waits until the broker answers a Metadata request listing itself.
kafka_wait_ready() {
  local pid="$1" deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  while ! kafka_probe >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$KAFKA_PIDFILE"
      tail_file "$KAFKA_LOGS/server.out"
      tail_file "$KAFKA_LOGS/server.log"
      die "kafka: the broker exited during startup; see $KAFKA_LOGS/server.log and $KAFKA_LOGS/server.out"
    fi
    if ((SECONDS >= deadline)); then
      tail_file "$KAFKA_LOGS/server.log"
      die "kafka: not ready after ${KAFKA_START_TIMEOUT}s (pid $pid still running; '$0 down' stops it); see $KAFKA_LOGS/server.log"
    fi
    sleep 0.5
  done
}

kafka_up() {
  local pid
  if pid="$(kafka_pid)"; then
    kafka_wait_ready "$pid"
    log "kafka: running (pid $pid) and ready at $KAFKA_BOOTSTRAP"
    return 0
  fi
  rm -f "$KAFKA_PIDFILE"
  local port
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" ${KAFKA_PROXIED_PORT:+"$KAFKA_PROXIED_PORT"}; do
    if port_open "$port"; then
      die "kafka: 127.0.0.1:$port is already in use by another process ($(port_owner "$port")); stop it first"
    fi
  done

  kafka_fetch
  mkdir -p "$KAFKA_LOGS"
  kafka_write_config
  kafka_format

  log "kafka: starting Kafka $KAFKA_VERSION on $KAFKA_BOOTSTRAP (logs: $KAFKA_LOGS)"
  printf '===== %s starting Kafka %s =====\n' "$(date -Is)" "$KAFKA_VERSION" >>"$KAFKA_LOGS/server.out"
  local heap=()
  read -r -a heap <<<"$KAFKA_HEAP_OPTS"
  local extra=()
  read -r -a extra <<<"${KAFKA_OPTS:-}"
  # setsid: the broker must outlive the shell (and CI step) that started it.
  # The child writes its own pid, then execs java, so the pid file is exact.
  # 9>&-: it must not inherit (and so hold) the infra.sh lock.
  # shellcheck disable=SC2016 # expanded by the child shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KAFKA_PIDFILE" \
    java "${heap[@]}" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true -Dkafka.logs.dir="$KAFKA_LOGS" \
    -Dlog4j2.configurationFile="$KAFKA_LOG4J" "${extra[@]}" \
    -cp "$KAFKA_LIB/*" kafka.Kafka "$KAFKA_CONF" \
    >>"$KAFKA_LOGS/server.out" 2>&1 </dev/null 9>&- &
  local _
  for _ in $(seq 50); do
    if pid="$(kafka_pid)"; then
      break
    fi
    sleep 0.1
  done
  if [[ -z "${pid:-}" ]] || ! kill -0 "$pid" 2>/dev/null; then
    tail_file "$KAFKA_LOGS/server.out"
    die "kafka: the broker did not start; see $KAFKA_LOGS/server.out"
  fi
  kafka_wait_ready "$pid"
  log "kafka: ready at $KAFKA_BOOTSTRAP (pid $pid)"
}

kafka_down() {
  local pid
  if ! pid="$(kafka_pid)"; then
    rm -f "$KAFKA_PIDFILE"
    log "kafka: not running"
    return 0
  fi
  log "kafka: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "kafka: still running after ${KAFKA_STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  fi
  rm -f "$KAFKA_PIDFILE"
  log "kafka: stopped"
}

kafka_status() {
  local pid
  if pid="$(kafka_pid)"; then
    if kafka_probe >/dev/null 2>&1; then
      echo "kafka: up (Kafka $KAFKA_VERSION, $KAFKA_BOOTSTRAP, pid $pid)"
      return 0
    fi
    echo "kafka: not ready (pid $pid running, not answering on $KAFKA_BOOTSTRAP; see $KAFKA_LOGS/server.log)"
    return 1
  fi
  if port_open "$KAFKA_PORT"; then
    echo "kafka: down (but 127.0.0.1:$KAFKA_PORT is used by another process: $(port_owner "$KAFKA_PORT"))"
  else
    echo "kafka: down"
  fi
  return 1
}

# -------------------------------------------------------------- postgresql --
# Prints the bin directory of the PostgreSQL server to use: the version that
# created .local/pg/data if it exists, else the newest installed one.
pg_find_bindir() {
  if [[ -n "${TERRANOHA_PG_BINDIR:-}" ]]; then
    echo "$TERRANOHA_PG_BINDIR"
    return 0
  fi
  local version=""
  if [[ -s "$PG_DATA/PG_VERSION" ]]; then
    version="$(cat "$PG_DATA/PG_VERSION")"
    if [[ -x "/usr/lib/postgresql/$version/bin/postgres" ]]; then
      echo "/usr/lib/postgresql/$version/bin"
    fi
    return 0
  fi
  local bin newest=""
  for bin in /usr/lib/postgresql/*/bin/postgres; do
    [[ -x "$bin" ]] && newest="$(printf '%s\n%s\n' "$newest" "$bin" | sort -V | tail -n1)"
  done
  if [[ -n "$newest" ]]; then
    dirname "$newest"
  fi
}

pg_install() {
  if [[ -n "$(pg_find_bindir)" ]]; then
    return 0
  fi
  if [[ -s "$PG_DATA/PG_VERSION" ]]; then
    local v
    v="$(cat "$PG_DATA/PG_VERSION")"
    if compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
      die "postgres: $PG_DATA was created by PostgreSQL $v, which is not installed (install postgresql-$v, or run '$0 down --purge' to start over)"
    fi
  fi
  local sudo=()
  if [[ $EUID -ne 0 ]]; then
    sudo=(sudo -n)
  fi
  local apt_log="$LOCAL_DIR/apt-postgresql.log"
  log "postgres: server not installed; installing Debian's postgresql package (log: $apt_log)"
  # Debian's package would also create and start a default cluster on port
  # 5432; this drop-in tells it not to while we install.
  local dropin_dir=/etc/postgresql-common/createcluster.d
  local dropin="$dropin_dir/zz-terranoha-no-main-cluster.conf" created=0 created_dir=0
  if [[ ! -d "$dropin_dir" ]]; then
    "${sudo[@]}" mkdir -p "$dropin_dir" && created_dir=1 || true
  fi
  if [[ ! -e "$dropin" ]]; then
    printf 'create_main_cluster = false\n' | "${sudo[@]}" tee "$dropin" >/dev/null \
      && created=1 || true
  fi
  local ok=1
  {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update \
      && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
  } >"$apt_log" 2>&1 9>&- || ok=0
  if ((created)); then
    "${sudo[@]}" rm -f "$dropin" || true
  fi
  if ((created_dir)); then
    "${sudo[@]}" rmdir "$dropin_dir" 2>/dev/null || true
  fi
  if ((!ok)); then
    tail_file "$apt_log" 15
    die "postgres: 'apt-get install postgresql' failed (is the Debian archive reachable?); full log: $apt_log"
  fi
  [[ -n "$(pg_find_bindir)" ]] || die "postgres: installed the postgresql package but found no /usr/lib/postgresql/*/bin/postgres"
}

# Runs a command as the OS user owning the cluster (postgres when run as root;
# the server refuses to run as root).
pg_as_owner() {
  # 9>&-: the server must not inherit (and so hold) the infra.sh lock.
  if [[ $EUID -eq 0 ]]; then
    (cd "$PG_DIR" && runuser -u "$PG_OS_USER" -- "$@") 9>&-
  else
    (cd "$PG_DIR" && "$@") 9>&-
  fi
}

pg_prepare_dirs() {
  mkdir -p "$PG_DIR"
  if [[ $EUID -eq 0 ]]; then
    id -u "$PG_OS_USER" >/dev/null 2>&1 || die "postgres: OS user '$PG_OS_USER' does not exist (it comes with Debian's postgresql-common package)"
    chown "$PG_OS_USER:" "$PG_DIR"
  fi
  chmod 700 "$PG_DIR"
  if ! pg_as_owner test -w "$PG_DIR"; then
    die "postgres: the '$PG_OS_USER' OS user cannot write $PG_DIR; every parent directory must be searchable by it (e.g. chmod o+x on each parent), or set TERRANOHA_LOCAL_DIR to a directory it can reach"
  fi
  pg_as_owner mkdir -p "$PG_LOG_DIR" "$PG_RUN"
  # Unix socket paths are limited to 107 bytes.
  if (( ${#PG_RUN} + 16 > 107 )); then
    die "postgres: socket directory path too long for a unix socket: $PG_RUN (set TERRANOHA_LOCAL_DIR to a shorter path)"
  fi
}

pg_ctl_status() {
  pg_as_owner "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1
}

pg_server_pid() {
  pg_as_owner head -n1 "$PG_DATA/postmaster.pid" 2>/dev/null || true
}

pg_psql_admin() {
  pg_as_owner "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres
}

pg_initdb() {
  if pg_as_owner test -s "$PG_DATA/PG_VERSION"; then
    return 0
  fi
  if pg_as_owner test -d "$PG_DATA" && [[ -n "$(pg_as_owner ls -A "$PG_DATA")" ]]; then
    die "postgres: $PG_DATA exists but is not a PostgreSQL data directory; run '$0 down --purge' to start over"
  fi
  log "postgres: creating cluster in $PG_DATA ($("$PG_BIN/postgres" --version))"
  if ! pg_as_owner "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
      --auth-local=trust --auth-host=scram-sha-256 >"$PG_LOG_DIR/initdb.log" 2>&1; then
    tail_file "$PG_LOG_DIR/initdb.log"
    die "postgres: initdb failed; see $PG_LOG_DIR/initdb.log"
  fi
  printf "\n# Local settings written by deploy/local/infra.sh on every start.\ninclude_if_exists = 'terranoha.conf'\n" \
    | pg_as_owner tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

pg_write_config() {
  pg_as_owner tee "$PG_DATA/terranoha.conf" >/dev/null <<EOF
# Written by deploy/local/infra.sh; edits are overwritten on the next start.
listen_addresses = '$PG_HOST'
port = $PG_PORT
unix_socket_directories = '$PG_RUN'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
}

pg_ensure_database() {
  pg_psql_admin <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN SUPERUSER PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN SUPERUSER PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
SQL
}

# Waits for pg_isready, then checks the DSN itself (TCP + password + query).
pg_wait_ready() {
  local deadline=$((SECONDS + PG_START_TIMEOUT))
  while ! "$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT" -t 2; do
    if ((SECONDS >= deadline)); then
      tail_file "$PG_LOG"
      die "postgres: not accepting connections on $PG_HOST:$PG_PORT after ${PG_START_TIMEOUT}s; see $PG_LOG"
    fi
    sleep 0.5
  done
}

pg_check_dsn() {
  local out
  if ! out="$(PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -At \
      -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -c 'select 1' 2>&1)" || [[ "$out" != 1 ]]; then
    printf '%s\n' "$out" >&2
    die "postgres: running, but '$PG_DSN' does not answer 'select 1'; see $PG_LOG"
  fi
}

# Installs the server if needed and checks the state directory is usable;
# done before anything is started so that problems surface early.
pg_prepare() {
  pg_install
  PG_BIN="$(pg_find_bindir)"
  [[ -n "$PG_BIN" ]] || die "postgres: no usable server binaries found"
  pg_prepare_dirs
}

pg_up() {
  if pg_ctl_status; then
    pg_wait_ready
    pg_ensure_database
    pg_check_dsn
    log "postgres: running (pid $(pg_server_pid)) and ready at $PG_HOST:$PG_PORT"
    return 0
  fi
  if port_open "$PG_PORT"; then
    die "postgres: 127.0.0.1:$PG_PORT is already in use by another process ($(port_owner "$PG_PORT")); stop it first"
  fi

  pg_initdb
  pg_write_config
  log "postgres: starting on $PG_HOST:$PG_PORT (log: $PG_LOG)"
  if ! pg_as_owner "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" -s; then
    tail_file "$PG_LOG"
    die "postgres: failed to start; see $PG_LOG"
  fi
  pg_wait_ready
  pg_ensure_database
  pg_check_dsn
  log "postgres: ready at $PG_HOST:$PG_PORT (pid $(pg_server_pid))"
}

pg_down() {
  PG_BIN="$(pg_find_bindir)"
  if [[ -z "$PG_BIN" || ! -d "$PG_DIR" ]] || ! pg_ctl_status; then
    log "postgres: not running"
    return 0
  fi
  log "postgres: stopping"
  if ! pg_as_owner "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 60 -s; then
    die "postgres: 'pg_ctl stop -m fast' failed; see $PG_LOG"
  fi
  log "postgres: stopped"
}

pg_status() {
  PG_BIN="$(pg_find_bindir)"
  if [[ -n "$PG_BIN" && -d "$PG_DIR" ]] && pg_ctl_status; then
    local version
    version="$("$PG_BIN/postgres" --version | sed -n 's/^postgres (PostgreSQL) \([^ ]*\).*/\1/p')"
    if "$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT" -t 2; then
      echo "postgres: up (PostgreSQL $version, $PG_HOST:$PG_PORT, pid $(pg_server_pid))"
      return 0
    fi
    echo "postgres: not ready (server running, not answering on $PG_HOST:$PG_PORT; see $PG_LOG)"
    return 1
  fi
  if port_open "$PG_PORT"; then
    echo "postgres: down (but 127.0.0.1:$PG_PORT is used by another process: $(port_owner "$PG_PORT"))"
  else
    echo "postgres: down"
  fi
  return 1
}

# ---------------------------------------------------------------- commands --
cmd_up() {
  local start=$SECONDS
  if [[ -n "$KAFKA_PROXIED_PORT" && -z "$KAFKA_PROXY_PORT" ]] \
      || [[ -z "$KAFKA_PROXIED_PORT" && -n "$KAFKA_PROXY_PORT" ]]; then
    die "set both TERRANOHA_KAFKA_PROXIED_PORT (the broker listens there) and TERRANOHA_KAFKA_PROXY_PORT (the proxy in front of it, advertised to clients), or neither"
  fi
  check_prerequisites
  take_lock
  pg_prepare
  kafka_up
  pg_up
  env_lines >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
  log "up in $((SECONDS - start))s; connection settings in $ENV_FILE:"
  env_lines
}

cmd_down() {
  local purge=0
  case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) die "unknown option for down: $1 (expected --purge)" ;;
  esac
  if [[ ! -d "$LOCAL_DIR" ]]; then
    log "nothing to stop ($LOCAL_DIR does not exist)"
    return 0
  fi
  take_lock
  kafka_down
  pg_down
  if ((purge)); then
    log "purging data and logs (keeping downloaded jars in $KAFKA_LIB)"
    rm -rf "${KAFKA_DATA:?}" "${KAFKA_LOGS:?}" "${KAFKA_CONF:?}" "${KAFKA_CLUSTER_ID_FILE:?}" \
      "$KAFKA_DIR/lib.download" "$KAFKA_DIR/download.log" "${PG_DIR:?}" "$ENV_FILE" \
      "$LOCAL_DIR/apt-postgresql.log"
  fi
}

cmd_status() {
  local rc=0
  kafka_status || rc=1
  pg_status || rc=1
  return "$rc"
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    env) env_lines ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
