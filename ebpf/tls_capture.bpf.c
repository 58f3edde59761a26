/* km TLS capture: the plaintext a sandbox's processes hand to OpenSSL, taken at SSL_write/SSL_read.
 *
 * Uprobes on the exported SSL_write, SSL_read, SSL_write_ex and SSL_read_ex of one libssl. The entry
 * probe remembers the call's buffer (and, for the _ex variants, where the byte count will be written)
 * per thread; the return probe reads how many bytes went through and reports them. Uprobes are per
 * inode and therefore system-wide: every process using that libssl takes the trap, including other
 * sandboxes cloned from the same image. Only tasks whose cgroup (or an ancestor) is in `targets` are
 * captured, and that check is made here, in the kernel, so nobody else's plaintext is ever copied.
 *
 * Which peer a call talked to is taken where OpenSSL moves the ciphertext: programs on the
 * sock_send_length and sock_recv_length tracepoints note the socket's remote address in the
 * thread's pending call (the first send or receive the call makes). A call served from OpenSSL's own buffer makes no such call; the reader
 * then names the peer from the connection's earlier calls.
 *
 * Compiled ahead of time (ebpf/objects.py). The kernel's struct sock is read through CO-RE: the
 * minimal definitions below are relocated by libbpf against the running kernel's BTF at load.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

/* Only the fields read here; libbpf finds them by name in the kernel's struct sock (the ___km suffix
 * keeps them apart from any other declaration and is ignored when matching). */
struct in6_addr___km {
    __u8 s6_addr[16];
} __attribute__((preserve_access_index));

struct sock_common___km {
    __be32 skc_daddr;
    __be16 skc_dport;
    unsigned short skc_family;
    struct in6_addr___km skc_v6_daddr;
} __attribute__((preserve_access_index));

struct sock___km {
    struct sock_common___km __sk_common;
} __attribute__((preserve_access_index));

#define KM_AF_INET 2
#define KM_AF_INET6 10

#define TLS_MAX_PAYLOAD 4096
#define TLS_MAX_ANCESTOR_LEVELS 16

#define DIRECTION_WRITE 0
#define DIRECTION_READ 1

#define COUNTER_CAPTURED 0
#define COUNTER_LOST 1       /* the ring buffer was full: the event is gone */
#define COUNTER_UNREADABLE 2 /* reported with its size but without payload: the buffer could not be read */
#define COUNTER_SLOTS 3

struct tls_config {
    __u32 payload_bytes; /* how much plaintext each event carries: 0 (sizes only) to TLS_MAX_PAYLOAD */
    __u32 reserved;
    __u64 pidns_dev; /* kernel dev_t of the sandbox's pid namespace file; 0 = report host pids */
    __u64 pidns_ino;
};

/* An SSL call between its entry and its return. */
struct tls_call {
    __u64 ssl;       /* the SSL *: names the connection */
    __u64 buffer;    /* user address of the plaintext */
    __u64 count_out; /* _ex variants: the size_t * the byte count is written to; 0 otherwise */
    __u32 direction;
    __u16 family;    /* the peer, once a TCP send or receive in the call has named it; 0 until then */
    __u16 port;      /* network byte order */
    __u8 address[16];
};

/* A 76-byte header followed by `captured` payload bytes; only header + captured bytes are sent.
 * The Python side unpacks the header with struct format "=QQIIIIIB3x16sHH16s". */
struct tls_event {
    __u64 ts_ns;
    __u64 ssl;
    __u32 pid; /* thread group id */
    __u32 tid;
    __u32 uid;
    __u32 size;     /* bytes the call wrote or read */
    __u32 captured; /* bytes of them in payload */
    __u8 direction;
    __u8 pad[3];
    char comm[16];
    __u16 family; /* AF_INET, AF_INET6, or 0: the call made no TCP send or receive */
    __u16 port;   /* network byte order */
    __u8 address[16];
    __u8 payload[TLS_MAX_PAYLOAD];
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct tls_config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u64); /* cgroup id */
    __type(value, __u8);
} targets SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u64); /* cgroup id */
    __type(value, __u8);
} exempt SEC(".maps");

/* LRU: a thread killed inside SSL_write never reaches the return probe, and its entry must not stay. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64); /* pid_tgid */
    __type(value, struct tls_call);
} calls SEC(".maps");

/* The event is built here: 4 KiB is far above the 512-byte BPF stack. */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct tls_event);
} scratch SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, COUNTER_SLOTS);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 2 * 1024 * 1024);
} events SEC(".maps");

static __always_inline void count(__u32 slot) {
    __u64 *value = bpf_map_lookup_elem(&counters, &slot);
    if (value)
        *value += 1; /* per-CPU slot: no atomics needed */
}

/* Targeted when the task's own cgroup or an ancestor is in `targets` and none of them is in `exempt`:
 * a sandbox targets its machine's root and exempts the machine's own services, so the agent's
 * cgroups are captured from the moment they exist, however often they are recreated. */
static __always_inline int task_is_target(void) {
    __u64 id = bpf_get_current_cgroup_id();
    if (bpf_map_lookup_elem(&exempt, &id))
        return 0;
    int targeted = bpf_map_lookup_elem(&targets, &id) != 0;
#pragma unroll
    for (int level = 0; level < TLS_MAX_ANCESTOR_LEVELS; level++) {
        id = bpf_get_current_ancestor_cgroup_id(level);
        if (id == 0) /* deeper than the task's own cgroup */
            break;
        if (bpf_map_lookup_elem(&exempt, &id))
            return 0;
        if (bpf_map_lookup_elem(&targets, &id))
            targeted = 1;
    }
    return targeted;
}

static __always_inline int on_entry(struct pt_regs *ctx, __u32 direction, int has_count_out) {
    if (!task_is_target())
        return 0;
    struct tls_call call = {};
    call.ssl = PT_REGS_PARM1(ctx);
    call.buffer = PT_REGS_PARM2(ctx);
    call.count_out = has_count_out ? PT_REGS_PARM4(ctx) : 0;
    call.direction = direction;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    bpf_map_update_elem(&calls, &pid_tgid, &call, BPF_ANY);
    return 0;
}

/* The bytes the finished call moved: SSL_write/SSL_read return them (<= 0 is failure); the _ex
 * variants return 1 on success and store the count through their last argument. */
static __always_inline __u64 bytes_moved(struct pt_regs *ctx, struct tls_call *call) {
    long result = PT_REGS_RC(ctx);
    if (call->count_out == 0)
        return (int)result > 0 ? (__u64)(int)result : 0;
    if ((int)result != 1)
        return 0;
    __u64 moved = 0;
    if (bpf_probe_read_user(&moved, sizeof(moved), (void *)call->count_out) != 0)
        return 0;
    return moved;
}

static __always_inline void fill_ids(struct tls_event *event, struct tls_config *cfg) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    event->pid = pid_tgid >> 32;
    event->tid = (__u32)pid_tgid;
    if (cfg->pidns_dev != 0 || cfg->pidns_ino != 0) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(cfg->pidns_dev, cfg->pidns_ino, &ns, sizeof(ns)) == 0) {
            event->pid = ns.tgid;
            event->tid = ns.pid;
        }
    }
}

static __always_inline int on_return(struct pt_regs *ctx) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    struct tls_call *found = bpf_map_lookup_elem(&calls, &pid_tgid);
    if (!found)
        return 0; /* not a target, or the entry was evicted */
    struct tls_call call = *found;
    bpf_map_delete_elem(&calls, &pid_tgid);

    __u64 moved = bytes_moved(ctx, &call);
    if (moved == 0)
        return 0;
    __u32 zero = 0;
    struct tls_config *cfg = bpf_map_lookup_elem(&config, &zero);
    struct tls_event *event = bpf_map_lookup_elem(&scratch, &zero);
    if (!cfg || !event)
        return 0;

    event->ts_ns = bpf_ktime_get_ns();
    event->ssl = call.ssl;
    fill_ids(event, cfg);
    event->uid = (__u32)bpf_get_current_uid_gid();
    event->size = moved > 0xffffffff ? 0xffffffff : (__u32)moved;
    event->direction = (__u8)call.direction;
    bpf_get_current_comm(&event->comm, sizeof(event->comm));
    event->family = call.family;
    event->port = call.port;
    __builtin_memcpy(event->address, call.address, sizeof(event->address));

    /* 64-bit lengths, and the bound restated right at the read: with 32-bit ones clang clamps a copy
     * whose bounds the verifier loses, and it refuses the variable-size record. */
    __u64 wanted = cfg->payload_bytes;
    if (wanted > TLS_MAX_PAYLOAD)
        wanted = TLS_MAX_PAYLOAD;
    if (wanted > moved)
        wanted = moved;
    __u64 length = 0;
    if (wanted > 0 && wanted <= TLS_MAX_PAYLOAD) {
        if (bpf_probe_read_user(event->payload, wanted, (void *)call.buffer) == 0)
            length = wanted;
        else
            count(COUNTER_UNREADABLE);
    }
    event->captured = (__u32)length;
    if (bpf_ringbuf_output(&events, event, offsetof(struct tls_event, payload) + length, 0) != 0) {
        count(COUNTER_LOST);
        return 0;
    }
    count(COUNTER_CAPTURED);
    return 0;
}

/* A socket send or receive made inside a pending SSL call: the peer of that call. */
static __always_inline int note_peer(struct sock___km *sk) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    struct tls_call *call = bpf_map_lookup_elem(&calls, &pid_tgid);
    if (!call || call->family != 0)
        return 0;
    __u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
    if (family == KM_AF_INET) {
        __be32 address = BPF_CORE_READ(sk, __sk_common.skc_daddr);
        __builtin_memcpy(call->address, &address, sizeof(address));
    } else if (family == KM_AF_INET6) {
        bpf_core_read(call->address, sizeof(call->address), &sk->__sk_common.skc_v6_daddr);
    } else {
        return 0;
    }
    call->port = BPF_CORE_READ(sk, __sk_common.skc_dport);
    call->family = family;
    return 0;
}

/* sock_send_length and sock_recv_length (kernel 6.3+) fire after every send and receive on a socket,
 * with the struct sock first: raw tracepoints, because this kernel kind has neither kprobes nor fentry. */
SEC("raw_tracepoint/sock_send_length")
int sock_send_peer(struct bpf_raw_tracepoint_args *ctx) {
    return note_peer((struct sock___km *)ctx->args[0]);
}

SEC("raw_tracepoint/sock_recv_length")
int sock_recv_peer(struct bpf_raw_tracepoint_args *ctx) {
    return note_peer((struct sock___km *)ctx->args[0]);
}

SEC("uprobe")
int ssl_write_entry(struct pt_regs *ctx) {
    return on_entry(ctx, DIRECTION_WRITE, 0);
}

SEC("uprobe")
int ssl_read_entry(struct pt_regs *ctx) {
    return on_entry(ctx, DIRECTION_READ, 0);
}

SEC("uprobe")
int ssl_write_ex_entry(struct pt_regs *ctx) {
    return on_entry(ctx, DIRECTION_WRITE, 1);
}

SEC("uprobe")
int ssl_read_ex_entry(struct pt_regs *ctx) {
    return on_entry(ctx, DIRECTION_READ, 1);
}

/* One return program serves all four functions: the entry recorded what kind of call it was. */
SEC("uretprobe")
int ssl_call_return(struct pt_regs *ctx) {
    return on_return(ctx);
}

char LICENSE[] SEC("license") = "GPL"; /* bpf_probe_read_user and the ring buffer need a GPL program */
