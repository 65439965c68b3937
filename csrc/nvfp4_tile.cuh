// The NVFP4 W4A16 tile engine shared by the dense kernel (nvfp4_gemm.cu) and the grouped MoE
// kernel (nvfp4_moe_gemm.cu).
//
//   out[row, n] = (x[row, :] @ W[n, :]^T) * global_scale (+ bias[n]) (* row weight)
//
// ---------------------------------------------------------------------------------------------
// Orientation. Decode (few tokens) is what this engine is for, so the weight is the MMA's A
// operand (16 rows of N) and the activations are B (8 tokens): m16n8k16 then wastes nothing
// at M <= 8, and each weight element is dequantized once per block of tokens. C comes out as
// out^T tiles.
//
// Fragments of mma.m16n8k16 (g = lane / 4, t = lane % 4), with A = W tile, B = x^T tile:
//   a[0] = W[g  ][2t, 2t+1]   a[1] = W[g+8][2t, 2t+1]   a[2] = W[g][2t+8, 2t+9]   a[3] = W[g+8][2t+8, 2t+9]
//   b[0] = x[g][2t, 2t+1]     b[1] = x[g][2t+8, 2t+9]
//   c[0..1] = out^T[g][2t, 2t+1]  c[2..3] = out^T[g+8][2t, 2t+1]   (row = n, col = token)
//
// Weight layout (uint32 [N/16][K/64][32 lanes][4 k16 steps], written by jax_nvfp4/prepare.py):
// one 32-bit word holds the 8 codes a lane needs for one 16x16 tile, so a lane's four k16 steps
// are 16 contiguous bytes and a warp's k64 chunk is 512 contiguous bytes. Inside the word, code
// bit b (m, e0, e1, s) of element e of pair i (= a[i]) sits at bit CODE_BIT_POSITIONS[i][e][b]
// (jax_nvfp4/prepare.py):
//   pair 0: {0,1,2,9}    | {16,17,18,25}      pair 2: {10,11,12,19} | {26,27,28,3}
//   pair 1: {4,5,6,13}   | {20,21,22,29}      pair 3: {14,7,8,15}   | {30,23,24,31}
// Decoding drops the magnitude e1 e0 m into the exponent-low/mantissa-high bits of a 16-bit
// float and the sign onto bit 15 (the high element: +16):
//   bf16: e1 e0 m -> bits 8..6, s -> 15  => E2M1 * 2^-126 (0.5 becomes a bf16 subnormal)
//   fp16: e1 e0 m -> bits 11..9, s -> 15 => E2M1 * 2^-14  (0.5 becomes an fp16 subnormal)
// For bf16 the target pattern {6,7,8,15} is what pairs 0-2 hold, translated: one funnel rotate
// and one mask each (pair 2's sign bits are stored in the opposite halves, and the rotate by
// 28 brings them home); pair 3 has e0, e1 and s in place and only m 8 bits up: 3 operations,
// 9 per word instead of the 14 of a layout with magnitudes and signs in separate fields. (No
// layout decodes all four pairs with one rotate: that would need four translates of {0,1,2,9}
// to tile Z/16, and none does; three is the most, see benchmarks/NOTES_dense.md.) fp16 takes
// two rotates per pair. No lookup table, no local memory.
//
// Block scales (uint8 [N/16][K/64][8 g][2 rows g,g+8][4 k16 steps]) are "UE5M3": unsigned,
// 5 exponent bits (bias 10), 3 mantissa bits; every E4M3 value, subnormals included, is a
// normal UE5M3 number. Widening to the 16-bit float is a multiply-add on two bytes at once:
//   bf16: (u << 4) + (235 << 7) = s * 2^118     fp16: (u << 7) + (12 << 10) = s * 2^7
// so the dequantized weight E2M1 * s * 2^c (c = -8 for bf16, -7 for fp16) is exact and normal
// (or an exact fp16 subnormal), and 2^-c is folded into the global scale, applied to the fp32
// accumulator in the epilogue (never to a 16-bit value: no fp16 overflow before the scale).
// One multiply-add widens bytes 0 and 2 (steps 0 and 2) into the two halves of a register, a
// second one bytes 1 and 3; the HMUL2 that applies the scale reads the half it needs.
//
// Pipeline. A block is 8 warps; warp w owns N tile (16 rows) blockIdx.x * 8 + w (with k-slices,
// KS > 1: N tile w % (8/KS) of the block's current N block, and the KS warps of a tile take the
// KS consecutive pieces of kChunksPerSlice chunks of each unit; see TileConfig), and the block
// owns 8 * MT token rows and a range of units of kChunksPerUnit k64 chunks (split K over
// gridDim.y, or several N blocks in a row). Each unit is one stage of a kStages-deep cp.async
// ring in shared memory: 8 warps x kChunksPerSlice x 512 B of weights (16-byte copies), their
// block scales, and the x tile (8*MT rows x kChunksPerUnit * 128 B, which every block re-reads
// from L2). Only the m_tile-8 weight copies carry an L2 evict-first hint: elsewhere ptxas 13.0
// emitted, again and again as the surrounding code changed, copies whose cache-policy register
// nothing writes, an illegal instruction at run time (NOTES_dense.md v8, v14, v15;
// tests/test_sass.py scans for it). The loads of unit u + kStages - 1 are issued before unit u
// is computed, so up to kStages - 1 units per block are in flight without holding registers.
// Several chunks per stage cut the per-stage cost (barrier, wait, address updates, copy issue)
// per weight byte; ncu showed that overhead to be a third of the instructions with one chunk per
// stage. A chunk past K64 (odd K64) and x columns past K are zero-filled by the copy itself
// (ignore-src, the source not read); weight padding is code 0 with scale 1, so the K tail needs
// no branch. x rows past M (or padding rows of an MoE block) are never copied (a predicated
// copy, not a branch): their rows are zeroed once in every stage before the loop. Decode with
// at most 4 tokens goes further (TileConfig XR; dense, and the grouped GEMM's expert tiles, which then
// hold at most that many rows): the stage holds 1, 2 or 4 x rows, the MMA's other rows read
// the stage's row 0 again (their output columns are never stored), and the freed shared memory
// buys a deeper ring (22-34 KB stages, 3-4 deep, instead of 2 x 50 KB): more weight bytes in
// flight per block.
//
// x tile in shared memory (TileConfig::x_offset): chunk-major, row r (a token) of k64 chunk c at
// c * (kXRows * 128) + r * 128, its 16-byte piece q (8 k values, 0..7) at ((q ^ r) & 7) * 16.
// ldmatrix.x4 then reads eight rows of one piece column without bank conflicts and hands each
// lane exactly b[0], b[1] of two k16 steps; and eight rows of a chunk are one 1024-byte atom of
// the 128-byte swizzle, which is how wgmma reads B from shared memory.
//
// Large token tiles on sm_90a (m_tile 4 and 8, use_wgmma): the 4 warps of a warpgroup issue
// wgmma.m64n{32,64}k16 with their dequantized 16x16 weight tiles as the register A operand (the
// same fragment as mma.sync's A, so the decode above is unchanged) and the x tile as B through a
// shared-memory descriptor; the accumulators come back in the m16n8k16 C layout, one [4] per
// 8 tokens, so the epilogues are the same for both paths. One wgmma reads the x tile once for
// four warps, where mma.sync has every warp read it with ldmatrix.
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace jax_nvfp4 {

constexpr int kWarps = 8;               // warps per block, one N tile (16 rows) each
constexpr int kThreads = kWarps * 32;

// JAX_NVFP4_LAB_TIMELINE=1 (benchmarks/kernel_lab.cu and moe_timeline.py only): thread 0 of
// each block records %globaltimer and %clock64 when the block starts, when its first unit has
// landed, when its last unit's hand-off and epilogue begin, and when it ends
// (lab_timeline[block][0..3] and [4..7]), and its SM in [8]; only launches whose weight has
// lab_filter_n16 N tiles (0: every launch), so that one GEMM of a layer can be picked.
#ifndef JAX_NVFP4_LAB_TIMELINE
#define JAX_NVFP4_LAB_TIMELINE 0
#endif
#if JAX_NVFP4_LAB_TIMELINE
constexpr int kLabTimelineBlocks = 16384;
__device__ unsigned long long lab_timeline[kLabTimelineBlocks][9];
__device__ int lab_filter_n16;
__device__ __forceinline__ void lab_mark(int i, int n16) {
  if (threadIdx.x != 0 || (lab_filter_n16 != 0 && n16 != lab_filter_n16)) return;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (block >= kLabTimelineBlocks) return;
  unsigned long long global, clock;
  unsigned sm;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(global)::"memory");
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(clock)::"memory");
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  lab_timeline[block][i] = global;
  lab_timeline[block][4 + i] = clock;
  lab_timeline[block][8] = sm;
}
#define JAX_NVFP4_LAB_MARK(i, n16) lab_mark(i, n16)
#else
#define JAX_NVFP4_LAB_MARK(i, n16) \
  do {                             \
  } while (0)
#endif

// Tuning knobs, overridable at compile time for benchmarks/kernel_lab.cu only.
#ifndef JAX_NVFP4_CHUNKS_PER_STAGE
#define JAX_NVFP4_CHUNKS_PER_STAGE 4
#endif
#ifndef JAX_NVFP4_DECODE_STAGES
#define JAX_NVFP4_DECODE_STAGES 2
#endif
// m_tile 8: two stages of 50 KB, so that two blocks (four warpgroups) share an SM; with three
// stages, one block per SM, M = 256 and 4096 ran 13-32 % slower on the H100 (NOTES_dense.md v10).
#ifndef JAX_NVFP4_MT8_STAGES
#define JAX_NVFP4_MT8_STAGES 2
#endif
// Resident blocks per SM the m_tile-8 kernels are compiled for (their register cap): two for
// the wgmma code (122-128 registers), one for the mma.sync code (~160).
#ifndef JAX_NVFP4_MT8_BLOCKS
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JAX_NVFP4_MT8_BLOCKS 2
#else
#define JAX_NVFP4_MT8_BLOCKS 1
#endif
#endif
// k64 chunks of one warp's slice of a k-sliced unit, at m_tile 1 and 2: the x tile of a
// k-sliced block is 8x wider than the unsliced one's, so m_tile 2 takes half the chunks to keep
// two blocks per SM (kernel_lab: 2 beat 4 and 1 at M = 16; 4 beat 2 and 1 at M = 1).
#ifndef JAX_NVFP4_KSLICE_CHUNKS
#define JAX_NVFP4_KSLICE_CHUNKS 4
#endif
#ifndef JAX_NVFP4_KSLICE_CHUNKS_MT2
#define JAX_NVFP4_KSLICE_CHUNKS_MT2 2
#endif
// The 8-slice block's 1-, 2- and 4-row x tiles, for all K (a lab knob: at 8 chunks, K 2048 lost
// 25 -> 40 us; the extension instead launches long slices where they win, kLongSliceChunks).
#ifndef JAX_NVFP4_KSLICE_CHUNKS_SHORT
#define JAX_NVFP4_KSLICE_CHUNKS_SHORT JAX_NVFP4_KSLICE_CHUNKS
#endif
// Long slices (TileConfig's SC): the dense 8-slice block's 1- and 2-row x tiles where K is a
// whole number of such units (K % 4096 == 0): 8 k64 chunks per slice, half the ring's barriers
// and bookkeeping per weight byte, at the same two blocks per SM (2 stages of 44 / 52 KB).
// kernel_lab on an H200: 8192x28672 at M = 1 42.2 -> 40.1 us, M = 2 42.6 -> 40.8; at 4 rows
// (68 KB stages, one block per SM) 44.5 -> 49.4, and where K leaves slices idle (K 2048) or a
// half unit (14336) they lose (NOTES_dense.md v23).
constexpr int kLongSliceChunks = 8;
// Long units (TileConfig's SC at KS = 1): the grouped GEMM's unsliced m_tile-1 block (its decode
// launches with more than 4 token tiles, the top-8 layers at T = 1-16) takes units of 8 k64
// chunks where K is unsplit and at least kLongUnitMinK64 chunks long: 2 stages of 44 KB, two
// blocks per SM instead of three, half the barriers per weight byte. profile_moe on an H200
// (GPU us per layer, 4 -> 8 chunks): DeepSeek-like T = 1 77.4 -> 74.1, T = 16 702.7 -> 668.2;
// Mixtral-like T = 16 238.1 -> 225.4; Qwen3-like T = 1 21.7 -> 21.3, but its GEMM 2 (K = 768:
// 12 chunks, a unit and a half) 27.7 -> 34.7 us at T = 16, hence the K floor (NOTES_moe.md v22).
// The default since v23 (GPU tests, memcheck and profile: NOTES_moe.md); nvfp4_kernel.cuh
// moe_long_units.
constexpr int kLongUnitChunks = 8;
constexpr int kLongUnitMinK64 = 32;
// The same for the 4-slice block at m_tile 1: 8 chunks for the short x tiles (1, 2 or 4 rows),
// a unit as long as the 8-slice block's with half the barriers and ring bookkeeping per weight
// byte, 2 stages of 40-52 KB at two blocks per SM (kernel_lab on an H200 at M = 1: 14336x4096
// 14.7 -> 13.2 us, 4096x57344 42.4 -> 39.4, 4096x14336 14.2 -> 13.6; NOTES_dense.md v22);
// 4 for the 8-row tile, whose 8-chunk stage (68 KB) leaves one block per SM. ops/dense.py
// k_sliced_unit_k mirrors both.
#ifndef JAX_NVFP4_PAIR_KSLICE_CHUNKS
#define JAX_NVFP4_PAIR_KSLICE_CHUNKS 4
#endif
#ifndef JAX_NVFP4_PAIR_KSLICE_CHUNKS_SHORT
#define JAX_NVFP4_PAIR_KSLICE_CHUNKS_SHORT 8
#endif
// Most stages of a k-sliced block that holds fewer x rows than its tile (M <= 4, TileConfig
// XR < 8): its stage is 22 / 26 / 34 KB for 1 / 2 / 4 rows instead of 50 KB, so the ring
// deepens to as many stages (at most this many) as leave two blocks per SM.
#ifndef JAX_NVFP4_ROW_STAGES
#define JAX_NVFP4_ROW_STAGES 4
#endif
// The shared memory a short-row ring may fill: one of two blocks per SM (228 KB per SM on sm_90,
// 1 KB reserved per block, 4-6 KB of the k-sliced kernel's static arrays).
#ifndef JAX_NVFP4_ROW_SMEM_KB
#define JAX_NVFP4_ROW_SMEM_KB 108
#endif
constexpr int kRowRingBytes = JAX_NVFP4_ROW_SMEM_KB * 1024;
constexpr int kChunksPerStage = JAX_NVFP4_CHUNKS_PER_STAGE;  // k64 chunks per stage ("unit")
// The unsliced m_tile-2 block (M = 9-16) takes units of 8 chunks: 2 stages of 52 KB, still two
// blocks per SM, half the barriers, waits and address updates per weight byte. Its time is
// neither the ring's depth (3 or 4 stages of 4 chunks: no change) nor how its grid spreads over
// the SMs (7 N tiles per block instead of 8: -1 %); kernel_lab on an H200 at M = 16: 8192x28672
// 52.3 -> 49.9 us, 4096x57344 54.4 -> 51.4, 4096x14336 (2-split cluster) 17.4 -> 17.6
// (NOTES_dense.md v24). ops/dense.py unsliced_unit_chunks mirrors it.
#ifndef JAX_NVFP4_CHUNKS_PER_STAGE_MT2
#define JAX_NVFP4_CHUNKS_PER_STAGE_MT2 8
#endif
// k64 chunks per unit of the unsliced (KS = 1) block at m_tile mt: what a K split is counted in.
__host__ __device__ constexpr int unsliced_unit_chunks(int mt) {
  return mt == 2 ? JAX_NVFP4_CHUNKS_PER_STAGE_MT2 : kChunksPerStage;
}
// Lab knob that takes instructions out of the decode loop without changing any stored bit
// (NOTES_dense.md v26, v28: measured no faster, 0 to +2 %, so off):
// JAX_NVFP4_WIDEN_PRMT: a chunk's scale bytes widen to 16-bit floats by one byte permute and
// one multiply-add (LEA) each instead of shift, mask and add (4 instructions per chunk fewer).
#ifndef JAX_NVFP4_WIDEN_PRMT
#define JAX_NVFP4_WIDEN_PRMT 0
#endif
// Stages of the 4-slice block's 8-row x tile (M = 5-8): 3 of 34 KB, still two blocks per SM
// (kernel_lab on an H200, 4096x14336 at M = 8: 15.4 -> 14.7 us with 3, 16.2 with 4 at one
// block per SM; NOTES_dense.md v24).
#ifndef JAX_NVFP4_PAIR_ROW8_STAGES
#define JAX_NVFP4_PAIR_ROW8_STAGES 3
#endif

// MT: token tiles of 8 rows per block. KS: k-slices per block: the 8 warps are KS groups that
// split each unit's K range (warp w works on N tile w % (8 / KS) of the block, slice w / (8 / KS))
// and add their partial sums in shared memory, so a block covers 8 / KS N tiles (1 for KS = 8).
// XR: token rows the x tile holds (8 * MT, or fewer at m_tile 1 where the launch expects the
// tile to have no more rows: dense M <= 4, or the grouped GEMM at T <= 4 tokens, whose blocks
// take one pass per XR slots that hold rows; nvfp4_kernel.cuh). The MMA still reads 8 rows;
// rows from XR on read row 0 again (the dense short tile stores rows < M <= XR, the grouped
// GEMM's passes their XR slots, so those MMA columns are never stored), so a stage shrinks to
// the weights and the real rows, and the ring deepens.
template <int MT, int KS = 1, int XR = 8 * MT, int SC = 0>
struct TileConfig {
  static_assert(KS == 1 || KS == 2 || KS == 4 || KS == 8, "k-slices must divide the 8 warps");
  static_assert(XR == 8 * MT || (MT == 1 && (XR == 1 || XR == 2 || XR == 4)),
                "fewer x rows than the tile: m_tile 1 only, 1, 2 or 4 rows");
  static constexpr bool kRowsShort = XR < 8 * MT;
  static constexpr int kTilesPerBlock = kWarps / KS;
  // k64 chunks of one warp's slice of a unit, and of the whole unit.
  static_assert(SC == 0 || (MT == 1 && KS == 8 && XR < 8 && SC == kLongSliceChunks) ||
                    (MT == 1 && KS == 1 && XR == 8 && SC == kLongUnitChunks),
                "long slices: the 8-slice block's short x tiles; long units: the unsliced "
                "m_tile-1 block");
  static constexpr int kChunksPerSlice =
      SC > 0                         ? SC
      : KS == 1                      ? unsliced_unit_chunks(MT)
      : MT == 1 && KS == 4 && XR < 8 ? JAX_NVFP4_PAIR_KSLICE_CHUNKS_SHORT
      : MT == 1 && KS == 4           ? JAX_NVFP4_PAIR_KSLICE_CHUNKS
      : MT == 1 && XR < 8            ? JAX_NVFP4_KSLICE_CHUNKS_SHORT
      : MT == 1                      ? JAX_NVFP4_KSLICE_CHUNKS
                                     : JAX_NVFP4_KSLICE_CHUNKS_MT2;
  static constexpr int kChunksPerUnit = KS * kChunksPerSlice;
  // Deeper rings where a stage is small (decode): more bytes in flight per SM.
  static constexpr int kWBytes = kChunksPerSlice * kWarps * 512;
  static constexpr int kSBytes = kWarps * kChunksPerSlice * 64;
  static constexpr int kXRowBytes = kChunksPerUnit * 128;
  static constexpr int kXRows = XR;
  static constexpr int kXBytes = kXRows * kXRowBytes;
  static constexpr int kStageBytes = kWBytes + kSBytes + kXBytes;
  // Short tiles: as many stages as fit in kRowRingBytes less 128 bytes (where a zero row once
  // lay; the stage counts measured keep it), at most
  // JAX_NVFP4_ROW_STAGES, and at least the two a ring needs (a budget below two 4-row stages
  // gives up blocks per SM for the 4-row tile instead).
  static constexpr int kRowStagesFit = (kRowRingBytes - 128) / kStageBytes;
  static constexpr int kRowStages = kRowStagesFit < 2                      ? 2
                                    : kRowStagesFit < JAX_NVFP4_ROW_STAGES ? kRowStagesFit
                                                                           : JAX_NVFP4_ROW_STAGES;
  static constexpr int kStages = kRowsShort                ? kRowStages
                                : MT == 1 && KS == 4      ? JAX_NVFP4_PAIR_ROW8_STAGES
                                : MT <= 2                 ? JAX_NVFP4_DECODE_STAGES
                                : MT == 4   ? 3
                                            : JAX_NVFP4_MT8_STAGES;
  static_assert(kStages >= 2, "the ring needs two stages");
  static constexpr int kSmemBytes = kStages * kStageBytes;  // > 48 KB: opt-in
  static constexpr int kXChunkBytes = kXRows * 128;            // one k64 chunk of every row
  static constexpr int kXPiecesPerRow = kXRowBytes / 16;
  static constexpr int kXPieces = kXRows * kXPiecesPerRow;   // 16-byte pieces of an x tile
  static constexpr int kXPerThread = (kXPieces + kThreads - 1) / kThreads;
  // Which pieces a thread copies: piece t + i * kThreads (row-major index), or with row groups
  // (x tiles of two or more 8-row groups whose rows have more than 32 pieces: m_tile 2's 16
  // rows of 128 or 64 pieces) grouped_x_piece(t, i): row t / 32 + 8 j and column t % 32 + 32 m,
  // i = j * kXColumnGroups + m, so that a thread's pieces lie constant offsets apart in shared
  // memory and in x: one address per row group and immediates, instead of one row address, one
  // shared address and one predicate per piece (275 -> 259 instructions per k-sliced m_tile-2
  // unit; 14336x4096 at M = 16 18.8 -> 18.1 us on an H200, NOTES_dense.md v28). Either way each
  // piece of the tile once over the block. (At one row group, the 8-row tiles, the column counts
  // cost more than the addresses save.)
  static constexpr bool kRowGroups = XR % 8 == 0 && XR >= 16 &&
                                     kXPiecesPerRow > 32 && kXPiecesPerRow % 32 == 0 &&
                                     kXPiecesPerRow <= kThreads;
  static constexpr int kXColumnGroups = kRowGroups ? kXPiecesPerRow / 32 : 1;
  static __host__ __device__ constexpr int grouped_x_piece(int t, int i) {
    return ((t >> 5) + 8 * (i / kXColumnGroups)) * kXPiecesPerRow + (t & 31) +
           32 * (i % kXColumnGroups);
  }
  // What the row-group copy (tile_mainloop) relies on: every piece once over the block, and
  // thread t's piece j * G + m in column t % 32 + 32 m, at its piece 0's stage offset plus j KB
  // and 4 m chunks.
  static constexpr bool row_groups_hold() {
    bool seen[kXPieces] = {};
    for (int t = 0; t < kThreads; ++t) {
      const uint32_t base = x_offset(t >> 5, t & 31);
      for (int i = 0; i < kXPerThread; ++i) {
        const int piece = grouped_x_piece(t, i), j = i / kXColumnGroups, m = i % kXColumnGroups;
        const int row = piece / kXPiecesPerRow, q = piece % kXPiecesPerRow;
        if (piece >= kXPieces || seen[piece] || q != (t & 31) + 32 * m ||
            x_offset(row, q) != base + j * 1024 + m * 4 * kXChunkBytes)
          return false;
        seen[piece] = true;
      }
    }
    for (int piece = 0; piece < kXPieces; ++piece)
      if (!seen[piece]) return false;
    return true;
  }
  static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm_80/sm_90 limit");
  static_assert(kXPieces % kThreads == 0 || kXPieces < kThreads, "x pieces must tile the block");
  // Tensor-core reads of the x tile need 1024-byte aligned swizzle atoms (wgmma, below).
  static_assert((kWBytes + kSBytes) % 1024 == 0 && kStageBytes % 1024 == 0,
                "x tiles must start on 1024-byte boundaries");
  // Byte offset of 16-byte piece q (8 k values) of token row `row` inside a stage's x tile:
  // chunk-major, 128 bytes per row and chunk, the piece index XOR the row (mod 8). Eight rows of
  // one chunk are one 1024-byte atom of the 128-byte swizzle that wgmma's shared-memory
  // descriptors name (a 16-byte piece moves to piece ^ (address bits 7..9)), and ldmatrix reads
  // eight rows of one piece column without bank conflicts.
  static __host__ __device__ constexpr uint32_t x_offset(int row, int q) {
    return (q >> 3) * kXChunkBytes + row * 128 + (((q ^ row) & 7) << 4);
  }
};

// Large token tiles on sm_90a: the warpgroup MMA (wgmma) with the dequantized weight tile as its
// register A operand and the x tile as B straight from shared memory. Where mma.sync needs
// every warp to read the whole x tile with ldmatrix (256 bytes of shared memory per HMMA at
// m_tile 8), one wgmma reads it once for the 4 warps of a warpgroup. Decode tiles (m_tile <= 2)
// and k-sliced blocks keep mma.sync: they are bound by the weight stream, not the MMAs.
template <int MT, int KS>
__device__ constexpr bool use_wgmma() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  return KS == 1 && (MT == 4 || MT == 8);
#else
  return false;
#endif
}

template <typename T>
struct Half2Traits;

template <>
struct Half2Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ T2 pack(float lo, float hi) {
    return __floats2bfloat162_rn(lo, hi);
  }
  static constexpr uint32_t kScaleMul = 16;
  static constexpr uint32_t kScaleAdd = (235u << 7) | (235u << 23);
  static constexpr float kUnbias = 256.0f;  // 2^8
};

template <>
struct Half2Traits<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ T2 pack(float lo, float hi) { return __floats2half2_rn(lo, hi); }
  static constexpr uint32_t kScaleMul = 128;
  static constexpr uint32_t kScaleAdd = (12u << 10) | (12u << 26);
  static constexpr float kUnbias = 128.0f;  // 2^7
};

__device__ __forceinline__ uint32_t rotl(uint32_t x, int s) { return __funnelshift_l(x, x, s); }

// The four A-fragment registers of one 16x16 weight tile, before the block scale.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t q, uint32_t (&a)[4]);

template <>
__device__ __forceinline__ void dequant_word<__nv_bfloat16>(uint32_t q, uint32_t (&a)[4]) {
  constexpr uint32_t kMask = 0x81C081C0u;  // bits 6..8 and 15 of both halves
  a[0] = rotl(q, 6) & kMask;
  a[1] = rotl(q, 2) & kMask;
  a[2] = rotl(q, 28) & kMask;
  a[3] = (q & 0x81808180u) | (rotl(q, 24) & 0x00400040u);
}

template <>
__device__ __forceinline__ void dequant_word<__half>(uint32_t q, uint32_t (&a)[4]) {
  constexpr uint32_t kMag = 0x0E000E00u, kSign = 0x80008000u;  // bits 9..11; bit 15
  a[0] = (rotl(q, 9) & kMag) | (rotl(q, 6) & kSign);
  a[1] = (rotl(q, 5) & kMag) | (rotl(q, 2) & kSign);
  a[2] = (rotl(q, 31) & kMag) | (rotl(q, 28) & kSign);
  a[3] = (rotl(q, 3) & 0x0C000C00u) | (rotl(q, 27) & 0x02000200u) | (q & kSign);
}

// a * (the low or high half of s, in both halves).
template <typename T>
__device__ __forceinline__ uint32_t scale_half(uint32_t a, uint32_t s, bool high);

template <>
__device__ __forceinline__ uint32_t scale_half<__nv_bfloat16>(uint32_t a, uint32_t s, bool high) {
  const __nv_bfloat162 sv = *reinterpret_cast<__nv_bfloat162 *>(&s);
  const __nv_bfloat162 b = high ? __high2bfloat162(sv) : __low2bfloat162(sv);
  __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162 *>(&a), b);
  return *reinterpret_cast<uint32_t *>(&r);
}

template <>
__device__ __forceinline__ uint32_t scale_half<__half>(uint32_t a, uint32_t s, bool high) {
  const __half2 sv = *reinterpret_cast<__half2 *>(&s);
  const __half2 b = high ? __high2half2(sv) : __low2half2(sv);
  __half2 r = __hmul2(*reinterpret_cast<__half2 *>(&a), b);
  return *reinterpret_cast<uint32_t *>(&r);
}

// Bytes 0 and 2 (even = true) or 1 and 3 of `bytes` as 16-bit float scales in the two halves.
template <typename T>
__device__ __forceinline__ uint32_t widen_scales(uint32_t bytes, bool even) {
  using Tr = Half2Traits<T>;
#if JAX_NVFP4_WIDEN_PRMT
  // Bytes 0, 2 (or 1, 3) into the low byte of each half, zeros above (selector 4 = the zero
  // operand's byte): one PRMT. Written as a multiply-add with the constant in a register, the
  // rest is one LEA; from C++ ptxas makes shift, mask and add of the expression above.
  const uint32_t pair = __byte_perm(bytes, 0u, even ? 0x4240u : 0x4341u);
  uint32_t r;
  asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(pair), "n"(Tr::kScaleMul), "r"(Tr::kScaleAdd));
  return r;
#else
  const uint32_t pair = (even ? bytes : bytes >> 8) & 0x00FF00FFu;
  return pair * Tr::kScaleMul + Tr::kScaleAdd;
#endif
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// An opaque use and redefinition of v: the compiler keeps v in a register from here on
// instead of recomputing it where it is used.
__device__ __forceinline__ void pin_register(uint32_t &v) { asm volatile("" : "+r"(v)); }

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A copy predicated instead of branched around: `issue` false issues nothing (an x row without
// a token, zeroed once before the loop; a lane without a scale copy); `read` false writes zeros
// and leaves src alone (cp.async's ignore-src operand: x columns past K, weight chunks past K64;
// src need not be a valid address then). ptxas wraps a branched-around copy in a convergence
// region of its own and recomputes its addresses there (NOTES_dense.md v14). kEvictFirst adds
// the L2 evict-first hint (weights streamed past x tiles that every block re-reads), its policy
// created inside so that ptxas sees no policy register to carry; only the m_tile-8 blocks use it
// (see load_next).
template <bool kEvictFirst = false>
__device__ __forceinline__ void cp_async16_pred(uint32_t dst, const void *src, bool issue, bool read) {
  if constexpr (kEvictFirst) {
    asm volatile("{\n .reg .pred issue, ignore;\n .reg .b64 policy;\n setp.ne.u32 issue, %2, 0;\n"
                 " setp.eq.u32 ignore, %3, 0;\n"
                 " createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
                 " @issue cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, ignore, policy;\n}\n"
                 :: "r"(dst), "l"(src), "r"(static_cast<uint32_t>(issue)),
                    "r"(static_cast<uint32_t>(read)));
  } else {
    asm volatile("{\n .reg .pred issue, ignore;\n setp.ne.u32 issue, %2, 0;\n"
                 " setp.eq.u32 ignore, %3, 0;\n"
                 " @issue cp.async.cg.shared.global [%0], [%1], 16, ignore;\n}\n"
                 :: "r"(dst), "l"(src), "r"(static_cast<uint32_t>(issue)),
                    "r"(static_cast<uint32_t>(read)));
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---- wgmma (sm_90a) --------------------------------------------------------------------------
// Shared-memory matrix descriptor of a K-major operand in the 128-byte swizzle: start address
// >> 4 (bits 0-13), leading offset unused for this mode (1), stride between 8-row atoms 1024 B
// >> 4 (bits 32-45), swizzle mode 1 = 128 B (bits 62-63). A k16 step inside a 128-byte row is
// the start address plus 32 bytes per step: the hardware applies the swizzle to the address it
// computes, the same XOR that x_offset wrote with.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_address) {
  return static_cast<uint64_t>((smem_address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Orders this thread's register writes (the A fragment, cleared accumulators) before the next
// wgmma of the warpgroup reads them.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed groups of this warpgroup's wgmmas are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Shared memory written through the generic proxy (cp.async, st.shared) before a barrier, read by
// wgmma (the async proxy) after it.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// The accumulators are results of asynchronous instructions: pin every use after the wait.
template <int MT>
__device__ __forceinline__ void pin_accumulators(float (&acc)[MT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(acc[mt][r]) :: "memory");
}

// acc (64 weight rows x 8*MT tokens per warpgroup; per warp the mma.m16n8k16 C layout of
// its 16 rows, one [4] per 8 tokens) += A (registers, the m16n8k16 A layout of the warp's 16
// rows) x B^T (8*MT token rows x k16, K-major at `desc`). scale-d = 1: always accumulate.
#define JAX_NVFP4_ACC16 \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}"
#define JAX_NVFP4_ACC32                                                                       \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"   \
  "%24,%25,%26,%27,%28,%29,%30,%31}"
#define JAX_NVFP4_F(mt) "+f"(acc[mt][0]), "+f"(acc[mt][1]), "+f"(acc[mt][2]), "+f"(acc[mt][3])
template <typename T, int MT>
__device__ __forceinline__ void wgmma_rs(float (&acc)[MT][4], const uint32_t (&a)[4], uint64_t desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (MT == 4) {
    if constexpr (kBf16) {
      asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " JAX_NVFP4_ACC16
                   ", {%16,%17,%18,%19}, %20, 1, 1, 1, 0;\n"
                   : JAX_NVFP4_F(0), JAX_NVFP4_F(1), JAX_NVFP4_F(2), JAX_NVFP4_F(3)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    } else {
      asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " JAX_NVFP4_ACC16
                   ", {%16,%17,%18,%19}, %20, 1, 1, 1, 0;\n"
                   : JAX_NVFP4_F(0), JAX_NVFP4_F(1), JAX_NVFP4_F(2), JAX_NVFP4_F(3)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
  } else if constexpr (MT == 8) {
    if constexpr (kBf16) {
      asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " JAX_NVFP4_ACC32
                   ", {%32,%33,%34,%35}, %36, 1, 1, 1, 0;\n"
                   : JAX_NVFP4_F(0), JAX_NVFP4_F(1), JAX_NVFP4_F(2), JAX_NVFP4_F(3),
                     JAX_NVFP4_F(4), JAX_NVFP4_F(5), JAX_NVFP4_F(6), JAX_NVFP4_F(7)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    } else {
      asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " JAX_NVFP4_ACC32
                   ", {%32,%33,%34,%35}, %36, 1, 1, 1, 0;\n"
                   : JAX_NVFP4_F(0), JAX_NVFP4_F(1), JAX_NVFP4_F(2), JAX_NVFP4_F(3),
                     JAX_NVFP4_F(4), JAX_NVFP4_F(5), JAX_NVFP4_F(6), JAX_NVFP4_F(7)
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
  }
#else
  __trap();  // use_wgmma() is false here: never called
#endif
}
#undef JAX_NVFP4_F
#undef JAX_NVFP4_ACC32
#undef JAX_NVFP4_ACC16

// What a warp needs from one k64 chunk of a stage to decode its 16x16 weight tiles: the
// lane's code word of each of the 4 k16 steps, and the block scales of rows g and g+8 as
// 16-bit floats [even steps 0,2 | odd steps 1,3] (scale_half picks the step's half).
struct ChunkFragments {
  uint32_t words[4];
  uint32_t s_lo[2], s_hi[2];
};

// A stage's words and scales by shared-memory address: from the pinned base, where a generic
// pointer made ptxas rebuild the shared window's base (S2UR of the cluster CTA id and four
// more) in every unit.
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

template <typename T, int KC>
__device__ __forceinline__ ChunkFragments load_chunk(uint32_t stage, int kc, int w_bytes, int warp,
                                                     int g) {
  const uint4 w = lds128(stage + kc * (kWarps * 512) + threadIdx.x * 16);
  const uint2 sc = lds64(stage + w_bytes + warp * (KC * 64) + kc * 64 + g * 8);
  return ChunkFragments{{w.x, w.y, w.z, w.w},
                        {widen_scales<T>(sc.x, true), widen_scales<T>(sc.x, false)},
                        {widen_scales<T>(sc.y, true), widen_scales<T>(sc.y, false)}};
}

// The A fragment of k16 step j (0..3) of a chunk: decoded, times its block scales.
template <typename T>
__device__ __forceinline__ void weight_fragment(const ChunkFragments &f, int j, uint32_t (&a)[4]) {
  const int jj = j & 1;
  const bool high = j >= 2;
  dequant_word<T>(f.words[j], a);
  a[0] = scale_half<T>(a[0], f.s_lo[jj], high);
  a[1] = scale_half<T>(a[1], f.s_hi[jj], high);
  a[2] = scale_half<T>(a[2], f.s_lo[jj], high);
  a[3] = scale_half<T>(a[3], f.s_hi[jj], high);
}

// The main loop of one block. Work is a line of units u = tile * units_per_tile + kunit, where
// tile is an N block (8 / KS N tiles of 16 rows; warp w's N tile is tile * (8 / KS) + w % (8 / KS))
// and kunit a k-unit of kChunksPerUnit = KS * kChunksPerSlice k64 chunks (slice w / (8 / KS)
// takes the kChunksPerSlice chunks at offset slice * kChunksPerSlice). With KS > 1 the slices'
// sums are added in slice order (deterministic) into the warps of slice 0 before the
// epilogue. The block runs units [u_begin, u_end), which may cross tiles (several N tiles per
// block); the pipeline runs on across a tile boundary. After the last
// unit of each tile in its range it calls epilogue(tile, acc) (all threads, uniformly; it may
// synchronise the block) and clears the accumulators.
//   qweight: [N16][K64][32] uint4;  qscales: [N16][K64][4] uint4 (one expert's)
//   xsrc:  per x piece this thread copies, the address of its token row at piece q, column 0
//          (or null for a row that holds no token); piece p = threadIdx.x + i * kThreads
//          (TileConfig::grouped_x_piece with row groups) covers
//          row p / kXPiecesPerRow, piece q = p % kXPiecesPerRow
//   x_any: a global address that rows without a token are addressed from (never read)
template <typename T, int MT, int KS, int XR, int SC, typename Epilogue>
__device__ __forceinline__ void tile_mainloop(
    const uint4 *__restrict__ qweight, const uint4 *__restrict__ qscales, int n16, int k64,
    const T *const (&xsrc)[TileConfig<MT, KS, XR, SC>::kXPerThread], const void *x_any, int k,
    int units_per_tile, int u_begin, int u_end, Epilogue &&epilogue) {
  using Cfg = TileConfig<MT, KS, XR, SC>;
  constexpr int S = Cfg::kStages;
  constexpr int KC = Cfg::kChunksPerSlice;
  constexpr int NT = Cfg::kTilesPerBlock;
  constexpr bool kWgmma = use_wgmma<MT, KS>();
  extern __shared__ __align__(1024) unsigned char smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = warp % NT;     // this warp's N tile within the block
  const int slice = warp / NT;   // and its k-slice
  const int g = lane >> 2;
  uint32_t smem_base = smem_addr(smem);
  // In a register of its own: ptxas otherwise rebuilt it in every unit (S2UR of the cluster
  // CTA id, and uniform-register arithmetic).
  pin_register(smem_base);
  if constexpr (kWgmma) {
    if (smem_base & 1023) __trap();  // the swizzle atoms would be misread: fail loudly
  }

  // Where this thread's copies land inside a stage.
  const uint32_t w_dst = threadIdx.x * 16;
  const uint32_t s_dst = Cfg::kWBytes + warp * (KC * 64) + lane * 16;   // lanes 0 .. 4*KC-1
  // Per x piece of this thread: where it lands in a stage, and where its row reads at the
  // first unit's column (x_any for a row without a token). Where a row has at most kThreads
  // pieces, all pieces of a thread sit in the same column q of their rows (kThreads is a
  // multiple of the pieces per row), so one count of columns left and one bit per piece
  // (copied at all?) finish the description: a unit's copy is then one compare and one address.
  // A wider row (a short tile's unit of 64 chunks: 512 pieces) gives a thread pieces in
  // kWideColumns columns of it, each with its own count.
  // With row groups (TileConfig::grouped_x_piece) a thread's pieces sit in kXColumnGroups columns
  // 32 apart, each with its own count, and in rows 8 apart.
  constexpr bool kWideRow = Cfg::kXPiecesPerRow > kThreads;
  constexpr int kWideColumns = Cfg::kRowGroups ? Cfg::kXColumnGroups
                               : kWideRow      ? Cfg::kXPiecesPerRow / kThreads
                                               : 1;
  static_assert(Cfg::kRowGroups || (kWideRow ? Cfg::kXPiecesPerRow % kThreads == 0
                                             : kThreads % Cfg::kXPiecesPerRow == 0),
                "a thread's x pieces must share a column, or a row split evenly over threads");
  static_assert(Cfg::kXPerThread <= 32, "one bit per x piece");
  static_assert(!Cfg::kRowGroups || Cfg::row_groups_hold(), "row groups: see row_groups_hold");
  // The column of piece 0, and how far apart a thread's columns are.
  const int x_q0 = (Cfg::kRowGroups ? threadIdx.x & 31 : threadIdx.x) % Cfg::kXPiecesPerRow;
  constexpr int kColumnStep = Cfg::kRowGroups ? 32 : kThreads;
  int x_left[kWideColumns];
#pragma unroll
  for (int c = 0; c < kWideColumns; ++c) x_left[c] = k - (x_q0 + c * kColumnStep) * 8;
  uint32_t x_dst[Cfg::kXPerThread];
  const T *x_src[Cfg::kXPerThread];
  uint32_t x_copy = 0;
#pragma unroll
  for (int i = 0; i < Cfg::kXPerThread; ++i) {
    const int piece =
        Cfg::kRowGroups ? Cfg::grouped_x_piece(threadIdx.x, i) : threadIdx.x + i * kThreads;
    const int row = piece / Cfg::kXPiecesPerRow;
    const int x_q = kWideRow || Cfg::kRowGroups ? piece % Cfg::kXPiecesPerRow : x_q0;
    x_dst[i] = Cfg::kWBytes + Cfg::kSBytes + Cfg::x_offset(row, x_q);
    const bool mine = Cfg::kXPieces >= kThreads || piece < Cfg::kXPieces;
    if (mine && xsrc[i] != nullptr) x_copy |= 1u << i;
    x_src[i] = mine && xsrc[i] != nullptr ? xsrc[i] + x_q * 8 : static_cast<const T *>(x_any);
    // A row without a token is zero in every stage, once; it is never copied.
    if (mine && xsrc[i] == nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s)
        *reinterpret_cast<uint4 *>(smem + s * Cfg::kStageBytes + x_dst[i]) = make_uint4(0, 0, 0, 0);
    }
  }

  // The unit the loads are at.
  int ld_tile = u_begin / units_per_tile;
  int ld_kunit = u_begin - ld_tile * units_per_tile;
  // The copies of one unit. The x copies have no branch around them: ptxas wrapped every
  // guarded copy in its own convergence region and recomputed its shared and global addresses
  // there (~22 instructions per 16-byte copy, more than half of the k-sliced m_tile-2 block's
  // issue slots, ncu in NOTES_dense.md v14). An x copy is predicated off for a row without a
  // token and writes zeros for columns past K.
  auto load_next = [&](uint32_t stage) {
    const uint32_t base = smem_base + stage;
    const int tile_n = ld_tile * NT + sub;
    const int unit_chunk = ld_kunit * Cfg::kChunksPerUnit;
    const int chunk = unit_chunk + slice * KC;
    if (tile_n < n16) {
      // Counted in 16-byte pieces, N * K / 32 of them, in 32 bits (the handlers refuse larger
      // weights: weight_size_problem): one wide multiply-add makes each address.
      const uint32_t at = static_cast<uint32_t>(tile_n) * static_cast<uint32_t>(k64) + chunk;
      const uint4 *w_src = qweight + (at * 32 + lane);
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        // K64 not a multiple of KC leaves the last unit's tail chunks empty: zero-filled,
        // their (possibly out-of-range) source never read.
        const uint32_t dst = base + kc * (kWarps * 512) + w_dst;
        const bool in = kc < k64 - chunk;  // one subtraction per unit, compares with immediates
        // m_tile 8 keeps the evict-first hint: without it 14336x4096 at M = 64 (K split four
        // ways, x re-read by 32 N blocks) took 61.7 instead of 53.3 us on an H200; elsewhere
        // it made no difference, and at m_tile 1, 2 and 4 ptxas 13.0 miscompiles it
        // (NOTES_dense.md v15; tests/test_sass.py scans for that).
        cp_async16_pred<MT == 8>(dst, w_src + kc * 32, true, in);
      }
      cp_async16_pred(base + s_dst, qscales + (at * 4 + lane), lane < 4 * KC,
                      (lane >> 2) < k64 - chunk);
    }
    const int col = unit_chunk * 64;
    if constexpr (Cfg::kRowGroups) {
      // Piece j * G + m is piece 0 plus 8 j rows (1 KB) and 32 m columns (4 chunks) in the
      // stage, and x_src[j * G] plus 32 m columns in x (x_offset: the swizzle term is the same).
      constexpr int G = Cfg::kXColumnGroups;
#pragma unroll
      for (int j = 0; j < Cfg::kXPerThread / G; ++j) {
        const T *src = x_src[j * G] + col;
#pragma unroll
        for (int m = 0; m < G; ++m)
          cp_async16_pred(base + x_dst[0] + j * 1024 + m * 4 * Cfg::kXChunkBytes, src + m * 256,
                          (x_copy >> (j * G)) & 1u, col < x_left[m]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < Cfg::kXPerThread; ++i) {
        cp_async16_pred(base + x_dst[i], x_src[i] + col, (x_copy >> i) & 1u,
                        col < x_left[i % kWideColumns]);
      }
    }
    if (++ld_kunit == units_per_tile) {
      ld_kunit = 0;
      ++ld_tile;
    }
  };

  // ldmatrix row addresses of this lane (relative to a stage) for k16 pairs 0-1, 2-3 of chunk
  // kc of its slice: matrix lane / 8 is piece 4 * (2 (slice * KC + kc) + jp) + lane / 8 of row
  // lane % 8. A row a short tile does not hold (XR <= lane % 8) reads row 0 instead (the same
  // address as lane 0's: a broadcast, no bank conflict), whose MMA column is never stored.
  // At m_tile 1 chunk kc's rows are the first chunk's plus kc * kXChunkBytes (x_offset), so one
  // address per k16 pair and immediates reach them all; at m_tile 2 that cost the k-sliced unit
  // 7 instructions, so there it is one address per chunk and k16 pair.
  const bool real_row = (lane & 7) < XR;
  constexpr bool kOneXAddress = MT == 1;
  uint32_t x_ld[kOneXAddress ? 1 : KC][2];
#pragma unroll
  for (int kc = 0; kc < (kOneXAddress ? 1 : KC); ++kc)
#pragma unroll
    for (int jp = 0; jp < 2; ++jp) {
      const int r = lane & 7, q = 8 * (slice * KC + kc) + 4 * jp + (lane >> 3);
      x_ld[kc][jp] = Cfg::kWBytes + Cfg::kSBytes + Cfg::x_offset(real_row ? r : 0, q);
      // Kept in a register: left to itself, ptxas recomputed these from threadIdx in every
      // unit (~30 instructions of the k-sliced m_tile-2 unit).
      if constexpr (!kWgmma) pin_register(x_ld[kc][jp]);
    }

  const int units = u_end - u_begin;
  uint32_t load_stage = 0;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < units) load_next(load_stage);
    cp_async_commit();
    load_stage += Cfg::kStageBytes;
  }
  if (load_stage == S * Cfg::kStageBytes) load_stage = 0;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[mt][r] = 0.f;
  int tile = u_begin / units_per_tile;
  int kunit = u_begin - tile * units_per_tile;
  uint32_t stage = 0;
  for (int u = 0; u < units; ++u) {
    cp_async_wait<S - 2>();
    if constexpr (kWgmma) fence_proxy_async_smem();
    __syncthreads();  // unit u has landed for everyone; the stage load_stage is free again
    if (u == 0) JAX_NVFP4_LAB_MARK(1, n16);
    if (u + S - 1 < units) load_next(load_stage);
    cp_async_commit();

    // Where load_chunk reads this stage: its shared address from the pinned base.
    const uint32_t st = smem_base + stage;
    if constexpr (kWgmma) {
      // All 4 warps of a warpgroup issue its wgmmas, so the test is the warpgroup's first N
      // tile; a warp past N computes on stale weights and its rows are never stored.
      if (tile * NT + (warp & ~3) < n16) {
        const uint32_t x_tile = smem_base + stage + Cfg::kWBytes + Cfg::kSBytes;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
          const ChunkFragments f = load_chunk<T, KC>(st, kc, Cfg::kWBytes, warp, g);
          const uint64_t desc = wgmma_desc_sw128(x_tile + kc * Cfg::kXChunkBytes);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t a[4];
            weight_fragment<T>(f, j, a);
            wgmma_fence();
            wgmma_rs<T, MT>(acc, a, desc + (j * 32 >> 4));  // k16 step j: 32 bytes further
          }
          // One group per chunk; at most two in flight, so the A fragments of only two chunks
          // stay live (m_tile 4 fits its 128 registers, two blocks per SM, without spills).
          wgmma_commit();
          wgmma_wait<1>();
        }
        wgmma_wait<0>();  // the stage is read before the next barrier frees it
        pin_accumulators<MT>(acc);
      }
    } else if (tile * NT + sub < n16) {
      const uint32_t x_stage = smem_base + stage;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        const ChunkFragments f = load_chunk<T, KC>(st, kc, Cfg::kWBytes, warp, g);
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
          uint32_t b[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            ldmatrix_x4(b[mt], x_stage + (kOneXAddress ? x_ld[0][jp] + kc * Cfg::kXChunkBytes
                                                        : x_ld[kc][jp]) + mt * 8 * 128);  // 8 rows on
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            const int j = 2 * jp + jj;
            uint32_t a[4];
            weight_fragment<T>(f, j, a);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
              mma_16816<T>(acc[mt], a, b[mt][2 * jj], b[mt][2 * jj + 1]);
          }
        }
      }
    }
    stage = stage + Cfg::kStageBytes == S * Cfg::kStageBytes ? 0 : stage + Cfg::kStageBytes;
    load_stage = load_stage + Cfg::kStageBytes == S * Cfg::kStageBytes ? 0 : load_stage + Cfg::kStageBytes;
    if (++kunit == units_per_tile || u + 1 == units) {
      if (u + 1 == units) JAX_NVFP4_LAB_MARK(2, n16);
      if constexpr (KS > 1) {
        // Slices 1..KS-1 hand their sums to slice 0 through a buffer of their own (the ring
        // may already hold the next tile's first units).
        __shared__ float4 handoff[KS - 1][NT][MT][32];
        if (slice > 0) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            handoff[slice - 1][sub][mt][lane] = make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]);
        }
        __syncthreads();
        if (slice == 0) {
          if constexpr (MT == 1) {
            // All KS - 1 loads go out before the first add: one shared-memory latency per
            // tile, not KS - 1 in a row on slice 0's path while the other warps wait at the
            // next barrier (-3 to -12 % at M = 1 where a tile's K is 2048-8192, NOTES_dense.md
            // v20; at m_tile 2 it measured no gain). The adds keep slice order, so the sums are
            // bitwise those of the loop below.
            float4 v[KS - 1];
#pragma unroll
            for (int s2 = 0; s2 < KS - 1; ++s2) v[s2] = handoff[s2][sub][0][lane];
#pragma unroll
            for (int s2 = 0; s2 < KS - 1; ++s2) {
              acc[0][0] += v[s2].x;
              acc[0][1] += v[s2].y;
              acc[0][2] += v[s2].z;
              acc[0][3] += v[s2].w;
            }
          } else {
#pragma unroll 1
            for (int s2 = 0; s2 < KS - 1; ++s2)
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                const float4 v = handoff[s2][sub][mt][lane];
                acc[mt][0] += v.x;
                acc[mt][1] += v.y;
                acc[mt][2] += v.z;
                acc[mt][3] += v.w;
              }
          }
        }
        __syncthreads();  // the buffer is free for the next tile
      }
      epilogue(tile, acc);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mt][r] = 0.f;
      kunit = 0;
      ++tile;
    }
  }
}

}  // namespace jax_nvfp4
