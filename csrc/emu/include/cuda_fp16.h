#pragma once
#include "llada_emu/cuda_emu.h"  // __half and its intrinsics: llada_emu/fp16.h
