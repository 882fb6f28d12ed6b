/*
 * Open file description (OFD) byte-range locks, the kind QEMU's image locking uses (block/file-posix.c):
 * they belong to an open file description, not to a process, so they are released when its last
 * descriptor closes (or the process dies) and several descriptions in one process conflict like
 * different processes would. All calls are non-blocking (F_OFD_SETLK, never F_OFD_SETLKW).
 *
 *   setLock(fd, start, length, type)  type 0 unlock, 1 shared (F_RDLCK), 2 exclusive (F_WRLCK);
 *                                     true when done, false when another description's lock is in the way
 *   testLock(fd, start, length, type) null when that lock could be taken now, else the first lock in the
 *                                     way: { type: 1 | 2, start, length, pid } (pid -1 for an OFD lock)
 *   dupFd(fd)                         a new descriptor of the same description (close-on-exec)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>
#include "addon.h"

#ifndef F_OFD_SETLK
#error "OFD locks (F_OFD_SETLK, Linux 3.15+) are needed"
#endif

static int lock_args(napi_env env, napi_callback_info info, const char *usage, int32_t *fd, struct flock *fl) {
  size_t argc = 4;
  napi_value argv[4];
  int64_t start, len;
  int32_t type;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4 ||
      napi_get_value_int32(env, argv[0], fd) != napi_ok || napi_get_value_int64(env, argv[1], &start) != napi_ok ||
      napi_get_value_int64(env, argv[2], &len) != napi_ok || napi_get_value_int32(env, argv[3], &type) != napi_ok ||
      *fd < 0 || start < 0 || len < 0 || type < 0 || type > 2) {
    napi_throw_type_error(env, NULL, usage);
    return -1;
  }
  struct flock f = {0};
  f.l_type = type == 0 ? F_UNLCK : type == 1 ? F_RDLCK : F_WRLCK;
  f.l_whence = SEEK_SET;
  f.l_start = (off_t)start;
  f.l_len = (off_t)len;
  f.l_pid = 0; /* must be 0 for OFD locks */
  *fl = f;
  return 0;
}

static napi_value set_lock(napi_env env, napi_callback_info info) {
  int32_t fd;
  struct flock fl;
  if (lock_args(env, info, "setLock(fd, start, length, type 0|1|2)", &fd, &fl) != 0) return NULL;
  int r;
  do r = fcntl(fd, F_OFD_SETLK, &fl);
  while (r == -1 && errno == EINTR);
  napi_value out;
  if (r == 0) {
    napi_get_boolean(env, true, &out);
    return out;
  }
  if (errno == EAGAIN || errno == EACCES) {
    napi_get_boolean(env, false, &out);
    return out;
  }
  return tm_throw_errno(env, "fcntl(F_OFD_SETLK)", errno);
}

static napi_value test_lock(napi_env env, napi_callback_info info) {
  int32_t fd;
  struct flock fl;
  if (lock_args(env, info, "testLock(fd, start, length, type 1|2)", &fd, &fl) != 0) return NULL;
  if (fl.l_type == F_UNLCK) {
    napi_throw_type_error(env, NULL, "testLock: type must be 1 (shared) or 2 (exclusive)");
    return NULL;
  }
  int r;
  do r = fcntl(fd, F_OFD_GETLK, &fl);
  while (r == -1 && errno == EINTR);
  if (r != 0) return tm_throw_errno(env, "fcntl(F_OFD_GETLK)", errno);
  napi_value out, v;
  if (fl.l_type == F_UNLCK) {
    napi_get_null(env, &out);
    return out;
  }
  if (napi_create_object(env, &out) != napi_ok) return NULL;
  napi_create_int32(env, fl.l_type == F_WRLCK ? 2 : 1, &v);
  napi_set_named_property(env, out, "type", v);
  napi_create_int64(env, (int64_t)fl.l_start, &v);
  napi_set_named_property(env, out, "start", v);
  napi_create_int64(env, (int64_t)fl.l_len, &v);
  napi_set_named_property(env, out, "length", v);
  napi_create_int32(env, (int32_t)fl.l_pid, &v);
  napi_set_named_property(env, out, "pid", v);
  return out;
}

static napi_value dup_fd(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) {
    napi_throw_type_error(env, NULL, "dupFd(fd) takes a descriptor");
    return NULL;
  }
  int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (nfd < 0) return tm_throw_errno(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
  napi_value out;
  napi_create_int32(env, nfd, &out);
  return out;
}

int tm_init_lock(napi_env env, napi_value exports) {
  if (tm_export(env, exports, "setLock", set_lock) != 0) return -1;
  if (tm_export(env, exports, "testLock", test_lock) != 0) return -1;
  return tm_export(env, exports, "dupFd", dup_fd);
}
