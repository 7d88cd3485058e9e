// OpenSSL, loaded at run time for the native range reader's TLS (csrc/http/tls_context.*). This
// file and cuda_driver.cpp are the only places that call dlopen/dlsym: the rest of the core calls
// through the table returned by openssl().
//
// Why the process's own OpenSSL rather than one linked or bundled: a Python process that talks
// HTTPS already has libssl loaded (the interpreter's _ssl module links it), so the core uses that
// copy (dlopen with RTLD_NOLOAD first) and the manylinux wheel links and ships no crypto of its
// own: no second OpenSSL to patch when a CVE lands, the trust store the system's OpenSSL is set up
// with, and no OpenSSL headers at build time (csrc/shim/openssl_api.h declares what is used).
// When no libssl is loaded yet it loads libssl.so.3, else libssl.so.1.1 (1.1.1 is the oldest API
// the declarations match).
#pragma once

#include <string>

#include "shim/openssl_api.h"

namespace blob2gpu {

struct OpenSsl {
  std::string library;  // the soname that was loaded, e.g. "libssl.so.3"
  std::string version;  // OpenSSL_version(OPENSSL_VERSION), e.g. "OpenSSL 3.0.13 30 Jan 2024"
  bool already_loaded = false;  // the process had it loaded before the core asked (RTLD_NOLOAD)
  PFN_TLS_client_method TLS_client_method = nullptr;
  PFN_SSL_CTX_new SSL_CTX_new = nullptr;
  PFN_SSL_CTX_free SSL_CTX_free = nullptr;
  PFN_SSL_CTX_set_default_verify_paths SSL_CTX_set_default_verify_paths = nullptr;
  PFN_SSL_CTX_load_verify_locations SSL_CTX_load_verify_locations = nullptr;
  PFN_SSL_CTX_set_verify SSL_CTX_set_verify = nullptr;
  PFN_SSL_CTX_ctrl SSL_CTX_ctrl = nullptr;
  PFN_SSL_CTX_set_default_read_buffer_len SSL_CTX_set_default_read_buffer_len = nullptr;
  PFN_SSL_new SSL_new = nullptr;
  PFN_SSL_free SSL_free = nullptr;
  PFN_SSL_set_fd SSL_set_fd = nullptr;
  PFN_SSL_ctrl SSL_ctrl = nullptr;
  PFN_SSL_set1_host SSL_set1_host = nullptr;
  PFN_SSL_get0_param SSL_get0_param = nullptr;
  PFN_SSL_connect SSL_connect = nullptr;
  PFN_SSL_read SSL_read = nullptr;
  PFN_SSL_write SSL_write = nullptr;
  PFN_SSL_get_error SSL_get_error = nullptr;
  PFN_SSL_shutdown SSL_shutdown = nullptr;
  PFN_SSL_get_verify_result SSL_get_verify_result = nullptr;
  PFN_OpenSSL_version_num OpenSSL_version_num = nullptr;
  PFN_OpenSSL_version OpenSSL_version = nullptr;
  PFN_ERR_get_error ERR_get_error = nullptr;
  PFN_ERR_error_string_n ERR_error_string_n = nullptr;
  PFN_ERR_clear_error ERR_clear_error = nullptr;
  PFN_X509_verify_cert_error_string X509_verify_cert_error_string = nullptr;
  PFN_X509_VERIFY_PARAM_set1_ip_asc X509_VERIFY_PARAM_set1_ip_asc = nullptr;
  PFN_X509_VERIFY_PARAM_set_hostflags X509_VERIFY_PARAM_set_hostflags = nullptr;
};

// Loads OpenSSL once per process (thread-safe) and returns its table. Throws CoreError
// SourceUnavailable naming what was tried and why it failed.
const OpenSsl& openssl();

// What OpenSSL's error queue of the calling thread says, in one line (the last error), and the
// queue emptied: a failed call must leave nothing for the next user of the thread's queue (the
// interpreter's own ssl module reads the same queue). Empty when the queue was empty.
std::string take_openssl_errors(const OpenSsl& ssl);

}  // namespace blob2gpu
