// See split_pool.h for why this exists next to OpenMP.
#include "cpu/split_pool.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace mllmcal {
namespace {

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t items;
  std::atomic<int64_t> next{0};  // next unclaimed item
  std::atomic<int64_t> done{0};  // items finished
  std::atomic<int> users{0};     // helpers that joined and may still touch this Job
};

void work_on(Job* job) {
  for (;;) {
    const int64_t w = job->next.fetch_add(1, std::memory_order_relaxed);
    if (w >= job->items) return;
    (*job->fn)(w);
    job->done.fetch_add(1, std::memory_order_release);
  }
}

class Pool {
 public:
  const pid_t owner = getpid();

  void run(int64_t items, int threads, const std::function<void(int64_t)>& fn) {
    Job job;
    job.fn = &fn;
    job.items = items;
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
    }
    cv_.notify_all();
    work_on(&job);
    // Only claimed items can be outstanding, and their claimers are running them.
    while (job.done.load(std::memory_order_acquire) < items) std::this_thread::yield();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (job_ == &job) job_ = nullptr;  // another caller may have published since
    }
    // A helper that joined (under the lock, before the unpublish) may still be between
    // its last failed claim and leaving; `job` lives on this stack, so wait for it.
    while (job.users.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

 private:
  void helper_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return job_ != nullptr && generation_ != seen; });
      seen = generation_;
      Job* job = job_;
      job->users.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      work_on(job);
      job->users.fetch_sub(1, std::memory_order_release);
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  size_t helpers_ = 0;
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

void split_pool_run(int64_t items, int threads, const std::function<void(int64_t)>& fn) {
  if (threads <= 1 || items <= 1) {
    for (int64_t w = 0; w < items; ++w) fn(w);
    return;
  }
  pool()->run(items, threads, fn);
}

}  // namespace mllmcal
