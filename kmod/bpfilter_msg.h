/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The frames a door (the kernel shim bpfilter.ko, or the user-space `bpfilter exec`) exchanges
 * with the helper (`python3 -m bpfilter_umh`) over its stdin/stdout.  Defined once here; the
 * Python mirror is bpfilter_umh/frames.py and tests/test_frames.py checks that both agree.
 *
 * One request, one reply, in order.  All fields are host byte order.
 */
#ifndef _BPFILTER_MSG_H
#define _BPFILTER_MSG_H

#include <linux/types.h>

#define BPFILTER_MSG_MAGIC	0x62706631	/* "bpf1" */

struct bpfilter_request {
	__u32	magic;		/* BPFILTER_MSG_MAGIC */
	__u32	cmd;		/* optname: IPT_SO_* (level SOL_IP) or IP6T_SO_* (SOL_IPV6) */
	__u32	is_set;		/* 1: setsockopt, 0: getsockopt */
	__u32	family;		/* AF_INET for SOL_IP, AF_INET6 for SOL_IPV6 */
	__u32	pid;		/* caller's thread id, as seen from the helper's pid namespace */
	__u32	len;		/* optlen: bytes the caller offers at addr */
	__u64	addr;		/* optval: address in the caller's memory */
	__u64	netns_cookie;	/* caller's network namespace (0: the helper's own) */
};

struct bpfilter_reply {
	__u32	magic;		/* BPFILTER_MSG_MAGIC */
	__s32	status;		/* 0 on success, or -errno for the caller */
	__u32	len;		/* getsockopt: the optlen to give back to the caller */
	__u32	pad;
};

/*
 * The user-space door's short way (bin/bpfilter-exec.c): instead of serving the seccomp
 * notifications of its command itself, a door hands the listener to the helper of its network
 * namespace and becomes the command.  It connects to the abstract unix socket
 * BPFILTER_HELPER_SOCKET and sends two requests, each answered by a plain reply:
 *   BPFILTER_CMD_HOLD   before it installs its filter: a status 0 promises the helper stays
 *                       (it does not exit idle while the connection is open);
 *   BPFILTER_CMD_ADOPT  with the listener in SCM_RIGHTS: status 0 once the helper serves it.
 * Their other fields are zero.  The kernel shim never sends them; they lie outside the
 * IPT_SO_* and IP6T_SO_* option numbers (64..69).
 */
#define BPFILTER_HELPER_SOCKET	"\0bpfilter"
#define BPFILTER_CMD_HOLD	0x100
#define BPFILTER_CMD_ADOPT	0x101

#endif /* _BPFILTER_MSG_H */
