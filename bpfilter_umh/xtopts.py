"""The xtables socket options by number (include/uapi/linux/netfilter_ipv4/ip_tables.h,
netfilter_ipv6/ip6_tables.h): what the door traps and the helper answers.

Plain constants and nothing imported: every `bpfilter exec` reads them, and the door's start-up
is paid once per iptables command (door.py "Cost").
"""
SOL_IP, SOL_IPV6 = 0, 41
AF_INET, AF_INET6 = 2, 10

SO_SET_REPLACE = 64
SO_SET_ADD_COUNTERS = 65
SO_GET_INFO = 64
SO_GET_ENTRIES = 65
# (MATCH, TARGET): ip6_tables.h moved them to 68/69, 66/67 being IPV6_RECVTCLASS/IPV6_TCLASS
REVISION_CMDS = {AF_INET: (66, 67), AF_INET6: (68, 69)}

# (is_set, optname) of the requests whose buffer starts with a table name
FILTER_CMDS = {(False, SO_GET_INFO), (False, SO_GET_ENTRIES),
               (True, SO_SET_REPLACE), (True, SO_SET_ADD_COUNTERS)}

CMD_NAMES = {(True, 64): "SET_REPLACE", (True, 65): "SET_ADD_COUNTERS", (False, 64): "GET_INFO",
             (False, 65): "GET_ENTRIES", (False, 66): "GET_REVISION_MATCH",
             (False, 67): "GET_REVISION_TARGET", (False, 68): "GET_REVISION_MATCH",
             (False, 69): "GET_REVISION_TARGET"}
XT_TABLE_MAXNAMELEN = 32
XT_EXTENSION_MAXNAMELEN = 29

SO_NETNS_COOKIE = 71        # include/uapi/asm-generic/socket.h
