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

#endif /* _BPFILTER_MSG_H */
