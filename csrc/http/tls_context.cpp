#include "http/tls_context.hpp"

#include <arpa/inet.h>

#include "errors.hpp"

namespace blob2gpu {
namespace {

constexpr size_t kTlsReadBufferBytes = 256 * 1024;

bool is_ip_literal(const std::string& host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

}  // namespace

TlsContext::TlsContext(const std::string& ca_file) : ssl_(openssl()) {
  ssl_.ERR_clear_error();
  ctx_ = ssl_.SSL_CTX_new(ssl_.TLS_client_method());
  if (ctx_ == nullptr) {
    throw CoreError(ErrorKind::SourceUnavailable,
                    "OpenSSL could not make a TLS context: " + take_openssl_errors(ssl_));
  }
  ssl_.SSL_CTX_set_verify(ctx_, BLOB2GPU_SSL_VERIFY_PEER, nullptr);
  ssl_.SSL_CTX_ctrl(ctx_, BLOB2GPU_SSL_CTRL_SET_MIN_PROTO_VERSION, BLOB2GPU_TLS1_2_VERSION,
                    nullptr);
  ssl_.SSL_CTX_ctrl(ctx_, BLOB2GPU_SSL_CTRL_MODE, BLOB2GPU_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER,
                    nullptr);
  // Read ahead into a buffer of many records: one read() from the socket brings several 16 KiB
  // records, where OpenSSL's default reads each record's header and body with a call each.
  ssl_.SSL_CTX_ctrl(ctx_, BLOB2GPU_SSL_CTRL_SET_READ_AHEAD, 1, nullptr);
  ssl_.SSL_CTX_set_default_read_buffer_len(ctx_, kTlsReadBufferBytes);
  int loaded = ca_file.empty() ? ssl_.SSL_CTX_set_default_verify_paths(ctx_)
                               : ssl_.SSL_CTX_load_verify_locations(ctx_, ca_file.c_str(), nullptr);
  if (loaded != 1) {
    std::string why = take_openssl_errors(ssl_);
    ssl_.SSL_CTX_free(ctx_);
    ctx_ = nullptr;
    if (ca_file.empty()) {
      throw CoreError(ErrorKind::SourceUnavailable,
                      "OpenSSL could not load its default certificate locations: " + why)
          .with_hint("point REQUESTS_CA_BUNDLE at a PEM file of CA certificates");
    }
    throw CoreError(ErrorKind::SourceUnavailable,
                    "cannot read the CA bundle '" + ca_file + "' (" + why + ")")
        .with_hint("point REQUESTS_CA_BUNDLE at a PEM file of CA certificates");
  }
}

TlsContext::~TlsContext() {
  if (ctx_ != nullptr) ssl_.SSL_CTX_free(ctx_);
}

SslHandle TlsContext::new_session(int fd, const std::string& host) const {
  ssl_.ERR_clear_error();
  SslHandle ssl(ssl_.SSL_new(ctx_), SslFree{ssl_.SSL_free});
  if (!ssl) {
    throw CoreError(ErrorKind::SourceUnavailable,
                    "OpenSSL could not make a TLS session: " + take_openssl_errors(ssl_));
  }
  X509_VERIFY_PARAM* param = ssl_.SSL_get0_param(ssl.get());
  bool ok = ssl_.SSL_set_fd(ssl.get(), fd) == 1;
  if (is_ip_literal(host)) {
    // No SNI for an address (RFC 6066); the certificate must list it as an IP address.
    ok = ok && ssl_.X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str()) == 1;
  } else {
    ssl_.X509_VERIFY_PARAM_set_hostflags(param, BLOB2GPU_X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    ok = ok && ssl_.SSL_set1_host(ssl.get(), host.c_str()) == 1 &&
         ssl_.SSL_ctrl(ssl.get(), BLOB2GPU_SSL_CTRL_SET_TLSEXT_HOSTNAME,
                       BLOB2GPU_TLSEXT_NAMETYPE_host_name, const_cast<char*>(host.c_str())) == 1;
  }
  if (!ok) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "cannot set up TLS for host '" + host + "': " + take_openssl_errors(ssl_));
  }
  return ssl;
}

}  // namespace blob2gpu
