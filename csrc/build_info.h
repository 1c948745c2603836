// The torch version an extension was compiled against, as a string in its read-only data.
// metaug_fast/_extension.py reads it from the file before loading the library: an extension built against
// another torch may crash at load time instead of failing to import, so the versions are compared first.
// setup.py passes the version as METAUG_TORCH_VERSION (unquoted, stringified here).
#pragma once

#define METAUG_STRINGIFY_(x) #x
#define METAUG_STRINGIFY(x) METAUG_STRINGIFY_(x)

#ifndef METAUG_TORCH_VERSION
#error "setup.py defines METAUG_TORCH_VERSION (the torch this extension is compiled against)"
#endif

extern "C" __attribute__((used, visibility("default"))) const char metaug_fast_built_with_torch[] =
    "metaug_fast:built-with-torch=" METAUG_STRINGIFY(METAUG_TORCH_VERSION) ";";
