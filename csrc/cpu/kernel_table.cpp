// This capability's Kernels table (cpu_ops.h), kernels_<CPU_CAPABILITY>.
#include "cpu/cpu_ops.h"

#define KK_CONCAT_(a, b) a##b
#define KK_CONCAT(a, b) KK_CONCAT_(a, b)

namespace kk::cpu {

#define KK_ENTRY(name) .name = &name,
constinit const Kernels KK_CONCAT(kernels_, CPU_CAPABILITY){KK_CPU_KERNELS(KK_ENTRY)};
#undef KK_ENTRY

}  // namespace kk::cpu
