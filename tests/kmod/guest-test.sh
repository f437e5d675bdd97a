#!/bin/sh
# The guest half of `make test-kmod`; runs as PID 1 inside qemu (see tests/kmod/init), in the
# host's root (read-only, under a tmpfs overlay) booted on the fetched Debian kernel.
# Drives the unmodified iptables-legacy binaries through bpfilter.ko and the real helper, prints
# PASS/FAIL lines and "N passed, M failed", and powers the guest off on every path.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root XTABLES_LOCKFILE=/run/xtables.lock
REPO=$kmodtest_repo
PY=$kmodtest_python
P=/sys/module/bpfilter/parameters
pass=0
fail=0

finish() {
    trap - EXIT
    echo "--- kernel log (bpfilter) ---"
    dmesg | grep -E 'bpfilter' | tail -n 40
    echo "$pass passed, $fail failed"
    sync
    echo o > /proc/sysrq-trigger
    sleep 30
}
trap finish EXIT INT TERM

ok() { pass=$((pass + 1)); echo "PASS: $1"; }
bad() { fail=$((fail + 1)); echo "FAIL: $1"; [ -s /tmp/out ] && sed 's/^/    | /' /tmp/out; }
# check NAME CMD...: CMD must succeed; its output is shown on failure.
check() { name=$1; shift; if "$@" > /tmp/out 2>&1; then ok "$name"; else bad "$name"; fi; }
has_mod() { grep -q "^$1 " /proc/modules; }
now() { date +%s%N; }
ms_since() { echo $(( ($(now) - $1) / 1000000 )); }

# The real engine (bpfilter_umh.engine) loads BPF; without it the helper serves the control plane
# with the in-memory stand-in (tests/test_door_standin.py), and the enforcement checks fail.
if (cd / && PYTHONPATH=$REPO $PY -c 'import bpfilter_umh.engine') > /tmp/out 2>&1; then
    ENGINE=real
else
    ENGINE=standin
    cat > /run/standin-python <<EOF
#!/bin/sh
export BPFILTER_ENGINE=test_door_standin:MemoryEngine PYTHONPATH=$REPO:$REPO/tests
exec $PY "\$@"
EOF
    chmod +x /run/standin-python
    sed -i "s|^options bpfilter python=[^ ]*|options bpfilter python=/run/standin-python|" /etc/modprobe.d/bpfilter.conf
fi
echo "engine: $ENGINE; $(grep '^options' /etc/modprobe.d/bpfilter.conf)"

# 1. iptables' own `modprobe ip_tables` (libxtables xtables_load_ko) brings up bpfilter.
t0=$(now)
check "iptables-legacy -L autoloads bpfilter through modprobe.d (not ip_tables)" \
    sh -c 'iptables-legacy -L -n && cat /proc/modules && grep -q "^bpfilter " /proc/modules && ! grep -qE "^(ip_tables|x_tables) " /proc/modules'
echo "    first request incl. module load and helper start: $(ms_since $t0) ms"

# 2. control plane, IPv4
cat > /tmp/want <<'EOF'
-P INPUT ACCEPT
-P FORWARD ACCEPT
-P OUTPUT ACCEPT
-A INPUT -s 192.0.2.0/24 -p tcp -m tcp --dport 22 -j DROP
-A INPUT -s 203.0.113.7/32 -j ACCEPT
EOF
t0=$(now)
check "iptables-legacy -A, -A, -S round trip" sh -c '
    iptables-legacy -A INPUT -s 192.0.2.0/24 -p tcp --dport 22 -j DROP &&
    iptables-legacy -A INPUT -s 203.0.113.7 -j ACCEPT &&
    iptables-legacy -S > /tmp/got && diff -u /tmp/want /tmp/got'
echo "    two -A and one -S: $(ms_since $t0) ms"

cat > /tmp/rules <<'EOF'
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:blocked - [0:0]
[5:300] -A INPUT -s 198.51.100.0/24 -j blocked
-A blocked -p udp -m udp --dport 53 -j DROP
COMMIT
EOF
check "/proc/net/ip_tables_names and ip6_tables_names list filter" sh -c '
    [ "$(cat /proc/net/ip_tables_names)" = filter ] && [ "$(cat /proc/net/ip6_tables_names)" = filter ]'
check "iptables-legacy-restore -c, then -save -c gives back rules and counters" sh -c '
    iptables-legacy-restore -c < /tmp/rules &&
    iptables-legacy-save -c > /tmp/saved && cat /tmp/saved &&
    grep -qx "\[5:300\] -A INPUT -s 198.51.100.0/24 -j blocked" /tmp/saved &&
    grep -qx "\[0:0\] -A blocked -p udp -m udp --dport 53 -j DROP" /tmp/saved &&
    grep -qx ":FORWARD DROP \[0:0\]" /tmp/saved &&
    ! grep -q 203.0.113.7 /tmp/saved'
check "iptables-legacy-save output restores to the same ruleset" sh -c '
    iptables-legacy-save > /tmp/s1 && iptables-legacy -F && iptables-legacy -X &&
    iptables-legacy-restore < /tmp/s1 && iptables-legacy-save > /tmp/s2 &&
    grep -v "^#" /tmp/s1 | diff -u - /tmp/s2 | grep -v "^[-+]#"; [ "$(grep -v "^#" /tmp/s1)" = "$(grep -v "^#" /tmp/s2)" ]'

# 3. control plane, IPv6: the range reaches the helper; its engine may not compile IPv6 yet
check "ip6tables-legacy -S and ip6tables-legacy-save through the IPv6 range" sh -c '
    ip6tables-legacy -S | grep -qx -- "-P INPUT ACCEPT" && ip6tables-legacy-save | grep -qx "\*filter"'
if ip6tables-legacy -A INPUT -s 2001:db8:1::/48 -p udp --dport 53 -j DROP > /tmp/out 2>&1; then
    check "ip6tables-legacy -A then -S shows the rule" sh -c '
        ip6tables-legacy -S | grep -qx -- "-A INPUT -s 2001:db8:1::/48 -p udp -m udp --dport 53 -j DROP"'
elif grep -q "Operation not supported" /tmp/out; then
    echo "XFAIL: ip6tables-legacy -A: the helper answers EOPNOTSUPP (engine: IPv6 not compiled yet)"
else
    bad "ip6tables-legacy -A"
fi

$PY $REPO/tests/kmod/sockopt_probe.py --repeat 200 > /tmp/rt 2>&1
check "round trip of GET_INFO through bpfilter.ko and the helper, 200 calls: $(cat /tmp/rt)" \
    grep -q '^ok' /tmp/rt

# 4. namespaces: one helper, each caller served in its own network namespace
ip netns add kmt_a && ip netns add kmt_b
ip link add kmt_va netns kmt_a type veth peer name kmt_vb netns kmt_b
ip -n kmt_a addr add 198.51.100.1/24 dev kmt_va && ip -n kmt_a link set kmt_va up
ip -n kmt_b addr add 198.51.100.2/24 dev kmt_vb && ip -n kmt_b link set kmt_vb up
ip -n kmt_a link set lo up && ip -n kmt_b link set lo up
check "a fresh network namespace starts with an empty filter table" sh -c '
    ip netns exec kmt_b iptables-legacy -S > /tmp/got &&
    printf -- "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n" | diff -u - /tmp/got'
ping_b() { ip netns exec kmt_a ping -c 1 -W 2 198.51.100.2 > /dev/null 2>&1; }

# 5. enforcement by BPF inside the guest (6.12: netfilter BPF links)
check "baseline: ping a -> b passes" ping_b
check "iptables-legacy -A INPUT -p icmp -j DROP in netns b is enforced" sh -c '
    ip netns exec kmt_b iptables-legacy -A INPUT -p icmp -j DROP && ! ip netns exec kmt_a ping -c 1 -W 2 198.51.100.2'
check "the DROP is a BPF program: netfilter link pinned by the engine, ip_tables/x_tables not loaded" sh -c '
    bpftool link show; find /sys/fs/bpf -name "link_*" | grep . && ! grep -qE "^(ip_tables|x_tables|iptable_filter) " /proc/modules'
check "the rule of netns b is not in the initial namespace" sh -c '! iptables-legacy -S | grep -q icmp'
check "iptables-legacy -D lifts it: ping passes again" sh -c '
    ip netns exec kmt_b iptables-legacy -D INPUT -p icmp -j DROP && ip netns exec kmt_a ping -c 1 -W 2 198.51.100.2'

# 6. CAP_NET_ADMIN (kept CAP_NET_RAW so the raw socket opens and the sockopt itself is refused)
check "without CAP_NET_ADMIN: iptables-legacy fails with Permission denied" sh -c '
    ! setpriv --bounding-set=-net_admin --inh-caps=-net_admin iptables-legacy -S > /tmp/o 2>&1 && cat /tmp/o && grep -q "Permission denied" /tmp/o'
check "without CAP_NET_ADMIN: getsockopt(IPT_SO_GET_INFO) and IP6T_SO_GET_INFO give EPERM" sh -c "
    setpriv --bounding-set=-net_admin --inh-caps=-net_admin $PY $REPO/tests/kmod/sockopt_probe.py | grep '^EPERM' &&
    setpriv --bounding-set=-net_admin --inh-caps=-net_admin $PY $REPO/tests/kmod/sockopt_probe.py v6 | grep '^EPERM'"
check "root of a user namespace administers its own network namespace (CAP_NET_ADMIN there)" sh -c "
    setpriv --reuid=65534 --regid=65534 --clear-groups unshare -Urn sh -c '
        export XTABLES_LOCKFILE=/tmp/userns.lock
        iptables-legacy -A INPUT -s 192.0.2.9 -j DROP && iptables-legacy -S' > /tmp/o &&
    cat /tmp/o && grep -qx -- '-A INPUT -s 192.0.2.9/32 -j DROP' /tmp/o && ! grep -q 198.51.100 /tmp/o"

# 7. helper killed in the middle of a request: the caller gets an error, not a hang.
# The helper is stopped so that the request is certainly in flight when it is killed.
PROBE="$PY $REPO/tests/kmod/sockopt_probe.py"
pid=$(cat $P/helper_pid)
starts=$(cat $P/helper_starts)
kill -STOP "$pid"
$PROBE > /tmp/killed 2>&1 &
bg=$!
# wait (at most 30 s) until the probe sleeps in bpfilter.ko waiting for the reply
i=0
while [ $i -lt 300 ] && ! grep -qs helper_recv /proc/[0-9]*/wchan; do sleep 0.1; i=$((i + 1)); done
echo "    in flight: $(grep -ls helper_recv /proc/[0-9]*/wchan | tr '\n' ' ')after $((i / 10)) s"
kill -KILL "$pid"
wait $bg
check "helper killed during GET_INFO: the syscall fails with EPIPE ($(cat /tmp/killed))" sh -c "
    grep -q '^EPIPE' /tmp/killed && [ \$(sed 's/.* \\([0-9]*\\)ms/\\1/' /tmp/killed) -lt 10000 ]"
t0=$(now)
check "the next iptables command works, with a new helper" sh -c "
    iptables-legacy -S > /tmp/o && [ \$(cat $P/helper_starts) -gt $starts ] && [ \$(cat $P/helper_pid) != $pid ]"
echo "    request incl. helper restart: $(ms_since $t0) ms"
pid=$(cat $P/helper_pid)
kill -STOP "$pid"
(sleep 1; kill -KILL "$pid") &
t0=$(now)
check "iptables-legacy -S while its helper is killed: finishes (iptables retries iptc_init once)" \
    iptables-legacy -S
echo "    took $(ms_since $t0) ms"
# The helper killed while it works on a request it has read: a SET_REPLACE of 4000 rules.
# kill_in_request.py runs the restore, stops the helper once the restore waits in helper_recv
# and the helper's end of the channel has nothing unread, looks again 0.2 s later, and kills it
# (see there).  A stop that came after the reply proves nothing: the attempt is made again.
{ echo '*filter'; i=0
  while [ $i -lt 4000 ]; do echo "-A INPUT -s 203.0.113.$((i % 250)) -p tcp --dport $((1000 + i)) -j DROP"; i=$((i + 1)); done
  echo COMMIT; } > /tmp/big
attempt=0
inside=0
while [ $attempt -lt 6 ] && [ $inside -eq 0 ]; do
    attempt=$((attempt + 1))
    # an attempt whose stop came after the reply may have left the 4000 rules: the old set back
    [ $attempt -eq 1 ] || iptables-legacy-restore < /tmp/s1 > /dev/null 2>&1
    before=$(iptables-legacy -S | grep -c '^-A')
    $PY $REPO/tests/kmod/kill_in_request.py /tmp/stop $(cat $P/helper_pid) \
        iptables-legacy-restore < /tmp/big > /tmp/bigout 2>&1
    rc=$?
    if grep -q '^inside' /tmp/stop; then inside=1; fi
    echo "    attempt $attempt: $(cat /tmp/stop)"
done
check "helper killed while applying a 4000-rule restore: iptables-legacy-restore fails ($(cat /tmp/stop))" sh -c "
    cat /tmp/bigout; [ $inside -eq 1 ] && [ $rc -ne 0 ] && [ \$(sed 's/.* after \\([0-9]*\\) ms/\\1/' /tmp/stop) -lt 120000 ]"
check "the ruleset is the old one or the new one, never a mix" sh -c "
    n=\$(iptables-legacy -S | grep -c '^-A'); echo \$n rules; [ \$n -eq $before ] || [ \$n -eq 4000 ]"
if [ "$ENGINE" = real ]; then
    check "the ruleset survived the helpers' deaths (pinned by the engine)" sh -c '
        iptables-legacy-save | grep -v "^#" > /tmp/s3 && grep -v "^#" /tmp/s1 | diff -u - /tmp/s3'
fi

# 8. a helper that does not answer: the caller gets ETIMEDOUT after timeout_ms, not a hang
iptables-legacy -S > /dev/null 2>&1    # a helper is up
echo 2000 > $P/timeout_ms
pid=$(cat $P/helper_pid)
kill -STOP "$pid"
$PROBE > /tmp/stuck 2>&1
echo 30000 > $P/timeout_ms
check "stopped helper: GET_INFO fails with ETIMEDOUT after timeout_ms=2000 ($(cat /tmp/stuck))" sh -c "
    grep -q '^ETIMEDOUT' /tmp/stuck && ms=\$(sed 's/.* \\([0-9]*\\)ms/\\1/' /tmp/stuck) &&
    [ \$ms -ge 1900 ] && [ \$ms -lt 10000 ]"
check "the stuck helper was killed and the next command works" sh -c "
    sleep 0.5; ! kill -0 $pid 2>/dev/null && iptables-legacy -S"

# 8b. a broken helper: garbage instead of a reply frame, or no interpreter at all
orig_python=$(cat $P/python)
# takes one request frame and answers 16 bytes without the frame magic
printf '#!/bin/sh\nhead -c 40 > /dev/null\nprintf 0123456789abcdef\nsleep 30\n' > /run/garbage-helper
chmod +x /run/garbage-helper
kill -KILL "$(cat $P/helper_pid)"
echo /run/garbage-helper > $P/python
$PROBE > /tmp/garbage 2>&1
check "a helper answering garbage: the caller gets EIO ($(cat /tmp/garbage)), the helper is killed" sh -c "
    grep -q '^EIO' /tmp/garbage && dmesg | grep -q 'malformed reply' && sleep 0.5 && ! pgrep -f '^/bin/sh /run/garbage-helper'"
echo /nonexistent/python3 > $P/python
$PROBE > /tmp/noexec 2>&1
check "a helper that cannot start: the caller gets ENOENT ($(cat /tmp/noexec)), the log says why" sh -c "
    grep -q '^ENOENT' /tmp/noexec && dmesg | grep -q 'cannot start helper .*/nonexistent/python3'"
echo "$orig_python" > $P/python
check "with the interpreter back, the next command works" iptables-legacy -S

# 9. unload, refusal while ip_tables holds the range, reload
pid=$(cat $P/helper_pid)
check "modprobe -r bpfilter unloads it and stops the helper" sh -c "
    [ $pid -gt 0 ] && modprobe -r bpfilter && ! grep -q '^bpfilter ' /proc/modules && sleep 0.5 && ! kill -0 $pid 2>/dev/null"
check "with the real ip_tables loaded, modprobe bpfilter refuses (EBUSY) and says why" sh -c '
    modprobe -C /dev/null ip_tables && ! modprobe bpfilter 2> /tmp/o; cat /tmp/o;
    dmesg | grep -q "ip_tables is loaded" && grep -q "Device or resource busy" /tmp/o'
check "after unloading ip_tables, bpfilter loads again and serves" sh -c '
    modprobe -C /dev/null -r ip_tables && modprobe bpfilter && iptables-legacy -S'
check "while bpfilter is loaded, the real ip_tables is refused (no kernel warning)" sh -c '
    ! modprobe iptable_filter; ! grep -qE "^(ip_tables|iptable_filter) " /proc/modules &&
    dmesg | grep -q "refusing to load ip_tables"'
check "bpfilter and the helper left no kernel warning" sh -c '! dmesg | grep -E "WARNING:|BUG:|Call Trace"'

# 10. XDP hardware offload on netdevsim (tests/kmod/guest-offload.sh)
. "$REPO/tests/kmod/guest-offload.sh"
ip netns del kmt_a
ip netns del kmt_b
