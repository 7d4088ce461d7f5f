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
#pragma once

#include <cstdint>
#include <functional>

namespace mllmcal {

// Runs fn(w) for every w in [0, items) using up to `threads` threads, the caller being
// one of them. fn must not throw. Returns when every item is done.
void split_pool_run(int64_t items, int threads, const std::function<void(int64_t)>& fn);

}  // namespace mllmcal
