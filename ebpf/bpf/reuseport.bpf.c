// SPDX-License-Identifier: Apache-2.0 OR MIT
//
// CPU-local accept for one SO_REUSEPORT group (sk_reuseport, kernel >= 4.19).
//
// The program runs at the SYN (TCP) or datagram (UDP) on the CPU that took the packet and picks
// the listener of the worker pinned on that CPU, so accept, peek and splice stay on one core.
// It never refuses: every way out is SK_PASS, and when it selects nothing the kernel falls back
// to its 4-tuple hash over the group (no worker on this CPU, worker busy, socket missing).
//
// One load of this object per group: the maps below belong to that group only.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define WORKERS_MAX 256
#define CPUS_MAX 1024

enum stat {
	STAT_LOCAL = 0,     // selected the worker pinned on this CPU
	STAT_NO_WORKER = 1, // no worker on this CPU, or its socket is not in `workers`
	STAT_BUSY = 2,      // the worker's published load is >= busy_at
	STAT_COUNT = 3,
};

// Set by the loader before load (.rodata, frozen: the verifier sees a constant).
const volatile __u32 busy_at = 0xffffffff;

// Index = worker; value = that worker's listening socket in this group.
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, WORKERS_MAX);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} workers SEC(".maps");

// Index = CPU; value = worker + 1 (0: no worker pinned on that CPU).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CPUS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} cpu_worker SEC(".maps");

// Index = worker; value = its pending connections, published by the worker itself.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WORKERS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} load SEC(".maps");

// Per-CPU counters, index = enum stat (user space sums over CPUs).
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

SEC("sk_reuseport")
int select_local_worker(struct sk_reuseport_md *md)
{
	__u32 cpu = bpf_get_smp_processor_id();
	__u32 *slot = bpf_map_lookup_elem(&cpu_worker, &cpu);

	if (!slot || *slot == 0) {
		count(STAT_NO_WORKER);
		return SK_PASS;
	}
	__u32 worker = *slot - 1;
	__u32 *pending = bpf_map_lookup_elem(&load, &worker);

	if (pending && *pending >= busy_at) {
		count(STAT_BUSY);
		return SK_PASS;
	}
	if (bpf_sk_select_reuseport(md, &workers, &worker, 0) != 0) {
		count(STAT_NO_WORKER);
		return SK_PASS;
	}
	count(STAT_LOCAL);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
