// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// A small fixed-size thread pool for kvc's CPU kernels. Kernels are serial unless the caller
/// hands them a pool: the caller chooses the threads, and OpenMP is never required.
///
/// Concurrency (docs/threading.md): any number of threads may call parallel_for on one pool at
/// once. Calls from different threads are *serialised*: each runs on the whole pool in turn
/// (an engine whose threads share a pool gets every call done, each with all the workers). A
/// call from inside a task of the same pool (nested) runs its loop inline on the calling thread,
/// since waiting for the pool there would deadlock; one from inside another pool's task uses
/// this pool when idle and runs inline when busy, so pools calling each other never deadlock.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE

/// See docs/threading.md: parallel_for may be called from several threads (serialised) and from
/// inside its own tasks (run inline).
class thread_pool {
 public:
  /// \param threads  total threads that work on a parallel_for, the caller's included (>= 1)
  explicit thread_pool(std::int32_t threads = static_cast<std::int32_t>(std::thread::hardware_concurrency())) {
    if (threads < 1) threads = 1;
    for (std::int32_t i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~thread_pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  std::int32_t size() const noexcept { return static_cast<std::int32_t>(workers_.size()) + 1; }

  /// Runs fn(i) for i in [0, n) on the pool and the calling thread; returns when all are done.
  /// The first exception thrown by fn is rethrown here (inline runs stop at it, pool runs finish
  /// the other indices first).
  ///
  /// Thread safety: callers on different threads take turns (call_mu_), so one job's state is
  /// never overwritten by another's. A call made from inside one of this pool's tasks runs fn
  /// inline on that thread: the pool's threads are all busy with the outer job, and the outer
  /// caller holds the turn, so waiting would never end. A call from inside another pool's task
  /// uses this pool if it is idle and runs inline if it is busy.
  void parallel_for(std::int32_t n, const std::function<void(std::int32_t)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1 || running_here()) {
      for (std::int32_t i = 0; i < n; ++i) fn(i);
      return;
    }
    // Outside any task a caller waits for its turn. Inside another pool's task it takes the turn
    // only if free, else runs inline: a task never waits for a turn, so turns cannot form a
    // cycle (A's task waiting for B while B's task waits for A, on two threads).
    std::unique_lock<std::mutex> turn(call_mu_, std::defer_lock);
    if (top_frame() == nullptr) {
      turn.lock();
    } else if (!turn.try_lock()) {
      for (std::int32_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    job_ = &fn;
    count_ = n;
    next_.store(0);
    pending_ = n;
    error_ = nullptr;
    ++generation_;
    lock.unlock();
    cv_.notify_all();
    run_tasks();
    lock.lock();
    // Also wait for every woken worker to leave run_tasks(): one still looping there reads count_
    // and job_, which the next call would overwrite (ThreadSanitizer found this).
    done_cv_.wait(lock, [this] { return pending_ == 0 && active_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  /// The pools whose tasks this thread is inside, innermost first: a linked list of run_tasks
  /// frames on this thread's stack. A chain, not one slot, so that pool A's task calling pool
  /// B, whose task calls A again, is still seen as nested in A (else that call would wait for
  /// A's turn, which A's outer caller holds until the task returns: a deadlock).
  struct frame {
    const thread_pool* pool;
    const frame* outer;
  };
  static const frame*& top_frame() noexcept {
    thread_local const frame* top = nullptr;
    return top;
  }
  bool running_here() const noexcept {
    for (const frame* f = top_frame(); f; f = f->outer)
      if (f->pool == this) return true;
    return false;
  }

  void run_tasks() {
    const frame here{this, top_frame()};
    top_frame() = &here;
    struct pop {
      const frame* outer;
      ~pop() { top_frame() = outer; }
    } pop_on_exit{here.outer};
    std::int32_t finished = 0;
    for (;;) {
      const std::int32_t i = next_.fetch_add(1);
      if (i >= count_) break;
#if KVC_HAS_EXCEPTIONS
      try {
        (*job_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
#else
      (*job_)(i);
#endif
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(mu_);
      pending_ -= finished;
      if (pending_ == 0) done_cv_.notify_all();
    }
  }

  void work() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || (generation_ != seen && job_ != nullptr); });
        if (stop_) return;
        seen = generation_;
        ++active_;
      }
      run_tasks();
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex call_mu_;  ///< held by the one caller whose job the pool runs now
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(std::int32_t)>* job_ = nullptr;
  std::int32_t count_ = 0;
  std::atomic<std::int32_t> next_{0};
  std::int32_t pending_ = 0;
  std::int32_t active_ = 0;  ///< workers inside run_tasks() for the current job
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

KVC_END_NAMESPACE
