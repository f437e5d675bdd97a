"""The C declarations kernel.py calls through cffi: the libc and libbpf 1.x functions, and the
`union bpf_attr` members and libbpf option structs it fills (include/uapi/linux/bpf.h,
libbpf's bpf.h). Their own module so that tools/gen_kernel_ffi.py reads them without loading
libbpf; kernel.py takes the FFI that script generated from them (bpfilter_umh/_kernel_ffi.py)
when it is current."""

CDEF = """
long syscall(long number, ...);
int statfs(const char *path, void *buf);
int unshare(int flags);
int setns(int fd, int nstype);
int mount(const char *source, const char *target, const char *fstype, unsigned long flags,
          const void *data);

struct bpf_attr_prog_load {
    uint32_t prog_type, insn_cnt;
    uint64_t insns, license;
    uint32_t log_level, log_size;
    uint64_t log_buf;
    uint32_t kern_version, prog_flags;
    char prog_name[16];
    uint32_t prog_ifindex, expected_attach_type, prog_btf_fd, func_info_rec_size;
    uint64_t func_info;
    uint32_t func_info_cnt, line_info_rec_size;
    uint64_t line_info;
    uint32_t line_info_cnt, attach_btf_id, attach_prog_fd, core_relo_cnt;
    uint64_t fd_array, core_relos;
    uint32_t core_relo_rec_size, log_true_size;
};
struct bpf_attr_link_create_nf {
    uint32_t prog_fd, target_fd, attach_type, flags;
    uint32_t pf, hooknum;
    int32_t priority;
    uint32_t nf_flags;
};
struct bpf_attr_link_create_tcx {
    uint32_t prog_fd, target_ifindex, attach_type, flags;
    uint32_t relative_fd, pad;
    uint64_t expected_revision;
};

struct bpf_map_create_opts {
    size_t sz;
    uint32_t btf_fd, btf_key_type_id, btf_value_type_id, btf_vmlinux_value_type_id;
    uint32_t inner_map_fd, map_flags;
    uint64_t map_extra;
    uint32_t numa_node, map_ifindex;
};
struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    uint32_t data_size_in, data_size_out;
    const void *ctx_in;
    void *ctx_out;
    uint32_t ctx_size_in, ctx_size_out;
    uint32_t retval;
    int repeat;
    uint32_t duration, flags, cpu, batch_size;
};
int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                   uint32_t max_entries, const struct bpf_map_create_opts *opts);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
int bpf_prog_get_fd_by_id(uint32_t id);
int bpf_map_get_fd_by_id(uint32_t id);
int bpf_link_get_fd_by_id(uint32_t id);
int bpf_link_detach(int link_fd);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
typedef int (*libbpf_print_fn_t)(int level, const char *, void *ap);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
"""
