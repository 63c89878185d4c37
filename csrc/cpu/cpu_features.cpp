// Compiled with baseline x86-64 flags: only CPUID queries here.
#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

#ifdef MMK_X86
#include <cpuid.h>
#endif

namespace mmk {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::Avx512:     return "avx512";
    case Isa::Avx2:       return "avx2";
    default:              return "scalar";
  }
}

#ifdef MMK_X86
static unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((unsigned long long)edx << 32) | eax;
}

static CpuFeatures probe() {
  CpuFeatures f;
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
  f.avx2 = avx2 && fma && f16c;
  f.avx512 = zmm_os && avx512f && avx512dq && avx512bw && avx512vl && fma && f16c;
  f.avx512_bf16 = f.avx512 && avx512bf16;
  f.avx512_vnni = f.avx512 && avx512vnni;
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
  if (f.avx512) return f.avx512_bf16 ? Isa::Avx512Bf16 : Isa::Avx512;
  return f.avx2 ? Isa::Avx2 : Isa::Scalar;
}

Isa selected_isa(const char** error) {
  *error = nullptr;
  const Isa best = detected_isa();
  const char* env = std::getenv("MMKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "avx512_bf16") == 0)
    want = Isa::Avx512Bf16;
  else if (std::strcmp(env, "avx512") == 0)
    want = Isa::Avx512;
  else if (std::strcmp(env, "avx2") == 0)
    want = Isa::Avx2;
  else if (std::strcmp(env, "scalar") == 0)
    want = Isa::Scalar;
  else {
    *error = "MMKERNELS_CPU_ISA must be one of auto, avx512_bf16, avx512, avx2, scalar";
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
