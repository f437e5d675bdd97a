// SPDX-License-Identifier: GPL-2.0
/*
 * bpfilter-exec [--] CMD [ARGS]: `bpfilter exec -- CMD` without starting Python (issue #7).
 *
 * The Python door (bpfilter_umh/door.py) forks, lets the child install the seccomp filter and
 * exec CMD, and serves the notifications itself: a Python start-up (~15-20 ms) per iptables
 * command.  This launcher hands the filter's listener to the helper already serving this
 * network namespace and execs CMD in its own place, so CMD's exit status and signals are its
 * own and no door process stays behind; the helper serves the notifications with the Python
 * door's own code (doorserve.Door, __main__.serve_listen).  It does only the part that needs no
 * decision of Python's:
 *   1. connect to the helper's abstract socket and send BPFILTER_CMD_HOLD (bpfilter_msg.h): a
 *      status 0 means the helper took the connection and will not exit idle under us;
 *   2. install the Python door's filter (door.seccomp_filter(), generated into
 *      door_filter.h by the Makefile, so there is one definition) with
 *      SECCOMP_FILTER_FLAG_NEW_LISTENER, after PR_SET_NO_NEW_PRIVS as seccomp(2) requires of
 *      an unprivileged caller;
 *   3. send BPFILTER_CMD_ADOPT with the listener in SCM_RIGHTS, wait for status 0, close it;
 *   4. exec CMD.
 * Everything else goes to the Python door, before any filter exists: flags (config.py),
 * BPFILTER_DOOR_TRACE (a door's own log), no helper running yet (the Python door starts one,
 * the user-space request_module), a helper that refuses.  After step 2 there is no way back
 * (a filter cannot be removed): a helper gone between 2 and 3 fails the command, exit 126.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>

#include "bpfilter_msg.h"
#include "door_filter.h"	/* DOOR_FILTER: struct sock_filter[] of door.seccomp_filter() */

#ifndef BPFILTER_ROOT
#error "BPFILTER_ROOT: the checkout whose bin/bpfilter is the fallback door"
#endif
#ifndef BPFILTER_PYTHON
#define BPFILTER_PYTHON "python3"
#endif

/* the Python door with our arguments: `python3 -S ROOT/bin/bpfilter exec ARGS` */
static void python_door(int argc, char **argv)
{
	char **args = calloc(argc + 4, sizeof(*args));

	if (!args) {
		perror("bpfilter-exec");
		exit(126);
	}
	args[0] = BPFILTER_PYTHON;
	args[1] = "-S";
	args[2] = BPFILTER_ROOT "/bin/bpfilter";
	args[3] = "exec";
	memcpy(&args[4], &argv[1], argc * sizeof(*args));	/* argv[argc] is NULL */
	execvp(args[0], args);
	fprintf(stderr, "bpfilter-exec: cannot run %s: %s\n", args[0], strerror(errno));
	exit(126);
}

/* one request frame (with a descriptor if fd >= 0), then its reply's status; -EIO if none */
static int call(int sock, __u32 cmd, int fd)
{
	struct bpfilter_request req = { .magic = BPFILTER_MSG_MAGIC, .cmd = cmd };
	struct bpfilter_reply rep;
	struct iovec iov = { .iov_base = &req, .iov_len = sizeof(req) };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	size_t got = 0;
	ssize_t n;

	if (fd >= 0) {
		struct cmsghdr *c;

		memset(&ctl, 0, sizeof(ctl));
		msg.msg_control = ctl.buf;
		msg.msg_controllen = sizeof(ctl.buf);
		c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	/* a frame of 40 bytes on a stream socket goes out whole or not at all in practice;
	 * a short send is treated as the helper gone */
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n != sizeof(req))
		return -EIO;
	while (got < sizeof(rep)) {
		n = read(sock, (char *)&rep + got, sizeof(rep) - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -EIO;
		got += n;
	}
	return rep.magic == BPFILTER_MSG_MAGIC ? rep.status : -EIO;
}

static int connect_helper(void)
{
	static const char name[] = BPFILTER_HELPER_SOCKET;	/* abstract: starts with NUL */
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (sock < 0)
		return -1;
	memcpy(addr.sun_path, name, sizeof(name) - 1);
	if (connect(sock, (struct sockaddr *)&addr,
		    offsetof(struct sockaddr_un, sun_path) + sizeof(name) - 1) < 0) {
		close(sock);
		return -1;
	}
	return sock;
}

int main(int argc, char **argv)
{
	static struct sock_filter code[] = DOOR_FILTER;
	struct sock_fprog prog = {
		.len = sizeof(code) / sizeof(code[0]),
		.filter = code,
	};
	int first = 1, sock, listener, err;

	if (argc > 1 && strcmp(argv[1], "--") == 0)
		first = 2;
	else if (argc > 1 && argv[1][0] == '-')
		python_door(argc, argv);		/* flags, --help */
	if (first >= argc || getenv("BPFILTER_DOOR_TRACE"))
		python_door(argc, argv);
	sock = connect_helper();
	if (sock < 0)
		python_door(argc, argv);		/* no helper yet: Python starts one */
	if (call(sock, BPFILTER_CMD_HOLD, -1) != 0) {
		close(sock);
		python_door(argc, argv);
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		goto no_filter;
	listener = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
			   SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (listener < 0)
		goto no_filter;
	err = call(sock, BPFILTER_CMD_ADOPT, listener);
	close(listener);
	close(sock);
	if (err) {
		fprintf(stderr, "bpfilter-exec: the helper did not take the door: %s\n",
			strerror(-err));
		return 126;
	}
	execvp(argv[first], &argv[first]);
	err = errno;
	if (err == ENOENT) {
		fprintf(stderr, "bpfilter: %s: command not found\n", argv[first]);
		return 127;
	}
	fprintf(stderr, "bpfilter: cannot run %s: %s\n", argv[first], strerror(err));
	return 126;

no_filter:
	fprintf(stderr, "bpfilter-exec: cannot install the seccomp filter: %s\n", strerror(errno));
	return 126;
}
