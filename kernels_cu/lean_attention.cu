// cupy-lean: fused LeanAttention decode kernel (and the comparison schedules).
//
// One module per spec. The spec is fixed by these macros (set by
// cupy_lean/kernels.py from compile-time parameters only):
//   LEAN_BF      0: fp16, 1: bf16
//   LEAN_D       head dim (64, 128, 256)
//   LEAN_MT      16-row query tiles per unit: ceil(group / 16), a power of two
//   LEAN_TILE    KV tokens per tile (16, 32, 64, 128)
//   LEAN_STAGES  cp.async pipeline depth (2..5)
//   LEAN_PAGED   0: dense cache, 1: paged cache
//   LEAN_ENTRY / LEAN_COMBINE_ENTRY   names of the extern "C" entry points
//
// Work decomposition (see DESIGN.md): a unit is one (batch, KV head) pair and
// all `group` query heads that share the KV head; a tile is TILE consecutive KV
// tokens of one unit. mode 0 (lean, stream-K): the grid derives from kv_lens
// (in device memory) the linear list of all tiles and takes an even share of
// it; a CTA's range can span several units. mode 1 (split / head): CTA c takes
// chunk c % num_splits of unit c / num_splits; num_splits == 1 is the head
// schedule (one CTA per unit, output written directly).
//
// Inside a CTA: WM x WN warps. Warp (wm, wn) owns query rows [16 wm, 16 wm + 16)
// and tokens [wn TW, wn TW + TW) of every tile; it keeps its own online-softmax
// state (m, l, acc) in registers. At the end of a segment the WN states of a
// row block are merged through shared memory in a fixed order.
//
// Partial segments (a unit shared by several CTAs) write their fp32 state to a
// workspace slot; the CTA whose atomic increment completes the unit's counter
// merges the unit's slots in CTA order and resets the counter. No CTA waits for
// another: correct whether or not the CTAs are co-resident.

#include "common.cuh"

#ifndef LEAN_BF
#define LEAN_BF 0
#endif
#ifndef LEAN_D
#define LEAN_D 128
#endif
#ifndef LEAN_MT
#define LEAN_MT 1
#endif
#ifndef LEAN_TILE
#define LEAN_TILE 64
#endif
#ifndef LEAN_STAGES
#define LEAN_STAGES 3
#endif
#ifndef LEAN_PAGED
#define LEAN_PAGED 0
#endif
#ifndef LEAN_ENTRY
#define LEAN_ENTRY lean_attention_default
#endif
#ifndef LEAN_COMBINE_ENTRY
#define LEAN_COMBINE_ENTRY lean_combine_default
#endif

namespace lean {

constexpr bool BF = LEAN_BF != 0;
constexpr int D = LEAN_D;
constexpr int MT = LEAN_MT;
constexpr int TILE = LEAN_TILE;
constexpr int STAGES = LEAN_STAGES;
constexpr bool PAGED = LEAN_PAGED != 0;

__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }

constexpr int WM = MT;                                            // one 16-row tile per warp row
// Token split per tile: 4 warps, or 8 for single-row-tile units with 128-token
// tiles (more warps per SM to hide latency at one CTA per SM).
constexpr int WN = imin(imax(1, 4 / MT) * ((MT == 1 && TILE >= 128) ? 2 : 1),
                        imax(1, TILE / (16 * MT)));
constexpr int NW = WM * WN;
constexpr int NT = NW * 32;
constexpr int TW = TILE / WN;  // tokens per warp per tile
constexpr int CPR = D / 8;     // 16-byte chunks per row
constexpr int ROWS_Q = MT * 16;
constexpr int LENS_CACHE = 256;

static_assert(D == 64 || D == 128 || D == 256, "head dim");
static_assert(MT == 1 || MT == 2 || MT == 4 || MT == 8, "MT");
static_assert(TILE == 16 || TILE == 32 || TILE == 64 || TILE == 128, "TILE");
static_assert(STAGES >= 2 && STAGES <= 6, "STAGES");
static_assert(TW % 16 == 0, "tokens per warp");
static_assert(NT % CPR == 0, "loader mapping");
static_assert(WN == 1 || WN * ROWS_Q <= TILE, "combine scratch fits in a stage");

// Shared memory layout, in bytes (mirrored by kernels.py: smem_bytes()).
constexpr int KV_STAGE_BYTES = 2 * TILE * D * 2;
constexpr int Q_SLOT_BYTES = ROWS_Q * D * 2;
constexpr int OFF_Q = STAGES * KV_STAGE_BYTES;
constexpr int OFF_MASK = OFF_Q + STAGES * Q_SLOT_BYTES;
constexpr int MASK_BYTES = PAGED ? ((STAGES * TILE + 15) / 16) * 16 : 0;
constexpr int OFF_STATS = OFF_MASK + MASK_BYTES;
constexpr int STATS_BYTES = 2 * WN * ROWS_Q * 4;
constexpr int OFF_LENS = OFF_STATS + STATS_BYTES;
constexpr int OFF_MISC = OFF_LENS + LENS_CACHE * 4;
constexpr int SMEM_BYTES = OFF_MISC + 64 * 4;

// Element offset of 16-byte chunk `ch` of row `r` in a [rows][D] tile, XOR
// swizzled so that ldmatrix rows of one column hit distinct banks.
__device__ __forceinline__ int swz(int r, int ch) { return r * D + ((ch ^ (r & 7)) << 3); }

struct Args {
  const u16* __restrict__ q;
  const u16* __restrict__ k;
  const u16* __restrict__ v;
  u16* out;
  float* lse;
  const int* __restrict__ kv_lens;
  const int* __restrict__ block_table;
  float* ws;
  int* counters;
  i64 q_sb, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_sh, bt_sb;
  int batch, heads_kv, group, capacity, page_size, num_pages, mode, num_splits;
  float scale_log2;
  int slot_stride;
};

__device__ __forceinline__ int clamp_len(int x, int cap) { return min(max(x, 0), cap); }

__device__ __forceinline__ int ntiles_of(int len) { return (len + TILE - 1) / TILE; }

// Walks a CTA's tiles in order: (b, h, t) plus the linear index g and the
// number of units (segments) entered so far.
struct Cursor {
  int b, h, t, nt, len, seg;
  i64 g;
};

struct Sched {
  int nct;
  i64 max_tiles, heavy;
  __device__ __forceinline__ i64 start(i64 c) const {
    return c < heavy ? c * max_tiles : heavy * max_tiles + (c - heavy) * (max_tiles - 1);
  }
  __device__ __forceinline__ i64 cta_of(i64 tile) const {
    return tile < heavy * max_tiles ? tile / max_tiles
                                    : heavy + (tile - heavy * max_tiles) / (max_tiles - 1);
  }
};

__device__ __forceinline__ int len_of(const Args& a, const int* lens_s, int b, bool cached) {
  if (a.kv_lens == nullptr) return a.capacity;
  if (cached && b < LENS_CACHE) return lens_s[b];
  return clamp_len(a.kv_lens[b], a.capacity);
}

__device__ __forceinline__ void advance(Cursor& c, i64 ce, const Args& a, const int* lens_s,
                                        bool cached) {
  c.g++;
  if (c.g >= ce) return;
  c.t++;
  if (c.t == c.nt) {
    c.t = 0;
    c.seg++;
    c.h++;
    if (c.h == a.heads_kv) {
      c.h = 0;
      do {
        c.b++;
        c.len = len_of(a, lens_s, c.b, cached);
        c.nt = ntiles_of(c.len);
      } while (c.nt == 0);
    }
  }
}

// Final output of 4 consecutive elements of one query row, and its lse.
__device__ __forceinline__ void write_final4(const Args& a, int b, int hq, int d, float4 acc,
                                             float M, float L) {
  float inv = (L == 0.f) ? 0.f : 1.f / L;
  u16* o = a.out + (i64)b * a.o_sb + (i64)hq * a.o_sh + d;
  uint2 w;
  w.x = pack2<BF>(acc.x * inv, acc.y * inv);
  w.y = pack2<BF>(acc.z * inv, acc.w * inv);
  *reinterpret_cast<uint2*>(o) = w;
  if (d == 0 && a.lse != nullptr)
    a.lse[(i64)b * a.heads_kv * a.group + hq] = (L == 0.f) ? -LEAN_INF : (M + fast_log2(L)) * LEAN_LN2;
}

// Zeros and lse = -inf for query rows [hq0, hq0 + n) of sequence b (one thread).
__device__ void write_empty_rows(const Args& a, int b, int hq0, int n) {
  for (int r = 0; r < n; ++r)
    for (int d = 0; d < D; d += 4) write_final4(a, b, hq0 + r, d, make_float4(0, 0, 0, 0), -LEAN_INF, 0.f);
}

// Merge the partial states of one unit, in the order slot_of(0..n-1), and
// write its output. All threads of the block take part (it contains barriers).
// `red` is shared-memory scratch of `red_floats` floats: when the n x group
// maxima and sums fit, they are gathered there first (parallel loads), turned
// into per-slot weights, and each output element then streams its n partial
// accumulators with 8 loads in flight; otherwise a plain loop.
template <class SlotOf>
__device__ void reduce_unit(const Args& a, int b, int h, int n, SlotOf slot_of, float* red,
                            int red_floats) {
  const int g = a.group;
  constexpr int PER_ROW = D / 4;
  const float SKIP = -1.f;  // weight of an empty slot (its accumulator is never read)
  if (2 * n * g + 2 * g <= red_floats) {
    float* W = red;              // [n][g]: m, then the weight exp2(m - M)
    float* Lp = red + n * g;     // [n][g]: l
    float* M = red + 2 * n * g;  // [g]
    float* L = M + g;            // [g]
    __syncthreads();
    for (int e = threadIdx.x; e < n * g; e += NT) {
      const int j = e / g, row = e % g;
      const float* s = a.ws + (i64)slot_of(j) * a.slot_stride;
      W[e] = __ldcg(s + g * D + row);
      Lp[e] = __ldcg(s + g * D + g + row);
    }
    __syncthreads();
    for (int row = threadIdx.x; row < g; row += NT) {
      float mx = -LEAN_INF;
      for (int j = 0; j < n; ++j) mx = fmaxf(mx, W[j * g + row]);
      float sum = 0.f;
      for (int j = 0; j < n; ++j) {
        const float mj = W[j * g + row];
        if (mj != -LEAN_INF) sum += Lp[j * g + row] * fast_exp2(mj - mx);
      }
      M[row] = mx;
      L[row] = sum;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n * g; e += NT) {
      const float mj = W[e];
      W[e] = (mj == -LEAN_INF) ? SKIP : fast_exp2(mj - M[e % g]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < g * PER_ROW; e += NT) {
      const int row = e / PER_ROW, d = (e % PER_ROW) * 4;
      float4 acc = make_float4(0, 0, 0, 0);
      for (int j0 = 0; j0 < n; j0 += 8) {
        float4 x[8];
        float w[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int j = j0 + u;
          w[u] = (j < n) ? W[j * g + row] : SKIP;
          x[u] = (w[u] != SKIP) ? ldcg4(a.ws + (i64)slot_of(j) * a.slot_stride + row * D + d)
                                : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (w[u] != SKIP) {
            acc.x += w[u] * x[u].x;
            acc.y += w[u] * x[u].y;
            acc.z += w[u] * x[u].z;
            acc.w += w[u] * x[u].w;
          }
        }
      }
      write_final4(a, b, h * g + row, d, acc, M[row], L[row]);
    }
    return;
  }
  for (int e = threadIdx.x; e < g * PER_ROW; e += NT) {
    const int row = e / PER_ROW, d = (e % PER_ROW) * 4;
    float mx = -LEAN_INF;
    for (int j = 0; j < n; ++j) {
      const float* s = a.ws + (i64)slot_of(j) * a.slot_stride;
      mx = fmaxf(mx, __ldcg(s + g * D + row));
    }
    float sum = 0.f;
    float4 acc = make_float4(0, 0, 0, 0);
    for (int j = 0; j < n; ++j) {
      const float* s = a.ws + (i64)slot_of(j) * a.slot_stride;
      const float mj = __ldcg(s + g * D + row);
      if (mj == -LEAN_INF) continue;
      const float f = fast_exp2(mj - mx);
      sum += f * __ldcg(s + g * D + g + row);
      const float4 x = ldcg4(s + row * D + d);
      acc.x += f * x.x;
      acc.y += f * x.y;
      acc.z += f * x.z;
      acc.w += f * x.w;
    }
    write_final4(a, b, h * g + row, d, acc, mx, sum);
  }
}

__device__ __forceinline__ void kernel_body(const Args& a) {
  extern __shared__ __align__(128) unsigned char smem[];
  u16* kv_s = reinterpret_cast<u16*>(smem);
  u16* q_s = reinterpret_cast<u16*>(smem + OFF_Q);
  unsigned char* mask_s = smem + OFF_MASK;
  float* stat_m = reinterpret_cast<float*>(smem + OFF_STATS);
  float* stat_l = stat_m + WN * ROWS_Q;
  int* lens_s = reinterpret_cast<int*>(smem + OFF_LENS);
  int* misc = reinterpret_cast<int*>(smem + OFF_MISC);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int c = blockIdx.x;
  const bool lean_mode = a.mode == 0 || a.mode == 2;

  if (tid == 0 && dynamic_smem_size() < (u32)SMEM_BYTES) __trap();

  Cursor start;
  i64 cs, ce;
  Sched sch = {0, 0, 0};

  if (lean_mode) {
    // Pass 1: tiles of every sequence, lengths cached in shared memory, outputs
    // of empty sequences written (sequence b by CTA b % gridDim.x).
    int local = 0;
    for (int b = tid; b < a.batch; b += NT) {
      const int len = a.kv_lens ? clamp_len(a.kv_lens[b], a.capacity) : a.capacity;
      if (b < LENS_CACHE) lens_s[b] = len;
      const int nt = ntiles_of(len);
      local += nt;
      if (nt == 0 && (b % gridDim.x) == c) write_empty_rows(a, b, 0, a.heads_kv * a.group);
    }
    int seq_tiles;
    block_incl_scan<NT>(local, misc, &seq_tiles);
    const i64 total = (i64)seq_tiles * a.heads_kv;
    const int nct = (int)min((i64)gridDim.x, total);
    if (c >= nct) return;
    sch.nct = nct;
    sch.max_tiles = (total + nct - 1) / nct;
    sch.heavy = total - (sch.max_tiles - 1) * nct;
    cs = sch.start(c);
    ce = cs + (c < sch.heavy ? sch.max_tiles : sch.max_tiles - 1);
    // Pass 2: the sequence that holds tile cs.
    int running = 0;
    for (int base = 0; base < a.batch; base += NT) {
      const int b = base + tid;
      const int nt = b < a.batch ? ntiles_of(len_of(a, lens_s, b, true)) : 0;
      int tot;
      const int incl = block_incl_scan<NT>(nt, misc, &tot);
      const i64 excl = (i64)running + incl - nt;
      if (nt > 0 && excl * a.heads_kv <= cs && cs < (excl + nt) * a.heads_kv) {
        misc[32] = b;
        misc[33] = (int)excl;
      }
      running += tot;
    }
    __syncthreads();
    start.b = misc[32];
    start.len = len_of(a, lens_s, start.b, true);
    start.nt = ntiles_of(start.len);
    const i64 r = cs - (i64)misc[33] * a.heads_kv;
    start.h = (int)(r / start.nt);
    start.t = (int)(r % start.nt);
  } else {
    const int unit = c / a.num_splits, j = c % a.num_splits;
    start.b = unit / a.heads_kv;
    start.h = unit % a.heads_kv;
    start.len = len_of(a, lens_s, start.b, false);
    start.nt = ntiles_of(start.len);
    const int chunk = (start.nt + a.num_splits - 1) / a.num_splits;
    const int t0 = min(j * chunk, start.nt), t1 = min(t0 + chunk, start.nt);
    if (t0 >= t1) {
      if (a.num_splits == 1) {
        if (tid == 0) write_empty_rows(a, start.b, start.h * a.group, a.group);
      } else {
        float* s = a.ws + (i64)c * a.slot_stride;
        for (int r = tid; r < a.group; r += NT) s[a.group * D + r] = -LEAN_INF;
      }
      return;
    }
    start.t = t0;
    cs = t0;
    ce = t1;
  }
  start.g = cs;
  start.seg = 0;
  const bool cached = lean_mode;
  const int n_my = (int)(ce - cs);

  if (a.mode == 2) {
    // Schedule dump for the tests (lean decomposition, no attention): per CTA
    // [cs, ce, nseg, then (unit, t_begin, t_end, partial) per segment].
    if (tid == 0) {
      int* dst = reinterpret_cast<int*>(a.ws) + (i64)c * a.slot_stride;
      const int max_seg = (a.slot_stride - 3) / 4;
      Cursor cur = start;
      int nseg = 0, t_begin = cur.t;
      for (int i = 0; i < n_my; ++i) {
        if (cur.g == ce - 1 || cur.t == cur.nt - 1) {
          if (nseg < max_seg) {
            int* e = dst + 3 + 4 * nseg;
            e[0] = cur.b * a.heads_kv + cur.h;
            e[1] = t_begin;
            e[2] = cur.t + 1;
            e[3] = !(t_begin == 0 && cur.t == cur.nt - 1);
          }
          nseg++;
          t_begin = 0;
        }
        advance(cur, ce, a, lens_s, cached);
      }
      dst[0] = (int)cs;
      dst[1] = (int)ce;
      dst[2] = nseg;
    }
    return;
  }
  const u64 policy = evict_first_policy();

  // ------------------------------------------------------------ loader
  constexpr int RSTEP = NT / CPR;
  constexpr int ROW_ITERS = (TILE + RSTEP - 1) / RSTEP;
  // Paged: the page index of each row this thread loads, fetched one tile
  // ahead (prefetch_pages) so the block-table read is off the critical path.
  // The row within its page goes to prow[]. Divisions by the page size are
  // done once per tile and stepped by RSTEP rows.
  int pg[PAGED ? ROW_ITERS : 1];
  int prow[PAGED ? ROW_ITERS : 1];
  const int ps = a.page_size;
  const int step_q = PAGED ? RSTEP / ps : 0, step_r = PAGED ? RSTEP % ps : 0;
  auto prefetch_pages = [&](const Cursor& cur, bool valid) {
    if (!PAGED) return;
    const int tok0 = cur.t * TILE;
    const int ntok = valid ? min(TILE, cur.len - tok0) : 0;
    const int first = tok0 + tid / CPR;
    int pq = first / ps, pr = first - pq * ps;
    const int* bt = a.block_table + (i64)cur.b * a.bt_sb;
#pragma unroll
    for (int it = 0; it < ROW_ITERS; ++it) {
      const int r = tid / CPR + it * RSTEP;
      pg[it] = (r < ntok) ? bt[pq] : -1;
      prow[it] = pr;
      pq += step_q;
      pr += step_r;
      if (pr >= ps) {
        pr -= ps;
        pq++;
      }
    }
  };
  auto load_tile = [&](int stage, const Cursor& cur) {
    if (cur.g == cs || cur.t == 0) {
      // First tile of a segment: this unit's query rows into the Q ring.
      u16* qd = q_s + (cur.seg % STAGES) * (ROWS_Q * D);
      const u16* qsrc = a.q + (i64)cur.b * a.q_sb + (i64)cur.h * a.group * a.q_sh;
      for (int e = tid; e < ROWS_Q * CPR; e += NT) {
        const int r = e / CPR, ch = e % CPR;
        const bool ok = r < a.group;
        cp_async16(smem_u32(qd + swz(r, ch)), ok ? (const void*)(qsrc + r * a.q_sh + ch * 8)
                                                 : (const void*)a.q, ok ? 16 : 0);
      }
    }
    const int tok0 = cur.t * TILE;
    const int ntok = min(TILE, cur.len - tok0);
    u16* ks = kv_s + stage * (2 * TILE * D);
    u16* vs = ks + TILE * D;
    const int ch = tid % CPR;
#pragma unroll
    for (int it = 0; it < ROW_ITERS; ++it) {
      const int r = tid / CPR + it * RSTEP;
      if (TILE % RSTEP != 0 && r >= TILE) break;
      bool ok = r < ntok;
      const int tok = tok0 + r;
      i64 koff, voff;
      if (PAGED) {
        int p = pg[PAGED ? it : 0];
        ok = ok && p >= 0 && p < a.num_pages;
        if (!ok) p = 0;
        const int pr = prow[PAGED ? it : 0];
        koff = (i64)p * a.k_sb + (i64)pr * a.k_st;
        voff = (i64)p * a.v_sb + (i64)pr * a.v_st;
        if (ch == 0) mask_s[stage * TILE + r] = ok ? 1 : 0;
      } else {
        koff = (i64)cur.b * a.k_sb + (i64)tok * a.k_st;
        voff = (i64)cur.b * a.v_sb + (i64)tok * a.v_st;
      }
      koff += (i64)cur.h * a.k_sh + ch * 8;
      voff += (i64)cur.h * a.v_sh + ch * 8;
      const int so = swz(r, ch);
      cp_async16_stream(smem_u32(ks + so), ok ? (const void*)(a.k + koff) : (const void*)a.k,
                        ok ? 16 : 0, policy);
      cp_async16_stream(smem_u32(vs + so), ok ? (const void*)(a.v + voff) : (const void*)a.v,
                        ok ? 16 : 0, policy);
    }
  };

  Cursor ld = start, cn = start;
  prefetch_pages(ld, n_my > 0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_my) {
      load_tile(s, ld);
      advance(ld, ce, a, lens_s, cached);
      prefetch_pages(ld, s + 1 < n_my);
    }
    cp_async_commit();
  }

  float acc[D / 8][4];
  float m0 = -LEAN_INF, m1 = -LEAN_INF, l0 = 0.f, l1 = 0.f;
  int seg_t0 = 0;
  const int tokw = wn * TW;
  const int row0 = wm * 16 + (lane >> 2), row1 = row0 + 8;

  for (int i = 0; i < n_my; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int jt = i + STAGES - 1;
      if (jt < n_my) {
        load_tile(jt % STAGES, ld);
        advance(ld, ce, a, lens_s, cached);
        prefetch_pages(ld, jt + 1 < n_my);
      }
      cp_async_commit();
    }
    const int stage = i % STAGES;
    if (cn.g == cs || cn.t == 0) {
#pragma unroll
      for (int x = 0; x < D / 8; ++x) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.f;
      m0 = m1 = -LEAN_INF;
      l0 = l1 = 0.f;
      seg_t0 = cn.t;
    }
    const u16* ks = kv_s + stage * (2 * TILE * D);
    const u16* vs = ks + TILE * D;
    const u16* qs = q_s + (cn.seg % STAGES) * (ROWS_Q * D);

    // S = Q K^T for this warp's 16 rows and TW tokens.
    float s[TW / 8][4];
#pragma unroll
    for (int x = 0; x < TW / 8; ++x) s[x][0] = s[x][1] = s[x][2] = s[x][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a0, a1, a2, a3;
      ldsm_x4(a0, a1, a2, a3,
              smem_u32(qs + swz(wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4))));
#pragma unroll
      for (int nb2 = 0; nb2 < TW / 16; ++nb2) {
        u32 b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3,
                smem_u32(ks + swz(tokw + nb2 * 16 + (lane & 7) + ((lane >> 4) << 3),
                                  kk * 2 + ((lane >> 3) & 1))));
        mma16816<BF>(s[2 * nb2], a0, a1, a2, a3, b0, b1);
        mma16816<BF>(s[2 * nb2 + 1], a0, a1, a2, a3, b2, b3);
      }
    }

    // Online softmax (base 2). Tokens past the unit's length, or on a page
    // outside the cache, are masked.
    const int ntok = min(TILE, cn.len - cn.t * TILE);
    float mx0 = -LEAN_INF, mx1 = -LEAN_INF;
#pragma unroll
    for (int nb = 0; nb < TW / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tk = tokw + nb * 8 + (lane & 3) * 2 + e;
        bool ok = tk < ntok;
        if (PAGED) ok = ok && mask_s[stage * TILE + tk];
        s[nb][e] = ok ? s[nb][e] * a.scale_log2 : -LEAN_INF;
        s[nb][e + 2] = ok ? s[nb][e + 2] * a.scale_log2 : -LEAN_INF;
        mx0 = fmaxf(mx0, s[nb][e]);
        mx1 = fmaxf(mx1, s[nb][e + 2]);
      }
    }
    mx0 = quad_max(mx0);
    mx1 = quad_max(mx1);
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float base0 = mn0 == -LEAN_INF ? 0.f : mn0;
    const float base1 = mn1 == -LEAN_INF ? 0.f : mn1;
    const float al0 = fast_exp2(m0 - base0), al1 = fast_exp2(m1 - base1);
    m0 = mn0;
    m1 = mn1;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int nb = 0; nb < TW / 8; ++nb) {
      s[nb][0] = fast_exp2(s[nb][0] - base0);
      s[nb][1] = fast_exp2(s[nb][1] - base0);
      s[nb][2] = fast_exp2(s[nb][2] - base1);
      s[nb][3] = fast_exp2(s[nb][3] - base1);
      rs0 += s[nb][0] + s[nb][1];
      rs1 += s[nb][2] + s[nb][3];
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
#pragma unroll
    for (int x = 0; x < D / 8; ++x) {
      acc[x][0] *= al0;
      acc[x][1] *= al0;
      acc[x][2] *= al1;
      acc[x][3] *= al1;
    }

    // O += P V
#pragma unroll
    for (int kb = 0; kb < TW / 16; ++kb) {
      const u32 p0 = pack2<BF>(s[2 * kb][0], s[2 * kb][1]);
      const u32 p1 = pack2<BF>(s[2 * kb][2], s[2 * kb][3]);
      const u32 p2 = pack2<BF>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
      const u32 p3 = pack2<BF>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
#pragma unroll
      for (int db2 = 0; db2 < D / 16; ++db2) {
        u32 b0, b1, b2, b3;
        ldsm_x4_t(b0, b1, b2, b3,
                  smem_u32(vs + swz(tokw + kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                    db2 * 2 + (lane >> 4))));
        mma16816<BF>(acc[2 * db2], p0, p1, p2, p3, b0, b1);
        mma16816<BF>(acc[2 * db2 + 1], p0, p1, p2, p3, b2, b3);
      }
    }

    // ------------------------------------------------------------ segment end
    if (cn.g == ce - 1 || cn.t == cn.nt - 1) {
      const bool partial = lean_mode ? !(seg_t0 == 0 && cn.t == cn.nt - 1) : (a.num_splits > 1);
      const int g = a.group;
      const int b = cn.b, h = cn.h;
      const int slot = lean_mode ? 2 * c + (cn.seg == 0 ? 0 : 1) : c;
      float* sp = a.ws + (i64)slot * a.slot_stride;
      const float lq0 = quad_sum(l0), lq1 = quad_sum(l1);
      if (WN == 1) {
        // Each warp owns whole rows: write straight from registers.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = half ? row1 : row0;
          if (row < g) {
            const float M = half ? m1 : m0, L = half ? lq1 : lq0;
            if (!partial) {
              const float inv = (L == 0.f) ? 0.f : 1.f / L;
              u16* o = a.out + (i64)b * a.o_sb + (i64)(h * g + row) * a.o_sh;
#pragma unroll
              for (int x = 0; x < D / 8; ++x)
                *reinterpret_cast<u32*>(o + x * 8 + (lane & 3) * 2) =
                    pack2<BF>(acc[x][2 * half] * inv, acc[x][2 * half + 1] * inv);
              if ((lane & 3) == 0 && a.lse != nullptr)
                a.lse[(i64)b * a.heads_kv * g + h * g + row] =
                    (L == 0.f) ? -LEAN_INF : (M + fast_log2(L)) * LEAN_LN2;
            } else {
#pragma unroll
              for (int x = 0; x < D / 8; ++x)
                *reinterpret_cast<float2*>(sp + row * D + x * 8 + (lane & 3) * 2) =
                    make_float2(acc[x][2 * half], acc[x][2 * half + 1]);
              if ((lane & 3) == 0) {
                sp[g * D + row] = M;
                sp[g * D + g + row] = L;
              }
            }
          }
        }
      } else {
        // Merge the WN token-slices of each row block through shared memory,
        // reusing this stage's K/V buffer (no load targets it until the next
        // iteration's barrier).
        float* scr = reinterpret_cast<float*>(kv_s + stage * (2 * TILE * D));
        __syncthreads();
        if ((lane & 3) == 0) {
          stat_m[wn * ROWS_Q + row0] = m0;
          stat_m[wn * ROWS_Q + row1] = m1;
          stat_l[wn * ROWS_Q + row0] = lq0;
          stat_l[wn * ROWS_Q + row1] = lq1;
        }
        __syncthreads();
        float M0 = -LEAN_INF, M1 = -LEAN_INF;
#pragma unroll
        for (int j = 0; j < WN; ++j) {
          M0 = fmaxf(M0, stat_m[j * ROWS_Q + row0]);
          M1 = fmaxf(M1, stat_m[j * ROWS_Q + row1]);
        }
        const float f0 = m0 == -LEAN_INF ? 0.f : fast_exp2(m0 - M0);
        const float f1 = m1 == -LEAN_INF ? 0.f : fast_exp2(m1 - M1);
        float* mine = scr + wn * ROWS_Q * D;
#pragma unroll
        for (int x = 0; x < D / 8; ++x) {
          const int f2 = x * 4 + (lane & 3);  // float2 index within the row
          *reinterpret_cast<float2*>(mine + row0 * D + 2 * (f2 ^ ((row0 & 7) << 2))) =
              make_float2(acc[x][0] * f0, acc[x][1] * f0);
          *reinterpret_cast<float2*>(mine + row1 * D + 2 * (f2 ^ ((row1 & 7) << 2))) =
              make_float2(acc[x][2] * f1, acc[x][3] * f1);
        }
        __syncthreads();
        constexpr int PER_ROW = D / 4;
        for (int e = tid; e < g * PER_ROW; e += NT) {
          const int row = e / PER_ROW, d = (e % PER_ROW) * 4;
          float M = -LEAN_INF;
#pragma unroll
          for (int j = 0; j < WN; ++j) M = fmaxf(M, stat_m[j * ROWS_Q + row]);
          float L = 0.f;
          float4 sum = make_float4(0, 0, 0, 0);
          const int f2 = (d >> 1) ^ ((row & 7) << 2);
#pragma unroll
          for (int j = 0; j < WN; ++j) {
            const float mj = stat_m[j * ROWS_Q + row];
            if (mj != -LEAN_INF) L += stat_l[j * ROWS_Q + row] * fast_exp2(mj - M);
            const float4 x = *reinterpret_cast<const float4*>(scr + (j * ROWS_Q + row) * D + 2 * f2);
            sum.x += x.x;
            sum.y += x.y;
            sum.z += x.z;
            sum.w += x.w;
          }
          if (!partial) {
            write_final4(a, b, h * g + row, d, sum, M, L);
          } else {
            *reinterpret_cast<float4*>(sp + row * D + d) = sum;
            if (d == 0) {
              sp[g * D + row] = M;
              sp[g * D + g + row] = L;
            }
          }
        }
      }
      if (partial && lean_mode) {
        // Publish the partial state, count it; the last contributor reduces.
        // The barrier orders every thread's stores before thread 0's fence
        // (cumulativity), which orders them before the counter increment;
        // the reducer's fence after the increment orders its loads after it.
        __syncthreads();
        const i64 u0 = cn.g - cn.t;  // linear index of the unit's first tile
        const int unit = b * a.heads_kv + h;
        if (tid == 0) {
          const i64 first = sch.cta_of(u0), last = sch.cta_of(u0 + cn.nt - 1);
          __threadfence();
          const int old = atomicAdd(a.counters + unit, 1);
          __threadfence();
          misc[34] = (old == (int)(last - first)) ? 1 : 0;
          misc[35] = (int)first;
          misc[36] = (int)(last - first + 1);
        }
        __syncthreads();
        if (misc[34]) {
          const int first = misc[35], n = misc[36];
          const int first_slot = 2 * first + (sch.start(first) < u0 ? 1 : 0);
          reduce_unit(a, b, h, n, [&](int j) { return j == 0 ? first_slot : 2 * (first + j); },
                      reinterpret_cast<float*>(kv_s + stage * (2 * TILE * D)), TILE * D);
          if (tid == 0) atomicExch(a.counters + unit, 0);
        }
      }
    }
    advance(cn, ce, a, lens_s, cached);
  }
  cp_async_wait<0>();
}

}  // namespace lean

#define LEAN_ARGS                                                                             \
  const u16 *__restrict__ q, const u16 *__restrict__ k, const u16 *__restrict__ v, u16 *out,  \
      float *lse, const int *__restrict__ kv_lens, const int *__restrict__ block_table,       \
      float *ws, int *counters, i64 q_sb, i64 q_sh, i64 k_sb, i64 k_st, i64 k_sh, i64 v_sb,   \
      i64 v_st, i64 v_sh, i64 o_sb, i64 o_sh, i64 bt_sb, int batch, int heads_kv, int group,  \
      int capacity, int page_size, int num_pages, int mode, int num_splits, float scale_log2, \
      int slot_stride

#define LEAN_FILL_ARGS(a)                                                                    \
  lean::Args a = {q, k, v, out, lse, kv_lens, block_table, ws, counters, q_sb, q_sh, k_sb,  \
                  k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_sh, bt_sb, batch, heads_kv, group, \
                  capacity, page_size, num_pages, mode, num_splits, scale_log2, slot_stride}

extern "C" __global__ void __launch_bounds__(lean::NT) LEAN_ENTRY(LEAN_ARGS) {
  LEAN_FILL_ARGS(a);
  lean::kernel_body(a);
}

// Combine step of the split schedule: grid = units; merges each unit's
// num_splits slots in chunk order. Same arguments as the attention entry.
extern "C" __global__ void __launch_bounds__(lean::NT) LEAN_COMBINE_ENTRY(LEAN_ARGS) {
  LEAN_FILL_ARGS(a);
  const int unit = blockIdx.x;
  const int ns = a.num_splits;
  __shared__ float red[4096];
  lean::reduce_unit(a, unit / a.heads_kv, unit % a.heads_kv, ns,
                    [&](int j) { return unit * ns + j; }, red, 4096);
}
