// The launch table of fastbert's kernels, for scripts/kernel_report.py: every kernel instantiation
// the launchers in csrc/<op>/*.cu can dispatch to, with the block sizes and the dynamic shared
// memory they launch it with. Host-only C++ (g++ is enough): it reads the sizes and the configs
// from the same csrc/<op>/<op>.h definitions the launchers use, so the two cannot drift apart
// silently. Kernels the binary holds but this table lacks are reported as unreachable; kernels
// this table names but the binary lacks are an error of the report, so keep it in step with the
// dispatch code.
//
// Output, one line per instantiation: name<template args> TAB block sizes (comma-separated) TAB
// dynamic shared memory in bytes (one number, or one per block size when it depends on the
// launch) [TAB 16 when its main path must move 16-byte packs: the report
// checks its SASS holds 128-bit global loads and stores]. Names are spelled as c++filt prints them.
#include <cstdio>
#include <map>
#include <set>
#include <string>

#include "attention/attention.h"
#include "bias_dropout_residual_layernorm/bias_dropout_residual_layernorm.h"
#include "bias_gelu/bias_gelu.h"
#include "cross_entropy/cross_entropy.h"
#include "gather/gather.h"
#include "layernorm/layernorm.h"

namespace {

using fastbert::DType;

void print_row(const std::string& name, const std::string& threads, const std::string& smem, int vector_bytes) {
  if (vector_bytes)
    std::printf("%s\t%s\t%s\t%d\n", name.c_str(), threads.c_str(), smem.c_str(), vector_bytes);
  else
    std::printf("%s\t%s\t%s\n", name.c_str(), threads.c_str(), smem.c_str());
}

void row(const std::string& name, const std::set<int>& threads, size_t dynamic_smem, int vector_bytes = 0) {
  std::string t;
  for (int n : threads) t += (t.empty() ? "" : ",") + std::to_string(n);
  print_row(name, t, std::to_string(dynamic_smem), vector_bytes);
}

// A kernel whose dynamic shared memory depends on the launch: the most per block size.
void row(const std::string& name, const std::map<int, size_t>& smem_by_threads, int vector_bytes = 0) {
  std::string t, s;
  for (const auto& [threads, smem] : smem_by_threads) {
    t += (t.empty() ? "" : ",") + std::to_string(threads);
    s += (s.empty() ? "" : ",") + std::to_string(smem);
  }
  print_row(name, t, s, vector_bytes);
}

const char* type_name(DType t) {
  return t == DType::kFloat32 ? "float" : t == DType::kFloat16 ? "__half" : "__nv_bfloat16";
}

void attention() {
  // attention_{fwd,bwd}_kernel.cu: dispatch() over fp16/bf16 and kAttentionHeadDims; launch_fwd/launch_bwd.
  for (const char* t : {"__half", "__nv_bfloat16"}) {
    for (int d : fastbert::kAttentionHeadDims) {
      const std::string args = std::string("<") + t + ", " + std::to_string(d) + ">";
      row("attention_fwd_kernel" + args, {fastbert::kAttentionThreads}, fastbert::attention_fwd_smem_bytes(d, 2));
      for (const char* dropout : {"false", "true"})  // attention_bwd_kernel<T, D, dropout enabled>
        row("attention_bwd_kernel<" + std::string(t) + ", " + std::to_string(d) + ", " + dropout + ">",
            {fastbert::kAttentionThreads}, fastbert::attention_bwd_smem_bytes(d, 2));
    }
  }
  row("attention_dropout_mask_kernel", {256}, 0);  // attention_dropout_mask(): 256 threads per block
  for (const char* t : {"__half", "__nv_bfloat16"})  // attention_delta_kernel.cu: DeltaLauncher<T, D>
    for (int d : fastbert::kAttentionHeadDims)
      row("attention_bwd_delta_kernel<" + std::string(t) + ", " + std::to_string(d) + ">",
          {fastbert::kAttentionDeltaThreads}, 0);
}

void layernorm() {
  // layernorm_kernel.cu: fwd_for/bwd_for launch <T, config.vec, config.nv> with config.threads, the
  // forward's and the backward's config apart; the backward with layernorm_bwd_smem_bytes(hidden)
  // of dynamic shared memory (listed per block size: the most any hidden size launches it with).
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (bool backward : {false, true}) {
      std::map<int, size_t> smem[17][9];  // [vec][nv]: threads -> the most dynamic shared memory
      for (int64_t hidden = 1; hidden <= fastbert::kLayerNormMaxHidden; ++hidden) {
        for (int access_bytes : {16, 8, 4, 1}) {  // what the pointers' alignment allows
          const fastbert::LayerNormConfig c = fastbert::layernorm_config(hidden, dtype, access_bytes, backward);
          size_t& s = smem[c.vec][c.nv][c.threads];
          const size_t bytes = backward ? fastbert::layernorm_bwd_smem_bytes(hidden) : 0;
          if (bytes > s) s = bytes;
        }
      }
      for (int vec = 1; vec <= 16; ++vec) {
        for (int nv = 1; nv <= 8; ++nv) {
          if (smem[vec][nv].empty()) continue;
          const std::string args =
              std::string("<") + type_name(dtype) + ", " + std::to_string(vec) + ", " + std::to_string(nv) + ">";
          const int vector_bytes = vec * fastbert::dtype_size(dtype) == 16 ? 16 : 0;  // the 16-byte packs
          if (backward)
            row("layernorm_bwd_kernel" + args, smem[vec][nv], vector_bytes);
          else {
            std::set<int> threads;
            for (const auto& entry : smem[vec][nv]) threads.insert(entry.first);
            row("layernorm_fwd_kernel" + args, threads, 0, vector_bytes);
          }
        }
      }
    }
  }
  row("layernorm_reduce_kernel", {fastbert::kLayerNormReduceCols * fastbert::kLayerNormReduceRows}, 0);
}

void cross_entropy() {
  // cross_entropy_kernel.cu: threads_for(classes) = 32 per 16-byte pack, rounded to a warp, capped.
  std::set<int> threads;
  for (int n = 32; n <= fastbert::kCrossEntropyMaxThreads; n += 32) threads.insert(n);
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    row(std::string("cross_entropy_fwd_kernel<") + type_name(dtype) + ">", threads, 0);
    row(std::string("cross_entropy_bwd_kernel<") + type_name(dtype) + ">", threads, 0);
  }
}

void gather() {
  // gather_kernel.cu: dispatch_vector() over 16, 8, 4, 2 and 1-byte accesses.
  for (const char* v : {"uint4", "uint2", "unsigned int", "unsigned short", "unsigned char"}) {
    row(std::string("gather_rows_kernel<") + v + ">", {fastbert::kGatherThreads}, 0);
    row(std::string("scatter_rows_kernel<") + v + ">", {fastbert::kGatherThreads}, 0);
  }
  row("build_inverse_kernel", {fastbert::kGatherThreads}, 0);
}

void bias_gelu() {
  // bias_gelu_kernel.cu: fwd_for/bwd_for launch <T, 1 or 16 / sizeof(T), kind> on 32 x 8 threads.
  const int threads = fastbert::kBiasGeluThreadsX * fastbert::kBiasGeluThreadsY;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int vec : {1, 16 / fastbert::dtype_size(dtype)}) {
      for (int kind : {0, 1}) {  // GeluKind::kErf, GeluKind::kTanh
        const std::string args = std::string("<") + type_name(dtype) + ", " + std::to_string(vec) + ", " +
                                 std::to_string(kind) + ">";
        row("bias_gelu_fwd_kernel" + args, {threads}, 0);
        row("bias_gelu_bwd_kernel" + args, {threads}, 0);
      }
    }
  }
  row("bias_gelu_dbias_kernel", {threads}, 0);
}

void bias_dropout_residual_layernorm() {
  // bias_dropout_residual_layernorm_kernel.cu: fwd_for/bwd_for launch <T, config.vec, config.nv>, the
  // forward's and the backward's config apart; the backward with bdrln_bwd_smem_bytes(hidden) of
  // dynamic shared memory (listed per block size: the most any hidden size launches it with).
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (bool backward : {false, true}) {
      std::map<int, size_t> smem[17][9];  // [vec][nv]: threads -> the most dynamic shared memory
      for (int64_t hidden = 1; hidden <= fastbert::kBdrlnMaxHidden; ++hidden) {
        for (bool aligned : {true, false}) {
          const fastbert::BdrlnConfig c = fastbert::bdrln_config(hidden, dtype, aligned, backward);
          size_t& s = smem[c.vec][c.nv][c.threads];
          const size_t bytes = backward ? fastbert::bdrln_bwd_smem_bytes(hidden) : 0;
          if (bytes > s) s = bytes;
        }
      }
      for (int vec = 1; vec <= 16; ++vec) {
        for (int nv = 1; nv <= 8; ++nv) {
          if (smem[vec][nv].empty()) continue;
          const std::string args =
              std::string("<") + type_name(dtype) + ", " + std::to_string(vec) + ", " + std::to_string(nv) + ">";
          const int vector_bytes = vec * fastbert::dtype_size(dtype) == 16 ? 16 : 0;  // the 16-byte packs
          row((backward ? "bdrln_bwd_kernel" : "bdrln_fwd_kernel") + args, smem[vec][nv], vector_bytes);
        }
      }
    }
  }
  row("bdrln_reduce_kernel", {fastbert::kBdrlnReduceCols * fastbert::kBdrlnReduceRows}, 0);
}

}  // namespace

int main() {
  attention();
  layernorm();
  cross_entropy();
  gather();
  bias_gelu();
  bias_dropout_residual_layernorm();
  return 0;
}
