/* The few OpenSSL declarations the native range reader uses, written from OpenSSL's manual pages
 * so that building needs no OpenSSL headers (and the wheel links no OpenSSL): the library is
 * loaded at run time by csrc/shim/openssl.cpp. Every type is opaque; the macros the headers define
 * over SSL_ctrl / SSL_CTX_ctrl are spelled out as their command numbers below. The signatures are
 * the same in OpenSSL 1.1.1 and 3.x, the two ABIs (libssl.so.1.1, libssl.so.3) the shim accepts. */
#ifndef BLOB2GPU_OPENSSL_API_H
#define BLOB2GPU_OPENSSL_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct X509_VERIFY_PARAM_st X509_VERIFY_PARAM;
typedef struct x509_store_ctx_st X509_STORE_CTX;
typedef int (*SSL_verify_cb)(int preverify_ok, X509_STORE_CTX* ctx);

enum {
  BLOB2GPU_SSL_VERIFY_PEER = 0x01,
  BLOB2GPU_SSL_ERROR_NONE = 0,
  BLOB2GPU_SSL_ERROR_SSL = 1,
  BLOB2GPU_SSL_ERROR_WANT_READ = 2,
  BLOB2GPU_SSL_ERROR_WANT_WRITE = 3,
  BLOB2GPU_SSL_ERROR_SYSCALL = 5,
  BLOB2GPU_SSL_ERROR_ZERO_RETURN = 6,
  BLOB2GPU_X509_V_OK = 0,
  /* SSL_ctrl / SSL_CTX_ctrl commands behind the headers' macros. */
  BLOB2GPU_SSL_CTRL_MODE = 33,                   /* SSL_CTX_set_mode */
  BLOB2GPU_SSL_CTRL_SET_READ_AHEAD = 41,         /* SSL_CTX_set_read_ahead */
  BLOB2GPU_SSL_CTRL_SET_TLSEXT_HOSTNAME = 55,    /* SSL_set_tlsext_host_name (SNI) */
  BLOB2GPU_SSL_CTRL_SET_MIN_PROTO_VERSION = 123, /* SSL_CTX_set_min_proto_version */
  BLOB2GPU_TLSEXT_NAMETYPE_host_name = 0,
  BLOB2GPU_TLS1_2_VERSION = 0x0303,
  /* SSL_write may be retried with another buffer address holding the same bytes. */
  BLOB2GPU_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2,
  /* X509_VERIFY_PARAM_set_hostflags: "*.example.com" only, never "a*.example.com". */
  BLOB2GPU_X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS = 0x4
};

/* libssl */
typedef const SSL_METHOD* (*PFN_TLS_client_method)(void);
typedef SSL_CTX* (*PFN_SSL_CTX_new)(const SSL_METHOD* method);
typedef void (*PFN_SSL_CTX_free)(SSL_CTX* ctx);
typedef int (*PFN_SSL_CTX_set_default_verify_paths)(SSL_CTX* ctx);
typedef int (*PFN_SSL_CTX_load_verify_locations)(SSL_CTX* ctx, const char* ca_file,
                                                 const char* ca_path);
typedef void (*PFN_SSL_CTX_set_verify)(SSL_CTX* ctx, int mode, SSL_verify_cb callback);
typedef long (*PFN_SSL_CTX_ctrl)(SSL_CTX* ctx, int cmd, long larg, void* parg);
typedef void (*PFN_SSL_CTX_set_default_read_buffer_len)(SSL_CTX* ctx, size_t len);
typedef SSL* (*PFN_SSL_new)(SSL_CTX* ctx);
typedef void (*PFN_SSL_free)(SSL* ssl);
typedef int (*PFN_SSL_set_fd)(SSL* ssl, int fd);
typedef long (*PFN_SSL_ctrl)(SSL* ssl, int cmd, long larg, void* parg);
typedef int (*PFN_SSL_set1_host)(SSL* ssl, const char* hostname);
typedef X509_VERIFY_PARAM* (*PFN_SSL_get0_param)(SSL* ssl);
typedef int (*PFN_SSL_connect)(SSL* ssl);
typedef int (*PFN_SSL_read)(SSL* ssl, void* buf, int num);
typedef int (*PFN_SSL_write)(SSL* ssl, const void* buf, int num);
typedef int (*PFN_SSL_get_error)(const SSL* ssl, int ret);
typedef int (*PFN_SSL_shutdown)(SSL* ssl);
typedef long (*PFN_SSL_get_verify_result)(const SSL* ssl);

/* libcrypto (resolved through libssl's handle: it is one of libssl's dependencies) */
typedef unsigned long (*PFN_OpenSSL_version_num)(void);
typedef const char* (*PFN_OpenSSL_version)(int type);
typedef unsigned long (*PFN_ERR_get_error)(void);
typedef void (*PFN_ERR_error_string_n)(unsigned long error, char* buf, size_t len);
typedef void (*PFN_ERR_clear_error)(void);
typedef const char* (*PFN_X509_verify_cert_error_string)(long n);
typedef int (*PFN_X509_VERIFY_PARAM_set1_ip_asc)(X509_VERIFY_PARAM* param, const char* ipasc);
typedef void (*PFN_X509_VERIFY_PARAM_set_hostflags)(X509_VERIFY_PARAM* param, unsigned int flags);

#ifdef __cplusplus
}
#endif

#endif /* BLOB2GPU_OPENSSL_API_H */
