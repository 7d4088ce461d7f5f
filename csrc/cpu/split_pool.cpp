// See split_pool.h for why this exists next to OpenMP, and for its wake policy.
#include "cpu/split_pool.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace mllmcal {
namespace {

constexpr int kAuto = 0;
constexpr int kAlways = 1;
constexpr int kNever = 2;
const char* const kPolicyNames[] = {"auto", "always", "never"};
std::atomic<int> g_policy{kAuto};

// Under "auto", a call that skipped the wake this many times in a row wakes anyway (a
// probe), so that the wake-cost estimate follows the machine (e.g. into a tight loop,
// where a helper's CPU is still awake and the wake is cheap).
constexpr int kProbeEvery = 16;
// The wake-ups timed last (a ring; see quickest).
constexpr int kLatencySamples = 32;
// A sample above this (a thread descheduled for a time slice) enters a mean at it.
constexpr double kMaxSampleNs = 2.0e6;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// An exponentially weighted mean; < 0 means no sample yet.
inline void ewma(double& est, double sample) {
  if (sample > kMaxSampleNs) sample = kMaxSampleNs;
  est = est < 0.0 ? sample : est + 0.25 * (sample - est);
}

// A call wakes the helper when the work left for the caller alone is more than the wake's
// cost plus one item. A helper that starts L after a wake that cost the caller S, with R
// of work left, takes half of what is left: the call ends at (R + S + L) / 2 instead of
// R, a gain when R > S + L; the item covers the one the caller may wait on at the end.
// The cost is S + L with L the quickest of the timed
// wake-ups, not a mean or median: a wake-up is quick when the helper's CPU is warm, which
// waking it often keeps it (measured on the 2-vCPU CI box with bench/wake_cost.cpp: 30 µs
// median after a 0.1 ms gap, 59 µs after 1 ms, 92 µs after 5 ms; and in the pool, 1-2 ms
// while torch's OpenMP workers still spin there), so the probes of a pool that rarely
// wakes see the slow ones; a median of those made
// [8, 151936] (~300 µs of work) stop waking in some runs, and run 1.6x slower.
double quickest(const double* lat, int n) {
  double q = lat[0];
  for (int k = 1; k < n; ++k) q = lat[k] < q ? lat[k] : q;
  return q;
}

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t items;
  std::atomic<int64_t> next{0};          // next unclaimed item
  std::atomic<int64_t> done{0};          // items finished
  std::atomic<int> users{0};             // helpers that joined and may still touch this Job
  std::atomic<int64_t> helper_items{0};  // items the helpers ran
};

class Pool {
 public:
  const pid_t owner = getpid();

  void run(int64_t items, int threads, const std::function<void(int64_t)>& fn,
           int64_t elements) {
    Job job;
    job.fn = &fn;
    job.items = items;
    const int policy = g_policy.load(std::memory_order_relaxed);
    const double per_item = static_cast<double>(elements > items ? elements : items) /
                            static_cast<double>(items);
    bool wake;
    double cost;  // the wake's cost (ns) the decisions below use; < 0 unknown
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Helpers are created on first need and kept (detached: they sleep on cv_ and die
      // with the process).
      while (static_cast<int>(helpers_) < threads - 1) {
        std::thread([this] { helper_loop(); }).detach();
        ++helpers_;
      }
      job_ = &job;
      ++generation_;
      ++calls_;
      cost = wake_cost_ns();
      if (policy == kAlways) {
        wake = true;
      } else if (cost < 0.0) {
        wake = true;  // nothing measured yet: wake, and measure
      } else {
        // The rate comes from earlier calls; without one, decide after the first item.
        wake = rate_ns_ >= 0.0 &&
               static_cast<double>(elements) * rate_ns_ > cost + per_item * rate_ns_;
        if (!wake && ++skipped_ >= kProbeEvery) wake = true;
      }
      if (wake) begin_wake();
    }
    int64_t syscall_ns = wake ? notify() : -1;
    // The caller's share. Without a wake yet ("auto"), it re-decides after each item from
    // this call's own rate: wake once the work left is worth it.
    int64_t mine = 0, busy_ns = 0;
    for (;;) {
      const int64_t w = job.next.fetch_add(1, std::memory_order_relaxed);
      if (w >= items) break;
      const int64_t t0 = now_ns();
      fn(w);
      busy_ns += now_ns() - t0;
      job.done.fetch_add(1, std::memory_order_release);
      ++mine;
      if (syscall_ns < 0) {
        const int64_t left = items - job.next.load(std::memory_order_relaxed);
        const double item_ns = static_cast<double>(busy_ns) / static_cast<double>(mine);
        if (left > 0 && static_cast<double>(left) * item_ns > cost + item_ns) {
          {
            std::lock_guard<std::mutex> lock(mu_);
            begin_wake();
          }
          syscall_ns = notify();
        }
      }
    }
    // Only claimed items can be outstanding, and their claimers are running them.
    while (job.done.load(std::memory_order_acquire) < items) std::this_thread::yield();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (job_ == &job) job_ = nullptr;  // another caller may have published since
      if (mine > 0) ewma(rate_ns_, static_cast<double>(busy_ns) / (static_cast<double>(mine) * per_item));
      if (syscall_ns >= 0) ewma(syscall_ns_, static_cast<double>(syscall_ns));
      helper_items_ += job.helper_items.load(std::memory_order_relaxed);
    }
    // A helper that joined (under the lock, before the unpublish) may still be between
    // its last failed claim and leaving; `job` lives on this stack, so wait for it.
    while (job.users.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

  SplitPoolStats stats(bool reset, double pin_us) {
    std::lock_guard<std::mutex> lock(mu_);
    const double cost = wake_cost_ns();
    const SplitPoolStats out{calls_, woken_, helper_items_, cost < 0.0 ? -1.0 : cost * 1e-3,
                             rate_ns_};
    if (reset) {
      calls_ = woken_ = helper_items_ = 0;
      skipped_ = 0;
      rate_ns_ = syscall_ns_ = pinned_ns_ = -1.0;
      n_lat_ = 0;
    }
    if (pin_us >= 0.0) pinned_ns_ = pin_us * 1e3;
    return out;
  }

 private:
  // The wake's cost: the caller's syscall plus the quickest timed wake-up, or the pinned
  // value; < 0 until both parts were measured. Under mu_.
  double wake_cost_ns() const {
    if (pinned_ns_ >= 0.0) return pinned_ns_;
    const int n = n_lat_ < kLatencySamples ? static_cast<int>(n_lat_) : kLatencySamples;
    if (syscall_ns_ < 0.0 || n == 0) return -1.0;
    return syscall_ns_ + quickest(lat_, n);
  }

  // Under mu_: the first helper to wake after this times its wake-up from now.
  void begin_wake() {
    wake_pending_ = true;
    wake_t_ = now_ns();
    skipped_ = 0;
    ++woken_;
  }

  // Wakes the helpers; returns the caller's cost in ns.
  int64_t notify() {
    const int64_t t0 = now_ns();
    cv_.notify_all();
    return now_ns() - t0;
  }

  void helper_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      while (job_ == nullptr || generation_ == seen) {
        cv_.wait(lock);
        if (wake_pending_) {  // also when the job is already over: the wake-up is what is timed
          wake_pending_ = false;
          lat_[n_lat_++ % kLatencySamples] = static_cast<double>(now_ns() - wake_t_);
        }
      }
      seen = generation_;
      Job* job = job_;
      job->users.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      int64_t ran = 0;
      for (;;) {
        const int64_t w = job->next.fetch_add(1, std::memory_order_relaxed);
        if (w >= job->items) break;
        (*job->fn)(w);
        ++ran;
        job->done.fetch_add(1, std::memory_order_release);
      }
      // Before `users` drops: after it the caller may return and `job` be gone.
      job->helper_items.fetch_add(ran, std::memory_order_relaxed);
      job->users.fetch_sub(1, std::memory_order_release);
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  size_t helpers_ = 0;
  // Wake policy state and counters, under mu_.
  bool wake_pending_ = false;
  int64_t wake_t_ = 0;
  int skipped_ = 0;
  double rate_ns_ = -1.0;     // caller's ns per element
  double syscall_ns_ = -1.0;  // caller's cost of notify_all
  double lat_[kLatencySamples] = {};  // wake to running helper, the last ones (a ring)
  int64_t n_lat_ = 0;                  // wake-ups timed since the reset
  double pinned_ns_ = -1.0;
  int64_t calls_ = 0, woken_ = 0, helper_items_ = 0;
};

Pool* pool() {
  // Never destroyed: detached helpers may still sleep on its condition variable at exit.
  // After fork() the child has none of the parent's helpers (and maybe a lock that was
  // held), so it starts a fresh pool.
  static Pool* p = new Pool();
  if (p->owner != getpid()) p = new Pool();
  return p;
}

}  // namespace

void split_pool_run(int64_t items, int threads, const std::function<void(int64_t)>& fn,
                    int64_t elements) {
  if (threads <= 1 || items <= 1 || g_policy.load(std::memory_order_relaxed) == kNever) {
    for (int64_t w = 0; w < items; ++w) fn(w);
    return;
  }
  pool()->run(items, threads, fn, elements);
}

std::string split_pool_policy(const std::string& policy) {
  const int before = g_policy.load();
  if (!policy.empty()) {
    int code = -1;
    for (int k = 0; k < 3; ++k)
      if (policy == kPolicyNames[k]) code = k;
    if (code < 0)
      throw std::invalid_argument("pool policy must be 'auto', 'always' or 'never', got '" +
                                  policy + "'");
    g_policy.store(code);
  }
  return kPolicyNames[before];
}

SplitPoolStats split_pool_stats(bool reset, double wake_cost_us) {
  return pool()->stats(reset, wake_cost_us);
}

}  // namespace mllmcal
