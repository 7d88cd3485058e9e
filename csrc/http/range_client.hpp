// RangeClient: the core's HTTP/1.1 range reader. One client per endpoint (scheme, host, port, trust
// and proxy settings); any number of threads call get_into() at once, each on a connection of its
// own from a small keep-alive pool the client owns. A call sends one GET whose target and headers
// the caller made (Python signs: x-ms-date, x-ms-version, the range, If-Match, Authorization),
// reads the answer's head strictly (csrc/http/response_head.*) and the body straight into the
// caller's memory (a staging slot, or the cpu arena), and reports what happened as a RangeResult.
// Python decides, C++ moves: no retry, throttle or error policy lives here, only one thing, a
// connection that a kept-alive server had closed while it idled is replaced once, since no byte
// of that answer arrived and a GET may be sent again.
//
// Why a narrow reader over the process's OpenSSL, not libcurl (as KvikIO does) or a bundled TLS:
// a range GET needs a small part of HTTP/1.1 (no redirects, cookies, compression, and chunked
// bodies only for error answers and listings), which is a few hundred lines that read the body with
// recv / SSL_read directly into the destination (libcurl hands bodies to a write callback: one more
// copy, and libcurl is no manylinux dependency); and TLS comes from the OpenSSL the interpreter
// already loaded (see csrc/shim/openssl.hpp), so the wheel links and ships no crypto.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "http/connection.hpp"
#include "http/fetch_result.hpp"
#include "http/tcp_socket.hpp"
#include "http/tls_context.hpp"

namespace blob2gpu {

// The body bytes of an error answer kept in RangeResult::error_body, and the most read to keep
// its connection (a longer error body, or one without a length, closes the connection instead).
constexpr size_t kErrorBodyBytes = 4096;
constexpr size_t kMaxDrainedErrorBytes = 64 * 1024;

class RangeClient {
 public:
  // ca_file: for HTTPS, a PEM bundle trusted instead of OpenSSL's defaults (empty: defaults);
  // pool_size: idle connections kept for reuse. Throws CoreError InvalidArgument for a bad
  // endpoint, SourceUnavailable when HTTPS is asked for and OpenSSL or the bundle cannot be
  // loaded.
  RangeClient(ConnectTarget target, const std::string& ca_file, size_t pool_size);
  ~RangeClient();
  RangeClient(const RangeClient&) = delete;
  RangeClient& operator=(const RangeClient&) = delete;

  // GET `target` (the path and query, e.g. "/account/container/blob?sv=...") with `headers`,
  // writing the body into dst[0, length). first_byte: the resource offset the request's range
  // starts at, checked against the answer's Content-Range (nullopt: no range, only the length is
  // checked). Blocks the calling thread, never more than the timeouts per step. Throws CoreError
  // InvalidArgument for a target or header that cannot be sent (a control character, a header
  // the client owns: Host, Connection, Content-Length, Transfer-Encoding, Proxy-Authorization);
  // every other outcome is in the RangeResult.
  RangeResult get_into(const std::string& target, const HeaderList& headers, uint8_t* dst,
                       size_t length, std::optional<uint64_t> first_byte);

  // GET `target` with `headers` for a small document (a container's listing: XML the control
  // plane parses), its 2xx body, framed by Content-Length or chunked and at most max_bytes, read
  // into *document (left empty for any other outcome; a longer body is Malformed). Blocks and
  // throws as get_into() does.
  RangeResult get_document(const std::string& target, const HeaderList& headers, size_t max_bytes,
                           std::string* document);

  // Breaks every request in flight (each returns Cancelled at once) and closes the idle
  // connections; later requests return Cancelled too. Safe from any thread, more than once.
  void close();

  const ConnectTarget& target() const { return target_; }
  uint64_t connections_opened() const { return connections_opened_.load(); }
  uint64_t requests() const { return requests_.load(); }
  size_t idle_connections() const;
  // "OpenSSL 3.0.13 30 Jan 2024 (libssl.so.3, the process's copy)"; empty for plain HTTP.
  std::string tls_library() const;

 private:
  // An idle kept-alive connection (*reused = true) unless `fresh`, else a new one.
  std::unique_ptr<Connection> checkout(bool fresh, bool* reused, int* proxy_status);
  void checkin(std::unique_ptr<Connection> connection);
  std::string request_head(const std::string& target, const HeaderList& headers) const;
  // Where a 2xx answer's body goes: dst[0, length) for a range (checked against first_byte), or
  // *document (at most document_max bytes) when document is set.
  struct Body {
    uint8_t* dst;
    size_t length;
    std::optional<uint64_t> first_byte;
    std::string* document;
    size_t document_max;
  };
  // Sends `head` on a connection (a kept-alive one replaced once, as get_into() says) and reads
  // the answer; every outcome is in the result.
  RangeResult send(const std::string& head, const Body& body);
  // One request and its answer on `connection`; returns whether the connection may be kept.
  // Fills *result as it goes; *answered once a byte of the answer arrived. Throws
  // TransportError.
  bool exchange(Connection& connection, const std::string& head, const Body& body,
                RangeResult* result, bool* answered);

  ConnectTarget target_;
  std::unique_ptr<TlsContext> tls_;  // null for plain HTTP
  WakeSignal wake_;                  // declared before the pool: connections wait on it
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<Connection>> idle_;
  size_t pool_size_;
  std::atomic<uint64_t> connections_opened_{0};
  std::atomic<uint64_t> requests_{0};
};

}  // namespace blob2gpu
