# Built by `npm install` (package.json "install"); optional: see qimg_native.c.
{
  "targets": [
    {
      "target_name": "qimg_native",
      "sources": ["qimg_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
