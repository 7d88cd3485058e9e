// TlsContext: the TLS client configuration of one RangeClient (an OpenSSL SSL_CTX, freed by its
// destructor) and the sessions it makes over connected sockets. Verification is always on: the
// server's chain must lead to a trusted CA (OpenSSL's default verify paths, which honour
// SSL_CERT_FILE and SSL_CERT_DIR, or the one bundle the caller names, as REQUESTS_CA_BUNDLE
// replaces the defaults for requests), and the certificate must be for the host (or IP address)
// that was asked for; SNI names the host. TLS 1.2 or newer. No crypto of the project's own: every
// step is OpenSSL's, through csrc/shim/openssl.hpp.
#pragma once

#include <memory>
#include <string>

#include "shim/openssl.hpp"

namespace blob2gpu {

struct SslFree {
  PFN_SSL_free free_fn = nullptr;
  void operator()(SSL* ssl) const {
    if (ssl != nullptr) free_fn(ssl);
  }
};
using SslHandle = std::unique_ptr<SSL, SslFree>;

class TlsContext {
 public:
  // ca_file: a PEM bundle to trust instead of the default verify paths; empty: the defaults.
  // Throws CoreError SourceUnavailable when OpenSSL cannot be loaded or the bundle not read.
  explicit TlsContext(const std::string& ca_file);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  // A client session over the connected socket `fd`, to verify as `host` (a name, or an IPv4 /
  // IPv6 literal, which gets no SNI and is checked against the certificate's IP addresses). The
  // handshake is the caller's (SSL_connect on a non-blocking socket).
  SslHandle new_session(int fd, const std::string& host) const;

  const OpenSsl& api() const { return ssl_; }

 private:
  const OpenSsl& ssl_;
  SSL_CTX* ctx_ = nullptr;
};

}  // namespace blob2gpu
