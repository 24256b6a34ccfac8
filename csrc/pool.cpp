// The worker pool of pyinf._C: see pool.h for what it does and why.
//
// Protocol of a job (one at a time, under Pool::submit):
//  * the caller publishes (fn, ctx, n) under mu_, with a new job number gen_,
//    and wakes the workers it wants (notify_all on wake_);
//  * everyone, the caller included, claims items with a CAS on next_, which
//    packs (job number, next item): a worker that wakes after its job is over
//    sees another job number, or no item left, and goes back to sleep without
//    touching anything of a job it did not join;
//  * done_ counts finished items; the thread that finishes the last one wakes
//    the caller if it sleeps on done_cv_.  The caller therefore waits only for
//    items that another thread has claimed, never for a thread to show up.

#include "pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace pyinf {
namespace {

#ifndef PYINF_POOL_SPIN_NS  // (a build-time knob for experiments)
#define PYINF_POOL_SPIN_NS 100000
#endif
constexpr int64_t kSpinNs = PYINF_POOL_SPIN_NS;
#ifndef PYINF_POOL_POLL_NS
#define PYINF_POOL_POLL_NS 200000
#endif
constexpr int64_t kPollNs = PYINF_POOL_POLL_NS;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

thread_local bool t_in_job = false;  // items must not start jobs: run those inline

void run_serial(int64_t n, ItemFn fn, void* ctx) {
  for (int64_t i = 0; i < n; ++i) fn(ctx, i);
}

class Pool {
 public:
  std::mutex submit;  // one job at a time

  // Runs the job; `submit` is held by the caller.
  void run(int64_t n, int nt, ItemFn fn, void* ctx) {
    const int want = static_cast<int>(std::min<int64_t>(nt - 1, n - 1));
    grow(want);
    uint64_t job;
    uint32_t g;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job = ++gen_;
      g = static_cast<uint32_t>(job);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      wanted_ = want;
      error_ = nullptr;
      done_.store(0, std::memory_order_relaxed);
      next_.store(static_cast<uint64_t>(g) << 32, std::memory_order_release);
    }
    // Published to the polling workers only once mu_ is free: a worker that
    // saw the job while mu_ is still held would block on it and pay the
    // futex wake-up that polling is there to avoid.
    gen_pub_.store(job, std::memory_order_release);
    if (want > 0) wake_.notify_all();
    work(g, n, fn, ctx);
    if (done_.load(std::memory_order_acquire) != n && !spin_until_done(n)) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return done_.load(std::memory_order_acquire) == n; });
    }
    std::exception_ptr err;
    {
      std::lock_guard<std::mutex> lk(mu_);
      std::swap(err, error_);
    }
    if (err) std::rethrow_exception(err);
  }

  int workers() {
    std::lock_guard<std::mutex> lk(mu_);
    return threads_;
  }

 private:
  // Starts workers up to `want` (never stops any).  Under `submit`.
  void grow(int want) {
    std::lock_guard<std::mutex> lk(mu_);
    while (threads_ < want) {
      try {
        std::thread(&Pool::worker, this, threads_, gen_).detach();
      } catch (const std::exception&) {  // no more threads: use those we have
        return;
      }
      ++threads_;
    }
  }

  // The caller's last wait: the other threads' last items usually end within
  // microseconds of its own, and waking a sleeping thread costs tens of
  // microseconds (more on a VM, where an idle vCPU is halted).  So spin for
  // at most kSpinNs, then sleep: bounded, a fraction of a percent of the ms-long
  // jobs, even when the item is held by a preempted thread.
  bool spin_until_done(int64_t n) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 1;; ++k) {
      if (done_.load(std::memory_order_acquire) == n) return true;
      cpu_relax();
      if (k % 64 == 0 &&
          std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(kSpinNs))
        return false;
    }
  }

  bool claim(uint32_t g, int64_t n, int64_t* item) {
    uint64_t w = next_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(w >> 32) != g ||
          static_cast<int64_t>(w & 0xffffffffu) >= n)
        return false;
      if (next_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
        *item = static_cast<int64_t>(w & 0xffffffffu);
        return true;
      }
    }
  }

  // Claims and runs items of job g until none is left.
  void work(uint32_t g, int64_t n, ItemFn fn, void* ctx) {
    t_in_job = true;
    int64_t i;
    while (claim(g, n, &i)) {
      try {
        fn(ctx, i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> lk(mu_);  // no lost wake-up: see run()
        done_cv_.notify_all();
      }
    }
    t_in_job = false;
  }

  void worker(int index, uint64_t seen) {
    for (;;) {
      poll_for_job(seen);
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return gen_ != seen; });  // sleeps: never spins
      seen = gen_;
      if (index >= wanted_) continue;
      const ItemFn fn = fn_;
      void* const ctx = ctx_;
      const int64_t n = n_;
      lk.unlock();
      work(static_cast<uint32_t>(seen), n, fn, ctx);
    }
  }

  // A pass is often a loop of calls (one per block or chunk) with a few tens
  // of microseconds of Python between them, and a worker asleep on a futex
  // takes ~50-100 us to wake on this VM, each call.  So a worker that just
  // finished polls for the next job for at most kPollNs (pause loop, clock
  // read every 64 polls), then sleeps.  The poll is bounded in wall time: on
  // a busy machine a preemption ends it (the deadline has passed when the
  // worker runs again), so a job costs the other processes at most ~kPollNs
  // of CPU, where libgomp spins ~3 ms at every barrier and between regions.
  // Measured (bench/cpu_ab.py, 256-row calls, 2 threads, quiet): sleeping at
  // once cost +13 % vs the OpenMP build, this poll ~+1 %; under load no
  // measurable difference.  (sched_yield instead of pause would hand the core
  // away at once under load, but costs a syscall per poll when quiet.)
  void poll_for_job(uint64_t seen) {
    if (gen_pub_.load(std::memory_order_acquire) != seen) return;
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 1; gen_pub_.load(std::memory_order_acquire) == seen; ++k) {
      cpu_relax();
      if (k % 64 == 0 &&
          std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(kPollNs))
        return;
    }
  }

  std::mutex mu_;
  std::condition_variable wake_, done_cv_;
  uint64_t gen_ = 0;  // the current job's number (under mu_)
  ItemFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int wanted_ = 0;  // workers index < wanted_ join the current job
  int threads_ = 0;
  std::exception_ptr error_;
  std::atomic<uint64_t> next_{0};  // (uint32 job number) << 32 | next item
  std::atomic<int64_t> done_{0};
  std::atomic<uint64_t> gen_pub_{0};  // gen_, readable without mu_ (polling)
};

// The process's pool, rebuilt after fork() (the child has none of the parent's
// threads; the old object is leaked, as it may hold locked mutexes).
pthread_mutex_t g_create = PTHREAD_MUTEX_INITIALIZER;
Pool* g_pool = nullptr;

void after_fork_in_child() {
  pthread_mutex_init(&g_create, nullptr);
  g_pool = nullptr;
}

Pool& pool() {
  pthread_mutex_lock(&g_create);
  static bool registered = false;
  if (!registered) {
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
    registered = true;
  }
  if (!g_pool) g_pool = new Pool();
  Pool& p = *g_pool;
  pthread_mutex_unlock(&g_create);
  return p;
}

}  // namespace

void parallel_items(int64_t n, int nt, ItemFn fn, void* ctx) {
  if (n <= 0) return;
  if (nt <= 1 || n == 1 || t_in_job || n >= (int64_t(1) << 31)) {
    run_serial(n, fn, ctx);
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> job(p.submit, std::try_to_lock);
  if (!job.owns_lock()) {  // another thread's job is running: do ours here
    run_serial(n, fn, ctx);
    return;
  }
  p.run(n, nt, fn, ctx);
}

int pool_workers() {
  pthread_mutex_lock(&g_create);
  Pool* p = g_pool;
  pthread_mutex_unlock(&g_create);
  return p ? p->workers() : 0;
}

}  // namespace pyinf
