// Runs a kernel compiled against tests/kernels/metal_stub.h on the CPU. The grid's threadgroups run one after
// another; inside a group every GPU thread is a fiber (ucontext) on this one OS thread, switched only
// where Metal synchronizes: a fiber runs until threadgroup_barrier or a simdgroup operation, then the next
// one runs. A barrier releases when every thread of the group has reached it, a simdgroup operation when
// every lane of the simdgroup has. Threads resume in the opposite order after each release, so a read of
// another thread's write that lacks a barrier sees stale data in one order or the other, deterministically.
// Reported as errors (all undefined on a GPU): a barrier or simdgroup operation that a thread of its group
// or simdgroup has already left by returning, and threads waiting at different synchronization points.
#include <ucontext.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int N_ATTRIBUTES = 34;
constexpr size_t STACK = 256 * 1024;

enum State { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  State state = DONE;
  unsigned attributes[N_ATTRIBUTES];
  unsigned char gathered[32][16];  // the lanes' values of the simdgroup operation just released
  int lanes = 0;
};

typedef void (*kvrt_entry_fn)(void** buffers, const unsigned* attributes);

ucontext_t scheduler;
std::vector<Fiber> fibers;
int current = 0;
int running = 0;  // threads in the current group
kvrt_entry_fn entry = nullptr;
void** buffers = nullptr;
unsigned char slots[32][32][16];  // [simdgroup][lane]: values deposited for a simdgroup operation
std::string error;

void fail(const std::string& why) {
  if (error.empty()) {
    error = why;
  }
}

void trampoline() {
  Fiber& f = fibers[current];
  entry(buffers, f.attributes);
  f.state = DONE;  // uc_link resumes the scheduler
}

void block(State state) {
  fibers[current].state = state;
  swapcontext(&fibers[current].context, &scheduler);
}

// After every fiber has blocked or finished: release whatever may go on; false when nothing can.
bool release() {
  int alive = 0, at_barrier = 0;
  for (int i = 0; i < running; ++i) {
    alive += fibers[i].state != DONE;
    at_barrier += fibers[i].state == AT_BARRIER;
  }
  if (alive == 0) {
    return false;
  }
  if (at_barrier == alive) {
    if (alive < running) {
      fail("threadgroup_barrier after a thread of the group returned");
    }
    for (int i = 0; i < running; ++i) {
      if (fibers[i].state == AT_BARRIER) {
        fibers[i].state = RUNNABLE;
      }
    }
    return true;
  }
  bool any = false;
  for (int s = 0; s * 32 < running; ++s) {
    const int first = s * 32, last = running < first + 32 ? running : first + 32;
    int waiting = 0, done = 0;
    for (int i = first; i < last; ++i) {
      waiting += fibers[i].state == AT_SIMD;
      done += fibers[i].state == DONE;
    }
    if (waiting == 0 || waiting + done < last - first) {
      continue;
    }
    if (done) {
      fail("simdgroup operation after a lane of the simdgroup returned");
    }
    for (int i = first; i < last; ++i) {
      if (fibers[i].state == AT_SIMD) {
        std::memcpy(fibers[i].gathered, slots[s], sizeof(slots[s]));
        fibers[i].lanes = last - first;
        fibers[i].state = RUNNABLE;
      }
    }
    any = true;
  }
  if (!any) {
    fail("threads wait at different synchronization points (a divergent barrier or simdgroup operation)");
  }
  return any;
}

}  // namespace

extern "C" {

void kvrt_threadgroup_barrier(void) { block(AT_BARRIER); }

int kvrt_simd_gather(const void* mine, unsigned size, void* all) {
  if (size > 16) {
    fail("simdgroup exchange of a value wider than 16 bytes");
    return 1;
  }
  std::memcpy(slots[current / 32][current % 32], mine, size);
  block(AT_SIMD);
  Fiber& f = fibers[current];
  for (int i = 0; i < f.lanes; ++i) {
    std::memcpy(static_cast<unsigned char*>(all) + i * size, f.gathered[i], size);
  }
  return f.lanes;
}

// Attribute slots handed to the kernel's entry (tests/kernels/metal_emulator.py ATTRIBUTES names them).
enum {
  POS_IN_GRID = 0, POS_IN_GROUP = 3, GROUP_POS = 6, THREADS_PER_GROUP = 9, GROUPS_PER_GRID = 12,
  THREADS_PER_GRID = 15, INDEX_IN_GROUP = 18, INDEX_IN_SIMD = 19, SIMD_INDEX = 20, SIMDS_PER_GROUP = 21,
  SIMD_WIDTH = 22, DISPATCH_THREADS_PER_GROUP = 23, INDEX_IN_QUAD = 26, QUAD_INDEX = 27, QUADS_PER_GROUP = 28,
  DISPATCH_SIMDS = 29, DISPATCH_QUADS = 30, GRID_ORIGIN = 31
};

int kvrt_run_grid(kvrt_entry_fn fn, void** bufs, const unsigned* grid, const unsigned* tg, char* message,
                  int message_len) {
  error.clear();
  entry = fn;
  buffers = bufs;
  unsigned size[3], groups[3];
  for (int d = 0; d < 3; ++d) {
    size[d] = tg[d] < grid[d] ? tg[d] : grid[d];  // MLX clamps the threadgroup to the grid
    groups[d] = (grid[d] + size[d] - 1) / size[d];
  }
  const unsigned dispatch_n = size[0] * size[1] * size[2];
  if (dispatch_n > 1024) {
    fail("more than 1024 threads per threadgroup");
  }
  if (fibers.size() < dispatch_n) {
    fibers.resize(dispatch_n);
  }
  bool forward = true;
  for (unsigned gz = 0; gz < groups[2] && error.empty(); ++gz)
    for (unsigned gy = 0; gy < groups[1] && error.empty(); ++gy)
      for (unsigned gx = 0; gx < groups[0] && error.empty(); ++gx) {
        const unsigned gpos[3] = {gx, gy, gz};
        unsigned here[3];  // dispatchThreads: an edge threadgroup holds only the threads inside the grid
        for (int d = 0; d < 3; ++d) {
          const unsigned left = grid[d] - gpos[d] * size[d];
          here[d] = left < size[d] ? left : size[d];
        }
        running = int(here[0] * here[1] * here[2]);
        for (int i = 0; i < running; ++i) {
          Fiber& f = fibers[i];
          unsigned* a = f.attributes;
          std::memset(a, 0, sizeof(f.attributes));
          const unsigned local[3] = {i % here[0], (i / here[0]) % here[1], i / (here[0] * here[1])};
          for (int d = 0; d < 3; ++d) {
            a[POS_IN_GRID + d] = gpos[d] * size[d] + local[d];
            a[POS_IN_GROUP + d] = local[d];
            a[GROUP_POS + d] = gpos[d];
            a[THREADS_PER_GROUP + d] = here[d];
            a[GROUPS_PER_GRID + d] = groups[d];
            a[THREADS_PER_GRID + d] = grid[d];
            a[DISPATCH_THREADS_PER_GROUP + d] = size[d];
            a[GRID_ORIGIN + d] = 0;
          }
          a[INDEX_IN_GROUP] = i;
          a[INDEX_IN_SIMD] = i % 32;
          a[SIMD_INDEX] = i / 32;
          a[SIMDS_PER_GROUP] = (running + 31) / 32;
          a[SIMD_WIDTH] = 32;
          a[INDEX_IN_QUAD] = i % 4;
          a[QUAD_INDEX] = i / 4;
          a[QUADS_PER_GROUP] = (running + 3) / 4;
          a[DISPATCH_SIMDS] = (dispatch_n + 31) / 32;
          a[DISPATCH_QUADS] = (dispatch_n + 3) / 4;
          if (f.stack.empty()) {
            f.stack.resize(STACK);
          }
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = &scheduler;
          makecontext(&f.context, trampoline, 0);
          f.state = RUNNABLE;
        }
        do {
          for (int k = 0; k < running; ++k) {
            current = forward ? k : running - 1 - k;
            if (fibers[current].state == RUNNABLE) {
              swapcontext(&scheduler, &fibers[current].context);
            }
          }
          forward = !forward;
        } while (release() && error.empty());
        for (int i = 0; i < running; ++i) {
          if (fibers[i].state != DONE && error.empty()) {
            fail("a thread never finished");
          }
        }
      }
  std::strncpy(message, error.c_str(), message_len - 1);
  message[message_len - 1] = 0;
  return error.empty() ? 0 : 1;
}

}  // extern "C"
