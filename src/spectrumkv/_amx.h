/* AMX permission, shared by the extensions that use AMX tiles (paged/_attention.c,
 * engines/_flash.c). Include after <Python.h>. */
#ifndef SPECTRUMKV_AMX_H
#define SPECTRUMKV_AMX_H

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Once per process: whether the CPU has AMX-TILE, AMX-BF16 and AVX512-BF16/BW, and Linux grants
 * this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; an old
 * kernel refuses). Call __builtin_cpu_init() first. Asking again is harmless. */
static int request_amx(void) {
#if defined(__x86_64__) && defined(__linux__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24)))
        return 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return 0;
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#endif
