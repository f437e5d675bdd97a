# Sourced by guest-test.sh (uses its check/ok/bad, $PY, $REPO): XDP offload proven on a device
# with a BPF offload engine.  netdevsim (built by tests/kmod/build-netdevsim.sh) registers one
# (bpf_offload_dev_create); bpfilter_umh.offload compiles the INPUT chain in its offload code
# mode, creates the counters array on the device (map_ifindex), loads with prog_ifindex and
# attaches with XDP_FLAGS_HW_MODE.  ip link then shows "xdpoffload", bpftool "offloaded_to".
# Then the engine itself (Engine.open(..., offload=NSIM)): install, replace, adopt, flush.
if ! modprobe netdevsim > /tmp/out 2>&1; then
    echo "SKIP: XDP offload: no netdevsim module ($(cat /tmp/out)); tests/kmod/build-netdevsim.sh did not build it"
else
    ip netns add kmt_o
    # `ip netns exec` mounts a fresh /sys, hiding /sys/fs/bpf: pin in a bpffs of our own
    mkdir -p /run/kmt_bpf && mount -t bpf bpf /run/kmt_bpf
    echo "1 1" > /sys/bus/netdevsim/new_device
    i=0
    while [ $i -lt 50 ] && ! ls /sys/bus/netdevsim/devices/netdevsim1/net/ > /dev/null 2>&1; do
        sleep 0.1; i=$((i + 1))
    done
    NSIM=$(ls /sys/bus/netdevsim/devices/netdevsim1/net/ 2>/dev/null | head -n1)
    ip link set "$NSIM" netns kmt_o
    ip -n kmt_o addr add 192.0.2.1/24 dev "$NSIM" && ip -n kmt_o link set "$NSIM" up
    t0=$(now)
    ip netns exec kmt_o $PY $REPO/tests/kmod/offload_probe.py all "$NSIM" /run/kmt_bpf/offload > /tmp/offload 2>&1
    rc=$?
    echo "    offload probe (load + refusals): $(ms_since $t0) ms"
    check "offload: a one-rule INPUT ruleset loads onto netdevsim $NSIM (prog_ifindex, HW mode)" sh -c "
        cat /tmp/offload; grep -q '^ok prog_id=' /tmp/offload"
    check "offload: ip link shows the program offloaded (xdpoffload) on $NSIM" sh -c "
        ip -n kmt_o -d link show $NSIM && ip -n kmt_o -d link show $NSIM | grep -q xdpoffload"
    check "offload: bpftool shows the program and its counters map offloaded_to $NSIM" sh -c "
        ip netns exec kmt_o bpftool prog show > /tmp/progs && ip netns exec kmt_o bpftool map show > /tmp/maps &&
        grep -A3 bpfilter_hw /tmp/progs && grep -A3 bpfilter_hw /tmp/progs | grep -q 'offloaded_to $NSIM' &&
        grep -A2 bpfilter_hwcnt /tmp/maps && grep -A2 bpfilter_hwcnt /tmp/maps | grep -q 'offloaded_to $NSIM'"
    check "offload: netdevsim holds the program id in its bpf_offloaded_id" sh -c "
        id=\$(cat /sys/kernel/debug/netdevsim/netdevsim1/ports/0/bpf_offloaded_id 2>/dev/null ||
              (mount -t debugfs none /sys/kernel/debug && cat /sys/kernel/debug/netdevsim/netdevsim1/ports/0/bpf_offloaded_id));
        echo \$id; [ \"\$id\" -gt 0 ] && bpftool prog show id \$id | grep -q bpfilter_hw"
    check "offload: refusals name the reason (map capacity, the offending rule, lo without engine)" sh -c "
        cat /tmp/offload; [ $rc -eq 0 ] && [ \$(grep -c '^refused:' /tmp/offload) -eq 3 ]"
    rm -f /run/kmt_bpf/offload
    check "offload: removing the pin detaches it" sh -c "! ip -n kmt_o -d link show $NSIM | grep -q xdpoffload"
    # the engine's own path (what the helper runs for --offload): install, replace, adopt, flush
    t0=$(now)
    ip netns exec kmt_o $PY $REPO/tests/kmod/offload_probe.py engine "$NSIM" > /tmp/offload_engine 2>&1
    rc=$?
    echo "    offload through the engine (2 installs, adopt, flush): $(ms_since $t0) ms"
    sed 's/^/    | /' /tmp/offload_engine
    check "offload: Engine(flavor xdp, offload $NSIM) installs, bpftool shows program and map offloaded_to it" sh -c "
        cat /tmp/offload_engine; grep -q '^ok engine: install offloads INPUT' /tmp/offload_engine &&
        grep -q '^ok engine: bpftool: the program is offloaded_to' /tmp/offload_engine &&
        grep -q '^ok engine: bpftool: its counters map is device-bound' /tmp/offload_engine"
    check "offload: a second install replaces the offloaded program on the same link" sh -c "
        cat /tmp/offload_engine; grep -q '^ok engine: a second install replaces' /tmp/offload_engine"
    check "offload: the device's drops are added to the DROP entries' counters (also at replace)" sh -c "
        cat /tmp/offload_engine; grep -q '^ok engine: the device.s drops are added' /tmp/offload_engine &&
        grep -q '^ok engine: the replaced table.s counters include' /tmp/offload_engine"
    check "offload: a new engine adopts it; flush removes it" sh -c "
        cat /tmp/offload_engine; [ $rc -eq 0 ] && grep -q '^ok engine: a new engine adopts' /tmp/offload_engine &&
        grep -q '^ok engine: flush removes it' /tmp/offload_engine &&
        ! ip -n kmt_o -d link show $NSIM | grep -q xdpoffload"
    ip netns del kmt_o
    umount /run/kmt_bpf
    echo 1 > /sys/bus/netdevsim/del_device
fi
