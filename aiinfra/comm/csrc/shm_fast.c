// The latency path of the shared-memory transport (aiinfra/comm/shm.py), in C: the tick wait loop
// and the one-chunk one-shot all_reduce. An 8-byte all_reduce spends ~15 us per rank in Python and
// torch calls; here it is well under a microsecond of work, which matters most when ranks share
// cores (4 ranks on 2 cores: every call waits for all four to be scheduled).
//
// Same protocol as shm.py, word for word: every rank's segment starts with int64 control words
// (PID, TICK, WAIT_RANK, WAIT_TICK, ...; two descriptor slots of 8 words at DESC and DESC + 8);
// signal = store own TICK (and wake a sleeper that published WAIT_RANK = me + 1); wait = every
// rank's TICK reached the value (spin, then sched_yield, then futex on TICK's low 32 bits).
//
// The group context is an int64 array built by native.py: 12 argument words (the *_packed entry
// points read their arguments there: one pointer through ctypes costs ~0.3 us, eleven ~1.5 us),
// then world, rank, spin_ns, yield_ns, ctrl[0..world), staging0[0..world), staging1[0..world).
// Return codes: 0 done; 1 the wait ran past budget_ns (the caller waits in Python, where timeouts
// and dead peers are reported, then calls ai_one_shot_finish); 2 the ranks' descriptors differ
// (the caller reads them and raises); 3 dtype or op this file does not handle; 4 the staging half
// was not freed by the peers within budget_ns (nothing done: the caller waits, then calls again).

#define _GNU_SOURCE
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { TICK = 1, WAIT_RANK = 2, WAIT_TICK = 3 };
enum { DESC_LEN = 5, MAX_WORLD = 64 };
enum { F32, BF16, F16, I32, I64, U8 };  // transport.DTYPES order
enum { SUM, AVG, MAX, MIN };            // transport.REDUCE_OPS order

typedef struct {
    int64_t args[12];
    int64_t world, rank, spin_ns, yield_ns;
    int64_t addr[];  // ctrl[world], staging half 0 [world], staging half 1 [world]
} ctx_t;

static inline int64_t *ctrl(const ctx_t *c, int64_t q) { return (int64_t *)c->addr[q]; }

static inline uint8_t *staging(const ctx_t *c, int64_t half, int64_t q) {
    return (uint8_t *)c->addr[c->world * (1 + half) + q];
}

static inline int64_t load(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline void store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// the first rank whose tick is below `tick`, or -1 when all reached it
static int64_t first_missing(const ctx_t *c, int64_t tick) {
    for (int64_t q = 0; q < c->world; q++)
        if (load(ctrl(c, q) + TICK) < tick) return q;
    return -1;
}

void ai_signal(const ctx_t *c, int64_t tick) {
    int64_t *own = ctrl(c, c->rank);
    store(own + TICK, tick);
    // a full fence: the waiter publishes WAIT_* and then re-reads TICK; one of us sees the other
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (int64_t q = 0; q < c->world; q++) {
        const int64_t *w = ctrl(c, q);
        if (load(w + WAIT_RANK) == c->rank + 1 && load(w + WAIT_TICK) <= tick) {
            syscall(SYS_futex, (int32_t *)(own + TICK), FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
            return;
        }
    }
}

int64_t ai_wait(const ctx_t *c, int64_t tick, int64_t budget_ns) {
    int64_t q = first_missing(c, tick);
    if (q < 0) return 0;
    const int64_t start = now_ns();
    int64_t t = start;
    while (t - start < c->spin_ns) {  // only when every rank has a core of its own
        for (int i = 0; i < 32; i++) cpu_relax();
        if (first_missing(c, tick) < 0) return 0;
        t = now_ns();
    }
    // still runnable: a peer sharing this core takes over in a syscall instead of a wake-up
    while (t - start < c->spin_ns + c->yield_ns) {
        sched_yield();
        if (first_missing(c, tick) < 0) return 0;
        t = now_ns();
    }
    int64_t *own = ctrl(c, c->rank);
    while (t - start < budget_ns) {
        q = first_missing(c, tick);
        if (q < 0) return 0;
        store(own + WAIT_TICK, tick);
        store(own + WAIT_RANK, q + 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int64_t seen = load(ctrl(c, q) + TICK);
        if (seen < tick) {
            struct timespec ts = {0, 1000000};  // bounded: the budget is checked every 1 ms
            syscall(SYS_futex, (int32_t *)(ctrl(c, q) + TICK), FUTEX_WAIT, (int32_t)seen, &ts,
                    NULL, 0);
        }
        store(own + WAIT_RANK, 0);
        t = now_ns();
    }
    return first_missing(c, tick) < 0 ? 0 : 1;
}

// --- reductions: dst = s[0] op s[1] op ... in rank order (bit-identical on every rank) ----------

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// floating max/min propagate NaN, as torch.maximum / torch.minimum
#define FMAX(a, b) ((a) != (a) ? (a) : (b) != (b) ? (b) : (a) > (b) ? (a) : (b))
#define FMIN(a, b) ((a) != (a) ? (a) : (b) != (b) ? (b) : (a) < (b) ? (a) : (b))
#define IMAX(a, b) ((a) > (b) ? (a) : (b))
#define IMIN(a, b) ((a) < (b) ? (a) : (b))

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// IEEE half <-> float without F16C, as c10::Half (from Marat Dukhan's FP16 library, MIT)
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t bits = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
    return bits_to_f32(sign | bits);
}

static inline uint16_t f32_to_f16(float f) {  // round to nearest even
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Rank order, one source at a time (the loops vectorize); 16-bit floats are computed in float and
// rounded after every step, as torch.add / torch.maximum on bf16 and fp16 tensors do.
#define REDUCE(T, LOAD, STORE, MAXF, MINF, ADD)                                        \
    do {                                                                               \
        T *d = (T *)dst;                                                               \
        memcpy(d, src[0], (size_t)n * sizeof(T));                                      \
        for (int64_t q = 1; q < p; q++) {                                              \
            const T *s = (const T *)src[q];                                            \
            if (op == MAX)                                                             \
                for (int64_t i = 0; i < n; i++) d[i] = STORE(MAXF(LOAD(d[i]), LOAD(s[i]))); \
            else if (op == MIN)                                                        \
                for (int64_t i = 0; i < n; i++) d[i] = STORE(MINF(LOAD(d[i]), LOAD(s[i]))); \
            else                                                                       \
                for (int64_t i = 0; i < n; i++) d[i] = ADD(d[i], s[i]);               \
        }                                                                              \
    } while (0)

#define ID(x) (x)
#define FADD(a, b) ((a) + (b))
#define BF16_ADD(a, b) f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b))
#define F16_ADD(a, b) f32_to_f16(f16_to_f32(a) + f16_to_f32(b))
// integers wrap around, as torch's
#define I32_ADD(a, b) (int32_t)((uint32_t)(a) + (uint32_t)(b))
#define I64_ADD(a, b) (int64_t)((uint64_t)(a) + (uint64_t)(b))
#define U8_ADD(a, b) (uint8_t)((a) + (b))

// avg: float sums / world size; integer sums floored, as torch's rounding_mode="floor"
#define AVG_FLOAT(T, LOAD, STORE)                                                     \
    for (int64_t i = 0; i < n; i++) ((T *)dst)[i] = STORE(LOAD(((T *)dst)[i]) / (float)p)
#define AVG_INT(T)                                                                    \
    for (int64_t i = 0; i < n; i++) {                                                 \
        const int64_t a = ((T *)dst)[i];                                              \
        ((T *)dst)[i] = (T)(a / p - (a % p < 0));                                     \
    }

static int64_t reduce(void *dst, const void *const *src, int64_t p, int64_t n, int64_t dtype,
                      int64_t op) {
    switch (dtype) {
        case F32:
            REDUCE(float, ID, ID, FMAX, FMIN, FADD);
            if (op == AVG) AVG_FLOAT(float, ID, ID);
            return 0;
        case BF16:
            REDUCE(uint16_t, bf16_to_f32, f32_to_bf16, FMAX, FMIN, BF16_ADD);
            if (op == AVG) AVG_FLOAT(uint16_t, bf16_to_f32, f32_to_bf16);
            return 0;
        case F16:
            REDUCE(uint16_t, f16_to_f32, f32_to_f16, FMAX, FMIN, F16_ADD);
            if (op == AVG) AVG_FLOAT(uint16_t, f16_to_f32, f32_to_f16);
            return 0;
        case I32:
            REDUCE(int32_t, ID, ID, IMAX, IMIN, I32_ADD);
            if (op == AVG) AVG_INT(int32_t);
            return 0;
        case I64:
            REDUCE(int64_t, ID, ID, IMAX, IMIN, I64_ADD);
            if (op == AVG) AVG_INT(int64_t);
            return 0;
        case U8:
            REDUCE(uint8_t, ID, ID, IMAX, IMIN, U8_ADD);
            if (op == AVG) AVG_INT(uint8_t);
            return 0;
    }
    return 3;
}

static const int64_t ELEM_BYTES[] = {4, 2, 2, 4, 8, 1};

int64_t ai_supports(int64_t dtype, int64_t op) {
    return dtype >= F32 && dtype <= U8 && op >= SUM && op <= MIN;
}

// Up to where this file beats torch's kernels (measured at world 2, docs/benchmarks.md): integer
// and float32 loops vectorize; 16-bit floats convert element by element (no F16C assumed).
int64_t ai_max_bytes(int64_t dtype) { return dtype == BF16 || dtype == F16 ? 4096 : 1 << 20; }

// After the barrier: check that every rank described the same call, then reduce the staged chunks.
int64_t ai_one_shot_finish(const ctx_t *c, void *dst, int64_t numel, int64_t dtype, int64_t op,
                           int64_t half, int64_t slot) {
    const int64_t *mine = ctrl(c, c->rank) + slot;
    for (int64_t q = 0; q < c->world; q++)
        if (memcmp(ctrl(c, q) + slot, mine, DESC_LEN * sizeof(int64_t)) != 0) return 2;
    const void *src[MAX_WORLD] = {0};
    for (int64_t q = 0; q < c->world; q++) src[q] = staging(c, half, q);
    return reduce(dst, src, c->world, numel, dtype, op);
}

// One-shot all_reduce of a chunk that fits one staging half: wait until peers are done with the
// half, copy in, publish the descriptor, barrier (signal `tick`, wait for all), reduce.
int64_t ai_one_shot(const ctx_t *c, const void *x, void *dst, int64_t numel, int64_t dtype,
                    int64_t op, int64_t tick, int64_t half, int64_t slot, int64_t half_free,
                    int64_t budget_ns) {
    if (!ai_supports(dtype, op) || c->world > MAX_WORLD) return 3;
    if (ai_wait(c, half_free, budget_ns) != 0) return 4;  // nothing done yet
    memcpy(staging(c, half, c->rank), x, (size_t)(numel * ELEM_BYTES[dtype]));
    int64_t *own = ctrl(c, c->rank) + slot;
    const int64_t desc[DESC_LEN] = {0 /* all_reduce */, numel, dtype, op, 0};
    memcpy(own, desc, sizeof desc);
    ai_signal(c, tick);
    if (ai_wait(c, tick, budget_ns) != 0) return 1;
    return ai_one_shot_finish(c, dst, numel, dtype, op, half, slot);
}

// --- entry points for ctypes: arguments in c->args ----------------------------------------------

// args[10..11]: a wait inside a one-shot call (finish re-reads the one-shot arguments) keeps them
int64_t ai_wait_packed(const ctx_t *c) { return ai_wait(c, c->args[10], c->args[11]); }

int64_t ai_signal_packed(const ctx_t *c) {
    ai_signal(c, c->args[10]);
    return 0;
}

int64_t ai_one_shot_packed(const ctx_t *c) {
    const int64_t *a = c->args;
    return ai_one_shot(c, (const void *)a[0], (void *)a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                       a[8], a[9]);
}

int64_t ai_one_shot_finish_packed(const ctx_t *c) {
    const int64_t *a = c->args;
    return ai_one_shot_finish(c, (void *)a[1], a[2], a[3], a[4], a[6], a[7]);
}
