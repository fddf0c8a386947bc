// What every source file of the C-ABI library shares: the export macro and the library's own error codes
// (returned beside CUDA's; svdq_error_string in svdq.cu names them).
#pragma once

#define SVDQ_API extern "C" __attribute__((visibility("default")))

enum { ERR_BAD_ARG = 10001, ERR_NO_PATH = 10002 };
enum { DT_F16 = 0, DT_BF16 = 1 };  // the dtype argument (kernels/_lib.py DT_*)
