#!/bin/bash
# weightd under systemd, as a user has it: run as root inside the test
# container by weightd-test.service (tests/systemd/run), through apt-get,
# systemctl, journalctl, weightctl and the Python client only.
#
# `check NAME COMMAND [ARG...]` runs one check: it prints "ok   NAME" or
# "FAIL NAME" with the command's output, and the run goes on. A check of
# several steps is a function (t_NAME) that returns non-zero, saying why, at
# the first that fails; `expect WHAT GOT WANT` compares two values. Add checks
# anywhere before "Removal and purge", which must stay last. /ci/rc gets the
# number of failed checks: the container's, and the test's, exit status.
set -u
cd /ci
exec > >(tee /ci/checks.log) 2>&1
trap '[ -e /ci/rc ] || echo 99 > /ci/rc' EXIT
n_ok=0
n_fail=0
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive

check() {
    local name=$1 out rc=0 t0 ms
    shift
    t0=$(date +%s%N)
    out=$("$@" 2>&1) || rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    if [ $rc -eq 0 ]; then
        n_ok=$((n_ok + 1))
        printf 'ok   %s (%d.%d s)\n' "$name" $((ms / 1000)) $((ms % 1000 / 100))
    else
        n_fail=$((n_fail + 1))
        printf 'FAIL %s (exit %d, %d.%d s)\n' "$name" $rc $((ms / 1000)) $((ms % 1000 / 100))
        printf '%s\n' "$out" | tail -30 | sed 's/^/     | /'
    fi
}
note() { printf 'note %s\n' "$*"; }
expect() {
    [ "$2" = "$3" ] && return 0
    echo "$1: \"$2\", expected \"$3\""
    return 1
}
# wait_for SECONDS COMMAND...: until COMMAND succeeds (every 0.1 s)
wait_for() {
    local end=$(($(date +%s) + $1))
    shift
    until "$@"; do
        [ "$(date +%s)" -ge $end ] && return 1
        sleep 0.1
    done
}
prop() { systemctl show -P "$2" "$1"; }
state_is() { [ "$(systemctl is-active "$1")" = "$2" ]; }
cursor() { journalctl -q -n0 --show-cursor | sed -n 's/^-- cursor: //p'; }
# since CURSOR [OPTION...]: what weightd logged, and what systemd logged
# about weightd.service, after CURSOR. Not with journal matches (-u, UNIT=):
# with them and --after-cursor, 252's journalctl left out the first entry
# that matched here ("Watchdog timeout"); without them it is there.
since() {
    journalctl -q --no-pager -o short-unix --after-cursor="$1" "${@:2}" |
        grep -E '^[0-9.]+ [^ ]+ (weightd\[[0-9]+\]: |systemd\[1\]: .*weightd\.service)'
}
# logged CURSOR PATTERN: a line about weightd since CURSOR matches the
# extended regex PATTERN (within 5 s: the journal may lag behind).
logged() {
    local c=$1 pattern=$2
    wait_for 5 eval 'since "$c" | grep -Eq "$pattern"'
}
# Lines of priority err or worse about weightd since cursor $1.
no_errors_since() {
    local errors
    errors=$(since "$1" -p err)
    [ -z "$errors" ] || { echo "errors in the journal:"; echo "$errors"; return 1; }
}
# with_debug_log COMMAND...: COMMAND with systemd logging at debug, where it
# logs each notification a service sends; then back at info.
with_debug_log() {
    local rc=0
    systemd-analyze log-level debug
    "$@" || rc=$?
    systemd-analyze log-level info
    return $rc
}
# as USER COMMAND...: as a user who is not root, on the system's socket.
as() {
    local user=$1
    shift
    runuser -u "$user" -- env WEIGHTD_SOCKET=/run/weightd/weightd.sock "$@"
}

echo "checks: systemd $(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p'), $(. /etc/os-release && echo "$PRETTY_NAME")"

# ---- Installation ------------------------------------------------------------

check "apt-get install ./weightd_*.deb, offline" apt-get install -y --no-install-recommends ./weightd_*.deb

t_user() {
    getent passwd weightd || { echo "no user weightd"; return 1; }
    expect groups "$(id -nG weightd | tr ' ' '\n' | sort | tr '\n' ' ')" "render video weightd "
}
check "the postinst made the user weightd (groups weightd, video, render)" t_user

t_conffile() {
    local want got
    dpkg-query -W -f='${Conffiles}\n' weightd | grep -q '^ /etc/weightd/weightd.conf ' ||
        { echo "/etc/weightd/weightd.conf is not a conffile"; return 1; }
    cmp <(weightd --print-config) /etc/weightd/weightd.conf || return 1
    want=$(weightd --help | sed -n 's/^  --\([a-z-]*\) .*/\1/p' | tr - _ |
        grep -vxE 'config|print_config|help|version' | sort)
    got=$(sed -n 's/^#\([a-z_]*\) =.*/\1/p' /etc/weightd/weightd.conf | sort)
    [ "$want" = "$got" ] || { echo "options in --help and in the file differ:"; diff <(echo "$want") <(echo "$got"); }
}
check "/etc/weightd/weightd.conf: a conffile, weightd --print-config, every option of --help" t_conffile

t_runtime_dir() {
    expect /run/weightd "$(stat -c '%U:%G %a' /run/weightd)" "root:weightd 750" &&
        expect /run/weightd/weightd.sock "$(stat -c '%U:%G %a %F' /run/weightd/weightd.sock)" \
            "weightd:weightd 660 socket"
}
check "/run/weightd is root:weightd 0750, the socket weightd:weightd 0660" t_runtime_dir
check "the postinst enabled the socket" expect is-enabled "$(systemctl is-enabled weightd.socket)" enabled
check "the socket listens" expect is-active "$(systemctl is-active weightd.socket)" active
check "the service waits for a first connection" expect is-active "$(systemctl is-active weightd.service)" inactive

t_verify() {
    local out rc=0
    out=$(systemd-analyze verify /lib/systemd/system/weightd.socket /lib/systemd/system/weightd.service 2>&1) || rc=$?
    [ $rc -eq 0 ] && [ -z "$out" ] && return 0
    echo "exit $rc:"
    echo "$out"
    return 1
}
check "systemd-analyze verify weightd.socket weightd.service: clean" t_verify

systemd-analyze security --no-pager weightd.service > /ci/security.txt 2>&1
score=$(sed -n 's/.*Overall exposure level for weightd.service: \([0-9.]*\).*/\1/p' /ci/security.txt)
note "systemd-analyze security weightd.service: $(grep 'Overall exposure' /ci/security.txt | sed 's/.*: //')"
check "the exposure score is at most 4.0 (systemd-analyze security)" \
    awk -v s="${score:-99}" 'BEGIN { exit !(s <= 4.0) }'

# ---- Socket activation, notifications, hardening -----------------------------

started() { weightctl list && wait_for 5 state_is weightd.service active; }
t_first_connection() {
    local c
    c=$(cursor)
    with_debug_log started || { echo "weightd.service: $(systemctl is-active weightd.service)"; return 1; }
    logged "$c" 'Got notification message from PID [0-9]+ \(READY=1\)' ||
        { echo "no READY=1 in the journal"; return 1; }
    logged "$c" 'Got notification message from PID [0-9]+ \(STATUS=0 models loaded' ||
        { echo "no STATUS= in the journal"; return 1; }
    no_errors_since "$c"
}
check "the first connection starts the service (Type=notify: READY=1, STATUS=)" t_first_connection

t_status() {
    local text
    text=$(prop weightd.service StatusText)
    [[ $text =~ ^0\ models\ loaded\ \(.*\),\ listening\ on\ /run/weightd/weightd.sock$ ]] ||
        { echo "StatusText: \"$text\""; return 1; }
    systemctl status --no-pager weightd.service | grep -qF "Status: \"$text\"" ||
        { systemctl status --no-pager weightd.service; return 1; }
}
check "systemctl show -p StatusText and systemctl status show the daemon's status" t_status

t_identity() {
    local pid
    pid=$(prop weightd.service MainPID)
    expect user "$(ps -o user= -p "$pid")" weightd &&
        expect NoNewPrivs "$(awk '/^NoNewPrivs:/ { print $2 }' /proc/"$pid"/status)" 1 &&
        expect CapEff "$(awk '/^CapEff:/ { print $2 }' /proc/"$pid"/status)" 0000000000000000 &&
        expect CapBnd "$(awk '/^CapBnd:/ { print $2 }' /proc/"$pid"/status)" 0000000000000000 &&
        expect Seccomp "$(awk '/^Seccomp:/ { print $2 }' /proc/"$pid"/status)" 2
}
check "the daemon runs as weightd, no new privileges, no capabilities, a seccomp filter" t_identity

t_properties() {
    local kv bad=0
    for kv in Type=notify NotifyAccess=main User=weightd Group=weightd WatchdogUSec=30s Restart=on-failure \
        FileDescriptorStoreMax=16384 ProtectSystem=strict ProtectHome=read-only PrivateTmp=yes \
        PrivateNetwork=yes NoNewPrivileges=yes ProtectKernelTunables=yes ProtectKernelModules=yes \
        ProtectKernelLogs=yes ProtectControlGroups=yes ProtectClock=yes ProtectHostname=yes \
        RestrictSUIDSGID=yes RestrictAddressFamilies=AF_UNIX DevicePolicy=closed LockPersonality=yes \
        'ExecReload={ path=/bin/kill ; argv[]=/bin/kill -HUP $MAINPID ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }'; do
        expect "${kv%%=*}" "$(prop weightd.service "${kv%%=*}")" "${kv#*=}" || bad=1
    done
    expect IPAddressDeny "$(prop weightd.service IPAddressDeny | tr ' ' '\n' | LC_ALL=C sort | xargs)" "0.0.0.0/0 ::/0" || bad=1 # in any order
    return $bad
}
check "systemctl show: the unit's type, watchdog, fd store and hardening" t_properties

t_sandbox() {
    local pid
    pid=$(prop weightd.service MainPID)
    touch /tmp/outside
    nsenter -t "$pid" -m test -e /tmp/outside && { echo "the service sees the host's /tmp"; return 1; }
    nsenter -t "$pid" -m touch /usr/probe 2>/dev/null && { echo "/usr is writable in the service"; return 1; }
    nsenter -t "$pid" -m touch /root/probe 2>/dev/null && { echo "/root is writable in the service"; return 1; }
    nsenter -t "$pid" -m touch /etc/weightd/probe 2>/dev/null && { echo "/etc is writable in the service"; return 1; }
    rm -f /tmp/outside
}
check "in the service's mount namespace: /tmp private, /usr /etc /root read-only" t_sandbox

# ---- A load, as an administrator (root) --------------------------------------

check "weightd-mkckpt writes a small qwen3-moe checkpoint" \
    weightd-mkckpt --preset qwen3-moe --layers 2 --experts 4 --vocab 1024 --out /srv/ckpt
check "weightctl load /srv/ckpt --name m" weightctl load /srv/ckpt --name m
check "weightctl list shows m ready" bash -c 'weightctl list | grep -Eq "^m +ready "'
t_status_loaded() {
    local text
    text=$(prop weightd.service StatusText)
    [[ $text =~ ^1\ model\ loaded\ \(152.05\ MiB\),\ listening\ on ]] || { echo "StatusText: \"$text\""; return 1; }
}
check "the status text counts the model" t_status_loaded
check "weightctl verify m (the daemon re-reads the files under its hardening)" weightctl verify m
check "weightctl attach m --verify (memfds mapped by a worker)" weightctl attach m --verify

t_python() {
    python3 - <<'EOF'
import weightd
with weightd.Client() as c:
    names = [m["name"] for m in c.list()]
    assert names == ["m"], names
    n = len(list(c.tensors("m")))
    with c.attach("m", framework="memoryview") as a:
        assert len(a) == n == 45, (len(a), n)
        for t in c.tensors("m"):
            assert a[t["name"]].nbytes == t["bytes"], t
EOF
}
check "the Python client lists and attaches (memoryview, through libweightd-client)" t_python

# ---- Who may connect ---------------------------------------------------------

useradd -m -G weightd alice
useradd -m bob
check "a member of weightd connects (weightctl list, as alice)" \
    bash -c 'runuser -u alice -- env WEIGHTD_SOCKET=/run/weightd/weightd.sock weightctl list | grep -Eq "^m +ready "'
check "a member attaches and verifies (a reader, as alice)" as alice weightctl attach m --verify
t_member_unload() {
    local out rc=0
    out=$(as alice weightctl --json unload m 2>&1) || rc=$?
    expect exit $rc 1 && [[ $out == *'"code":'*'"EPERM"'* ]] || { echo "$out"; return 1; }
    weightctl list | grep -Eq '^m +ready ' || { echo "m is gone"; return 1; }
}
check "a member is not an administrator: unload is refused (EPERM)" t_member_unload
t_nonmember() {
    local out rc=0
    out=$(as bob weightctl list 2>&1) || rc=$?
    [ $rc -ne 0 ] && [[ $out == *"Permission denied"* ]] || { echo "exit $rc: $out"; return 1; }
}
check "a user outside the group is refused (Permission denied, as bob)" t_nonmember

# ---- The watchdog ------------------------------------------------------------

t_watchdog_dropin() {
    mkdir -p /run/systemd/system/weightd.service.d
    printf '[Service]\nWatchdogSec=2s\n' > /run/systemd/system/weightd.service.d/test-watchdog.conf
    systemctl daemon-reload && systemctl restart weightd.service &&
        expect WatchdogUSec "$(prop weightd.service WatchdogUSec)" 2s
}
check "a drop-in sets WatchdogSec=2s (systemctl restart)" t_watchdog_dropin

restarted() { # since main pid $1: a new main pid, active
    local pid
    pid=$(prop weightd.service MainPID)
    [ "$pid" != 0 ] && [ "$pid" != "$1" ] && state_is weightd.service active
}
t_watchdog() {
    local pid n c
    c=$(cursor)
    pid=$(prop weightd.service MainPID)
    n=$(prop weightd.service NRestarts)
    sleep 3 # the daemon keeps the watchdog happy meanwhile
    state_is weightd.service active && [ "$(prop weightd.service MainPID)" = "$pid" ] ||
        { echo "the daemon did not stay up with WatchdogSec=2s"; return 1; }
    kill -STOP "$pid"
    wait_for 20 restarted "$pid" || { echo "not restarted: $(systemctl is-active weightd.service)"; return 1; }
    logged "$c" 'Watchdog timeout' || { echo "no watchdog timeout in the journal"; return 1; }
    logged "$c" "Failed with result 'watchdog'" || { echo "no result 'watchdog' in the journal"; return 1; }
    expect NRestarts "$(prop weightd.service NRestarts)" $((n + 1))
}
check "the watchdog kills a SIGSTOPped daemon (result 'watchdog') and systemd restarts it" t_watchdog
check "the restarted daemon serves" weightctl list
t_watchdog_back() {
    rm -rf /run/systemd/system/weightd.service.d
    systemctl daemon-reload && systemctl restart weightd.service &&
        expect WatchdogUSec "$(prop weightd.service WatchdogUSec)" 30s
}
check "without the drop-in, WatchdogSec=30s again" t_watchdog_back

# ---- Weights that survive a crash or a restart: the fd store -----------------

# Every byte of m as a worker maps it, against a copy of the checkpoint.
t_every_byte() {
    python3 - "$1" <<'EOF'
import json, os, struct, sys, weightd
saved = sys.argv[1]
want = {}
for f in sorted(os.listdir(saved)):
    if f.endswith(".safetensors"):
        with open(os.path.join(saved, f), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
            data = fh.read()
        for name, t in header.items():
            if name != "__metadata__":
                b, e = t["data_offsets"]
                want[name] = data[b:e]
with weightd.Client() as c, c.attach("m", framework="memoryview", reconnect=0) as a:
    assert sorted(a) == sorted(want), (len(a), len(want))
    for name, value in a.items():
        assert bytes(value) == want[name], name
print(len(want), "tensors equal")
EOF
}
t_store_holds() {
    local n st
    st=$(weightctl --json stats)
    [[ $st == *'"fd_store":'*'"enabled":'*true* ]] || { echo "$st" | grep -A8 fd_store; return 1; }
    n=$(prop weightd.service NFileDescriptorStore)
    [ "$n" -gt 2 ] || { echo "NFileDescriptorStore=$n"; return 1; }
}
check "after the watchdog's restart m is still there, from the fd store" \
    bash -c 'weightctl list | grep -Eq "^m +ready "'
check "the fd store holds m's descriptors (stats, NFileDescriptorStore)" t_store_holds
check "a copy of the checkpoint, and the checkpoint moved away" \
    bash -c 'cp -a /srv/ckpt /srv/saved && mv /srv/ckpt /srv/away'
t_survives() { # $1: how the daemon goes ("kill" or "restart")
    local pid c
    c=$(cursor)
    pid=$(prop weightd.service MainPID)
    if [ "$1" = kill ]; then
        systemctl kill -s SIGKILL weightd.service
    else
        systemctl restart weightd.service
    fi
    wait_for 20 restarted "$pid" || { echo "not back: $(systemctl is-active weightd.service)"; return 1; }
    weightctl list | grep -Eq '^m +ready ' || { weightctl list; return 1; }
    logged "$c" 'restored m from the fd store' || { echo "no restore in the journal"; return 1; }
    t_every_byte /srv/saved && weightctl verify m --quick >/dev/null
}
check "systemctl kill -s SIGKILL weightd: m comes back, every byte, its checkpoint away" t_survives kill
check "systemctl restart weightd: m comes back, every byte, its checkpoint away" t_survives restart
check "weightctl verify m reads the files it kept, moved away" weightctl verify m

# A worker attached through a restart: it computes on, and its client takes
# its lease again from the new daemon.
t_worker_rides_through() {
    local pid out rc=0 worker
    rm -f /ci/worker.state
    python3 - > /ci/worker.log 2>&1 <<'EOF' &
import os, time, zlib, weightd
a = weightd.Client().attach("m", framework="memoryview")
first = {k: zlib.crc32(bytes(v)) for k, v in a.items()}
while True:
    bad = sum(zlib.crc32(bytes(v)) != first[k] for k, v in a.items())
    a.process_events(0)
    with open("/ci/worker.state.new", "w") as f:
        f.write("%d %d %s\n" % (a.reattached, bad, a.lost))
    os.rename("/ci/worker.state.new", "/ci/worker.state")
    time.sleep(0.05)
EOF
    worker=$!
    wait_for 20 test -e /ci/worker.state || { cat /ci/worker.log; kill $worker; return 1; }
    pid=$(prop weightd.service MainPID)
    systemctl restart weightd.service
    wait_for 20 restarted "$pid" || { kill $worker; return 1; }
    wait_for 20 grep -q '^1 0 None$' /ci/worker.state ||
        { cat /ci/worker.state /ci/worker.log; kill $worker; return 1; }
    out=$(weightctl --json unload m 2>&1) || rc=$?
    kill $worker
    wait $worker 2>/dev/null
    [ $rc -ne 0 ] && [[ $out == *'"EBUSY"'* ]] || { echo "unload while the worker held m: exit $rc $out"; return 1; }
    wait_for 10 bash -c '! weightctl --json leases | grep -q "\"model\""' || { weightctl leases; return 1; }
}
check "a worker computes through systemctl restart and takes its lease again (unload refuses)" \
    t_worker_rides_through
t_stop_start_releases() {
    systemctl stop weightd.service && systemctl start weightd.service || return 1
    [ -z "$(weightctl list | grep -E '^m ')" ] || { weightctl list; return 1; }
    expect NFileDescriptorStore "$(prop weightd.service NFileDescriptorStore)" 0
}
check "systemctl stop then start: the models are gone, the store empty" t_stop_start_releases
check "the checkpoint back, and m loaded again" bash -c 'mv /srv/away /srv/ckpt && weightctl load /srv/ckpt --name m'
# The checks above started the service six times in a few seconds: more
# than the default start limit (5 in 10 s) lets the socket start it again.
note "systemctl reset-failed: the start limit counts afresh"
systemctl reset-failed weightd.service weightd.socket

# ---- Configuration at run time: systemctl reload -----------------------------

t_reload() {
    local c pid
    c=$(cursor)
    pid=$(prop weightd.service MainPID)
    cp /etc/weightd/weightd.conf /ci/weightd.conf.orig
    printf 'max_clients_per_uid = 7\nhost_capacity = 4GiB\n' >> /etc/weightd/weightd.conf
    systemctl reload weightd.service || return 1
    wait_for 10 logged "$c" 'reload: max_clients_per_uid 128 -> 7' || { since "$c"; return 1; }
    logged "$c" 'host_capacity changed' || { echo "no restart-only note"; since "$c"; return 1; }
    expect MainPID "$(prop weightd.service MainPID)" "$pid" &&
        weightctl list | grep -Eq '^m +ready ' || return 1
    # an invalid file keeps every value, and the daemon
    c=$(cursor)
    echo 'max_clients = lots' >> /etc/weightd/weightd.conf
    systemctl reload weightd.service || return 1
    wait_for 10 logged "$c" 'max_clients' || { since "$c"; return 1; }
    cp /ci/weightd.conf.orig /etc/weightd/weightd.conf
    systemctl reload weightd.service && state_is weightd.service active &&
        expect MainPID "$(prop weightd.service MainPID)" "$pid"
}
check "systemctl reload: live options applied, restart-only ones noted, a bad file refused, the daemon and m kept" \
    t_reload

# ---- Stopping ----------------------------------------------------------------

shut_down() { weightctl shutdown && wait_for 10 state_is weightd.service inactive; }
t_shutdown() {
    local c
    weightctl list >/dev/null && wait_for 5 state_is weightd.service active || return 1
    c=$(cursor)
    with_debug_log shut_down || { echo "weightd.service: $(systemctl is-active weightd.service)"; return 1; }
    expect Result "$(prop weightd.service Result)" success &&
        expect ExecMainCode "$(prop weightd.service ExecMainCode)" 1 &&
        expect ExecMainStatus "$(prop weightd.service ExecMainStatus)" 0 || return 1
    logged "$c" 'Got notification message from PID [0-9]+ \(STOPPING=1\)' ||
        { echo "no STOPPING=1 in the journal"; return 1; }
    no_errors_since "$c" && expect socket "$(systemctl is-active weightd.socket)" active
}
check "weightctl shutdown: STOPPING=1, exit 0, no restart, no errors, the socket stays" t_shutdown

t_stop() {
    local c
    weightctl list >/dev/null && wait_for 5 state_is weightd.service active || return 1
    c=$(cursor)
    systemctl stop weightd.service || return 1
    expect ActiveState "$(prop weightd.service ActiveState)" inactive &&
        expect Result "$(prop weightd.service Result)" success &&
        expect ExecMainStatus "$(prop weightd.service ExecMainStatus)" 0 || return 1
    logged "$c" 'stopped: every segment released' || { since "$c"; return 1; }
    no_errors_since "$c"
}
check "systemctl stop weightd: exit 0, no errors" t_stop
check "the socket starts it again" bash -c 'weightctl list && [ "$(systemctl is-active weightd.service)" = active ]'

# ---- Removal and purge (last) ------------------------------------------------

t_reinstall() {
    apt-get install -y --reinstall ./weightd_*.deb || return 1
    expect is-enabled "$(systemctl is-enabled weightd.socket)" enabled &&
        expect socket "$(systemctl is-active weightd.socket)" active && weightctl list
}
check "apt-get install --reinstall: the socket stays enabled and serves" t_reinstall
t_disable_kept() {
    systemctl disable weightd.socket && apt-get install -y --reinstall ./weightd_*.deb || return 1
    expect is-enabled "$(systemctl is-enabled weightd.socket)" disabled || return 1
    systemctl enable weightd.socket
}
check "an administrator's systemctl disable outlives a reinstall" t_disable_kept
t_remove() {
    apt-get remove -y weightd || return 1
    expect service "$(systemctl is-active weightd.service)" inactive &&
        expect socket "$(systemctl is-active weightd.socket)" inactive || return 1
    [ ! -e /run/weightd/weightd.sock ] || { echo "the socket is still there"; return 1; }
    [ -f /etc/weightd/weightd.conf ] || { echo "remove took the config file"; return 1; }
}
check "apt-get remove: service and socket stopped, the config kept" t_remove
t_purge() {
    apt-get purge -y weightd || return 1
    [ ! -e /etc/weightd ] || { echo "/etc/weightd is still there"; return 1; }
    [ -z "$(find /etc/systemd /lib/systemd -name 'weightd.*')" ] || { find /etc/systemd /lib/systemd -name 'weightd.*'; return 1; }
    [ ! -e /usr/lib/python3/dist-packages/weightd ] || { find /usr/lib/python3/dist-packages/weightd; return 1; }
    ! dpkg-query -W -f='${Status}\n' weightd 2>/dev/null | grep -q installed || { echo "still installed"; return 1; }
}
check "apt-get purge: /etc/weightd, every unit file and link, the Python client's byte code gone" t_purge

echo "checks: $n_ok passed, $n_fail failed"
echo $((n_fail > 100 ? 100 : n_fail)) > /ci/rc
