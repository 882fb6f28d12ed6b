{
  "targets": [
    {
      "target_name": "seek",
      "sources": ["seek.c", "watch.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
