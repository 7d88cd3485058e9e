// TcpSocket: one non-blocking TCP connection's file descriptor (closed by its destructor), how it
// is made (name resolution, then the first address that accepts, within a deadline) and how a
// thread waits on it. Every wait also watches a WakeSignal, so RangeClient::close() breaks a
// thread blocked on a silent server at once instead of after its timeout; nothing here holds or
// needs the GIL.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "http/fetch_result.hpp"

namespace blob2gpu {

using Millis = std::chrono::milliseconds;

// How a transfer failed, for the reader to turn into its RangeResult. Internal to csrc/http/.
class TransportError : public std::exception {
 public:
  // at_proxy: it happened reaching the forward proxy or in its tunnel, not at the server.
  TransportError(FetchFailure kind, std::string detail, bool at_proxy = false)
      : kind_(kind), detail_(std::move(detail)), at_proxy_(at_proxy) {}
  FetchFailure kind() const { return kind_; }
  const std::string& detail() const { return detail_; }
  bool at_proxy() const { return at_proxy_; }
  const char* what() const noexcept override { return detail_.c_str(); }

 private:
  FetchFailure kind_;
  std::string detail_;
  bool at_proxy_;
};

// An eventfd that, once fired, wakes every wait that watches it, and every later one: a client's
// close() is for good.
class WakeSignal {
 public:
  WakeSignal();  // throws CoreError SourceUnavailable when no eventfd can be made
  ~WakeSignal();
  WakeSignal(const WakeSignal&) = delete;
  WakeSignal& operator=(const WakeSignal&) = delete;

  void fire() noexcept;
  bool fired() const noexcept;
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

class TcpSocket {
 public:
  // Resolves `host` and connects to the first of its addresses that accepts, all within
  // `timeout`; TCP_NODELAY is set (a request is one write). Throws TransportError: Dns,
  // ConnectRefused, ConnectTimeout, ConnectFailed or Cancelled. `role` names the peer in
  // messages ("the proxy", "the server").
  static TcpSocket connect(const std::string& host, uint16_t port, Millis timeout,
                           const WakeSignal& wake, const char* role);

  TcpSocket() = default;
  TcpSocket(TcpSocket&& other) noexcept;
  TcpSocket& operator=(TcpSocket&& other) noexcept;
  ~TcpSocket();
  TcpSocket(const TcpSocket&) = delete;
  TcpSocket& operator=(const TcpSocket&) = delete;

  int fd() const { return fd_; }

  // Waits until the socket is ready for `events` (POLLIN / POLLOUT), at most `timeout`. Throws
  // TransportError Timeout (naming `what` it waited for) or Cancelled.
  void wait(short events, Millis timeout, const WakeSignal& wake, const char* what) const;

  // Whether an idle kept-alive connection can carry another request: nothing to read (no early
  // bytes, no close or reset from the server). Never blocks.
  bool idle_and_open() const;

  // Plain-socket I/O (no TLS): up to `n` bytes, waiting at most `timeout` for each step. recv
  // returns 0 when the peer closed. Throw TransportError Reset, Timeout or Cancelled.
  size_t send_some(const void* data, size_t n, Millis timeout, const WakeSignal& wake) const;
  size_t recv_some(void* data, size_t n, Millis timeout, const WakeSignal& wake) const;

 private:
  explicit TcpSocket(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace blob2gpu
