// Host emulation of csrc/ptx.cuh (mma.sync m16n8k16, ldmatrix .x4 / .x4.trans, cp.async, the
// two-float reduction), so the tensor-core kernels run under g++ exactly as written.
//
// The warp-level instructions exchange real fragments between the emulated lanes: every lane posts
// its registers (or its row address) in the warp's exchange area (cuda_on_host.h), and each lane then
// assembles its own result from the other lanes' posts following the PTX ISA layouts stated in
// ptx.cuh. A kernel that indexes a fragment wrongly therefore computes wrong numbers here, as on the
// GPU. Products of 16-bit values are exact in fp32; the 16 products of an mma are summed in fp32
// and added to the accumulator (the tensor cores' internal order differs by rounding only).
//
// cp.async is emulated as "poison at issue, land at wait" (cuda_on_host.h, cp_async_issue): the 16
// destination bytes become 0xFF (NaN in fp16, bf16 and fp32) when the copy is issued, and the data
// (or zeros) arrive only when the issuing thread's own cp_async_wait retires the copy's group.
// Reading a buffer before waiting for it, or overwriting one another warp still reads, then gives
// NaN in the results instead of passing by luck.
// Addresses are checked for the alignment the instructions require (16 bytes), and cp.async sources
// for being readable only when `fill` is set.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda_on_host.h"

namespace cvt_emu {

[[noreturn]] inline void fail(const char* what, const void* address) {
  std::fprintf(stderr, "cvt_fast emulation: %s (address %p)\n", what, address);
  std::abort();
}

inline void check_16_byte_aligned(const void* address, const char* what) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) fail(what, address);
}

template <typename T>
inline float half_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "16-bit operands are c10::BFloat16 or c10::Half");
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
}

// Element `index` (0 = low half) of a posted 32-bit register.
inline uint16_t half_of(uint64_t word, int index) { return static_cast<uint16_t>(word >> (16 * index)); }

}  // namespace cvt_emu

namespace cvt_fast {

struct FragA { uint32_t reg[4]; };
struct FragB { uint32_t reg[2]; };
struct FragC { float reg[4]; };

// acc += a @ b with the operands of all 32 lanes, laid out as in ptx.cuh. Each lane posts its 8 A and
// 4 B values as floats (A's register r half e at 2r + e, B's at 8 + 2r + e).
template <typename T>
inline void mma_16x8x16(FragC& acc, const FragA& a, const FragB& b) {
  float mine[12];
  for (int r = 0; r < 4; ++r) {
    mine[2 * r] = cvt_emu::half_to_float<T>(cvt_emu::half_of(a.reg[r], 0));
    mine[2 * r + 1] = cvt_emu::half_to_float<T>(cvt_emu::half_of(a.reg[r], 1));
  }
  for (int r = 0; r < 2; ++r) {
    mine[8 + 2 * r] = cvt_emu::half_to_float<T>(cvt_emu::half_of(b.reg[r], 0));
    mine[8 + 2 * r + 1] = cvt_emu::half_to_float<T>(cvt_emu::half_of(b.reg[r], 1));
  }
  uint64_t words[6];
  std::memcpy(words, mine, sizeof(mine));
  const auto lanes = cvt_emu::warp_exchange(words, 6);
  auto value = [&](int lane, int index) {
    float x;
    std::memcpy(&x, reinterpret_cast<const char*>(lanes[lane]) + 4 * index, 4);
    return x;
  };
  // A[m][k] is in lane (m % 8) * 4 + (k % 8) / 2, register (m / 8) + 2 * (k / 8), half k % 2;
  // B[k][n] is in lane n * 4 + (k % 8) / 2, register k / 8, half k % 2.
  const int g = cvt_emu::lane_id() / 4;
  const int t = cvt_emu::lane_id() % 4;
  for (int i = 0; i < 4; ++i) {  // c[i] = C[g + 8 * (i / 2)][2t + i % 2]
    const int m = g + 8 * (i / 2);
    const int n = 2 * t + i % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const float a_mk = value((m % 8) * 4 + (k % 8) / 2, 2 * ((m / 8) + 2 * (k / 8)) + k % 2);
      const float b_kn = value(n * 4 + (k % 8) / 2, 8 + 2 * (k / 8) + k % 2);
      sum += a_mk * b_kn;
    }
    acc.reg[i] += sum;
  }
}

// Lanes 8i..8i+7 address the rows of matrix i; register i of lane l = row l/4, elements 2(l%4), +1.
inline void ldmatrix_x4(uint32_t (&dst)[4], const void* row) {
  cvt_emu::check_16_byte_aligned(row, "ldmatrix row address is not 16-byte aligned");
  const uint64_t mine = reinterpret_cast<uintptr_t>(row);
  const auto lanes = cvt_emu::warp_exchange(&mine, 1);
  const int g = cvt_emu::lane_id() / 4;
  const int t = cvt_emu::lane_id() % 4;
  for (int i = 0; i < 4; ++i) {
    const auto* row_i = reinterpret_cast<const unsigned char*>(lanes[8 * i + g][0]);
    std::memcpy(&dst[i], row_i + 4 * t, 4);
  }
}

// .trans: register i of lane l = elements [2(l%4)][l/4] and [2(l%4)+1][l/4] of matrix i.
inline void ldmatrix_x4_trans(uint32_t (&dst)[4], const void* row) {
  cvt_emu::check_16_byte_aligned(row, "ldmatrix row address is not 16-byte aligned");
  const uint64_t mine = reinterpret_cast<uintptr_t>(row);
  const auto lanes = cvt_emu::warp_exchange(&mine, 1);
  const int g = cvt_emu::lane_id() / 4;
  const int t = cvt_emu::lane_id() % 4;
  for (int i = 0; i < 4; ++i) {
    const auto* low_row = reinterpret_cast<const uint16_t*>(lanes[8 * i + 2 * t][0]);
    const auto* high_row = reinterpret_cast<const uint16_t*>(lanes[8 * i + 2 * t + 1][0]);
    dst[i] = static_cast<uint32_t>(low_row[g]) | (static_cast<uint32_t>(high_row[g]) << 16);
  }
}

template <typename T>
inline uint32_t pack_pair(float low, float high) {
  return static_cast<uint32_t>(T(low).x) | (static_cast<uint32_t>(T(high).x) << 16);
}

inline void cp_async_16(void* dst, const void* src, bool fill) {
  cvt_emu::check_16_byte_aligned(dst, "cp.async destination is not 16-byte aligned");
  if (fill) cvt_emu::check_16_byte_aligned(src, "cp.async source is not 16-byte aligned");
  cvt_emu::cp_async_issue(dst, src, fill ? cvt_emu::kCpAsyncBytes : 0);
}

inline void cp_async_commit() { cvt_emu::cp_async_commit_group(); }

template <int kPending>
inline void cp_async_wait() {
  cvt_emu::cp_async_wait_groups(kPending);
}

inline void atomic_add_pair(float* address, float a, float b) {
  if (reinterpret_cast<uintptr_t>(address) % 8 != 0) cvt_emu::fail("atomic_add_pair address is not 8-byte aligned", address);
  std::atomic_ref<float>(address[0]).fetch_add(a);
  std::atomic_ref<float>(address[1]).fetch_add(b);
}

inline uint4 load_16(const void* address) {
  cvt_emu::check_16_byte_aligned(address, "16-byte vector load from a misaligned address");
  uint4 value;
  std::memcpy(&value, address, sizeof(value));
  return value;
}

inline unsigned char* dynamic_shared_memory() { return cvt_emu::tl_block->dynamic_shared.data(); }

}  // namespace cvt_fast
