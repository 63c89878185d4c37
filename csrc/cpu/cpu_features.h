// Runtime CPU feature detection for the CPU kernels (no torch headers here).
#pragma once

namespace mmk {
namespace cpu {

// Ordered from weakest to strongest.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

const char* isa_name(Isa isa);

// Best path this CPU can run (CPUID + OS support for the register state).
Isa detected_isa();

// The path to use now: detected_isa(), lowered by MMKERNELS_CPU_ISA=avx512_bf16|avx512|avx2|scalar
// (read at every call). Sets *error (static string) and returns Scalar when the variable names an
// unknown path or one this CPU cannot run.
Isa selected_isa(const char** error);

}  // namespace cpu
}  // namespace mmk
