// BlockingCall: how the bindings give the GIL up, and the count of its returns.
//
// A loader lives in someone else's process, where other threads run Python. Each time a thread
// gives the GIL up it must take it back, and with another thread running Python that wait lasts
// up to a switch interval (5 ms by default): the cost is per return, whatever the call did. So
// the bindings give the GIL up only around a call that can block (waiting for bytes, a staging
// slot, a device copy or a thread; reading files; populating host memory) or that works through
// a large buffer (hashing, parsing a header over 1 MiB); a call that only takes a short lock or
// queues work on the device keeps it. Handing tensors out costs at most one return per wake of
// the consumer: LoadSession.next_shard and wait_landed give the GIL up only when there is
// something to wait for, and exporting a tensor (`__dlpack__`, a CUDA consumer's stream wait
// included) never does; LoadSession.acquire only when the landing waits for a slot or memory.
//
// Every return is counted per thread (_core.gil_reacquisitions()), so tests bound them with a
// counter rather than a timing.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace blob2gpu {

// Returns of the GIL to the calling thread after a BlockingCall, since the thread started.
inline uint64_t& gil_reacquisitions() {
  thread_local uint64_t count = 0;
  return count;
}

// Gives the GIL up for its lifetime (as pybind11::gil_scoped_release, also usable as a
// call_guard), counting the return.
class BlockingCall {
 public:
  BlockingCall() { ++gil_reacquisitions(); }
  BlockingCall(const BlockingCall&) = delete;
  BlockingCall& operator=(const BlockingCall&) = delete;

 private:
  pybind11::gil_scoped_release release_;
};

}  // namespace blob2gpu
