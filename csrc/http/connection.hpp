// Connection: one HTTP/1.1 connection of the native range reader to its endpoint, owned by one
// request at a time (the RangeClient's pool holds the idle ones). It owns its socket and, over
// HTTPS, its TLS session; reaching the endpoint through a forward proxy is decided by the caller
// (Python reads HTTPS_PROXY / NO_PROXY) and done here: a CONNECT tunnel for HTTPS, the proxy itself
// for plain HTTP (whose requests then name the absolute URL). Bytes move between the socket (or
// SSL_read / SSL_write) and the caller's memory directly; every wait is bounded by a timeout and
// broken by the client's WakeSignal.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "http/tcp_socket.hpp"
#include "http/tls_context.hpp"

namespace blob2gpu {

// Where connections go, and how long each step may wait.
struct ConnectTarget {
  std::string host;  // the endpoint (a name, or an IP literal without brackets)
  uint16_t port = 0;
  bool tls = false;
  std::string proxy_host;  // empty: direct
  uint16_t proxy_port = 0;
  std::string proxy_authorization;  // the Proxy-Authorization value, or empty
  Millis connect_timeout{20'000};   // TCP connect, each of proxy and endpoint
  Millis read_timeout{60'000};      // any other wait: proxy answer, TLS handshake, each read
};

class Connection {
 public:
  // Connects: DNS and TCP (to the proxy when there is one), the CONNECT tunnel for HTTPS through
  // a proxy, the TLS handshake. Throws TransportError (Dns, ConnectRefused, ConnectTimeout,
  // ConnectFailed, ProxyRefused with the proxy's status in *proxy_status, TlsVerify,
  // TlsHandshake, Timeout, Reset, Malformed, Cancelled); `tls` is null for plain HTTP.
  static std::unique_ptr<Connection> open(const ConnectTarget& target, const TlsContext* tls,
                                          const WakeSignal& wake, int* proxy_status);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Sends all of data[0, n). Throws TransportError Reset, Timeout or Cancelled.
  void send_all(const char* data, size_t n);

  // Reads up to `n` bytes into `dst` (at least one, waiting up to the read timeout); 0 when the
  // server closed the connection. Throws TransportError Reset, Timeout or Cancelled.
  size_t recv_some(void* dst, size_t n);

  // Whether an idle connection can carry another request (see TcpSocket::idle_and_open).
  bool idle_and_open() const { return socket_.idle_and_open(); }

  // A connection whose exchange broke: no close_notify is sent when it is dropped.
  void mark_broken() { broken_ = true; }

 private:
  Connection(TcpSocket socket, const WakeSignal& wake, Millis read_timeout)
      : socket_(std::move(socket)), wake_(wake), read_timeout_(read_timeout) {}
  void tunnel(const ConnectTarget& target, int* proxy_status);
  void handshake(const TlsContext& tls, const std::string& host);
  enum class SslStep { Retry, Closed, Failed };
  // After `ret` from an SSL call: waits as OpenSSL asked and says Retry, or says the server
  // Closed the connection (with or without close_notify) or the call Failed (*error says why).
  SslStep wait_for_ssl(int ret, const char* what, std::string* error);

  TcpSocket socket_;
  SslHandle ssl_;
  const OpenSsl* api_ = nullptr;  // set with ssl_
  const WakeSignal& wake_;
  Millis read_timeout_;
  bool broken_ = false;
};

}  // namespace blob2gpu
