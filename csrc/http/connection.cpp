#include "http/connection.hpp"

#include <poll.h>
#include <signal.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <vector>

#include "http/response_head.hpp"

namespace blob2gpu {
namespace {

// OpenSSL writes to its socket with write(), which raises SIGPIPE when the server has gone. The
// interpreter ignores SIGPIPE, but a process that embeds Python may not: block it on this thread
// for the write, and swallow one it raised, the way libraries that must not touch the process's
// signal handlers do.
class SigpipeBlock {
 public:
  SigpipeBlock() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    blocked_ = pthread_sigmask(SIG_BLOCK, &pipe_, &old_) == 0;
  }
  ~SigpipeBlock() {
    if (!blocked_) return;
    sigset_t pending;
    if (!was_pending_ && sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1) {
      timespec zero = {0, 0};
      while (sigtimedwait(&pipe_, nullptr, &zero) == -1 && errno == EINTR) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t pipe_{};
  sigset_t old_{};
  bool was_pending_ = false;
  bool blocked_ = false;
};

std::string authority(const std::string& host, uint16_t port) {
  bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

int clamp_int(size_t n) {
  return n > (1u << 30) ? (1 << 30) : static_cast<int>(n);
}

}  // namespace

std::unique_ptr<Connection> Connection::open(const ConnectTarget& target, const TlsContext* tls,
                                             const WakeSignal& wake, int* proxy_status) {
  if (target.proxy_host.empty()) {
    TcpSocket socket =
        TcpSocket::connect(target.host, target.port, target.connect_timeout, wake, "the server");
    std::unique_ptr<Connection> c(new Connection(std::move(socket), wake, target.read_timeout));
    if (target.tls) c->handshake(*tls, target.host);
    return c;
  }
  std::unique_ptr<Connection> c;
  try {
    TcpSocket socket = TcpSocket::connect(target.proxy_host, target.proxy_port,
                                          target.connect_timeout, wake, "the proxy");
    c.reset(new Connection(std::move(socket), wake, target.read_timeout));
    if (target.tls) c->tunnel(target, proxy_status);
  } catch (const TransportError& e) {
    if (e.kind() == FetchFailure::Cancelled) throw;
    throw TransportError(e.kind(), e.detail(), /*at_proxy=*/true);
  }
  if (target.tls) c->handshake(*tls, target.host);
  return c;
}

Connection::~Connection() {
  if (ssl_ && !broken_) {
    // close_notify, once, without waiting for the server's: the socket closes right after.
    SigpipeBlock quiet;
    api_->ERR_clear_error();
    api_->SSL_shutdown(ssl_.get());
    api_->ERR_clear_error();
  }
}

void Connection::tunnel(const ConnectTarget& target, int* proxy_status) {
  std::string to = authority(target.host, target.port);
  std::string request = "CONNECT " + to + " HTTP/1.1\r\nHost: " + to + "\r\n";
  if (!target.proxy_authorization.empty()) {
    request += "Proxy-Authorization: " + target.proxy_authorization + "\r\n";
  }
  request += "\r\n";
  send_all(request.data(), request.size());

  std::string where = "the proxy " + authority(target.proxy_host, target.proxy_port);
  std::vector<char> buffer(4096);
  size_t have = 0;
  for (;;) {
    if (have == buffer.size()) buffer.resize(std::min(buffer.size() * 2, kMaxResponseHeadBytes));
    size_t got = have < buffer.size() ? recv_some(buffer.data() + have, buffer.size() - have) : 0;
    if (got == 0 && have < buffer.size()) {
      throw TransportError(FetchFailure::Reset, where +
                                                    " closed the connection before it "
                                                    "answered CONNECT");
    }
    size_t scanned = have;
    have += got;
    ResponseHead head;
    HeadOutcome outcome = parse_response_head(buffer.data(), have, &head, scanned);
    if (outcome.state == HeadState::Incomplete) continue;
    if (outcome.state == HeadState::Malformed) {
      throw TransportError(FetchFailure::Malformed,
                           where + " answered CONNECT with a malformed head: " + outcome.problem);
    }
    if (head.status < 200 || head.status > 299) {
      *proxy_status = head.status;
      throw TransportError(FetchFailure::ProxyRefused, where + " refused the tunnel to " + to +
                                                           ": HTTP " + std::to_string(head.status) +
                                                           " " + head.reason);
    }
    if (outcome.head_bytes != have) {
      // The server speaks only after the ClientHello: anything more is the proxy's mistake.
      throw TransportError(FetchFailure::Malformed,
                           where + " sent bytes after its answer to CONNECT");
    }
    return;
  }
}

Connection::SslStep Connection::wait_for_ssl(int ret, const char* what, std::string* error) {
  int saved_errno = errno;
  int e = api_->SSL_get_error(ssl_.get(), ret);
  if (e == BLOB2GPU_SSL_ERROR_WANT_READ) {
    socket_.wait(POLLIN, read_timeout_, wake_, what);
    return SslStep::Retry;
  }
  if (e == BLOB2GPU_SSL_ERROR_WANT_WRITE) {
    socket_.wait(POLLOUT, read_timeout_, wake_, what);
    return SslStep::Retry;
  }
  std::string queued = take_openssl_errors(*api_);
  if (e == BLOB2GPU_SSL_ERROR_ZERO_RETURN) {
    *error = "the server closed the TLS session";
    return SslStep::Closed;
  }
  if (e == BLOB2GPU_SSL_ERROR_SYSCALL && queued.empty()) {
    if (ret == 0 || saved_errno == 0) {
      *error = "the server closed the connection";
      return SslStep::Closed;
    }
    *error = std::strerror(saved_errno);
    return SslStep::Failed;
  }
  *error = queued.empty() ? "TLS error " + std::to_string(e) : queued;
  return SslStep::Failed;
}

void Connection::handshake(const TlsContext& tls, const std::string& host) {
  api_ = &tls.api();
  ssl_ = tls.new_session(socket_.fd(), host);
  for (;;) {
    api_->ERR_clear_error();
    int ret;
    {
      SigpipeBlock quiet;
      ret = api_->SSL_connect(ssl_.get());
    }
    if (ret == 1) return;
    std::string error;
    if (wait_for_ssl(ret, "answer to the TLS handshake", &error) == SslStep::Retry) continue;
    broken_ = true;
    long verify = api_->SSL_get_verify_result(ssl_.get());
    if (verify != BLOB2GPU_X509_V_OK) {
      // What Python's ssl module calls the verify message: the caller knows the host.
      throw TransportError(
          FetchFailure::TlsVerify,
          std::string("certificate verify failed: ") + api_->X509_verify_cert_error_string(verify));
    }
    throw TransportError(FetchFailure::TlsHandshake,
                         "the TLS handshake with '" + host + "' failed: " + error);
  }
}

void Connection::send_all(const char* data, size_t n) {
  while (n > 0) {
    size_t sent = 0;
    if (!ssl_) {
      sent = socket_.send_some(data, n, read_timeout_, wake_);
    } else {
      api_->ERR_clear_error();
      int ret;
      {
        SigpipeBlock quiet;
        ret = api_->SSL_write(ssl_.get(), data, clamp_int(n));
      }
      if (ret <= 0) {
        std::string error;
        if (wait_for_ssl(ret, "room to send the request", &error) == SslStep::Retry) continue;
        broken_ = true;
        throw TransportError(FetchFailure::Reset, "sending the request failed: " + error);
      }
      sent = static_cast<size_t>(ret);
    }
    data += sent;
    n -= sent;
  }
}

size_t Connection::recv_some(void* dst, size_t n) {
  if (!ssl_) return socket_.recv_some(dst, n, read_timeout_, wake_);
  for (;;) {
    api_->ERR_clear_error();
    int ret = api_->SSL_read(ssl_.get(), dst, clamp_int(n));
    if (ret > 0) return static_cast<size_t>(ret);
    std::string error;
    SslStep step = wait_for_ssl(ret, "bytes from the server", &error);
    if (step == SslStep::Retry) continue;
    broken_ = true;
    // A close (with or without close_notify) is an end the caller judges; the rest broke.
    if (step == SslStep::Closed) return 0;
    throw TransportError(FetchFailure::Reset, "the TLS connection broke: " + error);
  }
}

}  // namespace blob2gpu
