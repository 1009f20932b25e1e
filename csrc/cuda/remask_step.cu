// STUB: replaced by the CUDA kernel.
#include <torch/library.h>
