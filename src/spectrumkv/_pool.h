/* A persistent pool of helper threads for the frame codec (_codec.c). Paged decode attention
 * (paged/_attention.c) runs on OpenMP instead, on torch's own threads (see its top comment).
 * Each extension that includes this header gets its own pool (the state below is static).
 *
 * Starting a thread, or waking a sleeping one, costs 0.1-4 ms on some VMs, as much as encoding a
 * small layer, so helpers spin for up to SPIN_NS after a job before they sleep, and a caller
 * spins likewise before it sleeps on the result. A job is split into one share per thread: share
 * t runs fn(ctx, t, nthreads). Each helper share is claimed (share[t], a CAS from "open for
 * generation g" to "claimed") by its helper or, once the caller has done its own share, by the
 * caller, so a caller never waits for a helper that has not woken yet: it waits only for shares
 * a helper has started. One job runs at a time; a caller that finds the pool busy (another Python
 * thread in the same extension) does its whole job on its own thread.
 *
 * Include after <pthread.h>, <stdatomic.h>, <stdint.h>, <time.h> and a `relax()` spin hint.
 * Call pool_init() once from the module's init function. */
#ifndef SPECTRUMKV_POOL_H
#define SPECTRUMKV_POOL_H

#define POOL_MAX_THREADS 64
#define SPIN_NS 300000
/* A job the caller marks small runs on the caller alone, unless a helper is still awake or jobs
 * are coming back to back (the previous one ended under BACK_TO_BACK_NS ago), where one wake-up
 * pays for many jobs. */
#define BACK_TO_BACK_NS 2000000

typedef void (*pool_fn)(void *ctx, int t, int nthreads);

static struct {
    pthread_mutex_t run; /* held for a whole job */
    pthread_mutex_t mu;  /* guards the sleeps below */
    pthread_cond_t wake, done;
    int started;             /* helper threads alive, ids 1..started (under mu) */
    _Atomic uint64_t gen;    /* bumped for each job */
    _Atomic int pending;     /* helper shares of the current job not done yet */
    _Atomic int awake;       /* helpers spinning or working (not asleep) */
    _Atomic uint64_t share[POOL_MAX_THREADS]; /* share t: gen (open) or gen | CLAIMED (taken) */
    uint64_t born[POOL_MAX_THREADS];          /* gen when each helper was started */
    pool_fn fn;                               /* the current job, written before gen moves */
    void *ctx;
    int total;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spin until the job generation moves past `value` or SPIN_NS pass; returns whether it did. */
static int spin_while_gen(uint64_t value) {
    int64_t until = now_ns() + SPIN_NS;
    for (int i = 1;; i++) {
        if (atomic_load(&pool.gen) != value) return 1;
        if (!(i & 255) && now_ns() > until) return 0;
        relax();
    }
}

#define CLAIMED (UINT64_C(1) << 63)

/* Take share t of job generation g; fails if it was taken or belongs to another job. */
static int claim(int t, uint64_t g) {
    uint64_t open = g;
    return atomic_compare_exchange_strong(&pool.share[t], &open, g | CLAIMED);
}

static int spin_while_pending(void) {
    int64_t until = now_ns() + SPIN_NS;
    for (int i = 1;; i++) {
        if (atomic_load(&pool.pending) == 0) return 1;
        if (!(i & 255) && now_ns() > until) return 0;
        relax();
    }
}

static void *helper_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.mu);
    uint64_t seen = pool.born[id];
    pthread_mutex_unlock(&pool.mu);
    atomic_fetch_add(&pool.awake, 1);
    for (;;) {
        if (!spin_while_gen(seen)) {
            atomic_fetch_sub(&pool.awake, 1);
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
            atomic_fetch_add(&pool.awake, 1);
        }
        seen = atomic_load(&pool.gen);
        if (!claim(id, seen)) continue; /* not part of this job, or the caller took it */
        pool.fn(pool.ctx, id, pool.total);
        if (atomic_fetch_sub(&pool.pending, 1) == 1) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    return NULL;
}

/* After fork() only the forking thread exists in the child: forget the helpers. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.run, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = 0;
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.awake, 0);
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static _Atomic int64_t last_job_end;

/* Run fn(ctx, t, total) for t = 0..total-1 (total <= nthreads) and return when all are done;
 * fn(ctx, 0, 1) alone on the calling thread when nthreads is 1, when the pool is busy, or when
 * `small` and no helper is awake and the last job did not just end. Returns the number of
 * shares the job was split into. */
static int pool_run(pool_fn fn, void *ctx, int nthreads, int small) {
    nthreads = nthreads < 1 ? 1 : nthreads > POOL_MAX_THREADS ? POOL_MAX_THREADS : nthreads;
    int back_to_back = now_ns() - atomic_load(&last_job_end) < BACK_TO_BACK_NS;
    small = small && atomic_load(&pool.awake) < nthreads - 1 && !back_to_back;
    if (nthreads == 1 || small || pthread_mutex_trylock(&pool.run) != 0) {
        fn(ctx, 0, 1);
        atomic_store(&last_job_end, now_ns());
        return 1;
    }
    pthread_mutex_lock(&pool.mu);
    while (pool.started < nthreads - 1) {
        pthread_t th;
        pool.born[pool.started + 1] = atomic_load(&pool.gen);
        if (pthread_create(&th, NULL, helper_main, (void *)(intptr_t)(pool.started + 1)) != 0)
            break;
        pthread_detach(th);
        pool.started++;
    }
    const int total = pool.started + 1 < nthreads ? pool.started + 1 : nthreads;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.total = total;
    const uint64_t g = atomic_load(&pool.gen) + 1;
    for (int t = 1; t < total; t++) atomic_store(&pool.share[t], g);
    atomic_store(&pool.pending, total - 1);
    atomic_store(&pool.gen, g); /* publishes the job to spinning helpers */
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    fn(ctx, 0, total);
    for (int t = 1; t < total; t++) { /* shares no helper has started yet */
        if (claim(t, g)) {
            fn(ctx, t, total);
            atomic_fetch_sub(&pool.pending, 1);
        }
    }
    if (!spin_while_pending()) {
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.pending)) pthread_cond_wait(&pool.done, &pool.mu);
        pthread_mutex_unlock(&pool.mu);
    }
    atomic_store(&last_job_end, now_ns());
    pthread_mutex_unlock(&pool.run);
    return total;
}

#endif
