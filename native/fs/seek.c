/*
 * dataExtents(fd, end[, start]): the data extents of a file within [start, end) (start defaults to 0),
 * found with lseek(SEEK_DATA / SEEK_HOLE), which Node does not expose. Returns a flat array
 * [offset0, length0, offset1, length1, ...]; what lies between is a hole and reads as zeros. A file
 * system without hole support reports one extent.
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#include <errno.h>
#include <unistd.h>
#include "addon.h"

static napi_value data_extents(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2) {
    napi_throw_type_error(env, NULL, "dataExtents(fd, end[, start]) takes two or three arguments");
    return NULL;
  }
  int32_t fd;
  double size_d, start_d = 0;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_double(env, argv[1], &size_d) != napi_ok ||
      (argc >= 3 && napi_get_value_double(env, argv[2], &start_d) != napi_ok) || fd < 0 || !(size_d >= 0) ||
      size_d > 9007199254740991.0 || !(start_d >= 0) || start_d > size_d) {
    napi_throw_type_error(env, NULL, "dataExtents: fd must be a descriptor, 0 <= start <= end safe integers");
    return NULL;
  }
  off_t size = (off_t)size_d;
  napi_value out;
  if (napi_create_array(env, &out) != napi_ok) return NULL;
  uint32_t n = 0;
  for (off_t at = (off_t)start_d; at < size;) {
    off_t data = lseek(fd, at, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break; /* no data from `at` to the end of the file */
      return tm_throw_errno(env, "lseek(SEEK_DATA)", errno);
    }
    if (data >= size) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      /* The file shrank between the two calls: its end is the end of the data. */
      if (errno != ENXIO) return tm_throw_errno(env, "lseek(SEEK_HOLE)", errno);
      hole = size;
    }
    if (hole > size) hole = size;
    if (hole <= data) break; /* cannot happen on a stable file; never loop */
    napi_value v;
    if (napi_create_double(env, (double)data, &v) != napi_ok || napi_set_element(env, out, n++, v) != napi_ok ||
        napi_create_double(env, (double)(hole - data), &v) != napi_ok || napi_set_element(env, out, n++, v) != napi_ok)
      return NULL;
    at = hole;
  }
  return out;
}

int tm_init_seek(napi_env env, napi_value exports) {
  return tm_export(env, exports, "dataExtents", data_extents);
}
