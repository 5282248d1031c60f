// cupy-lean: helper kernels that do not depend on an attention spec.
//   merge_states_{f16,bf16,f32}: merge attention results over disjoint parts.
//   lean_check_inputs: device-side validation of kv_lens and block_table.
//   lean_pair_heads: q padding and output unpairing of calls run in head pairs.
#include "common.cuh"

template <int KIND>  // 0: f16, 1: bf16, 2: f32
struct Elem;
template <>
struct Elem<0> {
  typedef u16 T;
  static __device__ __forceinline__ float load(const T* p) { return to_float<false>(*p); }
  static __device__ __forceinline__ void store(T* p, float x) { *p = from_float<false>(x); }
};
template <>
struct Elem<1> {
  typedef u16 T;
  static __device__ __forceinline__ float load(const T* p) { return to_float<true>(*p); }
  static __device__ __forceinline__ void store(T* p, float x) { *p = from_float<true>(x); }
};
template <>
struct Elem<2> {
  typedef float T;
  static __device__ __forceinline__ float load(const T* p) { return *p; }
  static __device__ __forceinline__ void store(T* p, float x) { *p = x; }
};

// outs: (parts, rows, dim) contiguous; lses: (parts, rows) float32 (natural
// log). One thread per output element; parts merged in order.
template <int KIND>
__device__ void merge_states_body(const typename Elem<KIND>::T* __restrict__ outs,
                                  const float* __restrict__ lses,
                                  typename Elem<KIND>::T* __restrict__ out, float* __restrict__ lse,
                                  int parts, i64 rows, int dim) {
  const i64 n = rows * dim;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) {
    const i64 row = e / dim;
    float M = -LEAN_INF;
    for (int p = 0; p < parts; ++p) M = fmaxf(M, lses[p * rows + row]);
    float L = 0.f, acc = 0.f;
    for (int p = 0; p < parts; ++p) {
      const float s = lses[p * rows + row];
      if (s == -LEAN_INF) continue;
      const float w = __expf(s - M);
      L += w;
      acc += w * Elem<KIND>::load(outs + p * n + e);
    }
    Elem<KIND>::store(out + e, L == 0.f ? 0.f : acc / L);
    if (e % dim == 0) lse[row] = (L == 0.f) ? -LEAN_INF : M + __logf(L);
  }
}

#define MERGE_ENTRY(NAME, KIND)                                                            \
  extern "C" __global__ void NAME(const Elem<KIND>::T* __restrict__ outs,                  \
                                  const float* __restrict__ lses, Elem<KIND>::T* out,      \
                                  float* lse, int parts, i64 rows, int dim) {              \
    merge_states_body<KIND>(outs, lses, out, lse, parts, rows, dim);                       \
  }
MERGE_ENTRY(merge_states_f16, 0)
MERGE_ENTRY(merge_states_bf16, 1)
MERGE_ENTRY(merge_states_f32, 2)

// bad[0] receives the smallest code of a bad entry (initialised by the host to
// a large value): b * (max_pages + 1) for a length outside [0, capacity],
// b * (max_pages + 1) + 1 + j for block_table[b, j] outside [0, num_pages)
// among the pages that kv_lens[b] uses. block_table may be null (dense).
extern "C" __global__ void lean_check_inputs(const int* __restrict__ kv_lens,
                                             const int* __restrict__ block_table, int batch,
                                             int capacity, int page_size, int num_pages,
                                             int max_pages, i64 bt_sb,
                                             unsigned long long* bad) {
  const i64 stride = (i64)max_pages + 1;
  for (int b = blockIdx.x; b < batch; b += gridDim.x) {
    const int len = kv_lens[b];
    if (len < 0 || len > capacity) {
      if (threadIdx.x == 0) atomicMin(bad, (unsigned long long)(b * stride));
      continue;
    }
    if (block_table == nullptr) continue;
    const int used = (int)(((i64)len + page_size - 1) / page_size);  // 64-bit: no wrap whatever the host limits
    for (int j = threadIdx.x; j < used; j += blockDim.x) {
      const int p = block_table[b * bt_sb + j];
      if (p < 0 || p >= num_pages) atomicMin(bad, (unsigned long long)(b * stride + 1 + j));
    }
  }
}

// Head pairs (kernels.pair_heads): the query and output rows of a call that
// reads two neighbouring KV heads of head_dim 64 as one of 128. Rows are
// (sequence, token, query head) with element strides sb, st, sh and sd (the
// 64-wide side: any layout); the 128-wide side is contiguous. Query head h
// takes half ((h / group) & 1) of a 128-wide row (its KV head's place in the
// pair). pad != 0: the 128-wide q from src (64 wide), zeros in the other
// half; pad == 0: the wanted half of src (128 wide) into dst (64 wide).
// 16-bit values moved as bits.
extern "C" __global__ void lean_pair_heads(const u16* __restrict__ src, u16* __restrict__ dst, i64 rows,
                                           int tokens, int heads_q, i64 sb, i64 st, i64 sh, i64 sd, int group,
                                           int pad) {
  const int w = pad ? 128 : 64;
  const i64 n = rows * w;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / w;
    const int c = (int)(i - r * w);
    const i64 bt = r / heads_q;
    const int h = (int)(r - bt * heads_q);
    const i64 at = (bt / tokens) * sb + (bt % tokens) * st + (i64)h * sh;
    const int half = (h / group) & 1;
    if (pad)
      dst[i] = (c >> 6) == half ? src[at + (i64)(c & 63) * sd] : (u16)0;
    else
      dst[at + (i64)c * sd] = src[r * 128 + half * 64 + c];
  }
}
