// Run-time CPU feature detection for the CPU kernels, and the instruction sets the SIMD
// translation units are compiled for (no torch headers here).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define MMK_X86 1
#endif

// The SIMD translation units (*_avx512.cpp, *_avx2.cpp) are compiled with the baseline flags like
// every other file; each one switches its own code to its instruction set with one of these
// pragmas, written AFTER all its #includes except the kernel-body header (attention_kernel.h)
// that it instantiates. Everything defined after the pragma must have internal linkage (an
// anonymous namespace): an inline function with external linkage compiled for AVX-512 could be
// the copy the linker keeps for baseline callers. Standard headers stay before the pragma for the
// same reason. The path is picked at run time (selected_isa below), never by -march.
#define MMK_TARGET_AVX512 \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c\")")
#define MMK_TARGET_AVX2 _Pragma("GCC target(\"avx2,fma,f16c\")")
// The AMX translation units (*_amx.cpp): AVX-512 as above plus the tile instructions.
// clang-format off
#define MMK_TARGET_AMX _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c,amx-tile,amx-bf16,amx-int8\")")
// clang-format on

namespace mmk {
namespace cpu {

// Ordered from weakest to strongest. Amx: AVX-512 BF16 plus the AMX tiles (bf16 and int8 matrix
// products on tmm registers). AmxEmulated runs the AMX kernels' code with every tile instruction
// emulated in plain C++ (tile_emu.h): never chosen by itself, only with MMKERNELS_CPU_ISA (tests
// on CPUs without AMX; slow), and it needs AVX-512 BF16 and VNNI.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4, AmxEmulated = 5 };

const char* isa_name(Isa isa);

// What CPUID (and the OS's register-state support, XGETBV) report; the one probe of the library.
struct CpuFeatures {
  bool avx2 = false;         // AVX2 + FMA + F16C, YMM state enabled
  bool avx512 = false;       // AVX-512 F/BW/VL/DQ + FMA + F16C, ZMM state enabled
  bool avx512_bf16 = false;  // and AVX512_BF16 (vdpbf16ps)
  bool avx512_vnni = false;  // and AVX512_VNNI (vpdpbusd)
  bool avx512_fp16 = false;  // and AVX512_FP16 (reported only: no kernel uses it)
  // AMX-TILE + AMX-BF16 + AMX-INT8, the OS saves the tile state (XCR0 bits 17, 18) and granted
  // this process the tile-data permission (arch_prctl ARCH_REQ_XCOMP_PERM, asked once here).
  bool amx = false;
  const char* amx_reason = "";  // why amx is false ("" when true)
};
const CpuFeatures& cpu_features();

// Best path this CPU can run (from cpu_features()).
Isa detected_isa();

// The path to use now: detected_isa(), lowered by
// MMKERNELS_CPU_ISA=amx|avx512_bf16|avx512|avx2|scalar, or amx_emulated (read at every call). Sets
// *error (static string) and returns Scalar when the variable names an unknown path or one this
// CPU cannot run.
Isa selected_isa(const char** error);

}  // namespace cpu
}  // namespace mmk
