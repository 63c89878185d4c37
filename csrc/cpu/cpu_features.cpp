// Compiled with baseline x86-64 flags: only CPUID queries here.
#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

#ifdef MMK_X86
#include <cpuid.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace mmk {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AmxEmulated: return "amx_emulated";
    case Isa::Amx:         return "amx";
    case Isa::Avx512Bf16:  return "avx512_bf16";
    case Isa::Avx512:      return "avx512";
    case Isa::Avx2:        return "avx2";
    default:               return "scalar";
  }
}

#ifdef MMK_X86
static unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((unsigned long long)edx << 32) | eax;
}

// Linux keeps the AMX tile data (8 KiB of register state) off until a process asks for it; a
// tile instruction before that raises SIGILL. Asked once per process (permission is process-wide).
static bool request_tile_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

static CpuFeatures probe() {
  CpuFeatures f;
  f.amx_reason = "this CPU has no AMX (AMX-TILE, AMX-BF16 and AMX-INT8)";
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1,
             f16c = (c >> 29) & 1;
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (!ymm_os) return f;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1;
  const bool avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
             avx512vl = (b >> 31) & 1;
  const bool avx512vnni = (c >> 11) & 1;
  unsigned int a1 = 0, b1, c1, d1;
  if (a >= 1) __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avx512bf16 = (a1 >> 5) & 1;
  const bool avx512fp16 = (d >> 23) & 1;
  const bool amx = ((d >> 22) & 1) && ((d >> 24) & 1) && ((d >> 25) & 1);  // bf16, tile, int8
  f.avx2 = avx2 && fma && f16c;
  f.avx512 = zmm_os && avx512f && avx512dq && avx512bw && avx512vl && fma && f16c;
  f.avx512_bf16 = f.avx512 && avx512bf16;
  f.avx512_vnni = f.avx512 && avx512vnni;
  f.avx512_fp16 = f.avx512 && avx512fp16;
  if (amx && f.avx512_bf16 && f.avx512_vnni) {
    if ((xcr0 & 0x60000ull) != 0x60000ull) {
      f.amx_reason = "the OS does not enable the AMX tile state (XCR0 bits 17 and 18)";
    } else if (!request_tile_permission()) {
      f.amx_reason = "the kernel refused the AMX tile-data permission (arch_prctl XTILEDATA)";
    } else {
      f.amx = true;
      f.amx_reason = "";
    }
  }
  return f;
}
#else
static CpuFeatures probe() { return CpuFeatures{}; }
#endif

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = probe();
  return features;
}

Isa detected_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.amx) return Isa::Amx;
  if (f.avx512) return f.avx512_bf16 ? Isa::Avx512Bf16 : Isa::Avx512;
  return f.avx2 ? Isa::Avx2 : Isa::Scalar;
}

Isa selected_isa(const char** error) {
  *error = nullptr;
  const Isa best = detected_isa();
  const char* env = std::getenv("MMKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "amx_emulated") == 0) {
    if ((int)best < (int)Isa::Avx512Bf16 || !cpu_features().avx512_vnni) {
      *error = "MMKERNELS_CPU_ISA=amx_emulated needs a CPU with AVX-512 BF16 and VNNI";
      return Isa::Scalar;
    }
    return Isa::AmxEmulated;
  }
  if (std::strcmp(env, "amx") == 0)
    want = Isa::Amx;
  else if (std::strcmp(env, "avx512_bf16") == 0)
    want = Isa::Avx512Bf16;
  else if (std::strcmp(env, "avx512") == 0)
    want = Isa::Avx512;
  else if (std::strcmp(env, "avx2") == 0)
    want = Isa::Avx2;
  else if (std::strcmp(env, "scalar") == 0)
    want = Isa::Scalar;
  else {
    *error =
        "MMKERNELS_CPU_ISA must be one of auto, amx, avx512_bf16, avx512, avx2, scalar, "
        "amx_emulated";
    return Isa::Scalar;
  }
  if ((int)want > (int)best) {
    *error =
        "MMKERNELS_CPU_ISA asks for an instruction set this CPU does not support "
        "(see mmkernels.attention.cpu.cpu_isa() for the best one available)";
    return Isa::Scalar;
  }
  return want;
}

}  // namespace cpu
}  // namespace mmk
