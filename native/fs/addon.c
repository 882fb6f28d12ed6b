/* Module entry of native/fs: common helpers and the list of the files' init functions (see addon.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include "addon.h"

/* The errno names callers switch on; others are reported as "E<number>". */
static const char *errno_name(int err, char *buf, size_t len) {
  switch (err) {
    case EAGAIN: return "EAGAIN";
    case EACCES: return "EACCES";
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EINTR: return "EINTR";
    case ENOLCK: return "ENOLCK";
    case EMFILE: return "EMFILE";
    case ENXIO: return "ENXIO";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ENOSYS: return "ENOSYS";
    default: snprintf(buf, len, "E%d", err); return buf;
  }
}

napi_value tm_throw_errno(napi_env env, const char *what, int err) {
  char msg[200], name[16];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_throw_error(env, errno_name(err, name, sizeof name), msg);
  return NULL;
}

int tm_export(napi_env env, napi_value exports, const char *name, napi_callback fn) {
  napi_value f;
  if (napi_create_function(env, name, NAPI_AUTO_LENGTH, fn, NULL, &f) != napi_ok) return -1;
  if (napi_set_named_property(env, exports, name, f) != napi_ok) return -1;
  return 0;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  if (tm_init_seek(env, exports) != 0) return NULL;
  if (tm_init_lock(env, exports) != 0) return NULL;
  if (tm_init_watch(env, exports) != 0) return NULL;
  if (tm_init_crc32c(env, exports) != 0) return NULL;
  return exports;
}
