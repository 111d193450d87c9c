// Shadows glibc's <sys/single_threaded.h> (setup.py puts csrc/compat first on the include path).
// libstdc++ (GCC >= 11) includes it to read __libc_single_threaded, a glibc 2.32 symbol, in
// shared_ptr's reference counting; that one symbol kept the extension from loading on glibc
// 2.28-2.31 (RHEL 8, Ubuntu 20.04), where torch's manylinux_2_28 wheels run. Here the process
// never counts as single-threaded: the counts are always atomic, as with glibc < 2.32.
#pragma once
static const char __libc_single_threaded = 0;
