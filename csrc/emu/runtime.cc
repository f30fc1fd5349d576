// The kernel emulator's runtime: fibers, the block scheduler and its thread orders, warp
// collectives (shuffles, votes, mma.sync), error reports, and the few CUDA runtime calls the
// launchers make. Built with the kernels into build/emu/libfastbert_emu*.so by scripts/emulate.sh.
#include "emu/cuda_emu.h"

#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

// ----------------------------------------------------------------------------- context switch
// emu_switch(save, to): saves the callee-saved registers and the stack pointer into *save and
// resumes the context whose stack pointer is `to`. A new fiber starts in emu_trampoline, which
// calls r13(r12).
extern "C" void emu_switch(void** save, void* to);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
.globl emu_trampoline
.type emu_trampoline,@function
emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
.size emu_trampoline, .-emu_trampoline
)");
extern "C" void emu_trampoline();

namespace emu {

ThreadCtx* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;
int g_arch = 90;

namespace {

#ifdef EMU_ASAN
constexpr size_t kStackBytes = 256 * 1024;
#else
constexpr size_t kStackBytes = 64 * 1024;
#endif
constexpr int kMaxThreads = 1024;

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  ThreadCtx ctx;
  void* sp = nullptr;
  char* stack = nullptr;  // lowest address; a guard page below the usable part
  State state = State::kDone;
  const char* file = nullptr;  // where it waits
  int line = 0;
  // the warp collective it waits at
  int kind = 0;
  unsigned mask = 0;
  uint64_t bits = 0;
  int arg = 0, width = 32;
  uint32_t in[10] = {};
  uint32_t out[4] = {};
  void* fake_stack = nullptr;
  // cp.async: copies issued since the last commit, and the committed groups not yet waited for
  struct Copy {
    void* dst;
    const void* src;
    int bytes;
  };
  std::vector<Copy> uncommitted;
  std::deque<std::vector<Copy>> groups;
};

enum Order { kForward = 0, kReverse = 1, kWarpOrder = 2, kRandom = 3 };
const char* const kOrderNames[] = {"forward", "reverse", "warp", "random"};

// Collective kinds (warp slots): shuffles use their ShflKind, then these.
enum { kCollSyncwarp = 10, kCollVote = 20, kCollMma = 30, kCollLdmatrix = 40 };

std::mutex g_mutex;
std::vector<Fiber> g_fibers(kMaxThreads);
char* g_stacks = nullptr;
int g_num_threads = 0;
void* g_sched_sp = nullptr;
const void* g_sched_bottom = nullptr;
size_t g_sched_size = 0;
void* g_sched_fake = nullptr;
bool g_failed = false;
std::string g_message;  // the first error of the current call
cudaError_t g_last_error = cudaSuccess;
int g_order = kForward;
uint64_t g_seed = 1, g_rng = 1;
void* g_smem = nullptr;
const LaunchInfo* g_launch = nullptr;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

// Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
int optin_limit(int arch) {
  switch (arch) {
    case 80: case 87: return 163 * 1024;
    case 90: return 227 * 1024;
    case 86: case 89: case 120: return 99 * 1024;
    case 70: return 96 * 1024;
    case 75: return 64 * 1024;
    default: return 48 * 1024;
  }
}
int g_num_sms = 0;  // emu_set_num_sms: 0 = the architecture's own count below
int num_sms(int arch) {
  if (g_num_sms > 0) return g_num_sms;
  return arch == 80 ? 108 : arch == 86 ? 84 : arch == 89 ? 128 : arch == 120 ? 170 : 132;
}
// Per SM: resident threads and blocks, and shared memory (scripts/kernel_report.py's table).
int max_threads_per_sm(int arch) { return arch == 86 || arch == 89 || arch == 120 ? 1536 : 2048; }
int max_blocks_per_sm(int arch) { return arch == 86 ? 16 : arch == 89 ? 24 : 32; }
int smem_per_sm(int arch) { return arch == 80 || arch == 87 ? 164 * 1024 : arch == 90 ? 228 * 1024 : 100 * 1024; }

uint64_t next_random() {  // xorshift64*
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return g_rng * 2685821657736338717ull;
}

std::string format(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

// "fastbert::{anonymous}::layernorm_fwd_kernel<float, 4, 1>" from kernel_name<F>()'s __PRETTY_FUNCTION__.
std::string clean_name(const char* pretty) {
  std::string s = pretty;
  const size_t at = s.find("F = ");
  if (at == std::string::npos) return s;
  s = s.substr(at + 4);
  if (!s.empty() && s.back() == ']') s.pop_back();
  if (s.rfind("(& ", 0) == 0 && s.back() == ')') s = s.substr(3, s.size() - 4);
  if (!s.empty() && s[0] == '&') s = s.substr(1);
  return s;
}

// Records the first error of this call, with the kernel, the block and the thread.
void record(cudaError_t code, const std::string& what) {
  if (g_last_error == cudaSuccess) g_last_error = code;
  if (!g_message.empty()) return;
  if (g_launch != nullptr) {
    g_message = format("kernel %s (launched at %s:%d), block (%u,%u,%u)", clean_name(g_launch->name).c_str(),
                       g_launch->file, g_launch->line, g_block_idx.x, g_block_idx.y, g_block_idx.z);
    if (g_thread != nullptr)
      g_message += format(", thread (%u,%u,%u)", g_thread->tid.x, g_thread->tid.y, g_thread->tid.z);
    g_message += format(", order %s: ", kOrderNames[g_order]);
  }
  g_message += what;
}

// ----------------------------------------------------------------------------- fibers

void ensure_stacks() {
  if (g_stacks != nullptr) return;
  void* mem = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    fprintf(stderr, "fastbert emulator: cannot map fiber stacks\n");
    abort();
  }
  g_stacks = static_cast<char*>(mem);
  for (int i = 0; i < kMaxThreads; ++i) {
    g_fibers[i].stack = g_stacks + i * kStackBytes;
    mprotect(g_fibers[i].stack, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
  }
}

// Scheduler -> fiber.
void resume(Fiber& f) {
  g_thread = &f.ctx;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&g_sched_fake, f.stack, kStackBytes);
#endif
  emu_switch(&g_sched_sp, f.sp);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
  g_thread = nullptr;
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber. `dying`: never resumed.
void yield_to_scheduler(bool dying = false) {
  Fiber& f = g_fibers[g_thread->linear];
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, g_sched_bottom, g_sched_size);
#endif
  emu_switch(&f.sp, g_sched_sp);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  (void)dying;
}

void fiber_main(void* arg);
}  // namespace

void cp_async_commit() {
  Fiber& f = g_fibers[g_thread->linear];
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void cp_async_wait(int pending_groups) {
  Fiber& f = g_fibers[g_thread->linear];
  while (static_cast<int>(f.groups.size()) > pending_groups) {
    for (const Fiber::Copy& c : f.groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    f.groups.pop_front();
  }
}

namespace {

void fiber_main(void* arg) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  (void)arg;
  g_body(g_body_ctx);
  Fiber& f = g_fibers[g_thread->linear];
  if (!f.uncommitted.empty() || !f.groups.empty()) {  // copies never waited for still land, as on the GPU
    cp_async_commit();
    cp_async_wait(0);
  }
  f.state = State::kDone;
  yield_to_scheduler(true);
  __builtin_unreachable();
}

void init_fiber(Fiber& f, int linear) {
  const dim3& b = g_block_dim;
  f.ctx.linear = linear;
  f.ctx.tid = make_uint3(linear % b.x, (linear / b.x) % b.y, linear / (b.x * b.y));
  f.ctx.lane = linear % 32;
  f.ctx.warp = linear / 32;
  f.state = State::kRunnable;
  f.fake_stack = nullptr;
  f.uncommitted.clear();
  f.groups.clear();
#ifdef EMU_ASAN
  // the previous fiber on this stack never returned from fiber_main: its frames' redzones are
  // still poisoned at the top of the stack (deeper frames returned, and were unpoisoned then)
  __asan_unpoison_memory_region(f.stack + kStackBytes - 8192, 8192);
#endif
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  void** s = reinterpret_cast<void**>(top);
  s[-1] = reinterpret_cast<void*>(&emu_trampoline);  // ret address
  s[-2] = nullptr;                                      // rbp
  s[-3] = nullptr;                                      // rbx
  s[-4] = &f;                                           // r12: argument
  s[-5] = reinterpret_cast<void*>(&fiber_main);        // r13: function
  s[-6] = nullptr;                                      // r14
  s[-7] = nullptr;                                      // r15
  f.sp = &s[-7];
}

// Ends the current thread's launch: it never runs again, nor does any other thread of the launch.
[[noreturn]] void fail_here(cudaError_t code, const std::string& what) {
  record(code, what);
  g_failed = true;
  if (g_thread == nullptr) abort();  // not inside a kernel: cannot happen
  g_fibers[g_thread->linear].state = State::kDone;
  yield_to_scheduler(true);
  __builtin_unreachable();
}

// ----------------------------------------------------------------------------- scheduler

int pick(int cursor) {
  const int n = g_num_threads;
  auto runnable = [](int i) { return g_fibers[i].state == State::kRunnable; };
  switch (g_order) {
    case kReverse:
      for (int k = 1; k <= n; ++k) {
        const int i = ((cursor - k) % n + n) % n;
        if (runnable(i)) return i;
      }
      return -1;
    case kWarpOrder:  // the lowest warp with a runnable thread runs until the next block barrier
      for (int i = 0; i < n; ++i)
        if (runnable(i)) return i;
      return -1;
    case kRandom: {
      const int start = static_cast<int>(next_random() % n);
      for (int k = 0; k < n; ++k)
        if (runnable((start + k) % n)) return (start + k) % n;
      return -1;
    }
    default:
      for (int k = 1; k <= n; ++k) {
        const int i = (cursor + k) % n;
        if (runnable(i)) return i;
      }
      return -1;
  }
}

std::string describe_waiters() {
  std::map<std::string, int> sites;
  for (int i = 0; i < g_num_threads; ++i) {
    const Fiber& f = g_fibers[i];
    std::string s;
    if (f.state == State::kBarrier) s = format("__syncthreads at %s:%d", f.file, f.line);
    else if (f.state == State::kWarp) s = format("a warp collective with mask 0x%08x at %s:%d", f.mask, f.file, f.line);
    else if (f.state == State::kDone) s = "exited";
    else continue;
    ++sites[s];
  }
  std::string out;
  for (auto& [s, n] : sites) out += format("%s%d thread(s) %s", out.empty() ? "" : "; ", n, s.c_str());
  return out;
}

// Runs one block to completion; false if the launch failed.
bool run_block() {
  const int n = g_num_threads;
  for (int i = 0; i < n; ++i) init_fiber(g_fibers[i], i);
  int cursor = g_order == kReverse ? 0 : n - 1;
  for (;;) {
    const int next = pick(cursor);
    if (next < 0) {
      int done = 0, barrier = 0, warp = 0;
      const Fiber* first = nullptr;
      bool same_site = true;
      for (int i = 0; i < n; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.state == State::kDone) ++done;
        else if (f.state == State::kWarp) ++warp;
        else if (f.state == State::kBarrier) {
          ++barrier;
          if (first == nullptr) first = &f;
          else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) same_site = false;
        }
      }
      if (done == n) return true;
      if (warp == 0 && same_site) {  // every live thread is at one __syncthreads: release it
        for (int i = 0; i < n; ++i)
          if (g_fibers[i].state == State::kBarrier) g_fibers[i].state = State::kRunnable;
        continue;
      }
      record(cudaErrorLaunchFailure, std::string(warp == 0 ? "threads of the block wait at different barriers: "
                                                           : "deadlock: ") + describe_waiters());
      return false;
    }
    cursor = next;
    resume(g_fibers[next]);
    if (g_failed) return false;
  }
}

Fiber& self() { return g_fibers[g_thread->linear]; }

// Lanes [0, 32) of the current thread's warp that exist in this block.
unsigned warp_lanes() {
  const int base = g_thread->warp * 32;
  const int count = g_num_threads - base < 32 ? g_num_threads - base : 32;
  return count == 32 ? 0xffffffffu : ((1u << count) - 1u);
}

// Arrives at a warp collective; returns once every lane of `mask` has arrived (outputs in out).
void warp_collective(int kind, unsigned mask, const char* file, int line, void (*compute)(Fiber* const*, unsigned)) {
  Fiber& f = self();
  const int lane = g_thread->lane;
  if (!(mask >> lane & 1u))
    fail_here(cudaErrorLaunchFailure, format("%s:%d: warp collective called by lane %d with mask 0x%08x, which "
                                             "does not include it", file, line, lane, mask));
  if (mask & ~warp_lanes())
    fail_here(cudaErrorLaunchFailure, format("%s:%d: mask 0x%08x names lanes that do not exist in this warp "
                                             "(lanes 0x%08x)", file, line, mask, warp_lanes()));
  f.kind = kind;
  f.mask = mask;
  f.file = file;
  f.line = line;
  f.state = State::kWarp;
  Fiber* lanes[32] = {};
  bool all = true;
  const int base = g_thread->warp * 32;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& p = g_fibers[base + l];
    lanes[l] = &p;
    if (p.state == State::kDone)
      fail_here(cudaErrorLaunchFailure, format("%s:%d: warp collective with mask 0x%08x, but lane %d has exited",
                                               file, line, mask, l));
    if (p.state != State::kWarp) {
      all = false;
      continue;
    }
    if (p.mask != mask || p.kind != kind)
      fail_here(cudaErrorLaunchFailure,
                format("%s:%d: lane %d joins a warp collective (kind %d) with mask 0x%08x while lane %d waits at "
                       "%s:%d (kind %d) with mask 0x%08x", file, line, lane, kind, mask, l, p.file, p.line, p.kind,
                       p.mask));
  }
  if (all) {
    compute(lanes, mask);
    for (int l = 0; l < 32; ++l)
      if (lanes[l] != nullptr) lanes[l]->state = State::kRunnable;
    return;  // the last lane to arrive goes on running
  }
  yield_to_scheduler();
}

void compute_nothing(Fiber* const*, unsigned) {}

void compute_shfl(Fiber* const* lanes, unsigned mask) {
  uint64_t values[32];
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) values[l] = lanes[l]->bits;
  for (int l = 0; l < 32; ++l) {
    Fiber* f = lanes[l];
    if (!f) continue;
    const int width = f->width;
    const int seg = l & ~(width - 1), pos = l - seg;
    int src = l;
    switch (f->kind) {
      case kShflIdx: src = seg + (f->arg % width + width) % width; break;
      case kShflXor: src = (pos ^ f->arg) < width ? seg + (pos ^ f->arg) : l; break;
      case kShflUp: src = pos >= f->arg ? l - f->arg : l; break;
      case kShflDown: src = pos + f->arg < width ? l + f->arg : l; break;
    }
    if (!(mask >> src & 1u)) {  // reading an inactive lane: undefined on the GPU
      f->out[0] = 1;
      f->arg = src;
      continue;
    }
    f->out[0] = 0;
    f->bits = values[src];
  }
}

void compute_vote(Fiber* const* lanes, unsigned mask) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (lanes[l] && lanes[l]->bits) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) {
      Fiber* f = lanes[l];
      f->out[0] = f->arg == kBallot ? ballot : f->arg == kAny ? (ballot != 0) : (ballot == mask);
    }
}

template <typename T>
float elem(uint32_t reg, int half) {
  T v;
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: the PTX ISA fragment layouts,
// g = lane / 4, t = lane % 4:
//   A: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C, D: c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
template <typename T>
void compute_mma(Fiber* const* lanes, unsigned) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const Fiber* f = lanes[l];
    const int g = l >> 2, t = l & 3;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = elem<T>(f->in[0], h);
      A[g + 8][2 * t + h] = elem<T>(f->in[1], h);
      A[g][2 * t + 8 + h] = elem<T>(f->in[2], h);
      A[g + 8][2 * t + 8 + h] = elem<T>(f->in[3], h);
      B[2 * t + h][g] = elem<T>(f->in[4], h);
      B[2 * t + 8 + h][g] = elem<T>(f->in[5], h);
    }
    float c[4];
    std::memcpy(c, &f->in[6], sizeof(c));
    C[g][2 * t] = c[0];
    C[g][2 * t + 1] = c[1];
    C[g + 8][2 * t] = c[2];
    C[g + 8][2 * t + 1] = c[3];
  }
  for (int l = 0; l < 32; ++l) {
    Fiber* f = lanes[l];
    const int g = l >> 2, t = l & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; ++e) {
      float acc = C[rows[e]][cols[e]];
      for (int k = 0; k < 16; ++k) acc += A[rows[e]][k] * B[k][cols[e]];  // products exact in fp32
      std::memcpy(&f->out[e], &acc, 4);
    }
  }
}

// ldmatrix .x4: lane l reads matrix i's row l / 4 (or, transposed, rows 2 (l % 4), 2 (l % 4) + 1).
template <bool kTrans>
void compute_ldmatrix(Fiber* const* lanes, unsigned) {
  const char* rows[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&rows[l], &lanes[l]->bits, sizeof(rows[l]));
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 4; ++i) {
      uint32_t v;
      if (!kTrans) {
        std::memcpy(&v, rows[i * 8 + l / 4] + (l % 4) * 4, 4);
      } else {
        uint16_t lo, hi;
        std::memcpy(&lo, rows[i * 8 + 2 * (l % 4)] + (l / 4) * 2, 2);
        std::memcpy(&hi, rows[i * 8 + 2 * (l % 4) + 1] + (l / 4) * 2, 2);
        v = lo | (uint32_t(hi) << 16);
      }
      lanes[l]->out[i] = v;
    }
  }
}

}  // namespace

// ----------------------------------------------------------------------------- built-ins

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    fail_here(cudaErrorLaunchFailure, format("%s:%d: ldmatrix row address %p is not 16-byte aligned", file, line,
                                             row));
  Fiber& f = self();
  std::memcpy(&f.bits, &row, sizeof(row));
  warp_collective(kCollLdmatrix + trans, 0xffffffffu, file, line,
                  trans ? compute_ldmatrix<true> : compute_ldmatrix<false>);
  std::memcpy(r, f.out, 16);
}

void cp_async(void* smem, const void* gmem, int bytes, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(smem) % bytes != 0 || reinterpret_cast<uintptr_t>(gmem) % bytes != 0)
    fail_here(cudaErrorLaunchFailure, format("%s:%d: cp.async of %d bytes from %p to %p: both must be aligned to "
                                             "its size", file, line, bytes, gmem, smem));
  // A copy may land any time from its issue to the wait_group that covers it. The forward and
  // reverse orders take the latest (a read before the wait sees the poison), the warp order the
  // earliest (a warp running ahead to the next barrier overwrites a buffer another warp still
  // reads, if the barrier between those reads and the new copies is missing), random either, per copy.
  if (g_order == kWarpOrder || (g_order == kRandom && (next_random() & 1u))) {
    std::memcpy(smem, gmem, bytes);
    return;
  }
  g_fibers[g_thread->linear].uncommitted.push_back({smem, gmem, bytes});
}

void* dynamic_smem() { return g_smem; }

void fail(const char* file, int line, const char* what) {
  fail_here(cudaErrorLaunchFailure, format("%s:%d: %s", file, line, what));
}

void syncthreads(const char* file, int line) {
  Fiber& f = self();
  f.file = file;
  f.line = line;
  f.state = State::kBarrier;
  yield_to_scheduler();
}

void syncwarp(unsigned mask, const char* file, int line) {
  warp_collective(kCollSyncwarp, mask, file, line, compute_nothing);
}

uint64_t shfl_raw(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail_here(cudaErrorLaunchFailure, format("%s:%d: shuffle width %d is not a power of 2 in [1, 32]", file, line,
                                             width));
  Fiber& f = self();
  f.bits = bits;
  f.arg = arg;
  f.width = width;
  f.kind = kind;
  warp_collective(kind, mask, file, line, compute_shfl);
  if (f.out[0] != 0)
    fail_here(cudaErrorLaunchFailure, format("%s:%d: lane %d reads lane %d, which is not in the shuffle mask 0x%08x",
                                             file, line, g_thread->lane, f.arg, mask));
  return f.bits;
}

unsigned vote_raw(int kind, unsigned mask, bool pred, const char* file, int line) {
  Fiber& f = self();
  f.bits = pred;
  f.arg = kind;
  warp_collective(kCollVote + kind, mask, file, line, compute_vote);
  return f.out[0];
}

void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file,
                  int line) {
  if (g_arch < 80)  // what the GPU build compiles for older architectures
    fail_here(cudaErrorLaunchFailure, format("%s:%d: __trap(): mma.sync.m16n8k16 needs sm_80 or newer, the "
                                             "emulated architecture is sm_%d", file, line, g_arch));
  Fiber& f = self();
  std::memcpy(&f.in[0], a, 16);
  f.in[4] = b0;
  f.in[5] = b1;
  std::memcpy(&f.in[6], d, 16);
  warp_collective(kCollMma + bf16, 0xffffffffu, file, line, bf16 ? compute_mma<__nv_bfloat16> : compute_mma<__half>);
  std::memcpy(d, f.out, 16);
}

void launch_raw(const LaunchInfo& info, void (*body)(void*), void* ctx) {
  g_launch = &info;
  const dim3 g = info.grid, b = info.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  const int optin = optin_limit(g_arch);
  auto it = g_max_dynamic_smem.find(info.func);
  const size_t allowed = it != g_max_dynamic_smem.end() && it->second > 48 * 1024 ? it->second : 48 * 1024;
  if (threads == 0 || threads > kMaxThreads || b.x > 1024 || b.y > 1024 || b.z > 64 || g.x == 0 || g.y == 0 ||
      g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    record(cudaErrorInvalidConfiguration, format("invalid launch configuration grid (%u,%u,%u), block (%u,%u,%u)",
                                                 g.x, g.y, g.z, b.x, b.y, b.z));
  } else if (info.smem > allowed || info.smem > static_cast<size_t>(optin)) {
    record(cudaErrorInvalidValue,
           format("%zu bytes of dynamic shared memory requested; the kernel may use %zu (over 48 KiB needs "
                  "cudaFuncSetAttribute) and sm_%d allows at most %d", info.smem, allowed, g_arch, optin));
  } else {
    ensure_stacks();
    g_num_threads = static_cast<int>(threads);
    g_block_dim = b;
    g_grid_dim = g;
    g_body = body;
    g_body_ctx = ctx;
    g_failed = false;
    g_smem = std::malloc(info.smem > 0 ? info.smem : 1);  // heap: AddressSanitizer sees its bounds
    for (unsigned z = 0; z < g.z && !g_failed; ++z)
      for (unsigned y = 0; y < g.y && !g_failed; ++y)
        for (unsigned x = 0; x < g.x && !g_failed; ++x) {
          g_block_idx = make_uint3(x, y, z);
          std::memset(g_smem, 0xff, info.smem);  // NaN in every float format, at every block start
          if (!run_block()) g_failed = true;
        }
    std::free(g_smem);
    g_smem = nullptr;
#ifdef EMU_ASAN
    if (g_failed)  // abandoned fibers leave poisoned frames behind: clean the stacks for the next launch
      __asan_unpoison_memory_region(g_stacks, kStackBytes * kMaxThreads);
#endif
  }
  g_block_idx = make_uint3(0, 0, 0);
  g_launch = nullptr;
}

}  // namespace emu

// ----------------------------------------------------------------------------- CUDA runtime calls

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorAssert: return "device-side assert triggered";
    default: return "unknown error";
  }
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::num_sms(emu::g_arch); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::optin_limit(emu::g_arch); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::g_arch / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = emu::g_arch % 10; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

// The emulator does not know a kernel's registers or static shared memory: it answers the bound
// from threads, resident blocks and the dynamic shared memory (1 KiB reserved per block) of the
// emulated architecture, an upper bound of what the GPU says; never 0 for a launchable block.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* func, int block_size,
                                                          size_t dynamic_smem) {
  if (num_blocks == nullptr || func == nullptr || block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  const int arch = emu::g_arch;
  const int warps = (block_size + 31) / 32;
  int blocks = emu::max_threads_per_sm(arch) / (warps * 32);
  if (blocks > emu::max_blocks_per_sm(arch)) blocks = emu::max_blocks_per_sm(arch);
  const size_t per_block = dynamic_smem + 1024;
  const int by_smem = static_cast<int>(static_cast<size_t>(emu::smem_per_sm(arch)) / per_block);
  if (by_smem < blocks) blocks = by_smem;
  *num_blocks = blocks;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  const int limit = emu::optin_limit(emu::g_arch);
  if (value < 0 || value > limit) {
    emu::record(cudaErrorInvalidValue,
                emu::format("cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): over the opt-in limit of sm_%d "
                            "(%d bytes)", value, emu::g_arch, limit));
    return cudaErrorInvalidValue;
  }
  emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

// A device-side assert() ends the launch with an error instead of aborting the process; from
// host code it aborts as usual. Hidden, so the kernels in this library bind to it, not glibc's.
__attribute__((visibility("hidden"))) void __assert_fail(const char* expr, const char* file, unsigned line,
                                                         const char* function) {
  if (emu::g_thread != nullptr)
    emu::fail_here(cudaErrorAssert, emu::format("%s:%u: device assert failed: %s", file, line, expr));
  fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, expr);
  abort();
}

// ----------------------------------------------------------------------------- control from Python

// order: 0 forward, 1 reverse, 2 warp, 3 random (seeded); arch: e.g. 80, 86, 90.
int emu_configure(int order, unsigned long long seed, int arch) {
  if (order < 0 || order > 3 || arch < 50) return -1;
  emu::g_order = order;
  emu::g_seed = seed;
  emu::g_rng = seed * 0x9E3779B97F4A7C15ull + 1;
  emu::g_arch = arch;
  emu::g_max_dynamic_smem.clear();  // a new architecture: opt-ins are made again, as on a new device
  return 0;
}

// SMs the emulated device reports (cudaDevAttrMultiProcessorCount); 0 restores the architecture's.
int emu_set_num_sms(int sms) {
  if (sms < 0) return -1;
  emu::g_num_sms = sms;
  return 0;
}

// The message of the first error since emu_begin (empty if none).
const char* emu_last_error_message(void) { return emu::g_message.c_str(); }

// Every entry point starts with this: one call at a time, a clean error state.
void emu_begin(void) {
  emu::g_mutex.lock();
  emu::g_message.clear();
  emu::g_last_error = cudaSuccess;
}
void emu_end(void) { emu::g_mutex.unlock(); }

}  // extern "C"
