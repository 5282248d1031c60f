// cupy-lean: small device helpers shared by the kernels.
//
// No CUDA headers are included: NVRTC compiles these sources without an
// include path, so fp16/bf16 are handled as raw 16-bit words through PTX.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define LEAN_INF __int_as_float(0x7f800000)
#define LEAN_LN2 0.69314718055994530942f
#define LEAN_LOG2E 1.44269504088896340736f

// ---------------------------------------------------------------- conversions
template <bool BF>
__device__ __forceinline__ float to_float(u16 x) {
  if (BF) return __uint_as_float(((u32)x) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}

template <bool BF>
__device__ __forceinline__ u16 from_float(float f) {
  u16 h;
  if (BF)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Two floats to a packed pair; `lo` goes to the low 16 bits.
template <bool BF>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  if (BF)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------- tensor cores
// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulate.
template <bool BF>
__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                         u32 b0, u32 b1) {
  if (BF) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// ---------------------------------------------------------------- async copies
__device__ __forceinline__ u32 smem_u32(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}

// 16-byte global->shared copy; src_bytes == 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

// Same, with an L2 evict-first hint: K and V are streamed once.
__device__ __forceinline__ void cp_async16_stream(u32 dst, const void* src, int src_bytes,
                                                  u64 policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
               "l"(src), "r"(src_bytes), "l"(policy));
}

__device__ __forceinline__ u64 evict_first_policy() {
  u64 p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}

// Bring `bytes` (a multiple of 16) from 16-byte aligned global memory into L2,
// without waiting and without a destination (a hint: no ordering, no result).
// bulk (sm_90+): one asynchronous bulk prefetch (the TMA unit); otherwise one
// prefetch instruction per 128-byte line.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool HAS_BULK_PREFETCH = true;
#else
constexpr bool HAS_BULK_PREFETCH = false;
#endif
__device__ __forceinline__ void prefetch_l2(const void* src, u32 bytes, bool bulk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (bulk) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(src), "r"(bytes));
    return;
  }
#endif
  const char* c = reinterpret_cast<const char*>(src);
  for (u32 o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(c + o));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ u32 dynamic_smem_size() {
  u32 r;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

__device__ __forceinline__ int warp_incl_scan(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// Inclusive scan of x over the block, and in the same two barriers the
// block's maximum of m (m >= 0) in *max_out; `warp_buf` holds two ints per
// warp. Returns the thread's inclusive prefix; *total receives the block sum.
template <int NT>
__device__ __forceinline__ int block_incl_scan_max(int x, int m, int* warp_buf, int* total, int* max_out) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int incl = warp_incl_scan(x);
  m = __reduce_max_sync(0xffffffffu, m);
  if (lane == 31) {
    warp_buf[warp] = incl;
    warp_buf[NW + warp] = m;
  }
  __syncthreads();
  int off = 0, tot = 0, mx = 0;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const int s = warp_buf[w];
    if (w < warp) off += s;
    tot += s;
    mx = max(mx, warp_buf[NW + w]);
  }
  __syncthreads();
  *total = tot;
  *max_out = mx;
  return incl + off;
}

// block_incl_scan_max without the maximum.
template <int NT>
__device__ __forceinline__ int block_incl_scan(int x, int* warp_buf, int* total) {
  int unused;
  return block_incl_scan_max<NT>(x, 0, warp_buf, total, &unused);
}

// a / b for a >= 0, b > 0: in 32 bits when both fit (a 64-bit division is a
// long instruction sequence, and the prologue of a small call is latency).
__device__ __forceinline__ i64 div_pos(i64 a, i64 b) {
  return ((a | b) >> 31) == 0 ? (i64)((u32)a / (u32)b) : a / b;
}

__device__ __forceinline__ float4 ldcg4(const float* p) {
  return __ldcg(reinterpret_cast<const float4*>(p));
}
