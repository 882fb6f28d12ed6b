{
  "targets": [
    {
      "target_name": "tidemark_fs",
      "sources": ["addon.c", "seek.c", "lock.c", "watch.c", "crc32c.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
