// What waking a sleeping thread costs on this machine: the waker's FUTEX_WAKE syscall,
// and the time until the woken thread runs. The CPU kernel's thread pool decides by the
// same two costs (csrc/cpu/split_pool.h); this measures them without it. No torch.
//
//   g++ -O2 -std=c++17 bench/wake_cost.cpp -o /tmp/wake_cost -lpthread && /tmp/wake_cost
//
// For each gap (the time the waker spins before the wake, so the sleeper's CPU idles for
// it), 300 wakes: median and p90 of the syscall, and p10/median/p90 of the wake-up.
// Measured on the 2-vCPU KVM CI box (AMD EPYC): syscall 12-15 µs, wake-up 30-90 µs median.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

double now_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void spin(double us) {
  const double t = now_us();
  while (now_us() - t < us) {
  }
}

std::atomic<int> word{0};
std::atomic<double> woke{0.0};
std::atomic<bool> asleep{false};

}  // namespace

int main() {
  std::thread sleeper([] {
    for (;;) {
      const int w = word.load();
      asleep = true;
      syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, w, nullptr, nullptr, 0);
      asleep = false;
      woke = now_us();
    }
  });
  for (const double gap : {50.0, 100.0, 1000.0, 5000.0}) {
    std::vector<double> sys, lat;
    for (int r = 0; r < 300; ++r) {
      spin(gap);
      while (!asleep) {
      }
      const double t0 = now_us();
      word++;
      syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
      const double t1 = now_us();
      while (woke.load() < t0) {
      }
      sys.push_back(t1 - t0);
      lat.push_back(woke.load() - t0);
    }
    std::sort(sys.begin(), sys.end());
    std::sort(lat.begin(), lat.end());
    std::printf("gap %5.0f us: FUTEX_WAKE median %.2f p90 %.2f us | woken thread runs after "
                "p10 %.1f median %.1f p90 %.1f us\n",
                gap, sys[150], sys[270], lat[30], lat[150], lat[270]);
  }
  std::fflush(stdout);
  _exit(0);  // the sleeper never returns
}
