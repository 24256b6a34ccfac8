// The worker pool behind every multi-threaded pass of pyinf._C.
//
//   parallel_for(n, nt, f)   runs f(i) for every i in [0, n) on the calling
//                            thread plus up to nt - 1 pool workers; returns
//                            when all n items are done.
//
// Why not OpenMP (issue 11): on a busy machine (another process per core),
// pyinf's OpenMP passes at 2 threads ran 10-40x slower than at 1 thread.  An
// OpenMP parallel region ends with a barrier that waits for EVERY thread of
// the team, including one that the kernel has not scheduled yet (it may wait
// a whole time slice behind a busy process), and libgomp's waiting threads
// spin (GOMP_SPINCOUNT: ~3 ms by default) at that barrier and between regions,
// burning the CPU time the working thread needs.  Its wait policy cannot be
// set from here: OMP_WAIT_POLICY / GOMP_SPINCOUNT are read once when libgomp
// loads, and pyinf._C shares torch's libgomp (same soname), which `import
// torch` loads long before pyinf._C.  This pool instead:
//
//  * lets the calling thread do the work itself: items are claimed one at a
//    time from an atomic counter, so a worker that wakes late finds nothing
//    left and never holds the caller up (no team barrier: the caller waits
//    only for items that a worker has actually started);
//  * spins little: a worker that finished polls for the next job for at most
//    200 us of wall time (catching the next call of a loop without a ~50-100
//    us futex wake-up; a preemption ends the poll), then sleeps on a
//    condition variable; the caller, waiting for an item that another thread
//    has started, spins at most 100 us, then sleeps;
//  * runs jobs of one item on the caller, without waking anyone (the tiny
//    calls of the test suite paid a wake-up and a barrier each).
//
// The result of a job does not depend on which thread ran which item: every
// pass writes disjoint outputs per item, or per-item accumulators reduced in
// item order (csrc/passes.cpp), so results are bitwise reproducible.
//
// One job at a time: a second thread that calls a kernel while the pool is
// busy runs its items itself, in order (same result).  The pool is created on
// first use, grows to the largest thread count asked for, and is never torn
// down (its workers sleep; process exit does not join them).  In a child
// after fork() it is rebuilt on first use.  Exceptions thrown by an item
// (std::bad_alloc) are rethrown on the caller after the job.
#pragma once

#include <cstdint>

namespace pyinf {

using ItemFn = void (*)(void* ctx, int64_t item);

// Runs fn(ctx, i) for i in [0, n) on the caller and up to nt - 1 workers.
void parallel_items(int64_t n, int nt, ItemFn fn, void* ctx);

template <typename F>
void parallel_for(int64_t n, int nt, F& f) {
  parallel_items(
      n, nt, [](void* c, int64_t i) { (*static_cast<F*>(c))(i); }, &f);
}

// Pool workers started so far in this process (for tests and diagnostics).
int pool_workers();

}  // namespace pyinf
