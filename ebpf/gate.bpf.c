/* km egress gate: cgroup programs that let a sandbox reach only allowlisted destinations.
 *
 * Attached (legacy, exclusive) to one cgroup v2 directory, they gate every task below it except tasks
 * with an exempt cgroup among their ancestors. DNS (port 53, any address) goes to the sandbox's
 * resolver instead, and UDP replies get their original source back so clients accept them. In the
 * proxy enforcement modes, TCP connects go to the sandbox's L7 forwarder, which is told where each
 * connection was going (sock_ops) and checks the name the client sends (Host/SNI). Only TCP and UDP
 * sockets may be created (sock_create), and the daemon's in-sandbox ports may not be bound (bind), so
 * nothing leaves by a protocol the address hooks never see and nothing stands in for the daemon's servers.
 *
 * Compiled ahead of time with clang into a BPF object that libbpf loads (ebpf/objects.py). Only uapi
 * structures (bpf_sock_addr, bpf_sock_ops) are read, never kernel-internal ones, so the object needs
 * no relocation and loads on any kernel with these hooks (5.8+ for getpeername).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define GATE_AF_INET 2
#define GATE_AF_INET6 10
#define GATE_IPPROTO_TCP 6
#define GATE_IPPROTO_UDP 17
#define GATE_DNS_PORT 53
#define GATE_SOCK_STREAM 1
#define GATE_SOCK_DGRAM 2
#define GATE_DAEMON_PORTS 4
#define GATE_MAX_ANCESTOR_LEVELS 16

#define GATE_MODE_ENFORCE 0
#define GATE_MODE_LOG 1

/* network.enforcement */
#define GATE_ENFORCEMENT_EBPF 0  /* allow map only */
#define GATE_ENFORCEMENT_PROXY 1 /* TCP to the forwarder (it checks the name), other traffic by allow map */
#define GATE_ENFORCEMENT_BOTH 2  /* TCP must pass the allow map and then the forwarder */

/* Values in the allow maps: where an entry came from. */
#define ALLOW_LEARNED 1 /* an allowed name resolved to it */
#define ALLOW_STATIC 2  /* allowedCIDRs: reachable directly, never through the forwarder */

#define VERDICT_ALLOW 0
#define VERDICT_DENY 1
#define VERDICT_WOULD_DENY 2
#define VERDICT_REDIRECT 3
#define VERDICT_PROXY 4

/* Which hook decided: an address (connect or an unconnected send), a socket's creation, or a bind. */
#define HOOK_CONNECT 0
#define HOOK_SOCKET 1
#define HOOK_BIND 2

#define COUNTER_ALLOWED 0
#define COUNTER_DENIED 1
#define COUNTER_WOULD_DENY 2
#define COUNTER_REDIRECTED 3
#define COUNTER_EVENTS_DROPPED 4
#define COUNTER_PROXIED 5
#define COUNTER_SOCKETS_DENIED 6
#define COUNTER_BINDS_DENIED 7
#define COUNTER_SLOTS 8

/* Everything here is in network byte order exactly as bpf_sock_addr holds it (ports in the low 16 bits). */
struct gate_config {
    __u32 mode;
    __u32 audit_allows;
    __u32 resolver_ip4;
    __u32 resolver_port4;
    __u32 resolver_ip6[4];
    __u32 resolver_port6;
    __u32 enforcement;
    __u64 pidns_dev; /* kernel dev_t of the sandbox's pid namespace file; 0 = report host pids */
    __u64 pidns_ino;
    __u32 proxy_ip4;
    __u32 proxy_port4;
    __u32 proxy_ip6[4];
    __u32 proxy_port6;
    __u32 daemon_ports[GATE_DAEMON_PORTS]; /* only exempt tasks may bind these (0 = unused slot) */
    __u32 reserved;
};

struct lpm_key4 {
    __u32 prefixlen;
    __u8 addr[4];
};

struct lpm_key6 {
    __u32 prefixlen;
    __u8 addr[16];
};

/* Where a redirected socket was really going: a DNS query (so the reply can claim to come from there)
 * or a proxied TCP connection (so the forwarder knows the port, and getpeername() tells the truth). */
struct origin {
    __u32 addr[4]; /* IPv4 in addr[0] for family AF_INET */
    __u32 port;    /* network order */
    __u32 family;
};

/* The forwarder finds a proxied connection by the client's port and family as it sees them. */
struct proxy_client {
    __u32 family;
    __u32 port; /* host order */
};

/* 56 bytes, no implicit padding, addr 4-byte aligned (the verifier refuses misaligned stack stores):
 * the Python side unpacks it with struct format "=QIIHBBHBB16s16s". The protocol takes 16 bits
 * because MPTCP's is 262. */
struct gate_event {
    __u64 ts_ns;
    __u32 pid;
    __u32 uid;
    __u16 port; /* host order */
    __u8 family;
    __u8 verdict;
    __u16 proto;
    __u8 hook;
    __u8 sock_type; /* HOOK_SOCKET only: SOCK_STREAM, SOCK_DGRAM, SOCK_RAW… */
    __u8 addr[16];
    char comm[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct gate_config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u64);
    __type(value, __u8);
} exempt SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 65536);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct lpm_key4);
    __type(value, __u8);
} allow4 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 65536);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct lpm_key6);
    __type(value, __u8);
} allow6 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64); /* socket cookie */
    __type(value, struct origin);
} dns_origins SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64); /* socket cookie */
    __type(value, struct origin);
} proxy_origins SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, struct proxy_client);
    __type(value, struct origin);
} proxy_clients SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, COUNTER_SLOTS);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline struct gate_config *gate_config(void) {
    __u32 zero = 0;
    return bpf_map_lookup_elem(&config, &zero);
}

static __always_inline void count(__u32 slot) {
    __u64 *value = bpf_map_lookup_elem(&counters, &slot);
    if (value)
        *value += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline __u16 port_to_host(__u32 port) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (__u16)(((port & 0xff) << 8) | ((port >> 8) & 0xff));
#else
    return (__u16)port;
#endif
}

/* Exempt when the task's own cgroup or any ancestor is in the exempt map (system.slice, init.scope). */
static __always_inline int task_is_exempt(void) {
    __u64 id = bpf_get_current_cgroup_id();
    if (bpf_map_lookup_elem(&exempt, &id))
        return 1;
#pragma unroll
    for (int level = 0; level < GATE_MAX_ANCESTOR_LEVELS; level++) {
        id = bpf_get_current_ancestor_cgroup_id(level);
        if (id == 0) /* deeper than the task's own cgroup */
            break;
        if (bpf_map_lookup_elem(&exempt, &id))
            return 1;
    }
    return 0;
}

static __always_inline __u32 task_pid(struct gate_config *cfg) {
    if (cfg->pidns_dev != 0 || cfg->pidns_ino != 0) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(cfg->pidns_dev, cfg->pidns_ino, &ns, sizeof(ns)) == 0)
            return ns.tgid;
    }
    return bpf_get_current_pid_tgid() >> 32;
}

/* The fields every event has: when, who, which hook and verdict. */
static __always_inline void event_init(struct gate_event *event, struct gate_config *cfg, __u8 hook, __u8 verdict,
                                       __u32 family, __u32 proto) {
    event->ts_ns = bpf_ktime_get_ns();
    event->pid = task_pid(cfg);
    event->uid = (__u32)bpf_get_current_uid_gid();
    event->family = (__u8)family;
    event->proto = (__u16)proto;
    event->hook = hook;
    event->verdict = verdict;
    bpf_get_current_comm(&event->comm, sizeof(event->comm));
}

static __always_inline void send_event(struct gate_event *event) {
    if (bpf_ringbuf_output(&events, event, sizeof(*event), 0) != 0)
        count(COUNTER_EVENTS_DROPPED);
}

/* An address hook's decision; addr points at 4 (AF_INET) or 16 (AF_INET6) bytes in network order. */
static __always_inline void emit_hook(struct bpf_sock_addr *ctx, struct gate_config *cfg, __u8 hook, __u8 verdict,
                                      __u32 family, __u32 *addr, __u32 port) {
    struct gate_event event = {};
    event_init(&event, cfg, hook, verdict, family, ctx->protocol);
    event.port = port_to_host(port);
    __u32 *words = (__u32 *)event.addr;
    words[0] = addr[0];
    if (family == GATE_AF_INET6) {
        words[1] = addr[1];
        words[2] = addr[2];
        words[3] = addr[3];
    }
    send_event(&event);
}

static __always_inline void emit(struct bpf_sock_addr *ctx, struct gate_config *cfg, __u8 verdict, __u32 family,
                                 __u32 *addr, __u32 port) {
    emit_hook(ctx, cfg, HOOK_CONNECT, verdict, family, addr, port);
}

/* The allow map entry for an IPv4 address: 0 (none), ALLOW_LEARNED or ALLOW_STATIC. */
static __always_inline __u8 ip4_entry(__u32 ip4) {
    struct lpm_key4 key = {};
    key.prefixlen = 32;
    *(__u32 *)key.addr = ip4;
    __u8 *value = bpf_map_lookup_elem(&allow4, &key);
    return value ? *value : 0;
}

static __always_inline int ip4_is_local(__u32 ip4) {
    __u8 *bytes = (__u8 *)&ip4;
    return bytes[0] == 127 || ip4 == 0; /* 127/8 and 0.0.0.0 (which connects to this host) */
}

/* Instance metadata (169.254.169.254, fd00:ec2::254) holds the machine's credentials: only the machine's
 * root services, which are exempt, may ask it. Refused whatever the allow maps say, even in log mode. */
static __always_inline int ip4_is_metadata(__u32 ip4) {
    __u8 *bytes = (__u8 *)&ip4;
    return bytes[0] == 169 && bytes[1] == 254 && bytes[2] == 169 && bytes[3] == 254;
}

static __always_inline int ip6_is_metadata(__u32 *addr) {
    __u8 *bytes = (__u8 *)addr;
    return bytes[0] == 0xfd && bytes[1] == 0x00 && bytes[2] == 0x0e && bytes[3] == 0xc2 && addr[1] == 0 && addr[2] == 0 &&
           bytes[12] == 0 && bytes[13] == 0 && bytes[14] == 0x02 && bytes[15] == 0x54;
}

static __always_inline int forbid(struct bpf_sock_addr *ctx, struct gate_config *cfg, __u32 family, __u32 *addr,
                                  __u32 port) {
    count(COUNTER_DENIED);
    emit(ctx, cfg, VERDICT_DENY, family, addr, port);
    return 0;
}

/* Neither allowlisted nor local: deny, or in log mode allow and report that enforcement would deny. */
static __always_inline int refuse(struct bpf_sock_addr *ctx, struct gate_config *cfg, __u32 family, __u32 *addr,
                                  __u32 port) {
    if (cfg->mode == GATE_MODE_LOG) {
        count(COUNTER_WOULD_DENY);
        emit(ctx, cfg, VERDICT_WOULD_DENY, family, addr, port);
        return 1;
    }
    count(COUNTER_DENIED);
    emit(ctx, cfg, VERDICT_DENY, family, addr, port);
    return 0; /* connect()/sendmsg() fail with EPERM */
}

static __always_inline int permit(struct bpf_sock_addr *ctx, struct gate_config *cfg, __u32 family, __u32 *addr,
                                  __u32 port) {
    count(COUNTER_ALLOWED);
    if (cfg->audit_allows)
        emit(ctx, cfg, VERDICT_ALLOW, family, addr, port);
    return 1;
}

static __always_inline void remember(void *map, struct bpf_sock_addr *ctx, __u32 family, __u32 *addr, __u32 port) {
    struct origin origin = {};
    origin.addr[0] = addr[0];
    if (family == GATE_AF_INET6) {
        origin.addr[1] = addr[1];
        origin.addr[2] = addr[2];
        origin.addr[3] = addr[3];
    }
    origin.port = port;
    origin.family = family;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    bpf_map_update_elem(map, &cookie, &origin, BPF_ANY);
}

/* What the enforcement mode makes of a non-local destination whose allow entry is `entry`:
 * 1 pass directly, 0 refuse, 2 send to the forwarder (TCP connects only).
 * In the proxy modes UDP (DNS aside, redirected before this) reaches allowedCIDRs only: an address learned
 * from an allowed name may serve other names too (a CDN), and the forwarder cannot check QUIC's. */
static __always_inline int route(struct gate_config *cfg, __u8 entry, int tcp_connect) {
    if (cfg->enforcement == GATE_ENFORCEMENT_EBPF)
        return entry != 0;
    if (!tcp_connect)
        return entry == ALLOW_STATIC;
    if (cfg->mode == GATE_MODE_LOG || entry == ALLOW_STATIC)
        return entry != 0;
    if (cfg->enforcement == GATE_ENFORCEMENT_BOTH && entry == 0)
        return 0;
    return 2;
}

/* ---- IPv4 ------------------------------------------------------------------------------------- */

static __always_inline int gate4(struct bpf_sock_addr *ctx, int remember_dns, int tcp_connect) {
    struct gate_config *cfg = gate_config();
    if (!cfg)
        return 0; /* cannot happen for an array map; fail closed anyway */
    if (task_is_exempt())
        return 1;

    __u32 addr[4] = {};
    addr[0] = ctx->user_ip4;
    __u32 port = ctx->user_port;

    if (port_to_host(port) == GATE_DNS_PORT && cfg->resolver_port4 != 0) {
        if (remember_dns)
            remember(&dns_origins, ctx, GATE_AF_INET, addr, port);
        ctx->user_ip4 = cfg->resolver_ip4;
        ctx->user_port = cfg->resolver_port4;
        count(COUNTER_REDIRECTED);
        if (cfg->audit_allows)
            emit(ctx, cfg, VERDICT_REDIRECT, GATE_AF_INET, addr, port);
        return 1;
    }
    if (ip4_is_local(addr[0]))
        return 1;
    if (ip4_is_metadata(addr[0]))
        return forbid(ctx, cfg, GATE_AF_INET, addr, port);
    int decision = route(cfg, ip4_entry(addr[0]), tcp_connect);
    if (decision == 2 && cfg->proxy_port4 != 0) {
        remember(&proxy_origins, ctx, GATE_AF_INET, addr, port);
        ctx->user_ip4 = cfg->proxy_ip4;
        ctx->user_port = cfg->proxy_port4;
        count(COUNTER_PROXIED);
        if (cfg->audit_allows)
            emit(ctx, cfg, VERDICT_PROXY, GATE_AF_INET, addr, port);
        return 1;
    }
    if (decision == 1)
        return permit(ctx, cfg, GATE_AF_INET, addr, port);
    return refuse(ctx, cfg, GATE_AF_INET, addr, port);
}

SEC("cgroup/connect4")
int gate_connect4(struct bpf_sock_addr *ctx) {
    /* Connected UDP (glibc's resolver) reads replies with recvfrom and checks their source. */
    int udp = ctx->protocol == GATE_IPPROTO_UDP;
    return gate4(ctx, udp, ctx->protocol == GATE_IPPROTO_TCP);
}

SEC("cgroup/sendmsg4")
int gate_sendmsg4(struct bpf_sock_addr *ctx) {
    return gate4(ctx, 1, 0);
}

SEC("cgroup/recvmsg4")
int gate_recvmsg4(struct bpf_sock_addr *ctx) {
    struct gate_config *cfg = gate_config();
    if (!cfg || ctx->user_ip4 != cfg->resolver_ip4 || ctx->user_port != cfg->resolver_port4)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *origin = bpf_map_lookup_elem(&dns_origins, &cookie);
    if (origin && origin->family == GATE_AF_INET) {
        ctx->user_ip4 = origin->addr[0];
        ctx->user_port = origin->port;
    }
    return 1; /* recvmsg hooks must return 1 */
}

/* A proxied socket's peer is where the client meant to connect, not the forwarder. */
SEC("cgroup/getpeername4")
int gate_getpeername4(struct bpf_sock_addr *ctx) {
    struct gate_config *cfg = gate_config();
    if (!cfg || cfg->proxy_port4 == 0 || ctx->user_ip4 != cfg->proxy_ip4 || ctx->user_port != cfg->proxy_port4)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *origin = bpf_map_lookup_elem(&proxy_origins, &cookie);
    if (origin && origin->family == GATE_AF_INET) {
        ctx->user_ip4 = origin->addr[0];
        ctx->user_port = origin->port;
    }
    return 1;
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

static __always_inline int ip6_is_v4_mapped(__u32 *addr) {
    return addr[0] == 0 && addr[1] == 0 && addr[2] == WORD_V4_MAPPED; /* ::ffff:0:0/96 */
}

static __always_inline int ip6_is_local(__u32 *addr) {
    /* :: (connects to this host) and ::1 */
    return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && (addr[3] == 0 || addr[3] == WORD_ONE);
}

static __always_inline __u8 ip6_entry(__u32 *addr) {
    struct lpm_key6 key = {};
    key.prefixlen = 128;
    __u32 *words = (__u32 *)key.addr;
    words[0] = addr[0];
    words[1] = addr[1];
    words[2] = addr[2];
    words[3] = addr[3];
    __u8 *value = bpf_map_lookup_elem(&allow6, &key);
    return value ? *value : 0;
}

static __always_inline int gate6(struct bpf_sock_addr *ctx, int remember_dns, int tcp_connect) {
    struct gate_config *cfg = gate_config();
    if (!cfg)
        return 0;
    if (task_is_exempt())
        return 1;

    __u32 addr[4];
    addr[0] = ctx->user_ip6[0];
    addr[1] = ctx->user_ip6[1];
    addr[2] = ctx->user_ip6[2];
    addr[3] = ctx->user_ip6[3];
    __u32 port = ctx->user_port;

    if (port_to_host(port) == GATE_DNS_PORT && cfg->resolver_port6 != 0) {
        if (remember_dns)
            remember(&dns_origins, ctx, GATE_AF_INET6, addr, port);
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
    __u8 entry;
    if (ip6_is_v4_mapped(addr)) {
        /* An AF_INET6 socket reaching IPv4: the v4 rules apply, never allow6 */
        if (ip4_is_local(addr[3]))
            return 1;
        if (ip4_is_metadata(addr[3]))
            return forbid(ctx, cfg, GATE_AF_INET6, addr, port);
        entry = ip4_entry(addr[3]);
    } else {
        if (ip6_is_metadata(addr))
            return forbid(ctx, cfg, GATE_AF_INET6, addr, port);
        entry = ip6_entry(addr);
    }
    int decision = route(cfg, entry, tcp_connect);
    if (decision == 2 && cfg->proxy_port6 != 0) {
        /* The forwarder's IPv6 listener, also for v4-mapped destinations: the socket stays AF_INET6. */
        remember(&proxy_origins, ctx, GATE_AF_INET6, addr, port);
        ctx->user_ip6[0] = cfg->proxy_ip6[0];
        ctx->user_ip6[1] = cfg->proxy_ip6[1];
        ctx->user_ip6[2] = cfg->proxy_ip6[2];
        ctx->user_ip6[3] = cfg->proxy_ip6[3];
        ctx->user_port = cfg->proxy_port6;
        count(COUNTER_PROXIED);
        if (cfg->audit_allows)
            emit(ctx, cfg, VERDICT_PROXY, GATE_AF_INET6, addr, port);
        return 1;
    }
    if (decision == 1)
        return permit(ctx, cfg, GATE_AF_INET6, addr, port);
    return refuse(ctx, cfg, GATE_AF_INET6, addr, port);
}

SEC("cgroup/connect6")
int gate_connect6(struct bpf_sock_addr *ctx) {
    int udp = ctx->protocol == GATE_IPPROTO_UDP;
    return gate6(ctx, udp, ctx->protocol == GATE_IPPROTO_TCP);
}

SEC("cgroup/sendmsg6")
int gate_sendmsg6(struct bpf_sock_addr *ctx) {
    return gate6(ctx, 1, 0);
}

/* On an AF_INET6 socket an unconnected query to ::ffff:a.b.c.d passes the IPv4 send hook (redirected to the
 * IPv4 resolver), but its reply comes through this hook as ::ffff:<resolver v4>: restore both kinds. */
SEC("cgroup/recvmsg6")
int gate_recvmsg6(struct bpf_sock_addr *ctx) {
    struct gate_config *cfg = gate_config();
    if (!cfg)
        return 1;
    __u32 source[4];
    source[0] = ctx->user_ip6[0];
    source[1] = ctx->user_ip6[1];
    source[2] = ctx->user_ip6[2];
    source[3] = ctx->user_ip6[3];
    __u32 port = ctx->user_port;
    __u32 family;
    if (port == cfg->resolver_port6 && source[0] == cfg->resolver_ip6[0] && source[1] == cfg->resolver_ip6[1] &&
        source[2] == cfg->resolver_ip6[2] && source[3] == cfg->resolver_ip6[3])
        family = GATE_AF_INET6;
    else if (port == cfg->resolver_port4 && ip6_is_v4_mapped(source) && source[3] == cfg->resolver_ip4)
        family = GATE_AF_INET;
    else
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *origin = bpf_map_lookup_elem(&dns_origins, &cookie);
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

SEC("cgroup/getpeername6")
int gate_getpeername6(struct bpf_sock_addr *ctx) {
    struct gate_config *cfg = gate_config();
    if (!cfg || cfg->proxy_port6 == 0 || ctx->user_port != cfg->proxy_port6 || ctx->user_ip6[0] != cfg->proxy_ip6[0] ||
        ctx->user_ip6[1] != cfg->proxy_ip6[1] || ctx->user_ip6[2] != cfg->proxy_ip6[2] ||
        ctx->user_ip6[3] != cfg->proxy_ip6[3])
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *origin = bpf_map_lookup_elem(&proxy_origins, &cookie);
    if (origin && origin->family == GATE_AF_INET6) {
        ctx->user_ip6[0] = origin->addr[0];
        ctx->user_ip6[1] = origin->addr[1];
        ctx->user_ip6[2] = origin->addr[2];
        ctx->user_ip6[3] = origin->addr[3];
        ctx->user_port = origin->port;
    }
    return 1;
}

/* ---- sockets and binds ------------------------------------------------------------------------- */

/* Only TCP and UDP over IPv4/IPv6 leave: raw, ICMP datagram, SCTP, MPTCP, UDP-Lite and SEQPACKET sockets
 * would reach the network past the address hooks (which see TCP and UDP only), so they get EPERM in every
 * mode. The kernel calls this hook only for AF_INET and AF_INET6 (AF_UNIX, AF_NETLINK, AF_PACKET and
 * AF_VSOCK never reach it, measured on 6.18); other families are closed by the agent's units' seccomp
 * filter. The protocol is already resolved here (socket(AF_INET, SOCK_STREAM, 0) shows as TCP). */
SEC("cgroup/sock_create")
int gate_sock_create(struct bpf_sock *sk) {
    if (sk->family != GATE_AF_INET && sk->family != GATE_AF_INET6)
        return 1;
    if ((sk->type == GATE_SOCK_STREAM && sk->protocol == GATE_IPPROTO_TCP) ||
        (sk->type == GATE_SOCK_DGRAM && sk->protocol == GATE_IPPROTO_UDP))
        return 1;
    if (task_is_exempt())
        return 1;
    struct gate_config *cfg = gate_config();
    count(COUNTER_SOCKETS_DENIED);
    if (cfg) {
        struct gate_event event = {};
        event_init(&event, cfg, HOOK_SOCKET, VERDICT_DENY, sk->family, sk->protocol);
        event.sock_type = (__u8)sk->type;
        send_event(&event);
    }
    return 0;
}

static __always_inline int is_daemon_port(struct gate_config *cfg, __u32 port) {
#pragma unroll
    for (int slot = 0; slot < GATE_DAEMON_PORTS; slot++) {
        if (cfg->daemon_ports[slot] != 0 && cfg->daemon_ports[slot] == port)
            return 1;
    }
    return 0;
}

/* The daemon's resolver, forwarder and telemetry ports belong to the daemon on every address: while it is
 * down, an agent's server there would answer the DNS (or take the connections) of every other process. */
static __always_inline int gate_bind(struct bpf_sock_addr *ctx, __u32 family, __u32 *addr) {
    struct gate_config *cfg = gate_config();
    if (!cfg)
        return 0;
    if (!is_daemon_port(cfg, ctx->user_port) || task_is_exempt())
        return 1;
    count(COUNTER_BINDS_DENIED);
    emit_hook(ctx, cfg, HOOK_BIND, VERDICT_DENY, family, addr, ctx->user_port);
    return 0;
}

SEC("cgroup/bind4")
int gate_bind4(struct bpf_sock_addr *ctx) {
    __u32 addr[4] = {};
    addr[0] = ctx->user_ip4;
    return gate_bind(ctx, GATE_AF_INET, addr);
}

SEC("cgroup/bind6")
int gate_bind6(struct bpf_sock_addr *ctx) {
    __u32 addr[4];
    addr[0] = ctx->user_ip6[0];
    addr[1] = ctx->user_ip6[1];
    addr[2] = ctx->user_ip6[2];
    addr[3] = ctx->user_ip6[3];
    return gate_bind(ctx, GATE_AF_INET6, addr);
}

/* ---- the forwarder's side ------------------------------------------------------------------------ */

/* When a proxied socket sends its SYN its local port is known: file the original destination under it,
 * where the forwarder (seeing only the client's address) can look it up. */
SEC("sockops")
int gate_sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct origin *origin = bpf_map_lookup_elem(&proxy_origins, &cookie);
    if (!origin)
        return 1;
    struct proxy_client client = {};
    client.family = skops->family;
    client.port = skops->local_port;
    bpf_map_update_elem(&proxy_clients, &client, origin, BPF_ANY);
    return 1;
}

char LICENSE[] SEC("license") = "GPL";
