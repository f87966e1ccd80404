// SPDX-License-Identifier: Apache-2.0 OR MIT
//
// Lease ports without a listener per port (sk_lookup, kernel >= 5.9).
//
// Attached to one network namespace. For a TCP SYN or a UDP datagram addressed to the configured
// family/address and a destination port in [port_lo, port_hi]:
//   - port open for that protocol (`open_ports`): hand it to the socket of the worker pinned on
//     this CPU (else cpu % n), which learns the original port from getsockname/IP_ORIGDSTADDR;
//   - port not open: SK_DROP, so the kernel refuses it (TCP RST, UDP ICMP port unreachable).
// Everything else is SK_PASS without a selection: the kernel's normal lookup, untouched, so
// relays with disjoint ranges share a namespace.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define WORKERS_MAX 256
#define CPUS_MAX 1024

#define OPEN_TCP 1
#define OPEN_UDP 2

enum stat {
	STAT_TCP_STEERED = 0,
	STAT_UDP_STEERED = 1,
	STAT_TCP_REFUSED = 2,
	STAT_UDP_REFUSED = 3,
	STAT_COUNT = 4,
};

// Set by the loader before load (.rodata, frozen: the verifier sees constants).
const volatile __u32 port_lo = 1;
const volatile __u32 port_hi = 0; // lo > hi: matches nothing until configured
const volatile __u32 family = AF_INET;
const volatile __u32 addr_any = 1;    // 1: every local address of `family`
const volatile __u32 bind_addr[4] = {}; // network byte order; IPv4 uses [0]
const volatile __u32 n_tcp = 0;       // sockets in tcp_socks (0: TCP refused in the range)
const volatile __u32 n_udp = 0;

// Index = worker; value = its listening TCP socket / bound UDP socket.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, WORKERS_MAX);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} tcp_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, WORKERS_MAX);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} udp_socks SEC(".maps");

// Index = port - port_lo (the loader sizes it to the range); value = OPEN_TCP | OPEN_UDP bits.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} open_ports SEC(".maps");

// Index = CPU; value = worker + 1 (0: no worker pinned there).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CPUS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} cpu_worker SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &which);

	if (n)
		*n += 1; // per-CPU slot: no other CPU writes it
}

static __always_inline int ours(const struct bpf_sk_lookup *ctx)
{
	if (ctx->family != family)
		return 0;
	if (ctx->local_port < port_lo || ctx->local_port > port_hi)
		return 0;
	if (addr_any)
		return 1;
	// Every word read at its constant offset, unconditionally: the verifier refuses a context
	// load through a pointer that clang computed (ctx + offset chosen by a branch).
	__u32 ip4 = ctx->local_ip4;
	__u32 ip6_0 = ctx->local_ip6[0];
	__u32 ip6_1 = ctx->local_ip6[1];
	__u32 ip6_2 = ctx->local_ip6[2];
	__u32 ip6_3 = ctx->local_ip6[3];

	if (family == AF_INET)
		return ip4 == bind_addr[0];
	return ip6_0 == bind_addr[0] && ip6_1 == bind_addr[1] && ip6_2 == bind_addr[2] &&
	       ip6_3 == bind_addr[3];
}

// The socket of `worker` in one of the two sockmaps, with a reference the caller releases. One
// call site per map: the verifier then knows each call's map exactly.
static __always_inline struct bpf_sock *worker_socket(int tcp, __u32 worker)
{
	if (tcp)
		return bpf_map_lookup_elem(&tcp_socks, &worker);
	return bpf_map_lookup_elem(&udp_socks, &worker);
}

SEC("sk_lookup")
int steer_lease_port(struct bpf_sk_lookup *ctx)
{
	__u32 bit, n, refused, steered;
	int tcp = ctx->protocol == IPPROTO_TCP;

	if (ctx->protocol == IPPROTO_TCP) {
		bit = OPEN_TCP;
		n = n_tcp;
		steered = STAT_TCP_STEERED;
		refused = STAT_TCP_REFUSED;
	} else if (ctx->protocol == IPPROTO_UDP) {
		bit = OPEN_UDP;
		n = n_udp;
		steered = STAT_UDP_STEERED;
		refused = STAT_UDP_REFUSED;
	} else {
		return SK_PASS;
	}
	if (!ours(ctx))
		return SK_PASS;

	__u32 index = ctx->local_port - port_lo;
	__u32 *open = bpf_map_lookup_elem(&open_ports, &index);

	if (!open || !(*open & bit) || n == 0) {
		count(refused);
		return SK_DROP;
	}

	__u32 cpu = bpf_get_smp_processor_id();
	__u32 *slot = bpf_map_lookup_elem(&cpu_worker, &cpu);
	__u32 worker = (slot && *slot) ? *slot - 1 : cpu % n;
	struct bpf_sock *sk = worker_socket(tcp, worker);

	if (!sk && worker != 0)
		sk = worker_socket(tcp, 0);
	if (!sk) {
		count(refused);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);

	bpf_sk_release(sk);
	if (err) {
		count(refused);
		return SK_DROP;
	}
	count(steered);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
