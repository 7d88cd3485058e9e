#include "shim/openssl.hpp"

#include <dlfcn.h>

#include <mutex>

#include "errors.hpp"

namespace blob2gpu {
namespace {

std::once_flag g_load_once;
OpenSsl g_ssl;
std::string g_load_error;  // empty when loaded
bool g_loaded = false;

// The ABIs whose declarations openssl_api.h matches, newest first.
constexpr const char* kSonames[] = {"libssl.so.3", "libssl.so.1.1"};
constexpr unsigned long kOldestVersion = 0x10101000UL;  // 1.1.1

template <typename Fn>
bool resolve(void* lib, const char* symbol, Fn* slot, std::string* missing) {
  *slot = reinterpret_cast<Fn>(dlsym(lib, symbol));
  if (*slot == nullptr) {
    *missing = symbol;
    return false;
  }
  return true;
}

// The process's copy when it has one (the interpreter's _ssl loaded it), else a fresh load.
void* open_libssl(std::string* soname, bool* already_loaded, std::string* why) {
  for (const char* name : kSonames) {
    if (void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)) {
      *soname = name;
      *already_loaded = true;
      return lib;
    }
  }
  for (const char* name : kSonames) {
    if (void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL)) {
      *soname = name;
      *already_loaded = false;
      return lib;
    }
    const char* error = dlerror();
    *why += std::string(why->empty() ? "" : "; ") + (error ? error : name);
  }
  return nullptr;
}

void load_openssl() {
  std::string soname, why;
  bool already = false;
  // Never dlclose'd: connections and contexts may live until the process exits.
  void* lib = open_libssl(&soname, &already, &why);
  if (lib == nullptr) {
    g_load_error = "HTTPS needs OpenSSL 1.1.1 or 3.x and none could be loaded (" + why +
                   "); install the system's OpenSSL (libssl3)";
    return;
  }
  OpenSsl s;
  s.library = soname;
  s.already_loaded = already;
  std::string missing;
  bool ok =
      resolve(lib, "TLS_client_method", &s.TLS_client_method, &missing) &&
      resolve(lib, "SSL_CTX_new", &s.SSL_CTX_new, &missing) &&
      resolve(lib, "SSL_CTX_free", &s.SSL_CTX_free, &missing) &&
      resolve(lib, "SSL_CTX_set_default_verify_paths", &s.SSL_CTX_set_default_verify_paths,
              &missing) &&
      resolve(lib, "SSL_CTX_load_verify_locations", &s.SSL_CTX_load_verify_locations, &missing) &&
      resolve(lib, "SSL_CTX_set_verify", &s.SSL_CTX_set_verify, &missing) &&
      resolve(lib, "SSL_CTX_ctrl", &s.SSL_CTX_ctrl, &missing) &&
      resolve(lib, "SSL_CTX_set_default_read_buffer_len", &s.SSL_CTX_set_default_read_buffer_len,
              &missing) &&
      resolve(lib, "SSL_new", &s.SSL_new, &missing) &&
      resolve(lib, "SSL_free", &s.SSL_free, &missing) &&
      resolve(lib, "SSL_set_fd", &s.SSL_set_fd, &missing) &&
      resolve(lib, "SSL_ctrl", &s.SSL_ctrl, &missing) &&
      resolve(lib, "SSL_set1_host", &s.SSL_set1_host, &missing) &&
      resolve(lib, "SSL_get0_param", &s.SSL_get0_param, &missing) &&
      resolve(lib, "SSL_connect", &s.SSL_connect, &missing) &&
      resolve(lib, "SSL_read", &s.SSL_read, &missing) &&
      resolve(lib, "SSL_write", &s.SSL_write, &missing) &&
      resolve(lib, "SSL_get_error", &s.SSL_get_error, &missing) &&
      resolve(lib, "SSL_shutdown", &s.SSL_shutdown, &missing) &&
      resolve(lib, "SSL_get_verify_result", &s.SSL_get_verify_result, &missing) &&
      // libcrypto's, found through libssl's handle (dlsym searches its dependencies).
      resolve(lib, "OpenSSL_version_num", &s.OpenSSL_version_num, &missing) &&
      resolve(lib, "OpenSSL_version", &s.OpenSSL_version, &missing) &&
      resolve(lib, "ERR_get_error", &s.ERR_get_error, &missing) &&
      resolve(lib, "ERR_error_string_n", &s.ERR_error_string_n, &missing) &&
      resolve(lib, "ERR_clear_error", &s.ERR_clear_error, &missing) &&
      resolve(lib, "X509_verify_cert_error_string", &s.X509_verify_cert_error_string, &missing) &&
      resolve(lib, "X509_VERIFY_PARAM_set1_ip_asc", &s.X509_VERIFY_PARAM_set1_ip_asc, &missing) &&
      resolve(lib, "X509_VERIFY_PARAM_set_hostflags", &s.X509_VERIFY_PARAM_set_hostflags, &missing);
  if (!ok) {
    g_load_error = "the OpenSSL library " + soname + " lacks " + missing +
                   " (blob2gpu's HTTPS needs OpenSSL 1.1.1 or newer)";
    return;
  }
  if (s.OpenSSL_version_num() < kOldestVersion) {
    g_load_error = "the OpenSSL library " + soname + " is too old (" + s.OpenSSL_version(0) +
                   "); blob2gpu's HTTPS needs OpenSSL 1.1.1 or newer";
    return;
  }
  s.version = s.OpenSSL_version(0);
  g_ssl = s;
  g_loaded = true;
}

}  // namespace

const OpenSsl& openssl() {
  std::call_once(g_load_once, load_openssl);
  if (!g_loaded) throw CoreError(ErrorKind::SourceUnavailable, g_load_error);
  return g_ssl;
}

std::string take_openssl_errors(const OpenSsl& ssl) {
  std::string last;
  while (unsigned long code = ssl.ERR_get_error()) {
    char text[256] = {0};
    ssl.ERR_error_string_n(code, text, sizeof(text));
    last = text;
  }
  return last;
}

}  // namespace blob2gpu
