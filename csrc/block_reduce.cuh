// fastkd CUDA backend: block-wide reduction of a small struct of floats (device only).
//
// Warp level with __shfl_xor_sync (a butterfly: every lane ends with the warp's result), then the
// warps' results through shared memory, reduced again by the first warp. `merge` is associative
// and commutative (kd_math.cuh), so the order of the tree does not change the value beyond
// rounding.
#pragma once

#include <string.h>

#include "kd_math.cuh"

namespace fastkd {

template <typename S>
__device__ __forceinline__ S shuffle_xor(const S& value, int lane_mask) {
  static_assert(sizeof(S) % sizeof(float) == 0, "reduced structs hold floats only");
  constexpr int kFields = sizeof(S) / sizeof(float);
  float fields[kFields];
  memcpy(fields, &value, sizeof(S));
#pragma unroll
  for (int i = 0; i < kFields; ++i) fields[i] = __shfl_xor_sync(0xffffffffu, fields[i], lane_mask);
  S out;
  memcpy(&out, fields, sizeof(S));
  return out;
}

template <typename S>
__device__ __forceinline__ S warp_reduce(S value) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) value = merge(value, shuffle_xor(value, mask));
  return value;
}

// Every thread of the block calls it (blockDim.x a multiple of 32, at most 1024); thread 0 gets
// the block's result (the others a partial one).
template <typename S>
__device__ __forceinline__ S block_reduce(S value) {
  __shared__ S partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  value = warp_reduce(value);
  __syncthreads();  // partial[] may still be read by a previous block_reduce
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    S mine = partial[lane < warps ? lane : 0];
    // Lanes past the last warp repeat warp 0's value; it is merged only once below.
    value = mine;
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) {
      const S other = shuffle_xor(value, mask);
      const int other_lane = lane ^ mask;
      if (other_lane < warps && lane < warps) value = merge(value, other);
    }
  }
  return value;
}

}  // namespace fastkd
