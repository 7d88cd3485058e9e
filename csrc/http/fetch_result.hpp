// What one ranged GET of the native range reader came to, for the Python control plane: the
// answer's status and headers, how many body bytes landed, its timings, and a typed failure kind,
// so the retry, throttle and error policy (python/blob2gpu/sources/azure/) classifies by field,
// never by message. Plain data: owned by the caller, no resources.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace blob2gpu {

// Why a request got no whole answer. None: the server answered (read `status`; for 2xx, every
// body byte landed and matched the request).
enum class FetchFailure : uint8_t {
  None,
  Cancelled,       // RangeClient::close() broke it, or the client was closed before
  Dns,             // the host (or proxy) name does not resolve
  ConnectRefused,  // nothing listens at the address (origin, or proxy)
  ConnectTimeout,  // no TCP connection within the connect timeout
  ConnectFailed,   // another connect error (network or host unreachable, ...)
  ProxyRefused,    // the proxy answered CONNECT with a status other than 2xx (`status`: 407, ...)
  TlsVerify,       // the server's certificate is not trusted, or not for this host
  TlsHandshake,    // the TLS handshake failed for another reason (protocol, cipher, reset)
  Timeout,         // no byte within the read timeout, once connected
  Reset,           // the connection broke or closed before the answer was whole
  Malformed,       // the answer is not valid HTTP/1.1, or breaks the reader's size caps
  RangeMismatch,   // a 2xx whose Content-Length / Content-Range is not the range asked for
};

const char* fetch_failure_name(FetchFailure failure);

using HeaderList = std::vector<std::pair<std::string, std::string>>;

struct RangeResult {
  FetchFailure failure = FetchFailure::None;
  std::string detail;     // for people: what went wrong (never the request's target or headers)
  int status = 0;         // the answer's HTTP status (the proxy's for ProxyRefused); 0 when none
  bool at_proxy = false;  // the failure happened reaching the forward proxy or in its tunnel
  std::string reason;     // its reason phrase (Azure puts its error message there)
  HeaderList headers;     // names lower-cased, in the order received
  uint64_t bytes_received = 0;  // body bytes written into the destination
  int64_t content_length = -1;  // the answer's Content-Length; -1 when it had none
  int64_t total_size = -1;      // the resource's size (Content-Range's "/total"); -1 when unknown
  std::string error_body;       // the first bytes of a non-2xx answer's body (raw: may quote the
                                // request, so redact before showing it)
  bool reused_connection = false;  // sent on a kept-alive connection
  int64_t connect_ns = 0;          // getting a connection (DNS, TCP, proxy, TLS); ~0 when reused
  int64_t first_byte_ns = 0;       // request sent to the answer's first byte
  int64_t total_ns = 0;            // the whole call

  // The first header named `name` (ASCII case-insensitive), or null.
  const std::string* header(std::string_view name) const;
};

}  // namespace blob2gpu
