// SPDX-License-Identifier: GPL-2.0
/*
 * bpfilter.ko: the kernel door of bpfilter.
 *
 * It takes the iptables socket-option ranges (SOL_IP / SOL_IPV6, IPT_SO_* / IP6T_SO_*) that
 * ip_tables.ko and ip6_tables.ko would register, and forwards every call, unchanged, to a
 * user-mode helper (`python3 -m bpfilter_umh`) over a channel that is the helper's stdin and
 * stdout.  The helper reads and writes the caller's buffer itself (process_vm_readv/writev on
 * request.pid: the caller sleeps in this module meanwhile, so its memory is stable) and answers
 * with a status that becomes the syscall's result.  Frames: bpfilter_msg.h.
 *
 * One helper serves every network namespace.  A usermode helper is always forked from kthreadd,
 * i.e. in init_net with full capabilities, so a helper "per namespace" would have to setns()
 * anyway; the helper does that per request (request.netns_cookie, request.pid), keeps its state
 * keyed by the cookie, and requests are serialized here like xt_find_table_lock() serializes
 * them per family in net/netfilter/x_tables.c.
 *
 * The channel is an AF_UNIX stream socket pair: its file operations belong to the core kernel,
 * so a helper that outlives a request (or this module) never runs code of an unloaded module,
 * and its death is seen here as end-of-file.  Nothing in the exported API creates pipes for us
 * (create_pipe_files() is not exported), and fork_usermode_driver() is not exported either, so
 * the helper is started with call_usermodehelper_setup/exec and the socket is installed as its
 * fd 0 and 1 from the init callback, which runs in the new task before execve().
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4/ip_tables.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <linux/umh.h>
#include <linux/net.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/fcntl.h>
#include <linux/pid.h>
#include <linux/sched/signal.h>
#include <linux/capability.h>
#include <linux/compat.h>
#include <linux/wait.h>
#include <linux/slab.h>
#include <linux/mutex.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/uidgid.h>
#include <net/sock.h>
#include <net/net_namespace.h>

#include "bpfilter_msg.h"

static char *python = "/usr/bin/python3";
module_param(python, charp, 0644);
MODULE_PARM_DESC(python, "interpreter that runs the helper (`<python> -m bpfilter_umh`)");

static char *pythonpath = "";
module_param(pythonpath, charp, 0644);
MODULE_PARM_DESC(pythonpath, "PYTHONPATH of the helper (directory holding bpfilter_umh)");

static unsigned int timeout_ms = 30000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "a request not answered within this time fails with ETIMEDOUT and the helper is killed");

static int helper_pid;
module_param(helper_pid, int, 0444);
MODULE_PARM_DESC(helper_pid, "pid of the running helper, 0 if none");

static unsigned int helper_starts;
module_param(helper_starts, uint, 0444);
MODULE_PARM_DESC(helper_starts, "how many helpers were started since load");

struct bpfilter_helper {
	struct socket *sock;	/* our end of the channel */
	struct socket *peer;	/* the helper's end, until its init callback takes it */
	struct pid *pid;	/* the helper's thread-group leader */
};

/* Serializes requests and the helper's life: one request in flight, one reply in order. */
static DEFINE_MUTEX(bpfilter_mutex);
static struct bpfilter_helper *helper;	/* NULL: none running; protected by bpfilter_mutex */

/*
 * Requests wait with TASK_IDLE (signals do not cut a request short, as in ip_tables, whose
 * do_replace() runs to completion); the socket's own wakeups are interruptible-only
 * (sock_def_readable), so our socket's callbacks also wake this queue.
 */
static DECLARE_WAIT_QUEUE_HEAD(bpfilter_wq);
static void (*unix_data_ready)(struct sock *sk);
static void (*unix_state_change)(struct sock *sk);

static void bpfilter_data_ready(struct sock *sk)
{
	unix_data_ready(sk);
	wake_up(&bpfilter_wq);
}

static void bpfilter_state_change(struct sock *sk)
{
	unix_state_change(sk);
	wake_up(&bpfilter_wq);
}

static void helper_free(struct bpfilter_helper *h)
{
	struct sock *sk;

	if (h->sock) {
		sk = h->sock->sk;
		write_lock_bh(&sk->sk_callback_lock);
		if (sk->sk_data_ready == bpfilter_data_ready) {
			sk->sk_data_ready = unix_data_ready;
			sk->sk_state_change = unix_state_change;
		}
		write_unlock_bh(&sk->sk_callback_lock);
		sock_release(h->sock);
	}
	if (h->peer)
		sock_release(h->peer);
	put_pid(h->pid);
	kfree(h);
}

/* Kill the helper and drop the channel: the next request starts a fresh helper. */
static void helper_stop(const char *why)
{
	struct bpfilter_helper *h = helper;

	if (!h)
		return;
	if (why)
		pr_warn("stopping helper pid %d: %s\n", helper_pid, why);
	if (h->pid)
		kill_pid(h->pid, SIGKILL, 1);
	helper = NULL;
	WRITE_ONCE(helper_pid, 0);
	helper_free(h);
}

/* Install @f on the lowest free descriptor, which must be @want (0, 1, 2 of a new helper). */
static int install_fd(struct file *f, int want)
{
	int fd = get_unused_fd_flags(0);

	if (fd != want) {
		if (fd >= 0)
			put_unused_fd(fd);
		fput(f);
		return fd < 0 ? fd : -EBADF;
	}
	fd_install(fd, f);
	return 0;
}

/*
 * Runs in the new task, after call_usermodehelper_exec_async() set it up and before execve().
 * A usermode helper starts with kthreadd's empty descriptor table, so 0, 1, 2 are free.
 */
static int helper_init(struct subprocess_info *info, struct cred *new)
{
	struct bpfilter_helper *h = info->data;
	struct file *chan, *log;
	int err;

	chan = sock_alloc_file(h->peer, 0, NULL);
	h->peer = NULL;		/* sock_alloc_file() owns it now, even on failure */
	if (IS_ERR(chan))
		return PTR_ERR(chan);
	err = install_fd(get_file(chan), 0);
	if (!err)
		err = install_fd(chan, 1);
	else
		fput(chan);
	if (err)
		return err;

	/* stderr: the kernel log, so a helper's traceback is in dmesg; /dev/null otherwise. */
	log = filp_open("/dev/kmsg", O_WRONLY, 0);
	if (IS_ERR(log))
		log = filp_open("/dev/null", O_WRONLY, 0);
	if (!IS_ERR(log))
		install_fd(log, 2);

	h->pid = get_pid(task_tgid(current));
	return 0;
}

static int helper_start(void)
{
	struct bpfilter_helper *h;
	struct subprocess_info *info;
	char *argv[] = { NULL, "-m", "bpfilter_umh", NULL };
	char *envp[] = {
		"HOME=/",
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"PYTHONDONTWRITEBYTECODE=1",
		"BPFILTER_DOOR=kmod",
		NULL,	/* PYTHONPATH= */
		NULL,
	};
	char *py = NULL, *path = NULL;
	struct sock *sk;
	int err = -ENOMEM;

	h = kzalloc(sizeof(*h), GFP_KERNEL);
	if (!h)
		return -ENOMEM;

	/* strim(): a value written to /sys/module/bpfilter/parameters/ keeps echo's newline. */
	kernel_param_lock(THIS_MODULE);
	py = kstrdup(python, GFP_KERNEL);
	path = kstrdup(pythonpath, GFP_KERNEL);
	kernel_param_unlock(THIS_MODULE);
	if (!py || !path)
		goto out;
	argv[0] = strim(py);
	envp[4] = kasprintf(GFP_KERNEL, "PYTHONPATH=%s", strim(path));
	if (!envp[4])
		goto out;

	err = sock_create_kern(&init_net, AF_UNIX, SOCK_STREAM, 0, &h->sock);
	if (!err)
		err = sock_create_kern(&init_net, AF_UNIX, SOCK_STREAM, 0, &h->peer);
	if (!err)
		err = h->sock->ops->socketpair(h->sock, h->peer);
	if (err)
		goto out;

	sk = h->sock->sk;
	write_lock_bh(&sk->sk_callback_lock);
	unix_data_ready = sk->sk_data_ready;
	unix_state_change = sk->sk_state_change;
	sk->sk_data_ready = bpfilter_data_ready;
	sk->sk_state_change = bpfilter_state_change;
	write_unlock_bh(&sk->sk_callback_lock);

	err = -ENOMEM;
	info = call_usermodehelper_setup(argv[0], argv, envp, GFP_KERNEL, helper_init, NULL, h);
	if (!info)
		goto out;
	/* UMH_WAIT_EXEC: returns once execve() succeeded or failed; argv/envp are used until then. */
	err = call_usermodehelper_exec(info, UMH_WAIT_EXEC);
	if (!err && !h->pid)
		err = -ECHILD;
out:
	if (err) {
		pr_err("cannot start helper `%s -m bpfilter_umh` (%s): error %d\n",
		       argv[0] ?: "?", envp[4] ?: "", err);
		if (h->pid)
			kill_pid(h->pid, SIGKILL, 1);
		helper_free(h);
	} else {
		helper = h;
		WRITE_ONCE(helper_pid, pid_nr(h->pid));
		helper_starts++;
	}
	kfree(py);
	kfree(path);
	kfree(envp[4]);
	return err;
}

static bool helper_alive(struct bpfilter_helper *h)
{
	return pid_has_task(h->pid, PIDTYPE_TGID);
}

static int helper_send(struct bpfilter_helper *h, const struct bpfilter_request *req)
{
	struct kvec iov = { .iov_base = (void *)req, .iov_len = sizeof(*req) };
	struct msghdr msg = { .msg_flags = MSG_DONTWAIT | MSG_NOSIGNAL };
	int n;

	/* One frame in an idle stream socket never fills its buffer: -EAGAIN means a broken peer. */
	n = kernel_sendmsg(h->sock, &msg, &iov, 1, sizeof(*req));
	if (n == sizeof(*req))
		return 0;
	return n < 0 ? n : -EIO;
}

static bool reply_ready(struct sock *sk)
{
	return !skb_queue_empty_lockless(&sk->sk_receive_queue) ||
	       (READ_ONCE(sk->sk_shutdown) & RCV_SHUTDOWN) || READ_ONCE(sk->sk_err);
}

/*
 * Wait for the reply, at most timeout_ms.  Besides end-of-file on the socket, the helper's pid is
 * checked every 200 ms: a child that inherited the helper's stdout would keep the channel open
 * after the helper itself died.
 */
static int helper_recv(struct bpfilter_helper *h, struct bpfilter_reply *rep)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(READ_ONCE(timeout_ms));
	size_t got = 0;
	int n;

	while (got < sizeof(*rep)) {
		struct kvec iov = { .iov_base = (char *)rep + got, .iov_len = sizeof(*rep) - got };
		struct msghdr msg = { .msg_flags = MSG_DONTWAIT };

		n = kernel_recvmsg(h->sock, &msg, &iov, 1, iov.iov_len, MSG_DONTWAIT);
		if (n > 0) {
			got += n;
			continue;
		}
		/*
		 * End of file (every copy of the helper's end is closed) or ECONNRESET (it died with
		 * our request unread, unix_release_sock()): either way the helper is gone.
		 */
		if (n != -EAGAIN)
			return -EPIPE;
		if (!helper_alive(h))
			return -EPIPE;
		if (time_after_eq(jiffies, deadline))
			return -ETIMEDOUT;
		wait_event_idle_timeout(bpfilter_wq, reply_ready(h->sock->sk),
					min_t(long, deadline - jiffies, HZ / 5));
	}
	return 0;
}

/*
 * Forward one socket option to the helper.  Returns the helper's status (0 or -errno); on a
 * transport failure the helper is killed and the caller gets -EPIPE (helper died), -ETIMEDOUT
 * (no answer in time) or -EIO (malformed reply).
 */
static int bpfilter_forward(struct sock *sk, u32 family, int cmd, bool is_set,
			    void __user *addr, unsigned int len, unsigned int *out_len)
{
	struct net *net = sock_net(sk);
	struct bpfilter_request req = {
		.magic = BPFILTER_MSG_MAGIC,
		.cmd = cmd,
		.is_set = is_set,
		.family = family,
		.len = len,
		.addr = (u64)(uintptr_t)addr,
	};
	struct bpfilter_reply rep;
	bool fresh = false;
	int err;

	/* The check do_ipt_set_ctl()/do_ipt_get_ctl() in net/ipv4/netfilter/ip_tables.c make. */
	if (!ns_capable(net->user_ns, CAP_NET_ADMIN))
		return -EPERM;
	/* The helper decodes the native 64-bit layout only (Debian builds no XTABLES_COMPAT). */
	if (in_compat_syscall())
		return -EOPNOTSUPP;
	/* The helper itself must never come back here: it would wait for its own reply. */
	if (task_tgid_nr(current) == READ_ONCE(helper_pid))
		return -EDEADLK;

	/* The helper runs in the initial pid namespace, so it needs the global thread id. */
	req.pid = task_pid_nr(current);
	req.netns_cookie = net->net_cookie;

	if (mutex_lock_killable(&bpfilter_mutex))
		return -EINTR;
again:
	if (helper && !helper_alive(helper))
		helper_stop("it died while idle");
	if (!helper) {
		err = helper_start();
		if (err)
			goto out;
		fresh = true;
	}
	err = helper_send(helper, &req);
	if (err) {
		helper_stop("the channel is broken");
		/* The helper never saw this request, so a fresh one may serve it. */
		if (!fresh)
			goto again;
		goto out;
	}
	err = helper_recv(helper, &rep);
	if (err) {
		helper_stop(err == -ETIMEDOUT ? "no reply in time" : "it died during a request");
		goto out;
	}
	if (rep.magic != BPFILTER_MSG_MAGIC || rep.status > 0 || rep.status < -MAX_ERRNO ||
	    (!is_set && rep.len > len)) {
		helper_stop("malformed reply");
		err = -EIO;
		goto out;
	}
	err = rep.status;
	if (out_len)
		*out_len = rep.len;
out:
	mutex_unlock(&bpfilter_mutex);
	return err;
}

static int bpfilter_set(struct sock *sk, u32 family, int optval, sockptr_t arg, unsigned int len)
{
	/* Only user memory can be reached by the helper (process_vm_readv). */
	if (sockptr_is_kernel(arg))
		return -EOPNOTSUPP;
	return bpfilter_forward(sk, family, optval, true, arg.user, len, NULL);
}

static int bpfilter_get(struct sock *sk, u32 family, int optval, void __user *user, int *len)
{
	unsigned int out_len;
	int err;

	if (*len < 0)
		return -EINVAL;
	err = bpfilter_forward(sk, family, optval, false, user, *len, &out_len);
	if (!err)
		*len = out_len;
	return err;
}

static int bpfilter_set4(struct sock *sk, int optval, sockptr_t arg, unsigned int len)
{
	return bpfilter_set(sk, AF_INET, optval, arg, len);
}

static int bpfilter_get4(struct sock *sk, int optval, void __user *user, int *len)
{
	return bpfilter_get(sk, AF_INET, optval, user, len);
}

static int bpfilter_set6(struct sock *sk, int optval, sockptr_t arg, unsigned int len)
{
	return bpfilter_set(sk, AF_INET6, optval, arg, len);
}

static int bpfilter_get6(struct sock *sk, int optval, void __user *user, int *len)
{
	return bpfilter_get(sk, AF_INET6, optval, user, len);
}

/* The very ranges ipt_sockopts / ip6t_sockopts register (ip_tables.c, ip6_tables.c). */
static struct nf_sockopt_ops bpfilter_sockopts4 = {
	.pf		= PF_INET,
	.set_optmin	= IPT_BASE_CTL,
	.set_optmax	= IPT_SO_SET_MAX + 1,
	.set		= bpfilter_set4,
	.get_optmin	= IPT_BASE_CTL,
	.get_optmax	= IPT_SO_GET_MAX + 1,
	.get		= bpfilter_get4,
	.owner		= THIS_MODULE,
};

static struct nf_sockopt_ops bpfilter_sockopts6 = {
	.pf		= PF_INET6,
	.set_optmin	= IP6T_BASE_CTL,
	.set_optmax	= IP6T_SO_SET_MAX + 1,
	.set		= bpfilter_set6,
	.get_optmin	= IP6T_BASE_CTL,
	.get_optmax	= IP6T_SO_GET_MAX + 1,
	.get		= bpfilter_get6,
	.owner		= THIS_MODULE,
};

/*
 * /proc/net/ip_tables_names and ip6_tables_names, as xt_proto_init() in net/netfilter/x_tables.c
 * creates them: iptables-save reads the tables to dump from there, and libxtables'
 * xtables_load_ko() takes their existence to mean "the kernel side is loaded".  The helper
 * serves the filter table.
 */
static int tables_names_show(struct seq_file *m, void *v)
{
	seq_puts(m, "filter\n");
	return 0;
}

static const char *const tables_names[] = { "ip_tables_names", "ip6_tables_names" };

static int __net_init bpfilter_net_init(struct net *net)
{
	kuid_t root_uid = make_kuid(net->user_ns, 0);
	kgid_t root_gid = make_kgid(net->user_ns, 0);
	struct proc_dir_entry *pde;
	int i;

	for (i = 0; i < ARRAY_SIZE(tables_names); i++) {
		pde = proc_create_net_single(tables_names[i], 0440, net->proc_net,
					     tables_names_show, NULL);
		if (!pde) {
			while (i--)
				remove_proc_entry(tables_names[i], net->proc_net);
			return -ENOMEM;
		}
		/* Readable by the namespace's root, like x_tables' own files. */
		if (uid_valid(root_uid) && gid_valid(root_gid))
			proc_set_user(pde, root_uid, root_gid);
	}
	return 0;
}

static void __net_exit bpfilter_net_exit(struct net *net)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(tables_names); i++)
		remove_proc_entry(tables_names[i], net->proc_net);
}

static struct pernet_operations bpfilter_net_ops = {
	.init = bpfilter_net_init,
	.exit = bpfilter_net_exit,
};

/*
 * While bpfilter serves the socket options, the real ip_tables/ip6_tables must not come up: their
 * init would fail anyway (nf_register_sockopt() -EBUSY), but only after xt_proto_init() tripped
 * over our /proc/net/ip*_tables_names with a kernel warning.  A module notifier may veto a
 * module in MODULE_STATE_COMING (prepare_coming_module() in kernel/module/main.c).
 */
static int bpfilter_module_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	struct module *mod = data;

	if (action != MODULE_STATE_COMING ||
	    (strcmp(mod->name, "ip_tables") && strcmp(mod->name, "ip6_tables")))
		return NOTIFY_DONE;
	pr_err("refusing to load %s: bpfilter serves the iptables socket options (modprobe -r bpfilter first)\n",
	       mod->name);
	return notifier_from_errno(-EBUSY);
}

static struct notifier_block bpfilter_module_nb = {
	.notifier_call = bpfilter_module_notify,
};

static int __init bpfilter_init(void)
{
	int err;

	/* nf_register_sockopt() refuses overlapping ranges with -EBUSY (net/netfilter/nf_sockopt.c). */
	err = nf_register_sockopt(&bpfilter_sockopts4);
	if (err) {
		pr_err("cannot take the IPv4 iptables socket options (error %d)%s\n", err,
		       err == -EBUSY ? ": ip_tables is loaded; unload it (modprobe -r iptable_filter ... ip_tables) first" : "");
		return err;
	}
	err = nf_register_sockopt(&bpfilter_sockopts6);
	if (err) {
		pr_err("cannot take the IPv6 iptables socket options (error %d)%s\n", err,
		       err == -EBUSY ? ": ip6_tables is loaded; unload it (modprobe -r ip6table_filter ... ip6_tables) first" : "");
		nf_unregister_sockopt(&bpfilter_sockopts4);
		return err;
	}
	err = register_module_notifier(&bpfilter_module_nb);
	if (!err) {
		err = register_pernet_subsys(&bpfilter_net_ops);
		if (err)
			unregister_module_notifier(&bpfilter_module_nb);
	}
	if (err) {
		nf_unregister_sockopt(&bpfilter_sockopts6);
		nf_unregister_sockopt(&bpfilter_sockopts4);
		return err;
	}
	pr_info("serving the iptables socket options with `%s -m bpfilter_umh`\n", python);
	return 0;
}

static void __exit bpfilter_exit(void)
{
	/* No new request can arrive after this; requests in flight hold a module reference. */
	nf_unregister_sockopt(&bpfilter_sockopts6);
	nf_unregister_sockopt(&bpfilter_sockopts4);
	unregister_pernet_subsys(&bpfilter_net_ops);
	unregister_module_notifier(&bpfilter_module_nb);
	mutex_lock(&bpfilter_mutex);
	helper_stop(NULL);
	mutex_unlock(&bpfilter_mutex);
}

module_init(bpfilter_init);
module_exit(bpfilter_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("iptables socket options served by an eBPF-generating user-mode helper");
