// cupy-lean: the fused LeanAttention decode kernel (stream-K), the comparison
// decompositions (split-K and one CTA per unit) and the schedule dump.
//
// Reading order:
//   1. configuration      compile-time spec, warp layout, shared-memory layout
//   2. Params             the one parameter struct (mirrored by kernels.Params)
//   3. schedule           StreamK (a CTA's range, a tile's owner), Segment and
//                         SegmentWalker (a CTA's work as segments), PartialSlots
//                         (where partial states live), UnitCounter (last arrival)
//   4. softmax state      merge_weight / finalize (the one merge rule),
//                         WarpState (absorb a tile), emit (final or partial)
//   5. unit reduction     reduce_unit: merge a unit's partial states
//   6. the CTA            find_work, KVLoader, tile_scores / accumulate_pv,
//                         finish_segment, attention_cta
//   7. entry points       attention, combine (split-K), schedule dump
//
// Vocabulary: a unit is one (sequence b, KV head h) pair and the `group` query
// heads that share that KV head; a tile is TILE consecutive KV tokens of one
// unit; a segment is the part of one CTA's tile range inside one unit; a
// partial segment does not cover its unit and writes an fp32 softmax state to a
// workspace slot, which the unit's reduction merges.
//
// Spec macros (set by cupy_lean/kernels.py from compile-time parameters only):
//   LEAN_BF (0 fp16, 1 bf16), LEAN_D (64/128/256), LEAN_MT (16-row query tiles
//   per unit), LEAN_TILE (tokens per tile), LEAN_STAGES (cp.async depth),
//   LEAN_PAGED (0 dense, 1 paged), LEAN_FEATURES (optional semantics, a bit
//   mask: 1 sinks, 2 soft-cap, 4 sliding window, 8 query tokens, 16 / 32 fp8
//   e4m3 / e5m2 K/V), LEAN_ENTRY / LEAN_COMBINE_ENTRY /
//   LEAN_DUMP_ENTRY (entry names), and LEAN_HOST_* (the host's view of the
//   layouts, cross-checked below by static_assert).

#include "common.cuh"

// Phase timestamps of each CTA (ns, %globaltimer), for tools/timeline.py only:
// compiled in with -DLEAN_TIMELINE=<CTAs recorded>; the plain specs carry none.
#ifdef LEAN_TIMELINE
extern "C" {
__device__ unsigned long long lean_timeline[LEAN_TIMELINE * 32];
// the combine launch: block (x, y) stamps lean_ctimeline[(x + gridDim.x y) * 8 + k]:
// 0 start, 1 the previous kernel waited for, 2 its unit's record read, 3 end;
// inside its merge (thread 0, its first row pass): 4 the first round of state
// loads in, 5 every state absorbed, 6 the lanes merged, 7 the row stored
__device__ unsigned long long lean_ctimeline[LEAN_TIMELINE * 8];
}
// thread 0 of a block whose index `i` is recorded: %globaltimer into `slot`
#define LEAN_TIME_INTO(i, slot)                                                         \
  do {                                                                                  \
    if (threadIdx.x == 0 && (i) < LEAN_TIMELINE) {                                      \
      unsigned long long t_;                                                            \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                            \
      slot = t_;                                                                        \
    }                                                                                   \
  } while (0)
#define LEAN_STAMP(k) LEAN_TIME_INTO(blockIdx.x, lean_timeline[blockIdx.x * 32 + (k)])
// the SM's cycle counter (slots 14, 15: at start and end; their ratio to the
// time between gives the SM clock)
#define LEAN_CLOCK(k)                                                                   \
  do {                                                                                  \
    if (threadIdx.x == 0 && blockIdx.x < LEAN_TIMELINE)                                 \
      lean_timeline[blockIdx.x * 32 + (k)] = clock64();                                 \
  } while (0)
// the SM the CTA runs on (%smid), into slot k: which CTAs shared an SM or a TPC
#define LEAN_SMID(k)                                                                    \
  do {                                                                                  \
    if (threadIdx.x == 0 && blockIdx.x < LEAN_TIMELINE) {                               \
      unsigned int s_;                                                                  \
      asm volatile("mov.u32 %0, %%smid;" : "=r"(s_));                                  \
      lean_timeline[blockIdx.x * 32 + (k)] = s_;                                        \
    }                                                                                   \
  } while (0)
#define LEAN_CSTAMP(k) \
  LEAN_TIME_INTO(blockIdx.x + gridDim.x * blockIdx.y, lean_ctimeline[(blockIdx.x + gridDim.x * blockIdx.y) * 8 + (k)])
#else
#define LEAN_SMID(k) \
  do {               \
  } while (0)
#define LEAN_CSTAMP(k) \
  do {                 \
  } while (0)
#define LEAN_STAMP(k) \
  do {                \
  } while (0)
#define LEAN_CLOCK(k) \
  do {                \
  } while (0)
#endif

#if !defined(LEAN_D) || !defined(LEAN_HOST_SMEM_BYTES) || !defined(LEAN_HOST_PARAMS) || !defined(LEAN_HOST_RUN_ROWS)
#error "compile through cupy_lean.kernels (compile_options defines the spec and the host layouts)"
#endif

namespace lean {

// ============================================================= 1. configuration

constexpr bool BF = LEAN_BF != 0;
constexpr int D = LEAN_D;
constexpr int MT = LEAN_MT;
constexpr int TILE = LEAN_TILE;
constexpr int STAGES = LEAN_STAGES;
constexpr bool PAGED = LEAN_PAGED != 0;
// Optional semantics compiled into a spec only when a call asks for them
// (kernels.FEATURES): the plain specs do not carry their code.
#ifndef LEAN_FEATURES
#define LEAN_FEATURES 0
#endif
constexpr bool HAS_SINKS = (LEAN_FEATURES & 1) != 0;    // a logit per query head joins the denominator
constexpr bool HAS_SOFTCAP = (LEAN_FEATURES & 2) != 0;  // scores soft-capped: cap * tanh(score / cap)
constexpr bool HAS_WINDOW = (LEAN_FEATURES & 4) != 0;   // the query sees its last window_left + 1 keys
constexpr bool HAS_QLEN = (LEAN_FEATURES & 8) != 0;     // q_len query tokens per sequence, causal
// fp8 K and V (e4m3 or e5m2 bytes, one scale per KV head): copied to the ring
// as bytes (swz8 layout), read by the MMA warps straight from the ring and
// converted to the compute type in registers; scales folded into the score
// scale (K) and the final normalisation (V).
constexpr bool FP8_E4M3 = (LEAN_FEATURES & 16) != 0;
constexpr bool FP8_E5M2 = (LEAN_FEATURES & 32) != 0;
constexpr bool HAS_FP8 = FP8_E4M3 || FP8_E5M2;
// The MMAs' input type: q's, except with fp8 K/V, whose MMAs run in fp16
// whatever q's type (fp8 values are exact in fp16; bf16 q is brought into
// fp16's range per row, see prepare_q_fp8; P keeps 11 bits instead of 8), so
// that a K or V pair costs one conversion, not three.
constexpr bool MMA_BF = BF && !HAS_FP8;
constexpr bool Q_ROW_SCALE = HAS_FP8 && BF;  // prepare_q_fp8 scales each bf16 query row
// Paged, with a page size that the loader's run of rows per thread
// (KVLoader::RUN) does not divide (e.g. 1): a block-table read per row.
// A sliding window starts a unit's tiles at any token (a run may cross a
// page): windowed paged specs always read per row.
constexpr bool PAGE_ROWS = (LEAN_FEATURES & 64) != 0;
static_assert(!(LEAN_PAGED && HAS_WINDOW) || PAGE_ROWS, "a windowed paged spec reads the block table per row");
// fp8 K read 16 bytes per lane (an experiment, kernels.TUNING["fp8_wide_k_reads"]):
// each lane's 16-byte chunk of a K row serves four 16-wide score steps, q's
// columns regrouped to match (prepare_q_fp8), one shared load where four
// 4-byte ones ran; at D >= 128 the swz8 XOR separates a row pair's chunk
// groups (see swz8).
constexpr bool FP8_WIDE_K = (LEAN_FEATURES & 128) != 0;
static_assert(!FP8_WIDE_K || HAS_FP8, "wide K reads are an fp8 layout");
static_assert(!(FP8_E4M3 && FP8_E5M2), "one fp8 format");
// Head lanes (kernels.FEATURES["head_lanes"]): the launch runs p.lanes copies
// of one schedule side by side, lane l of the call's KV heads l, L + l,
// 2L + l, ... (L = p.lanes, a divisor of the call's heads; p.heads_kv is a
// lane's count), CTA c of lane l at block c * L + l, each lane with its own
// share of the workspace (lane_partials, lane_counters, lane_meta). CTAs
// cL .. cL + L - 1 do the same work on L neighbouring heads at the same time,
// so the 64-byte rows of an fp8 head_dim-64 cache that share 128-byte lines
// (neighbouring heads of one token) are read together.
constexpr bool LANES = (LEAN_FEATURES & 256) != 0;
static_assert(!LANES || HAS_FP8, "head lanes are made for fp8 caches");

__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }

// Warps: WM x WN. Warp (wm, wn) owns query rows [16 wm, 16 wm + 16) and tokens
// [wn TW, wn TW + TW) of every tile. 4 warps per CTA, or 8 for single-row-tile
// units with 128-token tiles (more warps to hide latency at one CTA per SM).
constexpr int WM = MT;
constexpr int WN = imin(imax(1, 4 / MT) * ((MT == 1 && TILE >= 128) ? 2 : 1),
                        imax(1, TILE / (16 * MT)));
constexpr int NW = WM * WN;
constexpr int NT = NW * 32;
constexpr int TW = TILE / WN;  // tokens per warp per tile
constexpr int CPR = D / 8;     // 16-byte chunks per row of fp16/bf16 (q, and fp16/bf16 K/V in the ring)
constexpr int KV_ELEM = HAS_FP8 ? 1 : 2;  // bytes per K/V element in global memory and in the ring
constexpr int KCPR = D * KV_ELEM / 16;    // 16-byte chunks per K/V row in global memory
constexpr int ROWS_Q = MT * 16;
constexpr int LENS_CACHE = 256;  // lengths of the first LENS_CACHE sequences kept in shared memory

static_assert(D == 64 || D == 128 || D == 256, "head dim");
static_assert(MT == 1 || MT == 2 || MT == 4 || MT == 8, "MT");
static_assert(TILE == 16 || TILE == 32 || TILE == 64 || TILE == 128, "TILE");
static_assert(STAGES >= 2 && STAGES <= 6, "STAGES");
static_assert(TW % 16 == 0, "tokens per warp");
static_assert(NT % CPR == 0 && NT % KCPR == 0, "loader mapping");
static_assert(WN == 1 || WN * ROWS_Q <= TILE, "the warp-merge scratch fits in one K/V stage (fp8: in two passes, or two stages)");

// Shared storage, in bytes: [K/V ring][Q ring][page mask][warp stats][lengths][scan scratch].
struct SharedLayout {
  static constexpr int KV_STAGE = 2 * TILE * D * KV_ELEM;  // K then V of one tile (HAS_FP8: bytes)
  static constexpr int Q_SLOT = ROWS_Q * D * 2;
  static constexpr int OFF_Q = STAGES * KV_STAGE;
  static constexpr int OFF_MASK = OFF_Q + STAGES * Q_SLOT;
  static constexpr int MASK = PAGED ? ((STAGES * TILE + 15) / 16) * 16 : 0;
  static constexpr int OFF_STATS = OFF_MASK + MASK;
  static constexpr int STATS = 2 * WN * ROWS_Q * 4;
  static constexpr int OFF_LENS = OFF_STATS + STATS;
  static constexpr int OFF_MISC = OFF_LENS + LENS_CACHE * 4;
  static constexpr int MISC_INTS = 64;
  static constexpr int BYTES = OFF_MISC + MISC_INTS * 4;
};

// The host computes the same numbers (kernels.Spec); a drift fails the compile.
static_assert(SharedLayout::BYTES == LEAN_HOST_SMEM_BYTES, "shared-memory layout differs from kernels.Spec.smem_bytes");
static_assert(NT == LEAN_HOST_THREADS, "warp layout differs from kernels.Spec.threads");
static_assert(LENS_CACHE == LEAN_HOST_LENS_CACHE, "length cache differs from kernels.LENS_CACHE");

// Named views of the shared storage.
struct Shared {
  unsigned char* base;
  __device__ u16* kv(int stage) const { return reinterpret_cast<u16*>(base + stage * SharedLayout::KV_STAGE); }
  // Float scratch once a stage is consumed: that stage (TILE * D floats; HAS_FP8: half as many), or
  // from stage 0 on once no copy is in flight (store_segment's `last`).
  __device__ float* scratch(int stage) const { return reinterpret_cast<float*>(base + stage * SharedLayout::KV_STAGE); }
  __device__ u16* q(int slot) const { return reinterpret_cast<u16*>(base + SharedLayout::OFF_Q) + slot * ROWS_Q * D; }
  __device__ unsigned char* mask(int stage) const { return base + SharedLayout::OFF_MASK + stage * TILE; }
  __device__ float* stat_m() const { return reinterpret_cast<float*>(base + SharedLayout::OFF_STATS); }
  __device__ float* stat_l() const { return stat_m() + WN * ROWS_Q; }
  __device__ int* lens() const { return reinterpret_cast<int*>(base + SharedLayout::OFF_LENS); }
  __device__ int* misc() const { return reinterpret_cast<int*>(base + SharedLayout::OFF_MISC); }
  // Q_ROW_SCALE: each query row's factor from prepare_q_fp8 (ROWS_Q floats), in
  // the warp stats: written after the barrier that opens a segment's first
  // tile and read into registers right after the next one, while the stats
  // are written only by store_segment after a barrier of its own, at the
  // segment's end (and read there before the next segment's first barrier).
  __device__ float* q_scale() const { return stat_m(); }
};
// misc[] use: [0, 32) block-scan scratch, then named words.
enum Misc { MISC_START_SEQ = 32, MISC_START_TILE = 33, MISC_LAST = 34, MISC_FIRST = 35, MISC_COUNT = 36 };

// Element offset of 16-byte chunk `ch` of row `r` in a [rows][D] tile, XOR
// swizzled so that ldmatrix rows of one column hit distinct banks.
__device__ __forceinline__ int swz(int r, int ch) { return r * D + ((ch ^ (r & 7)) << 3); }
// HAS_FP8: byte offset of 16-byte chunk `ch` of row `r` in a [rows][D]-byte
// tile. The chunk index is XORed with the row's 128-byte line (rows / line:
// 128 / D at D = 64), so that the same chunk of 8 consecutive rows lies in 8
// distinct 16-byte bank groups: a K word read per (row, chunk) by 8 x 4 lanes
// and an ldmatrix of 8 rows are both conflict-free.
constexpr int FP8_ROWS_PER_LINE = D >= 128 ? 1 : 128 / D;
constexpr int FP8_SWZ_MASK = (KCPR < 8 ? KCPR : 8) - 1;
// FP8_WIDE_K at D >= 128: the XOR is ((r & 1) << 2) | ((r >> 1) & 3), still
// one of 8 values over 8 consecutive rows (the ldmatrix of V and the loader's
// 8-row period hold), and rows 2m, 2m + 1 differ in its bit 2, so the 16-byte
// reads of chunks 4j..4j+3 of both rows (one quarter-warp) hit 8 bank groups.
__device__ __forceinline__ int swz8(int r, int ch) {
  if (FP8_WIDE_K && D >= 128) return r * D + ((ch ^ (((r & 1) << 2) | ((r >> 1) & 3))) << 4);
  return r * D + ((ch ^ ((r / FP8_ROWS_PER_LINE) & FP8_SWZ_MASK)) << 4);
}

// ============================================================= 2. parameters

// How the work is cut (kernels.Decomposition on the host).
enum Decomposition : int {
  STREAM_K = 0,  // LeanAttention: even tile ranges over a persistent grid
  SPLIT_K = 1,   // num_splits chunks per unit, one CTA each (num_splits == 1: one CTA per unit)
};
static_assert(STREAM_K == LEAN_HOST_STREAM_K && SPLIT_K == LEAN_HOST_SPLIT_K, "Decomposition differs from the host's");

// The one kernel parameter, passed as `const __grid_constant__` (read from the
// constant bank, never copied). The struct and its layout check are made from
// this one list of (type, name); kernels.Params mirrors it on the host.
#define LEAN_PARAMS_FIELDS(F)                                                                    \
  F(const u16*, q)           /* (batch, heads_q, D) */                                         \
  F(const u16*, k)           /* dense: (batch, capacity, heads_kv, D); paged: (pages, page_size, heads_kv, D) */ \
  F(const u16*, v)                                                                              \
  F(u16*, out)               /* (batch, heads_q, D) */                                         \
  F(float*, lse)             /* (batch, heads_q) natural log, or null */                       \
  F(const int*, kv_lens)     /* (batch,), or null: every sequence has `capacity` tokens */     \
  F(const int*, block_table) /* (batch, max_pages), or null (dense) */                         \
  F(float*, partials)        /* PartialSlots storage (the dump entry: its int records) */      \
  F(u32*, counters)          /* UnitCounters: one per unit, then one per slot (merge groups) */\
  F(int*, unit_meta)         /* STREAM_K merged by the combine launch: per unit, its pieces and first slot; else null */ \
  F(i64, q_sb) F(i64, q_sh)  /* strides in elements: q per sequence, per head */               \
  F(i64, k_sb) F(i64, k_st) F(i64, k_sh) /* k per sequence (or page), per token, per head */   \
  F(i64, v_sb) F(i64, v_st) F(i64, v_sh)                                                        \
  F(i64, o_sb) F(i64, o_sh)                                                                     \
  F(i64, bt_sb)              /* block_table per sequence */                                    \
  F(int, batch) F(int, heads_kv) F(int, group) F(int, capacity) F(int, page_size) F(int, num_pages) \
  F(int, decomposition)      /* Decomposition */                                               \
  F(int, num_splits)         /* SPLIT_K: chunks per unit */                                    \
  F(float, scale_log2)       /* softmax scale * log2(e) */                                     \
  F(int, slot_stride)        /* floats per partial slot (dump: ints per CTA record) */         \
  F(const float*, sinks)     /* HAS_SINKS: (heads_q,) natural-log logits, or null */           \
  F(float, softcap_scale)    /* HAS_SOFTCAP: scale / cap */                                    \
  F(float, softcap_log2)     /* HAS_SOFTCAP: cap * log2(e) */                                  \
  F(int, window_left)        /* HAS_WINDOW: keys seen = window_left + 1; -1: all */         \
  F(int, min_tiles_per_cta)  /* STREAM_K: at most one CTA per this many tiles (StreamK) */  \
  F(int, merge_balance)      /* STREAM_K: 0, or a, for ranges of >= sqrt(a x longest unit x rows / TILE) */ \
  F(int, q_len)              /* HAS_QLEN: query tokens per sequence (rows = q_len * group) */   \
  F(i64, q_st) F(i64, o_st)  /* HAS_QLEN: q and out strides per query token */                 \
  F(const int*, q_lens)      /* HAS_QLEN: query tokens of each sequence (<= q_len), or null */ \
  F(const float*, k_scale)   /* HAS_FP8: K = stored value x k_scale[h] (heads_kv floats), or null: */ \
  F(const float*, v_scale)   /* HAS_FP8: V = stored value x v_scale[h], or null: */         \
  F(float, k_scale_value)    /* HAS_FP8: ... one scale for every head (by value) */          \
  F(float, v_scale_value)                                                                       \
  F(int, runtime_split)      /* STREAM_K: 0: never; n >= 1: split-K in one wave when its busiest CTA has at most */ \
  F(int, split_slack)        /* ... n times stream-K's busiest CTA's tiles plus split_slack (>= 0) tiles, */ \
  F(int, split_cap)          /* ... the n times at most split_cap (>= 0) tiles above stream-K's busiest */ \
  F(u32, page_magic) F(int, page_shift) /* PAGED: tok / page_size = (umulhi(tok, magic) + tok) >> shift (kernels.index_divisor) */ \
  F(int, split_prefetch)     /* runtime_split, sm_90+: the split's first tiles into L2 (SplitPrefetch); 0: off */ \
  F(int, lanes)              /* LANES: lanes of the launch (heads_kv: a lane's KV heads) */ \
  F(int, lane_counters)      /* LANES: counters of a lane (its share of `counters`) */       \
  F(i64, lane_slots)         /* LANES: floats of a lane's partial slots (its share of `partials`) */ \
  F(int, lane_meta)          /* LANES: ints of a lane's unit records (its share of `unit_meta`) */ \
  F(u32, lane_magic) F(int, lane_shift) /* LANES: n / lanes = (umulhi(n, magic) + n) >> shift (kernels.index_divisor) */

#define LEAN_DECLARE_FIELD(type, name) type name;
struct Params {
  LEAN_PARAMS_FIELDS(LEAN_DECLARE_FIELD)
};
#undef LEAN_DECLARE_FIELD

// Layout check against the host: the same names and sizes in the same order
// (with natural alignment on both sides, hence the same offsets), and the
// same size. The host passes its list as LEAN_HOST_PARAMS.
struct FieldLayout {
  const char* name;
  int size;
};
#define LEAN_FIELD_LAYOUT(type, name) {#name, (int)sizeof(type)},
constexpr FieldLayout kParamsDevice[] = {LEAN_PARAMS_FIELDS(LEAN_FIELD_LAYOUT)};
#undef LEAN_FIELD_LAYOUT
constexpr FieldLayout kParamsHost[] = {LEAN_HOST_PARAMS};
constexpr int kParamsCount = sizeof(kParamsDevice) / sizeof(kParamsDevice[0]);

__host__ __device__ constexpr bool same_name(const char* a, const char* b) { return *a == *b && (*a == 0 || same_name(a + 1, b + 1)); }
__host__ __device__ constexpr bool same_fields() {
  for (int i = 0; i < kParamsCount; ++i)
    if (!same_name(kParamsDevice[i].name, kParamsHost[i].name) || kParamsDevice[i].size != kParamsHost[i].size)
      return false;
  return true;
}
static_assert(sizeof(kParamsHost) / sizeof(kParamsHost[0]) == kParamsCount, "Params: field count differs from kernels.Params");
static_assert(same_fields(), "Params: field names, order or sizes differ from kernels.Params");
static_assert(sizeof(Params) == LEAN_HOST_PARAMS_SIZE, "sizeof(Params) differs from kernels.Params");

__device__ __forceinline__ int clamp_len(int x, int cap) { return min(max(x, 0), cap); }

// LANES: n / p.lanes without a divide (n < 2**31).
__device__ __forceinline__ u32 lane_div(const Params& p, u32 n) { return (__umulhi(n, p.lane_magic) + n) >> p.lane_shift; }
// This CTA's index and the grid in its lane's schedule, and its head lane
// (LANES; else 0); unsigned, as blockIdx.x and gridDim.x are.
__device__ __forceinline__ u32 cta_index(const Params& p) { return LANES ? lane_div(p, blockIdx.x) : blockIdx.x; }
__device__ __forceinline__ u32 grid_ctas(const Params& p) { return LANES ? lane_div(p, gridDim.x) : gridDim.x; }
__device__ __forceinline__ u32 head_lane(const Params& p) { return LANES ? blockIdx.x - cta_index(p) * (u32)p.lanes : 0u; }
// This CTA's lane's share of the workspace.
__device__ __forceinline__ float* lane_partials(const Params& p) {
  return LANES ? p.partials + (i64)head_lane(p) * p.lane_slots : p.partials;
}
__device__ __forceinline__ u32* lane_counters(const Params& p) {
  return LANES ? p.counters + (i64)head_lane(p) * p.lane_counters : p.counters;
}
__device__ __forceinline__ int* lane_meta(const Params& p) {
  return LANES ? p.unit_meta + (i64)head_lane(p) * p.lane_meta : p.unit_meta;
}
// The call's KV heads (LANES: p.heads_kv is a lane's).
__device__ __forceinline__ int call_heads_kv(const Params& p) { return LANES ? p.heads_kv * p.lanes : p.heads_kv; }

// Query rows of a unit: group query heads, for each of q_len query tokens
// (HAS_QLEN; row r is token r / group, head r % group of the unit).
__device__ __forceinline__ int unit_rows(const Params& p) { return HAS_QLEN ? p.q_len * p.group : p.group; }
__device__ __forceinline__ int row_token(const Params& p, int r) { return HAS_QLEN ? r / p.group : 0; }
// HAS_FP8: the converted operands hold stored / 256 (e4m3 before sm_89, see fp8x2_to_f16x2) or
// stored (e5m2); these restore the scale and apply the KV head's k_scale /
// v_scale (1 without fp8).
// sm_89 and later convert e4m3 pairs in hardware (exact values, NaN bytes to
// NaN); earlier GPUs move the bits (value / 256, see fp8x2_to_f16x2), and so
// does every GPU with LEAN_FP8_BITMOVES (kernels.FP8_BITMOVES_ENV, for tests).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(LEAN_FP8_BITMOVES)
constexpr bool FP8_HW_CVT = true;
#else
constexpr bool FP8_HW_CVT = false;
#endif
constexpr float FP8_UNIT = (FP8_E4M3 && !FP8_HW_CVT) ? 256.f : 1.f;
// LANES: the KV head of the call that a lane's head h is.
__device__ __forceinline__ int phys_head(const Params& p, int h) {
  return LANES ? h * p.lanes + (int)head_lane(p) : h;
}
__device__ __forceinline__ float k_multiplier(const Params& p, int h) {
  return HAS_FP8 ? FP8_UNIT * (p.k_scale != nullptr ? p.k_scale[phys_head(p, h)] : p.k_scale_value) : 1.f;
}
__device__ __forceinline__ float v_multiplier(const Params& p, int h) {
  return HAS_FP8 ? FP8_UNIT * (p.v_scale != nullptr ? p.v_scale[phys_head(p, h)] : p.v_scale_value) : 1.f;
}

// Query tokens of sequence b: q_lens[b] clamped to [0, q_len] (ragged), else q_len.
__device__ __forceinline__ int query_tokens(const Params& p, int b) {
  if (!HAS_QLEN) return 1;
  return p.q_lens != nullptr ? min(max(__ldg(p.q_lens + b), 0), p.q_len) : p.q_len;
}
__device__ __forceinline__ int row_head(const Params& p, int h, int r) {
  return phys_head(p, h) * p.group + (HAS_QLEN ? r % p.group : r);
}
__device__ __forceinline__ int ntiles_of(int len) { return (len + TILE - 1) / TILE; }

// The first key sequence b (of `len` keys) lets its queries see: the sliding
// window's start, or 0. A unit's tiles cover keys [window_start, len). With
// ragged query counts (q_lens) it is that of the sequence's own tokens, so no
// key before its window is read.
__device__ __forceinline__ int window_start(const Params& p, int len, int b) {
  return (HAS_WINDOW && p.window_left >= 0) ? max(0, len - query_tokens(p, b) - p.window_left) : 0;
}
__device__ __forceinline__ int tiles_of(const Params& p, int len, int b) {
  return ntiles_of(len - window_start(p, len, b));
}

// Whether sequence b has no query tokens (q_lens[b] == 0): it reads no key,
// and its rows are padding, written as an empty sequence's.
__device__ __forceinline__ bool no_query_tokens(const Params& p, int b) {
  return HAS_QLEN && query_tokens(p, b) == 0;
}

// Keys sequence b reads: kv_lens[b] clamped to [0, capacity] (capacity
// without kv_lens), or none without query tokens.
__device__ __forceinline__ int keys_of(const Params& p, int b) {
  const int len = p.kv_lens != nullptr ? clamp_len(p.kv_lens[b], p.capacity) : p.capacity;
  return no_query_tokens(p, b) ? 0 : len;
}

// keys_of(p, b); from the shared cache when filled.
__device__ __forceinline__ int seq_len(const Params& p, const int* lens_s, int b, bool cached) {
  if (!HAS_QLEN && p.kv_lens == nullptr) return p.capacity;
  if (cached && b < LENS_CACHE) return lens_s[b];
  return keys_of(p, b);
}

// ============================================================= 3. schedule

// Merge balance: the fewest tiles n per CTA with n * n * TILE >= a * longest
// * rows (rows: the unit's state, 16 * MT). A unit cut into P pieces is
// merged by one CTA reading P states of rows x D floats while the others
// stream; ranges of n tiles bound P to about longest / n, so the merge
// (P x rows) stays within a times a range's stream (n x TILE). Integer
// arithmetic only: schedule.merge_balanced_tiles mirrors it exactly.
__device__ __forceinline__ int merge_balanced_tiles(int longest, int a) {
  const long long v = (long long)a * longest * (16 * MT);
  long long n = (long long)sqrtf((float)v / TILE);
  while (n * n * TILE < v) ++n;
  while (n > 1 && (n - 1) * (n - 1) * TILE >= v) --n;
  return (int)max(1LL, n);
}

// Stream-K: `total` tiles (every unit's tiles end to end, units in (b, h)
// order) cut into `ctas` ranges; the first `heavy` CTAs own `per` tiles, the
// others `per - 1`. `ctas` is the grid, at most one CTA per `min_tiles`
// tiles (fewer, longer ranges: fewer partial states to merge on small
// calls); CTAs past it exit. Mirrored by schedule.lean_schedule.
// Split-K (the SPLIT_K decomposition and the runtime split of find_work): a
// unit of `ntiles` tiles in `ns` chunks of split_chunk tiles; split_pieces of
// them hold tiles.
__device__ __forceinline__ int split_chunk(int ntiles, int ns) { return max(1, (ntiles + ns - 1) / ns); }
__device__ __forceinline__ int split_pieces(int ntiles, int ns) {
  const int chunk = split_chunk(ntiles, ns);
  return (ntiles + chunk - 1) / chunk;
}
// Tiles [x, y) of chunk j.
__device__ __forceinline__ int2 split_chunk_tiles(int ntiles, int ns, int j) {
  const int chunk = split_chunk(ntiles, ns), t0 = min(j * chunk, ntiles);
  return make_int2(t0, min(t0 + chunk, ntiles));
}
// The launch-time split's chunks per unit (find_work): as many as the grid
// holds for every unit (0: fewer CTAs than units).
__device__ __forceinline__ int launch_split_count(const Params& p) {
  return (int)grid_ctas(p) / max(p.batch * p.heads_kv, 1);
}
// PAGED: the page index of token `tok` (tok / page_size, by the host's magic number).
__device__ __forceinline__ int page_index(const Params& p, int tok) {
  return (int)((__umulhi((u32)tok, p.page_magic) + (u32)tok) >> p.page_shift);
}

struct StreamK {
  i64 total, per, heavy;
  int ctas;
  int split;  // > 0: this launch runs split-K in one wave instead (chunks per unit; see find_work)
  __device__ static StreamK make(i64 total, int grid, int min_tiles = 1) {
    StreamK s;
    s.split = 0;
    s.total = total;
    s.ctas = (int)min((i64)grid, min_tiles > 1 ? max((i64)1, div_pos(total, min_tiles)) : total);
    if (total == 0) s.ctas = 0;
    s.per = s.ctas > 0 ? div_pos(total + s.ctas - 1, s.ctas) : 0;
    s.heavy = total - (s.per - 1) * s.ctas;
    return s;
  }
  __device__ i64 begin(i64 c) const { return c < heavy ? c * per : heavy * per + (c - heavy) * (per - 1); }
  __device__ i64 end(i64 c) const { return begin(c) + (c < heavy ? per : per - 1); }
  // The CTA whose range holds linear tile `tile`.
  __device__ i64 owner(i64 tile) const {
    return tile < heavy * per ? div_pos(tile, per) : heavy + div_pos(tile - heavy * per, per - 1);
  }
};

// One segment: tiles [t0, t1) of unit (b, h); tile t holds keys
// [start + t * TILE, start + (t + 1) * TILE) of the sequence, up to len.
struct Segment {
  int b, h;
  int t0, t1;
  int len, start, ntiles;  // the unit's keys, its first key seen, its tiles
  int ordinal;      // position among this CTA's segments (0: its first)
  i64 unit_first;   // STREAM_K: linear index of the unit's first tile
  bool partial;     // does not cover the unit: writes a partial state
  __device__ bool first_tile(int t) const { return t == t0; }
};

// Enumerates a CTA's segments in order. STREAM_K: from the unit holding tile
// `g` (set by find_work) to the end of the CTA's range, skipping empty
// sequences; SPLIT_K: the one chunk of the CTA's unit.
struct SegmentWalker {
  int b, h, t, len, start, ntiles, ordinal;
  i64 g, end;

  __device__ bool next(const Params& p, const int* lens_s, Segment& s) {
    if (g >= end) return false;
    s.b = b;
    s.h = h;
    s.t0 = t;
    s.len = len;
    s.start = start;
    s.ntiles = ntiles;
    s.ordinal = ordinal++;
    s.unit_first = g - t;
    if (p.decomposition == SPLIT_K) {
      s.t1 = t + (int)(end - g);
      s.partial = p.num_splits > 1;
      g = end;
      return true;
    }
    s.t1 = (int)min((i64)ntiles, t + (end - g));
    s.partial = !(s.t0 == 0 && s.t1 == ntiles);
    g += s.t1 - s.t0;
    if (g < end) {  // the next non-empty unit (one exists: tiles remain)
      t = 0;
      if (++h == p.heads_kv) {
        h = 0;
        do {
          ++b;
          len = seq_len(p, lens_s, b, true);
          start = window_start(p, len, b);
          ntiles = ntiles_of(len - start);
        } while (ntiles == 0);
      }
    }
    return true;
  }
};

// Partial states in the workspace: one slot per partial segment, holding the
// unscaled accumulator acc[group][D], then the running max m[group] (base 2)
// and the sum l[group]. STREAM_K: CTA c writes its first segment to slot 2c
// and its last to 2c + 1 (only these two can be partial); SPLIT_K: CTA c
// writes slot c.
struct PartialSlots {
  float* base;
  int stride, group;
  __device__ float* slot(int s) const { return base + (i64)s * stride; }
  __device__ float* acc(int s, int row) const { return slot(s) + row * D; }
  __device__ float* m(int s) const { return slot(s) + group * D; }
  __device__ float* l(int s) const { return slot(s) + group * D + group; }
  __device__ static int stream_k_slot(int cta, int ordinal) { return 2 * cta + (ordinal == 0 ? 0 : 1); }
};

// The contributors of a partial STREAM_K unit: CTAs first .. first + count - 1,
// each with one segment of it, in tile order. The first one may hold the unit
// as its last segment; every other one holds it as its first.
struct Contributors {
  int first, count, first_slot;
  __device__ static Contributors of(const StreamK& sk, const Segment& s) {
    Contributors c;
    c.first = (int)sk.owner(s.unit_first);
    c.count = (int)(sk.owner(s.unit_first + s.ntiles - 1) - c.first + 1);
    c.first_slot = PartialSlots::stream_k_slot(c.first, sk.begin(c.first) < s.unit_first ? 1 : 0);
    return c;
  }
  // The launch-time split (sk.split = ns chunks per unit): the unit's chunks
  // with tiles, on CTAs from (c / ns) ns on, each chunk its CTA's only
  // segment (slot 2 x CTA).
  __device__ static Contributors of_split(int c, int ns, int ntiles) {
    Contributors w;
    w.first = c / ns * ns;
    w.count = split_pieces(ntiles, ns);
    w.first_slot = PartialSlots::stream_k_slot(w.first, 0);
    return w;
  }
  __device__ int slot(int j) const { return j == 0 ? first_slot : PartialSlots::stream_k_slot(first + j, 0); }
};

// The slots of n states to merge, in merge order: state 0 in slot `first`,
// state j >= 1 in slot next + (j - 1) * step (every list the kernel merges
// has this form, so the merge steps a pointer instead of recomputing slots).
struct SlotList {
  int first, next, step;
  __device__ int operator()(int j) const { return j == 0 ? first : next + (j - 1) * step; }
};

// Merge tree of a unit with n contributors: 0 (one merge of all n states by
// the last arrival) up to MERGE_TREE_FROM - 1 states, else the group size G:
// contributors j in [q G, q G + G) form group q, whose last arrival merges the
// group's states into the slot of its first member, and the last group to
// finish merges the ceil(n / G) group states. G ~ sqrt(n), at most
// (red_floats / rows - 2) / 2 with red_floats = TILE x D (a bound from the
// merge's former shared-memory gather, kept so that the host's mirror,
// schedule.merge_group_size, and the schedules it describes stay the same).
constexpr int MERGE_TREE_FROM = LEAN_HOST_MERGE_TREE_FROM;  // schedule.MERGE_TREE_FROM
static_assert(MERGE_TREE_FROM >= 2, "a merge tree needs 2 pieces at least");
__device__ __forceinline__ int merge_group_size(int n, int rows, int red_floats) {
  if (n < MERGE_TREE_FROM) return 0;
  int G = 1;
  while (G * G < n) ++G;
  G = min(G, (red_floats / rows - 2) / 2);
  return G >= 2 ? G : 0;
}

// Arrival counter of one partial unit: the CTA whose arrival completes the
// count reduces the unit. No CTA ever waits for another, so the kernel is
// correct whether or not its CTAs are co-resident.
//
// Publication protocol:
//  * a contributor's threads store its partial slot, then the block meets at a
//    barrier; thread 0 then arrives with one acq_rel atomic add at GPU scope.
//    The barrier makes the block's stores precede the release (cumulativity).
//  * the arrival that completes the count acquires every earlier release, so
//    after a second barrier all threads of the reducing CTA may read every
//    contributor's slot (through L2: __ldcg, never the non-coherent path).
//  * the reducer resets the counter to 0 when done: every counter is 0 again
//    when a launch completes (the next launch, or graph replay, starts there).
// A launch that starts always completes: a fault inside a kernel is sticky in
// CUDA (the context, and every workspace in it, is lost), and a launch the
// driver refuses never starts. What may leave counts behind is a write from
// outside (a caller's workspace reused for something else): Plan re-arms
// (zeroes) the counters before the next launch when told to, or after a launch
// call raised.
struct UnitCounter {
  u32* word;
  __device__ bool arrive_is_last(int count) const {
    u32 old;
    asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(old) : "l"(word) : "memory");
    return (int)old + 1 == count;
  }
  __device__ void reset() const { asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(word) : "memory"); }
};

// ============================================================= 4. softmax state

// The one merge rule of softmax states (base-2 logits): a state whose running
// max is m enters a merge with max M with weight 2^(m - M). An empty state
// (m = -inf) weighs 0, also when every state is empty (M = -inf). Used by the
// online update of a tile, the merge of the warps' states, and the reduction.
__device__ __forceinline__ float merge_weight(float m, float M) {
  return fast_exp2(m - (M == -LEAN_INF ? 0.f : M));
}

// A merged row: out = acc * inv, lse (natural log); an empty row gives 0, -inf.
// With a sink (base-2 logit `sink`, -inf: none), the sink joins the merge
// once, here: as one more state of max `sink`, sum 1 and a zero accumulator.
struct Finalized {
  float inv, lse;
  __device__ static Finalized of(float M, float L, float sink = -LEAN_INF) {
    Finalized f;
    if (sink != -LEAN_INF) {
      const float Mn = fmaxf(M, sink), a = merge_weight(M, Mn);
      const float Ln = L * a + merge_weight(sink, Mn);
      f.inv = a / Ln;
      f.lse = (Mn + fast_log2(Ln)) * LEAN_LN2;
      return f;
    }
    f.inv = (L == 0.f) ? 0.f : 1.f / L;
    f.lse = (L == 0.f) ? -LEAN_INF : (M + fast_log2(L)) * LEAN_LN2;
    return f;
  }
};

// Writes N consecutive accumulator values [d, d + N) of query row `row` of unit
// (b, h): finalized to `out` (and lse, by the d == 0 writer), or to partial
// slot `slot` as they are (with m and l, by the d == 0 writer).
template <int N>
__device__ __forceinline__ void emit(const Params& p, const PartialSlots& ps, int b, int h, int row, int d,
                                     const float (&x)[N], float M, float L, bool partial, int slot) {
  static_assert(N == 2 || N == 4, "emit width");
  if (!partial) {
    const int hq = row_head(p, h, row), tok = row_token(p, row);
    const float sink = (HAS_SINKS && p.sinks != nullptr) ? p.sinks[hq] * LEAN_LOG2E : -LEAN_INF;
    Finalized f = Finalized::of(M, L, sink);
    f.inv *= v_multiplier(p, h);
    u16* o = p.out + (i64)b * p.o_sb + (HAS_QLEN ? (i64)tok * p.o_st : 0) + (i64)hq * p.o_sh + d;
    if (N == 2) {
      *reinterpret_cast<u32*>(o) = pack2<BF>(x[0] * f.inv, x[1] * f.inv);
    } else {
      uint2 w;
      w.x = pack2<BF>(x[0] * f.inv, x[1] * f.inv);
      w.y = pack2<BF>(x[N > 2 ? 2 : 0] * f.inv, x[N > 3 ? 3 : 0] * f.inv);
      *reinterpret_cast<uint2*>(o) = w;
    }
    if (d == 0 && p.lse != nullptr)
      p.lse[((i64)b * (HAS_QLEN ? p.q_len : 1) + tok) * call_heads_kv(p) * p.group + hq] = f.lse;
  } else {
    float* a = ps.acc(slot, row) + d;
    if (N == 2)
      *reinterpret_cast<float2*>(a) = make_float2(x[0], x[1]);
    else
      *reinterpret_cast<float4*>(a) = make_float4(x[0], x[1], x[N > 2 ? 2 : 0], x[N > 3 ? 3 : 0]);
    if (d == 0) {
      ps.m(slot)[row] = M;
      ps.l(slot)[row] = L;
    }
  }
}

// Zeros and lse = -inf for query rows [row0, row0 + n) of unit (b, h); one thread.
__device__ void emit_empty_rows(const Params& p, int b, int h, int row0, int n) {
  const PartialSlots none = {nullptr, 0, 0};
  const float z[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r = row0; r < row0 + n; ++r)
    for (int d = 0; d < D; d += 4) emit<4>(p, none, b, h, r, d, z, -LEAN_INF, 0.f, false, 0);
}

// One warp's softmax state over its 16 query rows and TW tokens per tile, in
// the mma.m16n8k16 fragment layout: this thread holds rows r0 = lane / 4 and
// r0 + 8 (index `half` 0 / 1), columns (lane % 4) * 2 + {0, 1} of every 8
// (HAS_FP8: of the even / odd columns of every 16, see acc_pair).
struct WarpState {
  float acc[D / 8][4];  // unnormalised output
  float m[2];           // running max (base-2 logits)
  float l[2];           // this thread's share of the running sum (quad_sum gives the row's)

  __device__ void reset() {
#pragma unroll
    for (int x = 0; x < D / 8; ++x) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.f;
    m[0] = m[1] = -LEAN_INF;
    l[0] = l[1] = 0.f;
  }

  // Absorbs a tile's scores (base-2 logits, -inf where masked): turns them into
  // probabilities relative to the new running max and rescales acc and l.
  __device__ void absorb(float (&s)[TW / 8][4]) {
    float mx[2] = {-LEAN_INF, -LEAN_INF};
#pragma unroll
    for (int nb = 0; nb < TW / 8; ++nb) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nb][0], s[nb][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nb][2], s[nb][3]));
    }
    float alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float mn = fmaxf(m[hf], quad_max(mx[hf]));
      alpha[hf] = merge_weight(m[hf], mn);
      m[hf] = mn;
    }
#pragma unroll
    for (int nb = 0; nb < TW / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nb][e] = merge_weight(s[nb][e], m[e >> 1]);
        rs[e >> 1] += s[nb][e];
      }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) l[hf] = l[hf] * alpha[hf] + rs[hf];
    // Once the running max settles most tiles leave it unchanged (alpha = 1
    // in every row of the warp): the rescale is skipped, a no-op exactly.
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int x = 0; x < D / 8; ++x) {
      acc[x][0] *= alpha[0];
      acc[x][1] *= alpha[0];
      acc[x][2] *= alpha[1];
      acc[x][3] *= alpha[1];
    }
  }
};

// ============================================================= 5. unit reduction

// Merges the n partial states of unit (b, h), slots slot_of(0 .. n-1), rows
// [row_lo, row_hi) (row_hi < 0: to the unit's last row), and writes the
// output, or (out_slot >= 0) the merged state to that slot, which
// may be one of the merged ones (every element is stored by the thread that
// read it, and only after a barrier that follows every thread's reads). Every
// thread of the block takes part (barriers and warp shuffles inside).
//
// One pass, online: a thread takes CH float4 elements of one row (columns col
// + TPR c, TPR threads per row: coalesced loads) and walks its lane's states
// in order, U at a time, loading each state's max and sum with its
// accumulators (RED_LOADS float4 loads in flight); the batch's max rescales
// the running state once, then each state of the batch adds with weight
// 2^(m_j - max). No gather of the maxima first, no shared memory, no barrier
// between the phases: a merge of a few states costs about one L2 round trip
// per batch, and with one warp per scheduler (head_dim 256) its instruction
// count (about 6 per float4 of a state) is what bounds it. CH: the elements a
// thread would hold if spread evenly over the block, rounded up to a power of
// two, at most 8. With few elements and many states, `lanes` adjacent threads
// share the elements, each taking every lanes-th state, and a fixed butterfly
// merges their states: the order depends on n, the rows merged and the spec
// only, so results are deterministic.
// Partial accumulators a thread loads at once while merging (more would
// spill at head_dim 256, whose tile loop holds 128 accumulators per thread).
constexpr int RED_LOADS = D >= 128 ? 16 : 8;
template <int N>
struct IntConst {
  static constexpr int value = N;
};

__device__ void reduce_unit(const Params& p, int b, int h, int n, SlotList slot_of, int out_slot = -1,
                            int row_lo = 0, int row_hi = -1, bool stamp = false) {
  const int g = unit_rows(p);
  if (row_hi < 0) row_hi = g;
  const bool to_slot = out_slot >= 0;
  const PartialSlots ps = {lane_partials(p), p.slot_stride, g};
  constexpr int PER_ROW = D / 4;
  static_assert(PER_ROW % 8 == 0, "8 elements of a row per thread");
  const int E = (row_hi - row_lo) * PER_ROW;
  int lanes = 1;
  while (lanes < 32 && 2 * lanes * E <= NT && 8 * 2 * lanes <= n) lanes *= 2;  // >= 8 states per lane
  const int lane = threadIdx.x & (lanes - 1);
  const int ept = (E * lanes + NT - 1) / NT;
  // State j at p.partials + base(j) floats: base(j) in 32 bits (the host keeps
  // the workspace under 2^31 floats), affine in j from state 1 on; a row's
  // max and sum at + g D + row and + g D + g + row (PartialSlots).
  const int base0 = slot_of.first * ps.stride, base1 = slot_of.next * ps.stride, jstep = slot_of.step * ps.stride;
  auto merge = [&](auto chunk) {
    constexpr int CH = decltype(chunk)::value, TPR = PER_ROW / CH, U = RED_LOADS / CH;
    const int q = threadIdx.x / lanes, col = q % TPR, rows_per_pass = NT / lanes / TPR;
    for (int r0 = row_lo; r0 < row_hi; r0 += rows_per_pass) {  // the same trip count in every thread
      const int row = r0 + q / TPR;                              // (barrier, shuffles)
      const bool live = row < row_hi;
      const int within = live ? row * D + 4 * col : 0, stat = live ? g * D + row : 0;
      float acc[CH][4];
#pragma unroll
      for (int c = 0; c < CH; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.f;
      float M = -LEAN_INF, L = 0.f;
      // j0: the same trip count in every thread (__any_sync below): lane l takes
      // states l, l + lanes, ... in order.
      for (int j0 = 0; j0 < n; j0 += U * lanes) {
        float4 x[U][CH];
        float mj[U], lj[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // past n or an idle row: an empty state, nothing read
          const int j = j0 + lane + u * lanes;
          const bool ok = live && j < n;
          const float* st = ps.base + (j == 0 ? base0 : (ok ? base1 + (j - 1) * jstep : base0));
          mj[u] = ok ? __ldcg(st + stat) : -LEAN_INF;
          lj[u] = ok ? __ldcg(st + stat + g) : 0.f;
#pragma unroll
          for (int c = 0; c < CH; ++c) x[u][c] = ok ? ldcg4(st + within + 4 * TPR * c) : make_float4(0, 0, 0, 0);
        }
        float Mn = M;
#pragma unroll
        for (int u = 0; u < U; ++u) Mn = fmaxf(Mn, mj[u]);
        if (stamp && r0 == row_lo && j0 == 0) LEAN_CSTAMP(4);
        const float a = M == Mn ? 1.f : merge_weight(M, Mn);  // 1 also while every state so far is empty
        L *= a;
        if (__any_sync(0xffffffffu, a != 1.f)) {  // the running max settles: most batches skip this
#pragma unroll
          for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[c][i] *= a;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float w = merge_weight(mj[u], Mn);  // an empty state (max -inf) weighs 0
          L += w * lj[u];
#pragma unroll
          for (int c = 0; c < CH; ++c) {
            acc[c][0] += w * x[u][c].x;
            acc[c][1] += w * x[u][c].y;
            acc[c][2] += w * x[u][c].z;
            acc[c][3] += w * x[u][c].w;
          }
        }
        M = Mn;
      }
      if (stamp && r0 == row_lo) LEAN_CSTAMP(5);
      for (int o = 1; o < lanes; o <<= 1) {  // merge the lanes' states
        const float Mo = __shfl_xor_sync(0xffffffffu, M, o), Lo = __shfl_xor_sync(0xffffffffu, L, o);
        const float Mn = fmaxf(M, Mo), a = merge_weight(M, Mn), ao = merge_weight(Mo, Mn);
        L = L * a + Lo * ao;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[c][i] = acc[c][i] * a + __shfl_xor_sync(0xffffffffu, acc[c][i], o) * ao;
        M = Mn;
      }
      if (stamp && r0 == row_lo) LEAN_CSTAMP(6);
      if (to_slot) __syncthreads();  // in place: every thread's reads of these rows precede the stores
      if (live && lane == 0)
#pragma unroll
        for (int c = 0; c < CH; ++c) emit<4>(p, ps, b, h, row, 4 * (col + TPR * c), acc[c], M, L, to_slot, out_slot);
      if (stamp && r0 == row_lo) LEAN_CSTAMP(7);
    }
  };
  if (ept > 4)
    merge(IntConst<8>());
  else if (ept > 2)
    merge(IntConst<4>());
  else if (ept > 1)
    merge(IntConst<2>());
  else
    merge(IntConst<1>());
}

// ============================================================= 6. the CTA

// The launch-time split's chunk of CTA c (find_work) needs no scan of the
// lengths: unit c / ns, chunk c % ns with ns = grid / units, and its own
// sequence's length. With p.split_prefetch (sm_90+) each CTA guesses that
// the split will be taken and brings its chunk's first STAGES - 1 tiles of K
// and V and its unit's query rows into L2 while the lengths are scanned and
// the decision made, so that its first copies hit L2 instead of waiting for
// DRAM: by 128-byte lines (1) or by one bulk prefetch per row (2). sm_90
// and newer only (HAS_BULK_PREFETCH: the GPUs it was measured on); older
// GPUs ignore p.split_prefetch. Nothing but L2 changes: where the launch keeps stream-K, the lines
// are read by whichever CTA streams those tiles (or evicted). Addresses are
// those of valid tokens only (paged: of pages inside the cache).
// begin issues the length load (before pass 1, so the two loads overlap);
// locate takes the length and prefetches the query rows and dense K/V rows,
// or loads the pages of paged rows (before the scan); issue prefetches the
// paged rows (once the split is taken, when the page loads are long in).
struct SplitPrefetch {
  static constexpr int ROWS = ((STAGES - 1) * TILE + NT - 1) / NT;  // rows of K and V per thread
  bool on, bulk;
  int b, h, j, ns, len;
  int tok[ROWS];   // this thread's rows' tokens, or -1
  int page[ROWS];  // PAGED: their pages

  __device__ void begin(const Params& p, int c) {
    on = false;
    // measured on sm_90 only (an H100): older GPUs do not prefetch
    if (!HAS_BULK_PREFETCH || p.split_prefetch == 0 || p.runtime_split == 0) return;
    bulk = p.split_prefetch == 2;
    ns = launch_split_count(p);
    if (ns < 1 || c >= p.batch * p.heads_kv * ns) return;
    const int unit = c / ns;  // as find_work's split branch
    j = c % ns;
    b = unit / p.heads_kv;
    h = unit % p.heads_kv;
    len = p.kv_lens != nullptr ? p.kv_lens[b] : p.capacity;  // keys_of, clamped in locate (after the load)
    if (no_query_tokens(p, b)) len = 0;
    on = true;
  }

  __device__ void locate(const Params& p) {
    if (!on) return;
    len = clamp_len(len, p.capacity);
    const int start = window_start(p, len, b);
    const int2 r = split_chunk_tiles(ntiles_of(len - start), ns, j);  // the chunk's first STAGES - 1 tiles:
    const int tok_lo = start + r.x * TILE, tok_hi = min(len, start + min(r.y, r.x + STAGES - 1) * TILE);
    const u32 row_bytes = D * KV_ELEM;
    if (tok_lo < tok_hi) {  // the query rows (load_q's), when the chunk has tiles
      const u16* qsrc = p.q + (i64)b * p.q_sb;
      for (int r = threadIdx.x; r < unit_rows(p); r += NT)
        prefetch_l2(qsrc + (HAS_QLEN ? (i64)row_token(p, r) * p.q_st : 0) + (i64)row_head(p, h, r) * p.q_sh,
                    D * 2, bulk);
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int t = tok_lo + (int)threadIdx.x + i * NT;
      tok[i] = t < tok_hi ? t : -1;
      if (tok[i] < 0) continue;
      if (PAGED) {
        page[i] = p.block_table[(i64)b * p.bt_sb + page_index(p, t)];
      } else {
        const char* kb = reinterpret_cast<const char*>(p.k);
        const char* vb = reinterpret_cast<const char*>(p.v);
        prefetch_l2(kb + ((i64)b * p.k_sb + (i64)t * p.k_st + (i64)phys_head(p, h) * p.k_sh) * KV_ELEM, row_bytes, bulk);
        prefetch_l2(vb + ((i64)b * p.v_sb + (i64)t * p.v_st + (i64)phys_head(p, h) * p.v_sh) * KV_ELEM, row_bytes, bulk);
      }
    }
  }

  __device__ void issue(const Params& p) const {
    if (!PAGED || !on) return;
    const char* kb = reinterpret_cast<const char*>(p.k);
    const char* vb = reinterpret_cast<const char*>(p.v);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int t = tok[i], pg = page[i];
      if (t < 0 || pg < 0 || pg >= p.num_pages) continue;
      const int row = t - page_index(p, t) * p.page_size;
      prefetch_l2(kb + ((i64)pg * p.k_sb + (i64)row * p.k_st + (i64)phys_head(p, h) * p.k_sh) * KV_ELEM, D * KV_ELEM, bulk);
      prefetch_l2(vb + ((i64)pg * p.v_sb + (i64)row * p.v_st + (i64)phys_head(p, h) * p.v_sh) * KV_ELEM, D * KV_ELEM, bulk);
    }
  }
};

// This CTA's work: the stream-K split (STREAM_K) and a walker positioned at
// the CTA's first tile. Fills the shared length cache and writes the outputs
// of empty sequences (sequence b by CTA b % grid) when `write_empty`. Returns
// false when the CTA owns no tiles. All threads call it (barriers inside).
__device__ bool find_work(const Params& p, const Shared& sh, bool write_empty, StreamK& sk, SegmentWalker& w) {
  const int tid = threadIdx.x, c = cta_index(p);
  int* lens_s = sh.lens();
  int* misc = sh.misc();
  w.ordinal = 0;
  if (p.decomposition == SPLIT_K) {
    const int unit = c / p.num_splits, j = c % p.num_splits;
    w.b = unit / p.heads_kv;
    w.h = unit % p.heads_kv;
    w.len = seq_len(p, lens_s, w.b, false);
    w.start = window_start(p, w.len, w.b);
    w.ntiles = ntiles_of(w.len - w.start);
    const int2 r = split_chunk_tiles(w.ntiles, p.num_splits, j);
    const int t0 = r.x, t1 = r.y;
    w.t = t0;
    w.g = t0;
    w.end = t1;
    sk = StreamK::make(0, 1);
    return t0 < t1;
  }
  SplitPrefetch pf;
  pf.begin(p, c);
  // Pass 1: every sequence's tiles (and the longest); lengths cached; empty
  // sequences written.
  int local = 0, longest = 0;
  for (int b = tid; b < p.batch; b += NT) {
    const int len = seq_len(p, lens_s, b, false);
    if (b < LENS_CACHE) lens_s[b] = len;
    const int nt = tiles_of(p, len, b);
    local += nt;
    longest = max(longest, nt);
    if (nt == 0 && write_empty && (b % grid_ctas(p)) == c)
      for (int h = 0; h < p.heads_kv; ++h) {
        emit_empty_rows(p, b, h, 0, unit_rows(p));
        if (p.unit_meta != nullptr) lane_meta(p)[2 * (b * p.heads_kv + h)] = 0;  // nothing for the combine
      }
  }
  pf.locate(p);
  int seq_tiles;
  const int incl1 = block_incl_scan_max<NT>(local, longest, misc, &seq_tiles, &longest);
  LEAN_STAMP(8);
  int min_tiles = p.min_tiles_per_cta;
  if (p.merge_balance > 0) min_tiles = max(min_tiles, merge_balanced_tiles(longest, p.merge_balance));
  sk = StreamK::make((i64)seq_tiles * p.heads_kv, grid_ctas(p), min_tiles);
  LEAN_STAMP(17);
  if (p.runtime_split && sk.ctas > 0) {
    // Split-K in one wave (ns chunks per unit, ns = grid / units) when its
    // busiest CTA streams at most p.runtime_split times stream-K's busiest
    // CTA's tiles, yet at most p.split_cap tiles more than it, plus
    // p.split_slack tiles (what stream-K's cuts cost: about a CTA's range on
    // a small call, a bounded amount on a long one): then no CTA holds two
    // units' pieces. Every CTA takes the same decision from the same scan. CTA c's
    // state goes to slot 2c, the unit's chunks on consecutive CTAs; the
    // combine launch merges them as it merges pieces (unit_meta set), or
    // else the unit's last arriving chunk does, as for stream-K's pieces
    // (Contributors::of_split).
    const int units = p.batch * p.heads_kv, ns = launch_split_count(p);
    // ceil(longest / ns) <= min(scale x per, per + cap) + slack, as one product: no division on every
    // CTA's path to its first copy
    const i64 allowed = min((i64)p.runtime_split * sk.per, (i64)sk.per + p.split_cap) + p.split_slack;
    if (ns >= 1 && (i64)longest <= (i64)ns * allowed) {
      LEAN_STAMP(18);
      pf.issue(p);
      if (c >= units * ns) return false;
      const int unit = c / ns, j = c % ns;
      w.b = unit / p.heads_kv;
      w.h = unit % p.heads_kv;
      w.len = seq_len(p, lens_s, w.b, true);
      w.start = window_start(p, w.len, w.b);
      w.ntiles = ntiles_of(w.len - w.start);
      const int2 r = split_chunk_tiles(w.ntiles, ns, j);
      const int t0 = r.x, t1 = r.y;
      if (j == 0 && tid == 0 && p.unit_meta != nullptr) {  // the unit's record: its chunks with tiles, the first one's slot
        lane_meta(p)[2 * unit] = split_pieces(w.ntiles, ns);
        lane_meta(p)[2 * unit + 1] = PartialSlots::stream_k_slot(c, 0);
      }
      sk.split = ns;
      w.t = t0;
      w.g = t0;
      w.end = t1;
      return t0 < t1;
    }
  }
  if (c >= sk.ctas) return false;
  LEAN_STAMP(9);
  w.g = sk.begin(c);
  w.end = sk.end(c);
  // Pass 2: the sequence that holds tile w.g (tiles of sequence b are
  // [excl * heads_kv, (excl + nt) * heads_kv) with excl its prefix sum). Up
  // to NT sequences, pass 1's scan (one sequence per thread) is that of pass 2.
  int running = 0;
  for (int base = 0; base < p.batch; base += NT) {
    const int b = base + tid;
    const int nt = p.batch <= NT ? local : (b < p.batch ? tiles_of(p, seq_len(p, lens_s, b, true), b) : 0);
    int tot = seq_tiles;
    const int incl = p.batch <= NT ? incl1 : block_incl_scan<NT>(nt, misc, &tot);
    const i64 excl = (i64)running + incl - nt;
    if (nt > 0 && excl * p.heads_kv <= w.g && w.g < (excl + nt) * p.heads_kv) {
      misc[MISC_START_SEQ] = b;
      misc[MISC_START_TILE] = (int)excl;
    }
    running += tot;
  }
  __syncthreads();
  w.b = misc[MISC_START_SEQ];
  w.len = seq_len(p, lens_s, w.b, true);
  w.start = window_start(p, w.len, w.b);
  w.ntiles = ntiles_of(w.len - w.start);
  const i64 r = w.g - (i64)misc[MISC_START_TILE] * p.heads_kv;
  w.h = (int)div_pos(r, w.ntiles);
  w.t = (int)(r - (i64)w.h * w.ntiles);
  return true;
}

// The loader's position: runs up to STAGES - 1 tiles ahead of the compute.
// kb / vb: this thread's chunk of the segment's unit in K and V (dense: of
// its sequence's token 0; paged: of page 0, row 0), set once per segment.
struct LoadCursor {
  SegmentWalker walker;
  Segment seg;
  int t;
  const char* kb;
  const char* vb;
  __device__ void start(const Params& p, const int* lens_s) {
    walker.next(p, lens_s, seg);  // past the last segment: seg is kept, and nothing more is loaded
    t = seg.t0;
    const i64 ch = (threadIdx.x % KCPR) * (16 / KV_ELEM);
    kb = reinterpret_cast<const char*>(p.k) + ((PAGED ? 0 : (i64)seg.b * p.k_sb) + (i64)phys_head(p, seg.h) * p.k_sh + ch) * KV_ELEM;
    vb = reinterpret_cast<const char*>(p.v) + ((PAGED ? 0 : (i64)seg.b * p.v_sb) + (i64)phys_head(p, seg.h) * p.v_sh + ch) * KV_ELEM;
  }
  __device__ void advance(const Params& p, const int* lens_s) {
    if (++t == seg.t1) start(p, lens_s);
  }
};

// Issues the cp.async copies of one tile of K and V (and, at a segment's first
// tile, the unit's query rows) into a pipeline stage. The per-row work is kept
// to a pointer step and a compare (the copies are most of the loop's
// instructions); rows past the tile's tokens, or on a page outside the cache,
// are zero-filled (src-size 0 reads nothing at its address) and masked.
// Dense: thread t copies 16-byte chunk t % KCPR of rows t / KCPR + RSTEP i,
// stepped by a stride from the tile's first row.
// Paged: thread t copies chunk t % KCPR of RUN consecutive rows (a run),
// starting at row RUN (t / KCPR). Without a window a tile starts at a
// multiple of TILE tokens and RUN divides TILE, so when RUN divides the page
// size a run lies on one
// page: one block-table read per thread and tile, and rows stepped by a
// stride as in the dense layout. Other page sizes (e.g. 1; the page_rows
// feature) read a page per row: lane j < RUN of a row group (the KCPR lanes
// of a run) reads the page of the run's row j, and load() passes each row's
// K and V offsets along the group by shuffles. The reads are made one tile
// ahead (prefetch_pages), off the critical path.
struct KVLoader {
  static constexpr int RSTEP = NT / KCPR;  // dense: rows one pass of the block covers
  static constexpr int ROW_ITERS = (TILE + RSTEP - 1) / RSTEP;
  static constexpr int RUN = imax(1, TILE / RSTEP);  // paged: rows per thread (TILE < RSTEP: threads past TILE idle)
  static constexpr bool one_page = PAGED && !PAGE_ROWS;  // the host checked that RUN divides the page size
  int page[1];  // PAGED: physical page of the run (one_page) or of this lane's row of it; -1: none
  int prow0;    // PAGED: the run's first row's (or this lane's row's) place in its page
  u64 policy;

  __device__ void init(const Params& p) {
    policy = evict_first_policy();
    if (one_page && p.page_size % RUN != 0) __trap();  // a host bug: this spec needs page_rows
    if (PAGED && p.page_magic == 0) __trap();          // a host bug: the page divisor is not set
    if (LANES && p.lanes < 1) __trap();                 // ... or the lanes
  }

  __device__ void prefetch_pages(const Params& p, const Segment& s, int t, bool valid) {
    if (!PAGED) return;
    const int ps = p.page_size;
    const int tok0 = s.start + t * TILE;
    const int ntok = valid ? min(TILE, s.len - tok0) : 0;
    const int r0 = (threadIdx.x / KCPR) * RUN;
    const int j = one_page ? 0 : threadIdx.x % KCPR;  // page_rows: this lane's row of the run
    const int tok = tok0 + r0 + j;  // >= 0 and < 2^31: the sum below fits in 32 bits
    const int pq = page_index(p, tok);
    prow0 = tok - pq * ps;
    const int* bt = p.block_table + (i64)s.b * p.bt_sb;
    // checked when used (load): this read's latency is hidden
    page[0] = (j < RUN && r0 + j < ntok) ? bt[pq] : -1;
  }

  __device__ void load_q(const Params& p, const Shared& sh, const Segment& s) const {
    u16* qd = sh.q(s.ordinal % STAGES);
    const u16* qsrc = p.q + (i64)s.b * p.q_sb;
    for (int e = threadIdx.x; e < ROWS_Q * CPR; e += NT) {
      const int r = e / CPR, ch = e % CPR;
      const bool ok = r < unit_rows(p);
      const i64 off = (HAS_QLEN ? (i64)row_token(p, r) * p.q_st : 0) + (i64)row_head(p, s.h, r) * p.q_sh + ch * 8;
      cp_async16(smem_u32(qd + swz(r, ch)), ok ? (const void*)(qsrc + off) : (const void*)p.q, ok ? 16 : 0);
    }
  }

  // Returns true when a row of the tile's tokens lies on a page outside the
  // cache (paged; such rows are zero-filled and masked).
  __device__ bool load(const Params& p, const Shared& sh, int stage, const LoadCursor& c) const {
    const int tid = threadIdx.x;
    const Segment& s = c.seg;
    if (s.first_tile(c.t)) load_q(p, sh, s);  // the unit's query rows into the Q ring
    const int tok0 = s.start + c.t * TILE;
    const int ntok = min(TILE, s.len - tok0);
    unsigned char* ks = reinterpret_cast<unsigned char*>(sh.kv(stage));
    unsigned char* vs = ks + TILE * D * KV_ELEM;
    const int ch = tid % KCPR;
    if (PAGED) return load_paged(p, sh, stage, c, ks, vs, ch, ntok);
    const int r0 = tid / KCPR;
    // Both ring layouts (swz, swz8) repeat every 8 rows: with RSTEP a multiple
    // of 8, row r0 + RSTEP it lies a constant distance after row r0.
    const int so0 = HAS_FP8 ? swz8(r0, ch) : 2 * swz(r0, ch);
    const i64 kst = p.k_st * KV_ELEM, vst = p.v_st * KV_ELEM;  // bytes per token
    const char* kp = c.kb + (i64)(tok0 + r0) * kst;  // row r0 of the tile, stepped below
    const char* vp = c.vb + (i64)(tok0 + r0) * vst;
#pragma unroll
    for (int it = 0; it < ROW_ITERS; ++it) {
      const int r = r0 + it * RSTEP;
      if (TILE % RSTEP != 0 && r >= TILE) break;
      const bool ok = r < ntok;
      const int so = RSTEP % 8 == 0 ? so0 + it * RSTEP * D * KV_ELEM : (HAS_FP8 ? swz8(r, ch) : 2 * swz(r, ch));
      cp_async16_stream(smem_u32(ks + so), kp, ok ? 16 : 0, policy);
      cp_async16_stream(smem_u32(vs + so), vp, ok ? 16 : 0, policy);
      kp += RSTEP * kst;
      vp += RSTEP * vst;
    }
    return false;
  }

  __device__ bool load_paged(const Params& p, const Shared& sh, int stage, const LoadCursor& c, unsigned char* ks,
                             unsigned char* vs, int ch, int ntok) const {
    const int r0 = (threadIdx.x / KCPR) * RUN;
    // a page's bytes and a page's rows fit in 32 bits (the plan copies a cache whose do not)
    const u32 ksb = (u32)(p.k_sb * KV_ELEM), vsb = (u32)(p.v_sb * KV_ELEM);
    const int kst = (int)(p.k_st * KV_ELEM), vst = (int)(p.v_st * KV_ELEM);
    unsigned char* mrow = sh.mask(stage) + r0;
    // the page of this thread's run (one_page) or of its lane's row of the
    // run (page_rows): -1 past the tile's tokens; an offset from a page not
    // in the cache is never read (its copies have src-size 0)
    const int pg = page[0];
    const bool pok = pg >= 0 && pg < p.num_pages;
    const u64 koff = (u64)(u32)pg * ksb + (u32)(prow0 * kst);
    const u64 voff = (u64)(u32)pg * vsb + (u32)(prow0 * vst);
    bool bad = false;
    if (one_page) {
      if (TILE < RSTEP && r0 >= TILE) return false;  // an idle thread (more row groups than rows)
      const char* kp = c.kb + koff;
      const char* vp = c.vb + voff;
      bad = !pok && r0 < ntok;
      if (ch == 0) {  // rows past ntok are masked by ntok itself
        if (RUN % 4 == 0) {
#pragma unroll
          for (int w = 0; w < RUN / 4; ++w) reinterpret_cast<u32*>(mrow)[w] = pok ? 0x01010101u : 0u;
        } else {
#pragma unroll
          for (int it = 0; it < RUN; ++it) mrow[it] = pok ? 1 : 0;
        }
      }
#pragma unroll
      for (int it = 0; it < RUN; ++it) {
        const int r = r0 + it;
        const bool ok = pok && r < ntok;
        const int so = HAS_FP8 ? swz8(r, ch) : 2 * swz(r, ch);
        cp_async16_stream(smem_u32(ks + so), kp, ok ? 16 : 0, policy);
        cp_async16_stream(smem_u32(vs + so), vp, ok ? 16 : 0, policy);
        kp += kst;
        vp += vst;
      }
      return bad;
    }
    // each lane's row's K and V offsets along its run's lanes; the top bit
    // of the K offset set: no row (past the tile's tokens, or a page outside
    // the cache); the offsets are unsigned (the plan copies a cache whose
    // page or token strides run backwards)
    const u64 kflag = pok ? koff : koff | (1ull << 63);
    const bool live = TILE >= RSTEP || r0 < TILE;  // idle lanes still take part in the shuffles
#pragma unroll
    for (int it = 0; it < RUN; ++it) {
      const int r = r0 + it;
      const u32 khi = __shfl_sync(0xffffffffu, (u32)(kflag >> 32), it, KCPR);
      const u32 klo = __shfl_sync(0xffffffffu, (u32)kflag, it, KCPR);
      const u32 vhi = __shfl_sync(0xffffffffu, (u32)(voff >> 32), it, KCPR);
      const u32 vlo = __shfl_sync(0xffffffffu, (u32)voff, it, KCPR);
      const bool ok = (int)khi >= 0;
      const char* kp = c.kb + (((u64)khi << 32) | klo);
      const char* vp = c.vb + (((u64)vhi << 32) | vlo);
      bad = bad || (!ok && r < ntok && live);
      if (live) {
        if (ch == 0) mrow[it] = ok ? 1 : 0;
        const int so = HAS_FP8 ? swz8(r, ch) : 2 * swz(r, ch);
        cp_async16_stream(smem_u32(ks + so), kp, ok ? 16 : 0, policy);
        cp_async16_stream(smem_u32(vs + so), vp, ok ? 16 : 0, policy);
      }
    }
    return bad;
  }
};
static_assert(!PAGE_ROWS || (KVLoader::RUN <= KCPR && KCPR <= 32), "page_rows: a run's rows fit its lanes, one warp");
static_assert(KVLoader::RUN == LEAN_HOST_RUN_ROWS, "loader run differs from kernels.Spec.run_rows");

// HAS_FP8: two fp8 values (bytes B0 and B1 of w) as a pair of fp16 words (B0
// in the low half). e5m2 is the high byte of the fp16 of the same value. e4m3
// (4 exponent bits, bias 7; 3 mantissa bits) moved into fp16's fields keeps
// its exponent field and mantissa bits, which reads as the value / 256 for
// normal and subnormal numbers alike (exact: the bias differs by 8);
// k_multiplier and v_multiplier restore the 256. e4m3's NaN bytes (0x7F, 0xFF)
// read as +-480 there, and as NaN with the hardware conversion (the format has
// no infinity; caches do not hold NaN).
// FP8_HW_CVT: e4m3 by the hardware conversion (one instruction a pair;
// exact, NaN bytes to NaN).
template <int B0, int B1>
__device__ __forceinline__ u32 fp8x2_to_f16x2(u32 w) {
  if (FP8_E4M3 && FP8_HW_CVT) {
    u32 r;
    if (B0 == 2 && B1 == 3) {  // the high half of w as it is
      asm("{.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %1;\n\tcvt.rn.f16x2.e4m3x2 %0, hi;}" : "=r"(r) : "r"(w));
      return r;
    }
    const u16 pair = (B1 == B0 + 1 && B0 % 2 == 0) ? (u16)(w >> (8 * B0))  // a half of w as it is
                                                   : (u16)__byte_perm(w, 0u, B0 | (B1 << 4));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(pair));
    return r;
  }
  const u32 t = __byte_perm(w, 0u, (B1 << 12) | (4 << 8) | (B0 << 4) | 4);  // byte b as b << 8 in its half
  return FP8_E5M2 ? t : ((t & 0x80008000u) | ((t & 0x7F007F00u) >> 1));
}
// HAS_FP8: bytes 0, 2 (even) and 1, 3 (odd) of w as two fp16 pairs; with
// the hardware conversion one byte permutation serves both (the odd pair is
// converted from the high half in place).
__device__ __forceinline__ void fp8x4_to_f16x2_even_odd(u32 w, u32& even, u32& odd) {
  if (FP8_E4M3 && FP8_HW_CVT) {
    const u32 t = __byte_perm(w, 0u, 0x3120);  // bytes 0, 2 in the low half, 1, 3 in the high
    even = fp8x2_to_f16x2<0, 1>(t);
    odd = fp8x2_to_f16x2<2, 3>(t);
  } else {
    even = fp8x2_to_f16x2<0, 2>(w);
    odd = fp8x2_to_f16x2<1, 3>(w);
  }
}

// HAS_FP8: readies the segment's query rows (Q ring slot qs) for the fp8
// score MMAs, once per segment, before any warp reads them (all threads take
// part; the caller's barrier follows). Within each 16-column block of a row
// the 32-bit words (column pairs) 0, 2, 4, 6 move to the block's first 16
// bytes and 1, 3, 5, 7 to its second: the fp16 path's ldmatrix then gives a
// lane columns 16kk + 4 (lane % 4) + {0, 1} in A registers 0 / 1 and + {2, 3}
// in 2 / 3, the four bytes of one 32-bit K read (tile_scores). bf16 q becomes
// fp16, each row times the power of two 2^e that brings its largest magnitude
// into [2^14, 2^15) (exact for every element down to 2^-28 of that: fp16
// holds bf16's 8 bits); 2^-e goes to q_scale[row], for the row's logits.
// Q_ROW_SCALE helpers: a query row's largest magnitude over the LANES
// consecutive lanes that hold it (each passing its own words' maximum, as
// bf16 bits << 16: ordered as the values), its factor 2^e that brings that
// magnitude into [2^14, 2^15) (returning 2^-e, for the row's logits), and a
// bf16 pair as an fp16 pair times 2^e.
__device__ __forceinline__ u32 bf16_pair_max_bits(u32 w) {
  return max((w << 16) & 0x7FFFFFFFu, w & 0x7FFF0000u);
}
template <int LANES>
__device__ __forceinline__ float bf16_row_factor(u32 mx, float& f) {
#pragma unroll
  for (int o = 1; o < LANES; o <<= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  // exponent of the largest magnitude (0 for zeros and subnormals, 255 for inf / NaN): the
  // factor 2^(14 - (ex - 127)), at most 2^126; inf and NaN stay what they are
  const int ex = (int)(mx >> 23);
  const int sh2 = min(14 - (ex - 127), 126);
  f = __uint_as_float((u32)(127 + sh2) << 23);
  return __uint_as_float((u32)(127 - sh2) << 23);
}
__device__ __forceinline__ u32 bf16_pair_to_fp16(u32 w, float f) {
  const float x0 = __uint_as_float(w << 16) * f, x1 = __uint_as_float(w & 0xFFFF0000u) * f;
  return pack2<false>(x0, x1);
}

// FP8_WIDE_K: per 64-column group j of a row (its chunks 8j..8j+7 of 4 words,
// word w' holding columns 64j + 2w' + {0, 1}), chunk 8j + c of the result gets
// words c, 8 + c, 16 + c, 24 + c: at score step v = 4j + i the ldmatrix then
// gives lane q columns 16 (4j + q) + 4i + {0, 1} (A 0 / 1) and + {2, 3} (A 2 /
// 3), the four bytes of word i of the lane's 16-byte K read. bf16 rows as above.
__device__ void prepare_q_fp8_wide(u16* qs, float* q_scale) {
  constexpr int GROUPS = D / 64;  // 128-byte groups per row: 1, 2 or 4 lanes of one warp
  constexpr int ITEMS = ROWS_Q * GROUPS;
  static_assert(GROUPS == 1 || ITEMS % 32 == 0, "whole warps where a row's lanes shuffle");
  for (int e = threadIdx.x; e < ITEMS; e += NT) {  // warp-uniform bound where GROUPS > 1
    const int r = e / GROUPS, j = e % GROUPS;
    float f = 1.f;
    if (Q_ROW_SCALE) {  // a first pass for the row's factor, so that only the raw words stay live below
      u32 mx = 0;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const uint4 a = *reinterpret_cast<const uint4*>(qs + swz(r, 8 * j + c));
        mx = max(max(mx, max(bf16_pair_max_bits(a.x), bf16_pair_max_bits(a.y))),
                 max(bf16_pair_max_bits(a.z), bf16_pair_max_bits(a.w)));
      }
      const float inv = bf16_row_factor<GROUPS>(mx, f);
      if (j == 0) q_scale[r] = inv;
    }
    u32 w[32];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint4 a = *reinterpret_cast<const uint4*>(qs + swz(r, 8 * j + c));
      w[4 * c] = a.x, w[4 * c + 1] = a.y, w[4 * c + 2] = a.z, w[4 * c + 3] = a.w;
    }
    auto cv = [f](u32 x) { return Q_ROW_SCALE ? bf16_pair_to_fp16(x, f) : x; };
#pragma unroll
    for (int c = 0; c < 8; ++c)
      *reinterpret_cast<uint4*>(qs + swz(r, 8 * j + c)) =
          make_uint4(cv(w[c]), cv(w[8 + c]), cv(w[16 + c]), cv(w[24 + c]));
  }
}

__device__ void prepare_q_fp8(u16* qs, float* q_scale) {
  if (FP8_WIDE_K) return prepare_q_fp8_wide(qs, q_scale);
  constexpr int BLOCKS = D / 16;  // 32-byte blocks per row: 4, 8 or 16 lanes of one warp
  constexpr int ITEMS = ROWS_Q * BLOCKS;
  static_assert(ITEMS % 32 == 0, "whole warps per pass");
  for (int e = threadIdx.x; e < ITEMS; e += NT) {  // warp-uniform bound
    const int r = e / BLOCKS, kk = e % BLOCKS;
    uint4* lo = reinterpret_cast<uint4*>(qs + swz(r, 2 * kk));
    uint4* hi = reinterpret_cast<uint4*>(qs + swz(r, 2 * kk + 1));
    u32 w[8];
    {
      const uint4 a = *lo, b = *hi;
      w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    }
    if (Q_ROW_SCALE) {
      u32 mx = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) mx = max(mx, bf16_pair_max_bits(w[i]));
      float f;
      const float inv = bf16_row_factor<BLOCKS>(mx, f);
#pragma unroll
      for (int i = 0; i < 8; ++i) w[i] = bf16_pair_to_fp16(w[i], f);
      if (kk == 0) q_scale[r] = inv;
    }
    *lo = make_uint4(w[0], w[2], w[4], w[6]);
    *hi = make_uint4(w[1], w[3], w[5], w[7]);
  }
}

// Column of the first of the two accumulator values acc[x][2 hf + {0, 1}] that
// this lane's accumulator pair x stands for, and those two values.
// fp16/bf16: n8 block x holds columns 8x + 2 (lane % 4) + {0, 1}.
// HAS_FP8 (accumulate_pv): blocks 2j and 2j + 1 hold the even and odd columns
// of columns [16j, 16j + 16), so this lane holds 16j + 4 (lane % 4) + {0..3}:
// pair 2j is columns + {0, 1}, pair 2j + 1 columns + {2, 3}.
__device__ __forceinline__ int acc_pair(const float (&acc)[D / 8][4], int x, int hf, int lane, float (&v)[2]) {
  if (!HAS_FP8) {
    v[0] = acc[x][2 * hf];
    v[1] = acc[x][2 * hf + 1];
    return x * 8 + (lane & 3) * 2;
  }
  const int j = x >> 1, e = x & 1;
  v[0] = acc[2 * j][2 * hf + e];
  v[1] = acc[2 * j + 1][2 * hf + e];
  return 16 * j + 4 * (lane & 3) + 2 * e;
}

// S = Q K^T of this warp's 16 rows and TW tokens, masked (past the unit's
// length, or on a page outside the cache) and scaled to base-2 logits
// (HAS_SOFTCAP: soft-capped first).
// HAS_QLEN: row r (query token i = r / group) of a sequence of `nq` query
// tokens sees keys up to len - nq + i (none when i >= nq: a padding token of
// a ragged batch), and with a window none before that minus window_left;
// `tok0` is the tile's first key, `len` the sequence's.
__device__ __forceinline__ void tile_scores(const Params& p, const Shared& sh, const u16* qs, const u16* ks,
                                            int stage, int ntok, int tok0, int len, int nq, float kmul, const float (&qmul)[2],
                                            bool bad_pages, float (&s)[TW / 8][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / WN, tokw = (warp % WN) * TW;
  int hi[2] = {0, 0}, lo[2] = {0, 0};  // HAS_QLEN: visible keys [lo, hi] relative to tok0, per half
  if (HAS_QLEN) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int tok = row_token(p, wm * 16 + (lane >> 2) + 8 * hf);
      const int last = len - nq + tok;
      hi[hf] = tok < nq ? last - tok0 : -(1 << 30);
      lo[hf] = (HAS_WINDOW && p.window_left >= 0) ? last - p.window_left - tok0 : -(1 << 30);
    }
  }
#pragma unroll
  for (int x = 0; x < TW / 8; ++x) s[x][0] = s[x][1] = s[x][2] = s[x][3] = 0.f;
  // fp8 K straight from the ring: in each 16-wide step kk the MMA's k indices
  // {2q, 2q+1, 2q+8, 2q+9} (q = lane % 4) are mapped to columns 16kk + 4q +
  // {0..3} of q and K alike (a dot product does not depend on the order of
  // its terms), so that one 32-bit read of a K row gives both B registers;
  // q's columns were regrouped for this by prepare_q_fp8, so the same
  // ldmatrix as for fp16/bf16 K gives the A registers.
  const unsigned char* kb = reinterpret_cast<const unsigned char*>(ks);
  if (FP8_WIDE_K) {  // steps 4j..4j+3 from one 16-byte read per 8 tokens (see prepare_q_fp8_wide)
#pragma unroll
    for (int j = 0; j < D / 64; ++j) {
      u32 a[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        ldsm_x4(a[i][0], a[i][1], a[i][2], a[i][3],
                smem_u32(qs + swz(wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, (4 * j + i) * 2 + (lane >> 4))));
#pragma unroll
      for (int nb = 0; nb < TW / 8; ++nb) {
        const uint4 u = *reinterpret_cast<const uint4*>(kb + swz8(tokw + nb * 8 + (lane >> 2), 4 * j + (lane & 3)));
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
          mma16816<false>(s[nb], a[i][0], a[i][1], a[i][2], a[i][3], fp8x2_to_f16x2<0, 1>(w[i]),
                          fp8x2_to_f16x2<2, 3>(w[i]));
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < (FP8_WIDE_K ? 0 : D / 16); ++kk) {
    u32 a0, a1, a2, a3;
    ldsm_x4(a0, a1, a2, a3, smem_u32(qs + swz(wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4))));
    if (HAS_FP8) {
#pragma unroll
      for (int nb = 0; nb < TW / 8; ++nb) {
        const u32 w = *reinterpret_cast<const u32*>(kb + swz8(tokw + nb * 8 + (lane >> 2), kk) + 4 * (lane & 3));
        mma16816<false>(s[nb], a0, a1, a2, a3, fp8x2_to_f16x2<0, 1>(w), fp8x2_to_f16x2<2, 3>(w));
      }
    } else {
#pragma unroll
      for (int nb2 = 0; nb2 < TW / 16; ++nb2) {
        u32 b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3,
                smem_u32(ks + swz(tokw + nb2 * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1))));
        mma16816<MMA_BF>(s[2 * nb2], a0, a1, a2, a3, b0, b1);
        mma16816<MMA_BF>(s[2 * nb2 + 1], a0, a1, a2, a3, b2, b3);
      }
    }
  }
  // a score (of row half hf) as a base-2 logit
  auto logit = [&](float x, int hf) {
    const float f = kmul * (Q_ROW_SCALE ? qmul[hf] : 1.f);
    return HAS_SOFTCAP ? p.softcap_log2 * fast_tanh(x * (p.softcap_scale * f)) : x * (p.scale_log2 * f);
  };
  const unsigned char* mask = sh.mask(stage);
  // Per-element masks only where an element can be masked: a tile past the
  // sequence's end, a row on a page outside the cache (bad_pages), query-token
  // limits (ntok and bad_pages are the same in every thread: a uniform branch).
  if (!bad_pages && !HAS_QLEN && ntok == TILE) {
#pragma unroll
    for (int nb = 0; nb < TW / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = logit(s[nb][e], e >> 1);
    return;
  }
#pragma unroll
  for (int nb = 0; nb < TW / 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tk = tokw + nb * 8 + (lane & 3) * 2 + (e & 1);
      bool ok = tk < ntok;
      if (PAGED) ok = ok && mask[tk];
      if (HAS_QLEN) ok = ok && tk <= hi[e >> 1] && tk >= lo[e >> 1];
      const float x = logit(s[nb][e], e >> 1);
      s[nb][e] = ok ? x : -LEAN_INF;
    }
  }
}

// acc += P V for this warp's rows and tokens (P: the probabilities in s).
// HAS_FP8: V bytes straight from the ring. An ldmatrix.trans of 16-bit
// elements gives a lane the byte pairs (columns 2n, 2n + 1) of two tokens;
// the even bytes form the B operand of the even columns, the odd bytes that
// of the odd columns (see acc_pair for where each column lands).
__device__ __forceinline__ void accumulate_pv(WarpState& st, const float (&s)[TW / 8][4], const u16* vs) {
  const int lane = threadIdx.x & 31, tokw = ((threadIdx.x >> 5) % WN) * TW;
#pragma unroll
  for (int kb = 0; kb < TW / 16; ++kb) {
    const u32 p0 = pack2<MMA_BF>(s[2 * kb][0], s[2 * kb][1]);
    const u32 p1 = pack2<MMA_BF>(s[2 * kb][2], s[2 * kb][3]);
    const u32 p2 = pack2<MMA_BF>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
    const u32 p3 = pack2<MMA_BF>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
    if (HAS_FP8) {
      const unsigned char* vb = reinterpret_cast<const unsigned char*>(vs);
      const int mi = lane >> 3;  // matrix: tokens + 8 (mi & 1), chunk + 1 (mi >> 1)
#pragma unroll
      for (int c2 = 0; c2 < D / 32; ++c2) {
        u32 r0, r1, r2, r3;
        ldsm_x4_t(r0, r1, r2, r3, smem_u32(vb + swz8(tokw + kb * 16 + (mi & 1) * 8 + (lane & 7), 2 * c2 + (mi >> 1))));
        u32 e0, o0, e1, o1, e2, o2, e3, o3;  // even / odd columns' B registers
        fp8x4_to_f16x2_even_odd(r0, e0, o0);
        fp8x4_to_f16x2_even_odd(r1, e1, o1);
        fp8x4_to_f16x2_even_odd(r2, e2, o2);
        fp8x4_to_f16x2_even_odd(r3, e3, o3);
        mma16816<false>(st.acc[4 * c2], p0, p1, p2, p3, e0, e1);
        mma16816<false>(st.acc[4 * c2 + 1], p0, p1, p2, p3, o0, o1);
        mma16816<false>(st.acc[4 * c2 + 2], p0, p1, p2, p3, e2, e3);
        mma16816<false>(st.acc[4 * c2 + 3], p0, p1, p2, p3, o2, o3);
      }
    } else {
#pragma unroll
      for (int db2 = 0; db2 < D / 16; ++db2) {
        u32 b0, b1, b2, b3;
        ldsm_x4_t(b0, b1, b2, b3,
                  smem_u32(vs + swz(tokw + kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, db2 * 2 + (lane >> 4))));
        mma16816<MMA_BF>(st.acc[2 * db2], p0, p1, p2, p3, b0, b1);
        mma16816<MMA_BF>(st.acc[2 * db2 + 1], p0, p1, p2, p3, b2, b3);
      }
    }
  }
}

// The WN token-slices of each row merged through shared memory (`scr`) and
// written, in PASSES column ranges one after the other; the warp stats are in
// stat_m / stat_l (see store_segment).
template <int PASSES>
__device__ __forceinline__ void store_merged(const Params& p, const PartialSlots& ps, const Segment& s,
                                             const WarpState& st, int slot, float* scr, const float* stat_m,
                                             const float* stat_l, const int (&rows)[2], int wn, int lane) {
  const int g = ps.group;
  constexpr int DP = D / PASSES;                // columns of a pass: scr holds WN x ROWS_Q rows of DP floats
  constexpr int XP = D / 8 / PASSES;            // accumulator pairs x of a pass
  constexpr int SWZ = (DP / 2 - 1) & (7 << 2);  // the float2 index's bits that a row's XOR may flip
  static_assert(!HAS_FP8 || DP % 32 == 0, "fp8 merge swizzle: a pass's row spans whole 128-byte lines");
  // the XOR of a row's float2 indices, for the writes and the reduction's reads: fp8 rows 2m, 2m + 1 in
  // opposite halves of the banks (a quarter warp's float4 writes), 16-bit rows 8 apart in 32-byte steps
  auto row_xor = [](int row) { return HAS_FP8 ? (row & 1) << 3 : (row & 7) << 2 & SWZ; };
  float* mine = scr + wn * ROWS_Q * DP;
#pragma unroll
  for (int pass = 0; pass < PASSES; ++pass) {
    if (pass > 0) __syncthreads();  // the previous pass's reads of scr precede these writes
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = rows[hf];
      if (row >= g) continue;  // padding rows of the query tile: read by no one below
      float M = -LEAN_INF;
#pragma unroll
      for (int j = 0; j < WN; ++j) M = fmaxf(M, stat_m[j * ROWS_Q + row]);
      const float f = merge_weight(st.m[hf], M);
      if (HAS_FP8) {
        // a lane's pairs x = 2i and 2i + 1 are columns 16i + 4 (lane % 4) + 0..3: one float4
#pragma unroll
        for (int k = 0; k < XP / 2; ++k) {  // (counted from 0: fully unrolled at D = 256 too)
          const int i = pass * XP / 2 + k;
          float v[2], w[2];
          const int col = acc_pair(st.acc, 2 * i, hf, lane, v);
          acc_pair(st.acc, 2 * i + 1, hf, lane, w);
          const int f2 = (col >> 1) - pass * (DP / 2);
          *reinterpret_cast<float4*>(mine + row * DP + 2 * (f2 ^ row_xor(row))) =
              make_float4(v[0] * f, v[1] * f, w[0] * f, w[1] * f);
        }
        continue;
      }
#pragma unroll
      for (int x = pass * XP; x < (pass + 1) * XP; ++x) {
        float v[2];
        acc_pair(st.acc, x, hf, lane, v);  // columns x * 8 + 2 (lane % 4) + 0..1
        const int f2 = x * 4 + (lane & 3) - pass * (DP / 2);  // their float2 within the pass's row
        *reinterpret_cast<float2*>(mine + row * DP + 2 * (f2 ^ row_xor(row))) =
            make_float2(v[0] * f, v[1] * f);
      }
    }
    __syncthreads();
    if (pass == 0) LEAN_STAMP(22);
    constexpr int PER_ROW = DP / 4;
    for (int e = threadIdx.x; e < g * PER_ROW; e += NT) {
      const int row = e / PER_ROW, d = (e % PER_ROW) * 4;
      float M = -LEAN_INF, L = 0.f;
#pragma unroll
      for (int j = 0; j < WN; ++j) M = fmaxf(M, stat_m[j * ROWS_Q + row]);
      float sum[4] = {0.f, 0.f, 0.f, 0.f};
      const int f2 = (d >> 1) ^ row_xor(row);
#pragma unroll
      for (int j = 0; j < WN; ++j) {
        L += stat_l[j * ROWS_Q + row] * merge_weight(stat_m[j * ROWS_Q + row], M);
        const float4 x = *reinterpret_cast<const float4*>(scr + (j * ROWS_Q + row) * DP + 2 * f2);
        sum[0] += x.x;
        sum[1] += x.y;
        sum[2] += x.z;
        sum[3] += x.w;
      }
      emit<4>(p, ps, s.b, s.h, row, pass * DP + d, sum, M, L, s.partial, slot);
    }
    if (pass == 0) LEAN_STAMP(23);
  }
}

// Writes a segment's state: the output when it covers its unit, else its
// partial slot. With WN == 1 each warp owns whole rows and writes from
// registers; otherwise the WN token-slices of each row are merged through
// shared memory (store_merged) in warp order: `scr`, the K/V stage just
// consumed (no load targets it before the next iteration's barrier), holds
// the floats of half the columns with fp8 (a stage of bytes), so those merge
// in two passes, except on the CTA's last segment (`last`): no copy is then
// in flight into any stage, and the first two stages (with fp8: the floats of
// every column) take the merge in one pass, a barrier and a round of stores
// fewer on the path that ends a small call.
__device__ void store_segment(const Params& p, const Shared& sh, const Segment& s, const WarpState& st, int slot,
                              float* scr, bool last) {
  const int g = unit_rows(p);
  const PartialSlots ps = {lane_partials(p), p.slot_stride, g};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp / WN, wn = warp % WN;
  const int rows[2] = {wm * 16 + (lane >> 2), wm * 16 + (lane >> 2) + 8};
  const float lq[2] = {quad_sum(st.l[0]), quad_sum(st.l[1])};
  if (WN == 1) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if (rows[hf] >= g) continue;
#pragma unroll
      for (int x = 0; x < D / 8; ++x) {
        float v[2];
        const int col = acc_pair(st.acc, x, hf, lane, v);
        emit<2>(p, ps, s.b, s.h, rows[hf], col, v, st.m[hf], lq[hf], s.partial, slot);
      }
    }
    return;
  }
  float* stat_m = sh.stat_m();
  float* stat_l = sh.stat_l();
  __syncthreads();
  LEAN_STAMP(20);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      stat_m[wn * ROWS_Q + rows[hf]] = st.m[hf];
      stat_l[wn * ROWS_Q + rows[hf]] = lq[hf];
    }
  }
  __syncthreads();
  LEAN_STAMP(21);
  // a pass's floats fit in one stage (fp8: half the columns); with fp8 and at least two stages, every
  // column's fit in the first two
  static_assert(WN == 1 || 4 * WN * ROWS_Q * D / (HAS_FP8 ? 2 : 1) <= SharedLayout::KV_STAGE, "merge scratch");
  static_assert(WN == 1 || !HAS_FP8 || 4 * WN * ROWS_Q * D <= 2 * SharedLayout::KV_STAGE, "merge scratch");
  if (!HAS_FP8 || last)  // every column's floats in one pass (fp8: over stages 0 and 1)
    store_merged<1>(p, ps, s, st, slot, HAS_FP8 ? sh.scratch(0) : scr, stat_m, stat_l, rows, wn, lane);
  else
    store_merged<2>(p, ps, s, st, slot, scr, stat_m, stat_l, rows, wn, lane);
}

// STREAM_K merged by the combine launch: the CTA holding a unit's first tile
// records the unit's pieces (1: whole in that CTA, nothing to merge) and the
// first one's slot, at every launch (the combine reads nothing older). Out of
// line, with scalar arguments (registers, no stack frame): kept out of the
// register allocation of the tile loop.
__device__ __noinline__ void record_unit(int* at, i64 per, i64 heavy, i64 unit_first, int ntiles, int partial) {
  StreamK sk;
  sk.per = per;
  sk.heavy = heavy;
  Segment s;
  s.unit_first = unit_first;
  s.ntiles = ntiles;
  const Contributors who = Contributors::of(sk, s);  // reads only these fields
  at[0] = partial ? who.count : 1;
  at[1] = who.first_slot;
}

// End of a segment: store it; for a partial STREAM_K unit, arrive at the unit's
// counter and, if this CTA completes it, reduce the unit (UnitCounter says
// why this is safe); merged by the combine launch, record the unit. `last`:
// the CTA's last segment (see store_segment).
__device__ void finish_segment(const Params& p, const Shared& sh, const StreamK& sk, const Segment& s,
                               const WarpState& st, int stage, bool last) {
  const int c = cta_index(p);
  const int slot = p.decomposition == STREAM_K ? PartialSlots::stream_k_slot(c, s.ordinal) : c;
  store_segment(p, sh, s, st, slot, sh.scratch(stage), last);
  LEAN_STAMP(4);
  if (p.decomposition != STREAM_K) return;
  if (p.unit_meta != nullptr) {
    if (s.t0 == 0 && threadIdx.x == 0 && sk.split == 0)  // split: recorded by find_work
      record_unit(lane_meta(p) + 2 * (s.b * p.heads_kv + s.h), sk.per, sk.heavy, s.unit_first, s.ntiles, s.partial);
    return;
  }
  if (!s.partial) return;
  int* misc = sh.misc();
  const Contributors who = sk.split > 0 ? Contributors::of_split(c, sk.split, s.ntiles) : Contributors::of(sk, s);
  const int G = merge_group_size(who.count, unit_rows(p), TILE * D);
  // With a merge tree (G > 0) this CTA first arrives in its group (level 0):
  // the counters of groups follow the units', one per slot, indexed by the
  // group's first slot, and the group is merged into that slot. Level 1 is
  // the unit. One call of reduce_unit serves both levels (one copy of its
  // code), and little is live across it.
#pragma unroll 1
  for (int level = G > 0 ? 0 : 1;; ++level) {
    const int q0 = level == 0 ? (c - who.first) / G * G : 0;
    const int into = level == 0 ? who.slot(q0) : -1;
    const UnitCounter counter = {lane_counters(p) + (level == 0 ? p.batch * p.heads_kv + into : s.b * p.heads_kv + s.h)};
    const int members = level == 0 ? min(G, who.count - q0) : (G > 0 ? (who.count + G - 1) / G : who.count);
    __syncthreads();  // the slot's stores precede thread 0's release
    if (threadIdx.x == 0) misc[MISC_LAST] = counter.arrive_is_last(members) ? 1 : 0;
    __syncthreads();  // thread 0's acquire precedes every thread's slot loads
    LEAN_STAMP(5);
    if (!misc[MISC_LAST]) return;
    const int step = level == 0 || G == 0 ? 1 : G;  // in contributors
    reduce_unit(p, s.b, s.h, members,
                {who.slot(q0), PartialSlots::stream_k_slot(who.first + q0 + step, 0), 2 * step}, into);
    if (threadIdx.x == 0) counter.reset();
    LEAN_STAMP(6);
    if (level == 1) return;
  }
}

// SPLIT_K: this CTA's slot as an empty state (max -inf, sum 0, zero
// accumulators); all threads. Out of line: a rare path, kept out of the
// register allocation of the tile loop.
__device__ __noinline__ void write_empty_state(const Params& p, int g) {
  const PartialSlots ps = {lane_partials(p), p.slot_stride, g};
  const float z[4] = {0.f, 0.f, 0.f, 0.f};
  for (int e = threadIdx.x; e < g * (D / 4); e += NT)
    emit<4>(p, ps, 0, 0, e / (D / 4), e % (D / 4) * 4, z, -LEAN_INF, 0.f, true, cta_index(p));
}

// One CTA of the attention kernel.
__device__ void attention_cta(const Params& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Shared sh = {smem};
  if (threadIdx.x == 0 && dynamic_smem_size() < (u32)SharedLayout::BYTES) __trap();
  LEAN_STAMP(0);
  LEAN_CLOCK(14);
  LEAN_SMID(19);

  StreamK sk;
  SegmentWalker walker;
  if (!find_work(p, sh, true, sk, walker)) {
    // SPLIT_K chunk without tiles: an empty output (one CTA per unit) or an
    // empty state: max -inf, sum 0 and zero accumulators (the merge reads
    // every state's accumulators and weighs them, 0 here: stale workspace
    // bytes must not turn 0 x NaN into the output).
    if (p.decomposition == SPLIT_K) {
      const int g = unit_rows(p);
      if (p.num_splits == 1) {
        if (threadIdx.x == 0) emit_empty_rows(p, walker.b, walker.h, 0, g);
      } else {
        write_empty_state(p, g);
      }
    }
    return;
  }
  LEAN_STAMP(1);
  const int* lens_s = sh.lens();
  const int n_my = (int)(walker.end - walker.g);  // tiles of this CTA

  KVLoader loader;
  loader.init(p);
  LoadCursor ld = {walker};
  ld.start(p, lens_s);
  loader.prefetch_pages(p, ld.seg, ld.t, true);
  u32 bad_bits = 0;  // PAGED: bit s set when this thread copied a row on a page outside the cache into stage s
  // The first stages' copies. Not unrolled: they run once per CTA, and
  // STAGES - 1 inlined copies of the loader made 5-19% of the kernel's code,
  // fetched cold before the first tile of every CTA.
#pragma unroll 1
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_my) {
      if (loader.load(p, sh, s, ld)) bad_bits |= 1u << s;
      ld.advance(p, lens_s);
      loader.prefetch_pages(p, ld.seg, ld.t, s + 1 < n_my);
    }
    cp_async_commit();
  }
  LEAN_STAMP(10);

  WarpState st;
  int i = 0;  // tiles consumed
  for (Segment seg; walker.next(p, lens_s, seg);) {
    st.reset();
    const int nq = query_tokens(p, seg.b);
    const float kmul = k_multiplier(p, seg.h);
    float qmul[2] = {1.f, 1.f};  // Q_ROW_SCALE: the factors of this thread's rows (lane / 4 and + 8 of its warp's)
    for (int t = seg.t0; t < seg.t1; ++t, ++i) {
      cp_async_wait<STAGES - 2>();
      const int stage = i % STAGES;
      // stage i is in; stage i - 1 is free for the next load (paged: and whether
      // any thread copied a row on a page outside the cache into stage i)
      bool bad_pages = false;
      if (PAGED)
        bad_pages = __syncthreads_or((bad_bits >> stage) & 1u) != 0;
      else
        __syncthreads();
      if (i == 0) LEAN_STAMP(2);
      const int jt = i + STAGES - 1;
      if (jt < n_my) {
        const u32 bit = 1u << (jt % STAGES);
        bad_bits = loader.load(p, sh, jt % STAGES, ld) ? (bad_bits | bit) : (bad_bits & ~bit);
        ld.advance(p, lens_s);
        loader.prefetch_pages(p, ld.seg, ld.t, jt + 1 < n_my);
      }
      cp_async_commit();
      if (HAS_FP8 && t == seg.t0) {  // the segment's query rows are in (with stage i): ready them
        prepare_q_fp8(sh.q(seg.ordinal % STAGES), sh.q_scale());
        __syncthreads();
        if (Q_ROW_SCALE) {
          const int r = (threadIdx.x >> 5) / WN * 16 + ((threadIdx.x & 31) >> 2);
          qmul[0] = sh.q_scale()[r];
          qmul[1] = sh.q_scale()[r + 8];
        }
      }
      float s[TW / 8][4];
      tile_scores(p, sh, sh.q(seg.ordinal % STAGES), sh.kv(stage), stage,
                  min(TILE, seg.len - (seg.start + t * TILE)), seg.start + t * TILE, seg.len, nq, kmul, qmul, bad_pages, s);
      if (i == 0) LEAN_STAMP(11);
      st.absorb(s);
      if (i == 0) LEAN_STAMP(12);
      accumulate_pv(st, s, sh.kv(stage) + TILE * D * KV_ELEM / 2);
      if (i == 0) LEAN_STAMP(13);
    }
    LEAN_STAMP(3);
    finish_segment(p, sh, sk, seg, st, (i - 1) % STAGES, i == n_my);
  }
  cp_async_wait<0>();
  LEAN_STAMP(7);
  LEAN_CLOCK(15);
}

// The schedule as the kernel derives it, for tests and experiments: CTA c
// writes the record at its lane's partials (as ints) + c * p.slot_stride:
//   [begin, end, segments, then per segment: unit, tile_begin, tile_end,
//    partial, slot, first contributor, contributors]
// (slot -1 and contributors 0 for a whole segment; STREAM_K ranges are linear
// tile indices, SPLIT_K ones tiles of the unit). CTAs without work write
// nothing. Records past the stride are counted, not written.
constexpr int DUMP_HEADER = 3, DUMP_RECORD = 7;
static_assert(DUMP_HEADER == LEAN_HOST_DUMP_HEADER && DUMP_RECORD == LEAN_HOST_DUMP_RECORD, "dump layout");

__device__ void dump_cta(const Params& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Shared sh = {smem};
  StreamK sk;
  SegmentWalker walker;
  if (!find_work(p, sh, false, sk, walker) || threadIdx.x != 0) return;
  int* rec = reinterpret_cast<int*>(lane_partials(p)) + (i64)cta_index(p) * p.slot_stride;
  const int room = (p.slot_stride - DUMP_HEADER) / DUMP_RECORD;
  rec[0] = (int)walker.g;
  rec[1] = (int)walker.end;
  int n = 0;
  for (Segment s; walker.next(p, sh.lens(), s); ++n) {
    if (n >= room) continue;
    int* e = rec + DUMP_HEADER + DUMP_RECORD * n;
    e[0] = s.b * p.heads_kv + s.h;
    e[1] = s.t0;
    e[2] = s.t1;
    e[3] = s.partial;
    e[4] = e[5] = -1;
    e[6] = 0;
    if (!s.partial) continue;
    const bool stream_k = p.decomposition == STREAM_K;
    e[4] = stream_k ? PartialSlots::stream_k_slot(cta_index(p), s.ordinal) : (int)cta_index(p);
    // the merge's own contributors: stream-K's pieces, or split-K chunks (SPLIT_K, or the launch-time
    // split: the unit's first CTA, its chunks with tiles)
    const Contributors who = stream_k && sk.split == 0 ? Contributors::of(sk, s)
                             : Contributors::of_split(cta_index(p), stream_k ? sk.split : p.num_splits, s.ntiles);
    e[5] = who.first;
    e[6] = who.count;
  }
  rec[2] = n;
}

// Programmatic dependent launch (sm_90+; the host launches both entries with
// the attribute there): wait until the previous kernel in the stream has
// completed and its writes are visible, before any read or write of global
// memory. No explicit launch_dependents: the next kernel is let in as this
// grid's CTAs exit (an early trigger let the next call's CTAs take the first
// freed slots, two to an SM while others idled: +13% on a 190-unit dense
// call). Without the attribute the wait is a no-op.
__device__ __forceinline__ void after_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace lean

// ============================================================= 7. entry points

extern "C" __global__ void __launch_bounds__(lean::NT, 1) LEAN_ENTRY(const __grid_constant__ lean::Params p) {
  LEAN_STAMP(16);
  lean::after_previous_kernel();
  lean::attention_cta(p);
}

// SPLIT_K combine: grid = (units, row blocks); block (u, y) merges unit u's
// num_splits slots in chunk order for its share of the unit's rows (the
// rows split evenly over gridDim.y blocks; a block past the last row exits).
// STREAM_K (unit_meta set): the same for the unit's stream-K pieces, in CTA
// order: its first piece in slot `first` (a CTA's first or last slot), piece
// j >= 1 in the first slot of CTA first / 2 + j; a unit of one piece (or none)
// was written by the attention kernel.
namespace lean {
__device__ __forceinline__ void combine_block(const Params& p) {
  const int unit = cta_index(p), g = unit_rows(p);
  const int per = (g + gridDim.y - 1) / gridDim.y, lo = blockIdx.y * per;
  if (lo >= g) return;  // the whole block: no barrier is left waiting
  if (p.decomposition == STREAM_K) {
    const int* rec = lane_meta(p) + 2 * unit;
    const int n = __ldcg(rec), first = __ldcg(rec + 1);
    LEAN_CSTAMP(2);
    if (n <= 1) return;
    reduce_unit(p, unit / p.heads_kv, unit % p.heads_kv, n, {first, PartialSlots::stream_k_slot(first / 2 + 1, 0), 2},
                -1, lo, min(g, lo + per), true);
    return;
  }
  LEAN_CSTAMP(2);
  const int ns = p.num_splits;
  reduce_unit(p, unit / p.heads_kv, unit % p.heads_kv, ns, {unit * ns, unit * ns + 1, 1}, -1, lo, min(g, lo + per),
              true);
}
}  // namespace lean

// The combine launch (combine_block above).
extern "C" __global__ void __launch_bounds__(lean::NT, 1) LEAN_COMBINE_ENTRY(const __grid_constant__ lean::Params p) {
  LEAN_CSTAMP(0);
  lean::after_previous_kernel();
  LEAN_CSTAMP(1);
  lean::combine_block(p);
  LEAN_CSTAMP(3);
}

extern "C" __global__ void __launch_bounds__(lean::NT) LEAN_DUMP_ENTRY(const __grid_constant__ lean::Params p) {
  lean::dump_cta(p);
}
