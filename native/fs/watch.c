/*
 * Who else opens or writes a file: fanotify(7), which Node does not expose. The change tracker watches
 * every file of a tracked chain while it writes it; an open for writing or a close after writing by ANY
 * other process is reported with that process's pid, so a writer that ignores image locks (dd, qemu-io
 * with locking=off) is seen before a tracking id is answered.
 *
 *   watchInit()                  -> { fd, mode }   one fanotify group ("fid": events carry file handles,
 *                                                   works unprivileged; "fd": classic, needs CAP_SYS_ADMIN)
 *   watchAdd(fd, mode, path)     -> key            marks the file; events about it will carry this key
 *   watchRemove(fd, mode, path)  -> undefined      removes the mark (ENOENT and friends are ignored)
 *   watchDrain(fd, mode)         -> [mask, pid, key, mask, pid, key, ...]   the queued events, non-blocking
 *
 * Keys: "i:DEV:INO" in "fd" mode (from fstat of the event's descriptor, closed at once), "h:FSID:TYPE:HANDLE"
 * (hex) in "fid" mode. pid 0 means "another process" when the group is unprivileged (the kernel hides it).
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>
#include <node_api.h>
#include "addon.h"

/* No FAN_MODIFY: it would cost every write of our own; a writer opened before the mark is found in /proc. */
#define WATCH_MASK (FAN_OPEN | FAN_CLOSE_WRITE)

static int get_mode(napi_env env, napi_value v, int *fid) {
  char buf[8];
  size_t n;
  if (napi_get_value_string_utf8(env, v, buf, sizeof buf, &n) != napi_ok) return -1;
  if (strcmp(buf, "fid") == 0) *fid = 1;
  else if (strcmp(buf, "fd") == 0) *fid = 0;
  else return -1;
  return 0;
}

static void hex(char *out, const unsigned char *in, size_t n) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[in[i] >> 4];
    out[2 * i + 1] = digits[in[i] & 15];
  }
  out[2 * n] = 0;
}

/* "h:FSID:TYPE:HANDLE" for a handle as the kernel reports it in FAN_EVENT_INFO_TYPE_FID records. */
static void fid_key(char *out, size_t cap, const void *fsid, const struct file_handle *fh) {
  char fs[2 * sizeof(__kernel_fsid_t) + 1];
  char h[2 * MAX_HANDLE_SZ + 1];
  size_t bytes = fh->handle_bytes > MAX_HANDLE_SZ ? MAX_HANDLE_SZ : fh->handle_bytes;
  hex(fs, fsid, sizeof(__kernel_fsid_t));
  hex(h, fh->f_handle, bytes);
  snprintf(out, cap, "h:%s:%d:%s", fs, fh->handle_type, h);
}

static napi_value watch_init(napi_env env, napi_callback_info info) {
  (void)info;
  const char *mode = "fid";
  int fd = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID, O_RDONLY | O_LARGEFILE);
  if (fd < 0) {
    int first = errno;
    fd = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, O_RDONLY | O_LARGEFILE);
    if (fd < 0) return tm_throw_errno(env, "fanotify_init", first == EINVAL ? errno : first);
    mode = "fd";
  }
  napi_value out, v;
  if (napi_create_object(env, &out) != napi_ok || napi_create_int32(env, fd, &v) != napi_ok ||
      napi_set_named_property(env, out, "fd", v) != napi_ok ||
      napi_create_string_utf8(env, mode, NAPI_AUTO_LENGTH, &v) != napi_ok ||
      napi_set_named_property(env, out, "mode", v) != napi_ok)
    return NULL;
  return out;
}

/* Reads (fd, mode, path) arguments; path into buf. */
static int get_args(napi_env env, napi_callback_info info, int *fd, int *fid, char *path, size_t cap, size_t want) {
  size_t argc = 3;
  napi_value argv[3];
  size_t n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want ||
      napi_get_value_int32(env, argv[0], fd) != napi_ok || get_mode(env, argv[1], fid) != 0)
    return -1;
  if (want == 3 && (napi_get_value_string_utf8(env, argv[2], path, cap, &n) != napi_ok || n == 0 || n >= cap - 1))
    return -1;
  return 0;
}

static napi_value watch_add(napi_env env, napi_callback_info info) {
  int fd, fid;
  char path[4096];
  if (get_args(env, info, &fd, &fid, path, sizeof path, 3) != 0) {
    napi_throw_type_error(env, NULL, "watchAdd(fd, mode, path)");
    return NULL;
  }
  char key[2 * MAX_HANDLE_SZ + 128];
  if (fid) {
    struct {
      struct file_handle fh;
      unsigned char bytes[MAX_HANDLE_SZ];
    } h;
    int mount_id;
    h.fh.handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(AT_FDCWD, path, &h.fh, &mount_id, 0) != 0) return tm_throw_errno(env, path, errno);
    struct statfs sfs;
    if (statfs(path, &sfs) != 0) return tm_throw_errno(env, path, errno);
    fid_key(key, sizeof key, &sfs.f_fsid, &h.fh);
  } else {
    struct stat st;
    if (stat(path, &st) != 0) return tm_throw_errno(env, path, errno);
    snprintf(key, sizeof key, "i:%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
  }
  if (fanotify_mark(fd, FAN_MARK_ADD, WATCH_MASK, AT_FDCWD, path) != 0) return tm_throw_errno(env, path, errno);
  napi_value out;
  if (napi_create_string_utf8(env, key, NAPI_AUTO_LENGTH, &out) != napi_ok) return NULL;
  return out;
}

static napi_value watch_remove(napi_env env, napi_callback_info info) {
  int fd, fid;
  char path[4096];
  if (get_args(env, info, &fd, &fid, path, sizeof path, 3) != 0) {
    napi_throw_type_error(env, NULL, "watchRemove(fd, mode, path)");
    return NULL;
  }
  /* A file already gone, or never marked, has nothing to remove. */
  if (fanotify_mark(fd, FAN_MARK_REMOVE, WATCH_MASK, AT_FDCWD, path) != 0 && errno != ENOENT && errno != ENOTDIR)
    return tm_throw_errno(env, path, errno);
  return NULL;
}

static napi_value watch_drain(napi_env env, napi_callback_info info) {
  int fd, fid;
  if (get_args(env, info, &fd, &fid, NULL, 0, 2) != 0) {
    napi_throw_type_error(env, NULL, "watchDrain(fd, mode)");
    return NULL;
  }
  napi_value out;
  if (napi_create_array(env, &out) != napi_ok) return NULL;
  uint32_t n = 0;
  /* Aligned for struct fanotify_event_metadata. */
  static uint64_t buf[8192];
  for (;;) {
    ssize_t len = read(fd, buf, sizeof buf);
    if (len < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == EINTR) continue;
      return tm_throw_errno(env, "read(fanotify)", errno);
    }
    if (len == 0) break;
    struct fanotify_event_metadata *m = (struct fanotify_event_metadata *)buf;
    for (; FAN_EVENT_OK(m, len); m = FAN_EVENT_NEXT(m, len)) {
      char key[2 * MAX_HANDLE_SZ + 128] = "";
      if (m->vers != FANOTIFY_METADATA_VERSION) {
        napi_throw_error(env, NULL, "fanotify: unexpected metadata version");
        return NULL;
      }
      if (fid) {
        /* Info records follow the metadata: the first FID record names the file. */
        char *rec = (char *)m + m->metadata_len;
        char *end = (char *)m + m->event_len;
        while (rec + sizeof(struct fanotify_event_info_header) <= end) {
          struct fanotify_event_info_header *ih = (struct fanotify_event_info_header *)rec;
          if (ih->len < sizeof *ih || rec + ih->len > end) break;
          if (ih->info_type == FAN_EVENT_INFO_TYPE_FID) {
            struct fanotify_event_info_fid *f = (struct fanotify_event_info_fid *)rec;
            fid_key(key, sizeof key, &f->fsid, (struct file_handle *)f->handle);
            break;
          }
          rec += ih->len;
        }
      } else if (m->fd >= 0) {
        struct stat st;
        if (fstat(m->fd, &st) == 0)
          snprintf(key, sizeof key, "i:%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
        close(m->fd);
      }
      napi_value v;
      if (napi_create_double(env, (double)m->mask, &v) != napi_ok || napi_set_element(env, out, n++, v) != napi_ok ||
          napi_create_int32(env, m->pid, &v) != napi_ok || napi_set_element(env, out, n++, v) != napi_ok ||
          napi_create_string_utf8(env, key, NAPI_AUTO_LENGTH, &v) != napi_ok ||
          napi_set_element(env, out, n++, v) != napi_ok)
        return NULL;
    }
  }
  return out;
}

int tm_init_watch(napi_env env, napi_value exports) {
  if (tm_export(env, exports, "watchInit", watch_init) != 0) return -1;
  if (tm_export(env, exports, "watchAdd", watch_add) != 0) return -1;
  if (tm_export(env, exports, "watchRemove", watch_remove) != 0) return -1;
  if (tm_export(env, exports, "watchDrain", watch_drain) != 0) return -1;
  return 0;
}
