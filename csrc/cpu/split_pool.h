// A small persistent thread pool for both paths of the token-statistics kernel (whole
// rows, or vocabulary chunks of few rows), where an OpenMP parallel region is a poor fit
// on a shared machine or inside a serving engine.
//
// Why not OpenMP here: a parallel region ends in a barrier that waits for *every* team
// thread, including one the OS has not scheduled yet. With one [1, V] row per call the
// work is ~100 µs, so on a loaded 2-core machine a descheduled helper turns it into a
// multi-millisecond wait (measured: 150 µs alone vs 16 ms median with a 2-thread team).
// Here work items are claimed from an atomic counter and the caller waits only for
// items that were actually claimed: a helper that wakes late finds nothing left and the
// caller has already returned. On an idle machine helpers claim their share at once.
//
// Helpers sleep between calls (no spinning): on a shared machine a spinning helper
// steals time from the caller whenever the scheduler keeps both on one CPU, which we
// observed on the loaded 2-core CI box (caller and helper both on CPU 1, each at 50%).
//
// Waking a sleeping helper is not free, and on a virtual machine it can cost more than a
// decode-shape call: on the 2-vCPU KVM CI box the caller's FUTEX_WAKE took 12-15 µs (the
// IPI exits to the hypervisor) and the helper ran 30-90 µs after it, against 33 µs for a
// whole [1, 151936] fp32 row on one thread; and whenever the helper's CPU runs another
// thread (torch's OpenMP workers spin for a while after each op) it starts 1-2 ms later.
// So under the default policy ("auto") the caller wakes the helpers only when the work
// left, at the caller's own measured rate, is more than the wake's cost plus one item:
// the syscall plus the quickest of the last 32 timed wake-ups (split_pool.cpp, above
// `quickest`, says why the quickest). Both are measured as the pool runs, and every 16th
// call in a row that skipped the wake wakes anyway, so that the estimate follows the
// machine. Which thread runs an item never changes the result: items and their merge
// order are fixed by the caller's plan.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace mllmcal {

// Runs fn(w) for every w in [0, items) using up to `threads` threads, the caller being
// one of them. fn must not throw. Returns when every item is done. `elements` is the
// job's size in the units the wake policy's rate is kept in (logits read), for the
// estimate of its duration; items are assumed to be of about equal size.
void split_pool_run(int64_t items, int threads, const std::function<void(int64_t)>& fn,
                    int64_t elements);

// The wake policy of every later call: "auto" (the default), "always" (wake the helpers
// at the start of every multi-threaded call, as before the policy existed) or "never"
// (the caller runs every item, in order, and publishes nothing; the plan, and so the
// result, stays that of `threads`).
// Returns the policy before the call; "" only reads it. Throws std::invalid_argument for
// another name.
std::string split_pool_policy(const std::string& policy);

struct SplitPoolStats {
  int64_t calls;         // calls that could use helpers (threads > 1, items > 1, not "never")
  int64_t woken;         // calls that woke the helpers (probes included)
  int64_t helper_items;  // items run by helpers
  double wake_cost_us;   // caller's wake syscall + the quickest timed wake-up (or the
                         // pinned value): "auto" wakes for work above it and an item;
                         // < 0 unknown
  double ns_per_element; // current estimate of the caller's rate; < 0 unknown
};

// Counters since the process started (or since the last `reset`), and the current
// estimates, as they were before this call. Then `reset` zeroes the counters and forgets
// both estimates (unpins), and `wake_cost_us` >= 0 pins the wake-cost estimate (it stops
// learning; for tests).
SplitPoolStats split_pool_stats(bool reset, double wake_cost_us);

}  // namespace mllmcal
