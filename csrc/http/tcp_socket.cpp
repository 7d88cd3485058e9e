#include "http/tcp_socket.hpp"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "errors.hpp"

namespace blob2gpu {
namespace {

using Clock = std::chrono::steady_clock;

std::string errno_text(int err) {
  return std::strerror(err);
}

int poll_timeout_ms(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return left > 1'000'000'000 ? 1'000'000'000 : static_cast<int>(left);
}

// 1: `fd` is ready; 0: the deadline passed. Throws Cancelled once `wake` fired.
int wait_until(int fd, short events, Clock::time_point deadline, const WakeSignal& wake) {
  for (;;) {
    if (wake.fired()) throw TransportError(FetchFailure::Cancelled, "the client was closed");
    pollfd fds[2] = {{fd, events, 0}, {wake.fd(), POLLIN, 0}};
    int n = ::poll(fds, 2, poll_timeout_ms(deadline));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw TransportError(FetchFailure::Reset, "poll failed: " + errno_text(errno));
    }
    if (fds[1].revents != 0) throw TransportError(FetchFailure::Cancelled, "the client was closed");
    if (fds[0].revents != 0) return 1;  // ready, or an error the next call reports
    if (n == 0 && Clock::now() >= deadline) return 0;
  }
}

struct AddrInfoDeleter {
  void operator()(addrinfo* info) const { freeaddrinfo(info); }
};

FetchFailure connect_failure(int err) {
  if (err == ECONNREFUSED) return FetchFailure::ConnectRefused;
  if (err == ETIMEDOUT) return FetchFailure::ConnectTimeout;
  return FetchFailure::ConnectFailed;
}

}  // namespace

WakeSignal::WakeSignal() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (fd_ < 0) {
    throw CoreError(ErrorKind::SourceUnavailable, "cannot make an eventfd: " + errno_text(errno));
  }
}

WakeSignal::~WakeSignal() {
  if (fd_ >= 0) ::close(fd_);
}

void WakeSignal::fire() noexcept {
  uint64_t one = 1;
  // The counter only grows: it stays readable, so every later poll wakes too.
  [[maybe_unused]] ssize_t n = ::write(fd_, &one, sizeof(one));
}

bool WakeSignal::fired() const noexcept {
  pollfd p = {fd_, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

TcpSocket::TcpSocket(TcpSocket&& other) noexcept : fd_(other.fd_) {
  other.fd_ = -1;
}

TcpSocket& TcpSocket::operator=(TcpSocket&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

TcpSocket::~TcpSocket() {
  if (fd_ >= 0) ::close(fd_);
}

TcpSocket TcpSocket::connect(const std::string& host, uint16_t port, Millis timeout,
                             const WakeSignal& wake, const char* role) {
  if (wake.fired()) throw TransportError(FetchFailure::Cancelled, "the client was closed");
  Clock::time_point deadline = Clock::now() + timeout;
  std::string where = host + ":" + std::to_string(port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | AI_ADDRCONFIG;
  addrinfo* found = nullptr;
  std::string service = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found);
  std::unique_ptr<addrinfo, AddrInfoDeleter> addresses(found);
  if (rc != 0) {
    std::string why = rc == EAI_SYSTEM ? errno_text(errno) : gai_strerror(rc);
    throw TransportError(FetchFailure::Dns,
                         std::string(role) + " name '" + host + "' does not resolve (" + why + ")");
  }
  FetchFailure failure = FetchFailure::ConnectFailed;
  std::string why = "no address";
  for (addrinfo* a = addresses.get(); a != nullptr; a = a->ai_next) {
    TcpSocket s(
        ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
    if (s.fd_ < 0) {
      why = errno_text(errno);
      continue;
    }
    int err = 0;
    if (::connect(s.fd_, a->ai_addr, a->ai_addrlen) != 0) {
      err = errno;
      if (err == EINPROGRESS) {
        if (wait_until(s.fd_, POLLOUT, deadline, wake) == 0) {
          failure = FetchFailure::ConnectTimeout;
          why = "no answer within " + std::to_string(timeout.count()) + " ms";
          break;  // the deadline covers every address
        }
        socklen_t len = sizeof(err);
        if (::getsockopt(s.fd_, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      }
    }
    if (err == 0) {
      int one = 1;
      ::setsockopt(s.fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      return s;
    }
    failure = connect_failure(err);
    why = errno_text(err);
  }
  throw TransportError(
      failure, "cannot connect to " + std::string(role) + " at " + where + " (" + why + ")");
}

void TcpSocket::wait(short events, Millis timeout, const WakeSignal& wake, const char* what) const {
  if (wait_until(fd_, events, Clock::now() + timeout, wake) == 0) {
    throw TransportError(FetchFailure::Timeout, std::string("no ") + what + " within " +
                                                    std::to_string(timeout.count()) + " ms");
  }
}

bool TcpSocket::idle_and_open() const {
  pollfd p = {fd_, POLLIN, 0};
  int n = ::poll(&p, 1, 0);
  return n == 0;  // readable means early bytes, a close or a reset: none is a reusable state
}

size_t TcpSocket::send_some(const void* data, size_t n, Millis timeout,
                            const WakeSignal& wake) const {
  for (;;) {
    ssize_t sent = ::send(fd_, data, n, MSG_NOSIGNAL);
    if (sent >= 0) return static_cast<size_t>(sent);
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      throw TransportError(FetchFailure::Reset, "sending the request failed: " + errno_text(errno));
    }
    wait(POLLOUT, timeout, wake, "room to send the request");
  }
}

size_t TcpSocket::recv_some(void* data, size_t n, Millis timeout, const WakeSignal& wake) const {
  for (;;) {
    ssize_t got = ::recv(fd_, data, n, 0);
    if (got >= 0) return static_cast<size_t>(got);
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      throw TransportError(FetchFailure::Reset, "the connection broke: " + errno_text(errno));
    }
    wait(POLLIN, timeout, wake, "bytes from the server");
  }
}

}  // namespace blob2gpu
