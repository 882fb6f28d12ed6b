/*
 * The one native addon of Tidemark (native/fs): file-system calls Node does not expose, and the CRC-32C every
 * VHDX and tracking file is checked with (the CPU's instruction). Each C file adds
 * its functions to the module's exports through an init function listed in addon.c; a new file (say,
 * watch.c) adds its init function here and there, and its name to binding.gyp.
 */
#ifndef TIDEMARK_ADDON_H
#define TIDEMARK_ADDON_H

#include <node_api.h>

/* Throws an Error "what: strerror(err)" with `code` set to the errno name (EAGAIN, EBADF, ...); returns NULL. */
napi_value tm_throw_errno(napi_env env, const char *what, int err);

/* Adds `fn` as exports[name]; returns 0, or -1 with a JS exception pending. */
int tm_export(napi_env env, napi_value exports, const char *name, napi_callback fn);

/* seek.c: dataExtents (lseek SEEK_DATA / SEEK_HOLE). */
int tm_init_seek(napi_env env, napi_value exports);

/* lock.c: OFD byte-range locks (F_OFD_SETLK, F_OFD_GETLK) and descriptor duplication. */
int tm_init_lock(napi_env env, napi_value exports);

/* watch.c: fanotify marks and events (who else opens or writes a file). */
int tm_init_watch(napi_env env, napi_value exports);

/* crc32c.c: CRC-32C (SSE4.2's CRC32 instruction when the CPU has it). */
int tm_init_crc32c(napi_env env, napi_value exports);

#endif
