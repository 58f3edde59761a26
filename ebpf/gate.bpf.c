/* km egress gate: cgroup sock_addr programs that let a sandbox reach only allowlisted addresses.
 *
 * Attached (legacy, exclusive) to one cgroup v2 directory; they gate every task below it except tasks
 * with an exempt cgroup among their ancestors. DNS (port 53, any address) goes to the sandbox's
 * resolver instead, and UDP replies get their original source back so clients accept them.
 *
 * Compiled by BCC against Debian 6.1 headers for a newer running kernel: only uapi structures
 * (bpf_sock_addr) are read here, never kernel-internal ones, whose layouts would silently differ.
 */
#include <uapi/linux/bpf.h>

#define GATE_AF_INET 2
#define GATE_AF_INET6 10
#define GATE_IPPROTO_TCP 6
#define GATE_IPPROTO_UDP 17
#define GATE_DNS_PORT 53
#define GATE_MAX_ANCESTOR_LEVELS 16

#define GATE_MODE_ENFORCE 0
#define GATE_MODE_LOG 1

#define VERDICT_ALLOW 0
#define VERDICT_DENY 1
#define VERDICT_WOULD_DENY 2
#define VERDICT_REDIRECT 3

#define COUNTER_ALLOWED 0
#define COUNTER_DENIED 1
#define COUNTER_WOULD_DENY 2
#define COUNTER_REDIRECTED 3
#define COUNTER_EVENTS_DROPPED 4
#define COUNTER_SLOTS 5

/* Everything here is in network byte order exactly as bpf_sock_addr holds it (ports in the low 16 bits). */
struct gate_config {
    u32 mode;
    u32 audit_allows;
    u32 resolver_ip4;
    u32 resolver_port4;
    u32 resolver_ip6[4];
    u32 resolver_port6;
    u32 reserved;
    u64 pidns_dev; /* kernel dev_t of the sandbox's pid namespace file; 0 = report host pids */
    u64 pidns_ino;
};

struct lpm_key4 {
    u32 prefixlen;
    u8 addr[4];
};

struct lpm_key6 {
    u32 prefixlen;
    u8 addr[16];
};

/* Where a redirected DNS query was really going, so the reply can claim to come from there. */
struct dns_origin {
    u32 addr[4]; /* IPv4 in addr[0] for family AF_INET */
    u32 port;
    u32 family;
};

/* 56 bytes, no implicit padding, addr 4-byte aligned (the verifier refuses misaligned stack stores):
 * the Python side unpacks it with struct format "=QIIHBBB3x16s16s". */
struct gate_event {
    u64 ts_ns;
    u32 pid;
    u32 uid;
    u16 port; /* host order */
    u8 family;
    u8 proto;
    u8 verdict;
    u8 pad[3];
    u8 addr[16];
    char comm[16];
};

BPF_ARRAY(config, struct gate_config, 1);
BPF_HASH(exempt, u64, u8, 1024);
BPF_LPM_TRIE(allow4, struct lpm_key4, u8, 65536);
BPF_LPM_TRIE(allow6, struct lpm_key6, u8, 65536);
BPF_TABLE("lru_hash", u64, struct dns_origin, dns_origins, 16384);
BPF_PERCPU_ARRAY(counters, u64, COUNTER_SLOTS);
BPF_RINGBUF_OUTPUT(events, 64); /* 64 pages = 256 KiB */

static __always_inline struct gate_config *gate_config(void) {
    int zero = 0;
    return config.lookup(&zero);
}

static __always_inline void count(int slot) {
    u64 *value = counters.lookup(&slot);
    if (value)
        *value += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline u16 port_to_host(u32 port) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (u16)(((port & 0xff) << 8) | ((port >> 8) & 0xff));
#else
    return (u16)port;
#endif
}

/* Exempt when the task's own cgroup or any ancestor is in the exempt map (system.slice, init.scope). */
static __always_inline int task_is_exempt(void) {
    u64 id = bpf_get_current_cgroup_id();
    if (exempt.lookup(&id))
        return 1;
#pragma unroll
    for (int level = 0; level < GATE_MAX_ANCESTOR_LEVELS; level++) {
        id = bpf_get_current_ancestor_cgroup_id(level);
        if (id == 0) /* deeper than the task's own cgroup */
            break;
        if (exempt.lookup(&id))
            return 1;
    }
    return 0;
}

static __always_inline u32 task_pid(struct gate_config *cfg) {
    if (cfg->pidns_dev != 0 || cfg->pidns_ino != 0) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(cfg->pidns_dev, cfg->pidns_ino, &ns, sizeof(ns)) == 0)
            return ns.tgid;
    }
    return bpf_get_current_pid_tgid() >> 32;
}

/* addr points at 4 (AF_INET) or 16 (AF_INET6) bytes in network order. */
static __always_inline void emit(struct bpf_sock_addr *ctx, struct gate_config *cfg, u8 verdict, u32 family,
                                 u32 *addr, u32 port) {
    struct gate_event event = {};
    event.ts_ns = bpf_ktime_get_ns();
    event.pid = task_pid(cfg);
    event.uid = (u32)bpf_get_current_uid_gid();
    event.family = (u8)family;
    event.proto = (u8)ctx->protocol;
    event.verdict = verdict;
    event.port = port_to_host(port);
    u32 *words = (u32 *)event.addr;
    words[0] = addr[0];
    if (family == GATE_AF_INET6) {
        words[1] = addr[1];
        words[2] = addr[2];
        words[3] = addr[3];
    }
    bpf_get_current_comm(&event.comm, sizeof(event.comm));
    if (events.ringbuf_output(&event, sizeof(event), 0) != 0)
        count(COUNTER_EVENTS_DROPPED);
}

static __always_inline int ip4_allowed(u32 ip4) {
    struct lpm_key4 key = {};
    key.prefixlen = 32;
    *(u32 *)key.addr = ip4;
    return allow4.lookup(&key) != 0;
}

static __always_inline int ip4_is_local(u32 ip4) {
    u8 *bytes = (u8 *)&ip4;
    return bytes[0] == 127 || ip4 == 0; /* 127/8 and 0.0.0.0 (which connects to this host) */
}

/* Neither allowlisted nor local: deny, or in log mode allow and report that enforcement would deny. */
static __always_inline int refuse(struct bpf_sock_addr *ctx, struct gate_config *cfg, u32 family, u32 *addr, u32 port) {
    if (cfg->mode == GATE_MODE_LOG) {
        count(COUNTER_WOULD_DENY);
        emit(ctx, cfg, VERDICT_WOULD_DENY, family, addr, port);
        return 1;
    }
    count(COUNTER_DENIED);
    emit(ctx, cfg, VERDICT_DENY, family, addr, port);
    return 0; /* connect()/sendmsg() fail with EPERM */
}

static __always_inline int permit(struct bpf_sock_addr *ctx, struct gate_config *cfg, u32 family, u32 *addr, u32 port) {
    count(COUNTER_ALLOWED);
    if (cfg->audit_allows)
        emit(ctx, cfg, VERDICT_ALLOW, family, addr, port);
    return 1;
}

/* ---- IPv4 ------------------------------------------------------------------------------------- */

static __always_inline int gate4(struct bpf_sock_addr *ctx, int remember_dns) {
    struct gate_config *cfg = gate_config();
    if (!cfg)
        return 0; /* cannot happen for an array map; fail closed anyway */
    if (task_is_exempt())
        return 1;

    u32 addr[4] = {};
    addr[0] = ctx->user_ip4;
    u32 port = ctx->user_port;

    if (port_to_host(port) == GATE_DNS_PORT && cfg->resolver_port4 != 0) {
        if (remember_dns) {
            struct dns_origin origin = {};
            origin.addr[0] = addr[0];
            origin.port = port;
            origin.family = GATE_AF_INET;
            u64 cookie = bpf_get_socket_cookie(ctx);
            dns_origins.update(&cookie, &origin);
        }
        ctx->user_ip4 = cfg->resolver_ip4;
        ctx->user_port = cfg->resolver_port4;
        count(COUNTER_REDIRECTED);
        if (cfg->audit_allows)
            emit(ctx, cfg, VERDICT_REDIRECT, GATE_AF_INET, addr, port);
        return 1;
    }
    if (ip4_is_local(addr[0]))
        return 1;
    if (ip4_allowed(addr[0]))
        return permit(ctx, cfg, GATE_AF_INET, addr, port);
    return refuse(ctx, cfg, GATE_AF_INET, addr, port);
}

int gate_connect4(struct bpf_sock_addr *ctx) {
    /* Connected UDP (glibc's resolver) reads replies with recvfrom and checks their source. */
    return gate4(ctx, ctx->protocol == GATE_IPPROTO_UDP);
}

int gate_sendmsg4(struct bpf_sock_addr *ctx) {
    return gate4(ctx, 1);
}

int gate_recvmsg4(struct bpf_sock_addr *ctx) {
    struct gate_config *cfg = gate_config();
    if (!cfg || ctx->user_ip4 != cfg->resolver_ip4 || ctx->user_port != cfg->resolver_port4)
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct dns_origin *origin = dns_origins.lookup(&cookie);
    if (origin && origin->family == GATE_AF_INET) {
        ctx->user_ip4 = origin->addr[0];
        ctx->user_port = origin->port;
    }
    return 1; /* recvmsg hooks must return 1 */
}

/* ---- IPv6 ------------------------------------------------------------------------------------- */

/* The 32-bit words of an IPv6 address as loaded from network-order memory. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define WORD_V4_MAPPED 0xffff0000 /* bytes 00 00 ff ff */
#define WORD_ONE 0x01000000       /* bytes 00 00 00 01 */
#else
#define WORD_V4_MAPPED 0x0000ffff
#define WORD_ONE 0x00000001
#endif

static __always_inline int ip6_is_v4_mapped(u32 *addr) {
    return addr[0] == 0 && addr[1] == 0 && addr[2] == WORD_V4_MAPPED; /* ::ffff:0:0/96 */
}

static __always_inline int ip6_is_local(u32 *addr) {
    /* :: (connects to this host) and ::1 */
    return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && (addr[3] == 0 || addr[3] == WORD_ONE);
}

static __always_inline int ip6_allowed(u32 *addr) {
    struct lpm_key6 key = {};
    key.prefixlen = 128;
    u32 *words = (u32 *)key.addr;
    words[0] = addr[0];
    words[1] = addr[1];
    words[2] = addr[2];
    words[3] = addr[3];
    return allow6.lookup(&key) != 0;
}

static __always_inline int gate6(struct bpf_sock_addr *ctx, int remember_dns) {
    struct gate_config *cfg = gate_config();
    if (!cfg)
        return 0;
    if (task_is_exempt())
        return 1;

    u32 addr[4];
    addr[0] = ctx->user_ip6[0];
    addr[1] = ctx->user_ip6[1];
    addr[2] = ctx->user_ip6[2];
    addr[3] = ctx->user_ip6[3];
    u32 port = ctx->user_port;

    if (port_to_host(port) == GATE_DNS_PORT && cfg->resolver_port6 != 0) {
        if (remember_dns) {
            struct dns_origin origin = {};
            origin.addr[0] = addr[0];
            origin.addr[1] = addr[1];
            origin.addr[2] = addr[2];
            origin.addr[3] = addr[3];
            origin.port = port;
            origin.family = GATE_AF_INET6;
            u64 cookie = bpf_get_socket_cookie(ctx);
            dns_origins.update(&cookie, &origin);
        }
        ctx->user_ip6[0] = cfg->resolver_ip6[0];
        ctx->user_ip6[1] = cfg->resolver_ip6[1];
        ctx->user_ip6[2] = cfg->resolver_ip6[2];
        ctx->user_ip6[3] = cfg->resolver_ip6[3];
        ctx->user_port = cfg->resolver_port6;
        count(COUNTER_REDIRECTED);
        if (cfg->audit_allows)
            emit(ctx, cfg, VERDICT_REDIRECT, GATE_AF_INET6, addr, port);
        return 1;
    }
    if (ip6_is_local(addr))
        return 1;
    if (ip6_is_v4_mapped(addr)) {
        /* An AF_INET6 socket reaching IPv4: the v4 rules apply, never allow6 */
        if (ip4_is_local(addr[3]))
            return 1;
        if (ip4_allowed(addr[3]))
            return permit(ctx, cfg, GATE_AF_INET6, addr, port);
        return refuse(ctx, cfg, GATE_AF_INET6, addr, port);
    }
    if (ip6_allowed(addr))
        return permit(ctx, cfg, GATE_AF_INET6, addr, port);
    return refuse(ctx, cfg, GATE_AF_INET6, addr, port);
}

int gate_connect6(struct bpf_sock_addr *ctx) {
    return gate6(ctx, ctx->protocol == GATE_IPPROTO_UDP);
}

int gate_sendmsg6(struct bpf_sock_addr *ctx) {
    return gate6(ctx, 1);
}

/* On an AF_INET6 socket an unconnected query to ::ffff:a.b.c.d passes the IPv4 send hook (redirected to the
 * IPv4 resolver), but its reply comes through this hook as ::ffff:<resolver v4>: restore both kinds. */
int gate_recvmsg6(struct bpf_sock_addr *ctx) {
    struct gate_config *cfg = gate_config();
    if (!cfg)
        return 1;
    u32 source[4];
    source[0] = ctx->user_ip6[0];
    source[1] = ctx->user_ip6[1];
    source[2] = ctx->user_ip6[2];
    source[3] = ctx->user_ip6[3];
    u32 port = ctx->user_port;
    u32 family;
    if (port == cfg->resolver_port6 && source[0] == cfg->resolver_ip6[0] && source[1] == cfg->resolver_ip6[1] &&
        source[2] == cfg->resolver_ip6[2] && source[3] == cfg->resolver_ip6[3])
        family = GATE_AF_INET6;
    else if (port == cfg->resolver_port4 && ip6_is_v4_mapped(source) && source[3] == cfg->resolver_ip4)
        family = GATE_AF_INET;
    else
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct dns_origin *origin = dns_origins.lookup(&cookie);
    if (!origin || origin->family != family)
        return 1;
    if (family == GATE_AF_INET6) {
        ctx->user_ip6[0] = origin->addr[0];
        ctx->user_ip6[1] = origin->addr[1];
        ctx->user_ip6[2] = origin->addr[2];
        ctx->user_ip6[3] = origin->addr[3];
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = WORD_V4_MAPPED;
        ctx->user_ip6[3] = origin->addr[0];
    }
    ctx->user_port = origin->port;
    return 1;
}
