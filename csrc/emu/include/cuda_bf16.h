#pragma once
#include "llada_emu/cuda_emu.h"  // __nv_bfloat16 and its intrinsics: llada_emu/fp16.h
