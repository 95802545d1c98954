/*
 * ABI-level stand-in for libnvidia-ml.so.1, used only by the test suite.
 *
 * The fleet it serves is described by a plain-text file (NVML_STUB_CONFIG)
 * that the Python module nvml_stub writes; the library re-reads it whenever
 * it is replaced, so a test can change values or inject faults while the
 * process under test keeps running. Each load builds lookup indexes (see
 * struct index), so a call's cost does not grow with the size of the fleet. Per-symbol call counters live in a shared
 * file mapping (NVML_STUB_COUNTERS) so the test can read them concurrently.
 *
 * Config lines (space separated, "*" = any; DEV is a device index):
 *   g KEY VALUE...                  system value (device_count, driver_version, ...)
 *   d DEV KEY VALUE...              device value; a missing key means NOT_SUPPORTED
 *   m DEV MIG KEY VALUE...          MIG device value
 *   proc DEV PID MEM c|g GI CI      running process (compute or graphics)
 *   pname PID NAME...               process name
 *   putil DEV PID TS SM MEM ENC DEC process utilization sample
 *   sample DEV TYPE TS VALUE        nvmlDeviceGetSamples sample (unsigned int); TYPE is an
 *                                   nvmlSamplingType_t (1 GPU, 2 memory, 3 encoder, 4 decoder)
 *   field DEV ID SCOPE TYPE VALUE   nvmlDeviceGetFieldValues entry
 *   gpm DEV GI METRIC VALUE         GPM metric (GI "*" = whole device)
 *   retired DEV CAUSE ADDR TS       retired page
 *   event SEQ DEV TYPE DATA GI CI   queued event, SEQ strictly increasing
 *   fault SYMBOL DEV RC             SYMBOL ("*" = all) returns RC; first match wins
 *   delay SYMBOL DEV MS             SYMBOL sleeps MS before answering
 *   cost SYMBOL CPU_US WALL_US      each call of SYMBOL burns CPU_US of the calling thread's
 *                                   CPU time, then sleeps until WALL_US have passed
 *   fieldcost ID CPU_US             nvmlDeviceGetFieldValues burns CPU_US more per entry for
 *                                   field ID (0 <= ID < COSTED_IDS)
 *   gpmcost METRIC CPU_US           nvmlGpmMetricsGet burns CPU_US more per entry for METRIC
 *
 * Without cost lines every call answers at once. With them, the stand-in charges what a real
 * driver's RPCs to the GPU cost the calling thread (see costs.py), so a benchmark sees it.
 *
 * Struct layouts follow the ctypes definitions in pynvml.py; each versioned
 * struct's version constant is derived from sizeof() below, so a layout slip
 * shows up as ARGUMENT_VERSION_MISMATCH against pynvml's constants.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
};

enum sym {
#define SYM(name) SYM_##name,
#include "symbols.h"
#undef SYM
    SYM_COUNT
};

static const char *const sym_names[SYM_COUNT] = {
#define SYM(name) #name,
#include "symbols.h"
#undef SYM
};

/* Slot after the per-symbol counters: GPM samples allocated and not freed. */
#define GPM_OUTSTANDING_SLOT SYM_COUNT
#define COUNTER_SLOTS (SYM_COUNT + 1)

#define MAX_DEV 64
#define MAX_MIG 8
#define ANY (-1LL)
/* pynvml sizes c_nvmlGpmMetricsGet_t.metrics with NVML_GPM_METRIC_MAX. */
#define GPM_METRIC_MAX 477
#define VALUE_TYPE_UNSIGNED_INT 1
/* nvmlPcieUtilCounter_t: NVML_PCIE_UTIL_TX_BYTES = 0, NVML_PCIE_UTIL_RX_BYTES = 1. */
#define PCIE_UTIL_COUNT 2
/* Field ids of the ECC error counters: NVML_FI_DEV_ECC_SBE_VOL_TOTAL .. NVML_FI_DEV_ECC_DBE_AGG_CBU. */
#define FI_ECC_FIRST_COUNTER 3
#define FI_ECC_LAST_COUNTER 28

/* Field and GPM metric ids a cost line can name: above pynvml's NVML_FI_MAX (308) and
 * NVML_GPM_METRIC_MAX (477), small enough for a flat array per config. */
#define COSTED_IDS 512

#define STRUCT_VERSION(type, ver) ((unsigned int)(sizeof(type) | ((ver) << 24)))

/* ---- ABI structs (layouts from pynvml.py) ---- */

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned long long bar1Total;
    unsigned long long bar1Free;
    unsigned long long bar1Used;
} nvmlBAR1Memory_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int version;
    unsigned int sensorType;
    int temperature;
} nvmlTemperature_v1_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil;
    unsigned int memUtil;
    unsigned int encUtil;
    unsigned int decUtil;
} nvmlProcessUtilizationSample_t;

typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    int siVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned long long timeStamp;
    nvmlValue_t sampleValue;
} nvmlSample_t;

typedef struct {
    uint32_t fieldId;
    uint32_t scopeId;
    int64_t timestamp;
    int64_t latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

struct entity;
typedef struct entity *nvmlDevice_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

struct event_set;
typedef struct event_set *nvmlEventSet_t;

struct gpm_sample;
typedef struct gpm_sample *nvmlGpmSample_t;

typedef struct {
    unsigned int version;
    unsigned int isSupportedDevice;
} nvmlGpmSupport_t;

typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    struct {
        char *shortName;
        char *longName;
        char *unit;
    } metricInfo;
} nvmlGpmMetric_t;

typedef struct {
    unsigned int version;
    unsigned int numMetrics;
    nvmlGpmSample_t sample1;
    nvmlGpmSample_t sample2;
    nvmlGpmMetric_t metrics[GPM_METRIC_MAX];
} nvmlGpmMetricsGet_t;

#define MEMORY_V2_VERSION STRUCT_VERSION(nvmlMemory_v2_t, 2)
#define TEMPERATURE_V1_VERSION STRUCT_VERSION(nvmlTemperature_v1_t, 1)
#define GPM_SUPPORT_VERSION 1
#define GPM_METRICS_GET_VERSION 1

/* ---- configuration model ---- */

#define VEC(type) \
    struct {      \
        type *v;  \
        size_t n; \
        size_t cap; \
    }

static void *grow(void *items, size_t *cap, size_t n, size_t size) {
    if (n < *cap)
        return items;
    *cap = *cap ? *cap * 2 : 16;
    void *bigger = realloc(items, *cap * size);
    if (!bigger)
        abort();
    return bigger;
}

#define PUSH(vec) \
    ((vec).v = grow((vec).v, &(vec).cap, (vec).n, sizeof(*(vec).v)), &(vec).v[(vec).n++])

/*
 * Lookup indexes, built once per config load so that a call costs a few table lookups however
 * large the fleet is. An index maps a 64-bit key to the entries carrying it: `head` gives the
 * first entry in file order, `next` the following ones, so a scan of a chain visits exactly the
 * entries a linear scan of the whole vector would have matched on that key, in the same order.
 */
#define NO_KEY UINT64_MAX
#define NO_ENTRY SIZE_MAX

struct index {
    uint64_t *keys;  /* hash slots: the key, or NO_KEY when empty */
    uint32_t *heads; /* hash slots: the first entry with the key */
    uint32_t *next;  /* per entry: the next entry with the same key, or UINT32_MAX */
    size_t mask;
};

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* FNV-1a; never NO_KEY, so every string can be indexed. */
static uint64_t str_key(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h == NO_KEY ? 0 : h;
}

static uint64_t pair_key(unsigned int hi, unsigned int lo) { return ((uint64_t)hi << 32) | lo; }

static void free_index(struct index *ix) {
    free(ix->keys);
    free(ix->heads);
    free(ix->next);
    memset(ix, 0, sizeof(*ix));
}

static size_t index_slot(const struct index *ix, uint64_t key) {
    size_t i = (size_t)mix64(key) & ix->mask;
    while (ix->keys[i] != NO_KEY && ix->keys[i] != key)
        i = (i + 1) & ix->mask;
    return i;
}

/* keys[i] is entry i's key, NO_KEY for an entry no lookup can match. */
static void index_build(struct index *ix, const uint64_t *keys, size_t n) {
    memset(ix, 0, sizeof(*ix));
    if (n == 0)
        return;
    if (n >= UINT32_MAX)
        abort();
    size_t cap = 8;
    while (cap < 2 * n)
        cap *= 2;
    ix->mask = cap - 1;
    ix->keys = malloc(cap * sizeof(*ix->keys));
    ix->heads = malloc(cap * sizeof(*ix->heads));
    ix->next = malloc(n * sizeof(*ix->next));
    if (!ix->keys || !ix->heads || !ix->next)
        abort();
    for (size_t i = 0; i < cap; i++)
        ix->keys[i] = NO_KEY;
    /* Backwards, so each key's head ends up its first entry and its chain runs in file order. */
    for (size_t i = n; i-- > 0;) {
        ix->next[i] = UINT32_MAX;
        if (keys[i] == NO_KEY)
            continue;
        size_t slot = index_slot(ix, keys[i]);
        if (ix->keys[slot] == keys[i])
            ix->next[i] = ix->heads[slot];
        ix->keys[slot] = keys[i];
        ix->heads[slot] = (uint32_t)i;
    }
}

static size_t index_first(const struct index *ix, uint64_t key) {
    if (!ix->keys || key == NO_KEY)
        return NO_ENTRY;
    size_t slot = index_slot(ix, key);
    return ix->keys[slot] == key ? ix->heads[slot] : NO_ENTRY;
}

static size_t index_next(const struct index *ix, size_t i) {
    return ix->next[i] == UINT32_MAX ? NO_ENTRY : ix->next[i];
}

#define FOR_EACH_WITH_KEY(i, ix, key) \
    for (size_t i = index_first((ix), (key)); i != NO_ENTRY; i = index_next((ix), i))

struct kv {
    const char *key;
    const char *val;
};
typedef struct {
    struct kv *v;
    size_t n;
    size_t cap;
    struct index ix; /* by str_key(key) */
} kvlist;

struct proc {
    int dev;
    unsigned int pid;
    unsigned long long mem;
    char kind;
    unsigned int gi;
    unsigned int ci;
};

struct putil {
    int dev;
    nvmlProcessUtilizationSample_t s;
};

struct sample {
    int dev;
    unsigned int type;
    unsigned long long ts;
    unsigned int value;
};

struct field {
    int dev;
    unsigned int id;
    long long scope;
    unsigned int type;
    const char *value;
};

struct gpm_value {
    int dev;
    long long gi;
    unsigned int metric;
    double value;
};

struct retired {
    int dev;
    unsigned int cause;
    unsigned long long addr;
    unsigned long long ts;
};

struct event {
    int dev;
    unsigned long long seq;
    unsigned long long type;
    unsigned long long data;
    unsigned int gi;
    unsigned int ci;
};

/* A fault or delay: applies to symbol `sym` (or every symbol when -1) on device `dev` (or all). */
struct rule {
    int sym;
    long long dev;
    long long value;
};

struct pname {
    unsigned int pid;
    const char *name;
};

/* Per symbol, the rules that can apply to it (its own and the "*" ones), in file order. */
struct rule_index {
    uint32_t start[SYM_COUNT + 1]; /* symbol s's rules are list[start[s]] .. list[start[s + 1] - 1] */
    uint32_t *list;
};

struct cost {
    uint64_t cpu_ns;
    uint64_t wall_ns; /* never below cpu_ns */
};

/* Arrays indexed by symbol slot and by id, so that charging a call costs a load or two. */
struct costs {
    struct cost sym[SYM_COUNT];
    uint64_t field_cpu_ns[COSTED_IDS];
    uint64_t gpm_cpu_ns[COSTED_IDS];
};

struct config {
    char *buf;
    kvlist global;
    int ndev;
    kvlist dev[MAX_DEV];
    int nmig[MAX_DEV];
    kvlist mig[MAX_DEV][MAX_MIG];
    VEC(struct proc) procs;
    VEC(struct putil) putils;
    VEC(struct sample) samples;
    VEC(struct field) fields;
    VEC(struct gpm_value) gpm;
    VEC(struct retired) retired;
    VEC(struct event) events;
    VEC(struct rule) faults;
    VEC(struct rule) delays;
    VEC(struct pname) pnames;
    /* Built by build_indexes() once the whole file is parsed. */
    struct index procs_ix;   /* by (dev, kind) */
    struct index putils_ix;  /* by dev */
    struct index samples_ix; /* by (dev, type) */
    struct index fields_ix;  /* by (dev, id) */
    struct index gpm_ix;     /* by (dev, metric) */
    struct index retired_ix; /* by (dev, cause) */
    struct index pnames_ix;  /* by pid */
    uint32_t *event_order;   /* events by seq, file order among equal seqs */
    struct rule_index faults_ix;
    struct rule_index delays_ix;
    struct costs *costs; /* NULL without cost lines: the common case stays a pointer test */
};

static void free_config(struct config *c) {
    if (!c)
        return;
    free(c->global.v);
    free_index(&c->global.ix);
    for (int d = 0; d < MAX_DEV; d++) {
        free(c->dev[d].v);
        free_index(&c->dev[d].ix);
        for (int m = 0; m < MAX_MIG; m++) {
            free(c->mig[d][m].v);
            free_index(&c->mig[d][m].ix);
        }
    }
    free_index(&c->procs_ix);
    free_index(&c->putils_ix);
    free_index(&c->samples_ix);
    free_index(&c->fields_ix);
    free_index(&c->gpm_ix);
    free_index(&c->retired_ix);
    free_index(&c->pnames_ix);
    free(c->event_order);
    free(c->faults_ix.list);
    free(c->delays_ix.list);
    free(c->procs.v);
    free(c->putils.v);
    free(c->samples.v);
    free(c->fields.v);
    free(c->gpm.v);
    free(c->retired.v);
    free(c->events.v);
    free(c->faults.v);
    free(c->delays.v);
    free(c->pnames.v);
    free(c->costs);
    free(c->buf);
    free(c);
}

static char *next_tok(char **p) {
    char *s = *p;
    while (*s == ' ')
        s++;
    if (!*s)
        return NULL;
    char *e = s;
    while (*e && *e != ' ')
        e++;
    if (*e)
        *e++ = '\0';
    *p = e;
    return s;
}

static char *rest_of_line(char **p) {
    char *s = *p;
    while (*s == ' ')
        s++;
    return s;
}

static unsigned long long num(const char *s) { return s ? strtoull(s, NULL, 0) : 0; }

/* "*" stands for "any" in scope, device and GPU-instance columns. */
static long long num_or_any(const char *s) {
    return (!s || strcmp(s, "*") == 0) ? ANY : (long long)strtoll(s, NULL, 0);
}

static int sym_index(const char *name) {
    if (!name || strcmp(name, "*") == 0)
        return -1;
    for (int i = 0; i < SYM_COUNT; i++)
        if (strcmp(sym_names[i], name) == 0)
            return i;
    return -2;
}

static int dev_ok(long long d) { return d >= 0 && d < MAX_DEV; }

static void add_kv(kvlist *l, char *key, char *val) {
    struct kv *kv = PUSH(*l);
    kv->key = key;
    kv->val = val;
}

static void add_rule(void *vec, char **p) {
    VEC(struct rule) *rules = vec;
    int s = sym_index(next_tok(p));
    long long dev = num_or_any(next_tok(p));
    long long value = (long long)num(next_tok(p));
    if (s == -2)
        return;
    struct rule *r = PUSH(*rules);
    r->sym = s;
    r->dev = dev;
    r->value = value;
}

static uint64_t us_to_ns(const char *s) {
    double us = s ? strtod(s, NULL) : 0.0;
    return us > 0.0 ? (uint64_t)(us * 1000.0 + 0.5) : 0;
}

static struct costs *costs_of(struct config *c) {
    if (!c->costs && !(c->costs = calloc(1, sizeof(*c->costs))))
        abort();
    return c->costs;
}

static void add_cost(struct config *c, char *kind, char **p) {
    if (strcmp(kind, "cost") == 0) {
        int s = sym_index(next_tok(p));
        uint64_t cpu = us_to_ns(next_tok(p));
        uint64_t wall = us_to_ns(next_tok(p));
        if (s >= 0) {
            costs_of(c)->sym[s].cpu_ns = cpu;
            costs_of(c)->sym[s].wall_ns = wall > cpu ? wall : cpu;
        }
        return;
    }
    unsigned long long id = num(next_tok(p));
    uint64_t cpu = us_to_ns(next_tok(p));
    if (id >= COSTED_IDS)
        return;
    if (strcmp(kind, "fieldcost") == 0)
        costs_of(c)->field_cpu_ns[id] = cpu;
    else
        costs_of(c)->gpm_cpu_ns[id] = cpu;
}

static void parse_line(struct config *c, char *line) {
    char *p = line;
    char *kind = next_tok(&p);
    if (!kind)
        return;
    if (strcmp(kind, "g") == 0) {
        char *key = next_tok(&p);
        if (key)
            add_kv(&c->global, key, rest_of_line(&p));
    } else if (strcmp(kind, "d") == 0) {
        long long d = num_or_any(next_tok(&p));
        char *key = next_tok(&p);
        if (dev_ok(d) && key)
            add_kv(&c->dev[d], key, rest_of_line(&p));
    } else if (strcmp(kind, "m") == 0) {
        long long d = num_or_any(next_tok(&p));
        long long m = num_or_any(next_tok(&p));
        char *key = next_tok(&p);
        if (dev_ok(d) && m >= 0 && m < MAX_MIG && key) {
            add_kv(&c->mig[d][m], key, rest_of_line(&p));
            if (m + 1 > c->nmig[d])
                c->nmig[d] = (int)m + 1;
        }
    } else if (strcmp(kind, "proc") == 0) {
        struct proc *r = PUSH(c->procs);
        r->dev = (int)num(next_tok(&p));
        r->pid = (unsigned int)num(next_tok(&p));
        r->mem = num(next_tok(&p));
        char *k = next_tok(&p);
        r->kind = k ? k[0] : 'c';
        r->gi = (unsigned int)num(next_tok(&p));
        r->ci = (unsigned int)num(next_tok(&p));
    } else if (strcmp(kind, "putil") == 0) {
        struct putil *r = PUSH(c->putils);
        r->dev = (int)num(next_tok(&p));
        r->s.pid = (unsigned int)num(next_tok(&p));
        r->s.timeStamp = num(next_tok(&p));
        r->s.smUtil = (unsigned int)num(next_tok(&p));
        r->s.memUtil = (unsigned int)num(next_tok(&p));
        r->s.encUtil = (unsigned int)num(next_tok(&p));
        r->s.decUtil = (unsigned int)num(next_tok(&p));
    } else if (strcmp(kind, "sample") == 0) {
        struct sample *r = PUSH(c->samples);
        r->dev = (int)num(next_tok(&p));
        r->type = (unsigned int)num(next_tok(&p));
        r->ts = num(next_tok(&p));
        r->value = (unsigned int)num(next_tok(&p));
    } else if (strcmp(kind, "field") == 0) {
        struct field *r = PUSH(c->fields);
        r->dev = (int)num(next_tok(&p));
        r->id = (unsigned int)num(next_tok(&p));
        r->scope = num_or_any(next_tok(&p));
        r->type = (unsigned int)num(next_tok(&p));
        r->value = next_tok(&p);
    } else if (strcmp(kind, "gpm") == 0) {
        struct gpm_value *r = PUSH(c->gpm);
        r->dev = (int)num(next_tok(&p));
        r->gi = num_or_any(next_tok(&p));
        r->metric = (unsigned int)num(next_tok(&p));
        char *v = next_tok(&p);
        r->value = v ? strtod(v, NULL) : 0.0;
    } else if (strcmp(kind, "retired") == 0) {
        struct retired *r = PUSH(c->retired);
        r->dev = (int)num(next_tok(&p));
        r->cause = (unsigned int)num(next_tok(&p));
        r->addr = num(next_tok(&p));
        r->ts = num(next_tok(&p));
    } else if (strcmp(kind, "event") == 0) {
        struct event *r = PUSH(c->events);
        r->seq = num(next_tok(&p));
        r->dev = (int)num(next_tok(&p));
        r->type = num(next_tok(&p));
        r->data = num(next_tok(&p));
        r->gi = (unsigned int)num(next_tok(&p));
        r->ci = (unsigned int)num(next_tok(&p));
    } else if (strcmp(kind, "fault") == 0) {
        add_rule(&c->faults, &p);
    } else if (strcmp(kind, "delay") == 0) {
        add_rule(&c->delays, &p);
    } else if (strcmp(kind, "cost") == 0 || strcmp(kind, "fieldcost") == 0 ||
               strcmp(kind, "gpmcost") == 0) {
        add_cost(c, kind, &p);
    } else if (strcmp(kind, "pname") == 0) {
        struct pname *r = PUSH(c->pnames);
        r->pid = (unsigned int)num(next_tok(&p));
        r->name = rest_of_line(&p);
    }
}

/* The first entry with the key, as a scan of the list in file order would find. */
static const char *kv_get(const kvlist *l, const char *key) {
    FOR_EACH_WITH_KEY(i, &l->ix, str_key(key))
        if (strcmp(l->v[i].key, key) == 0)
            return l->v[i].val;
    return NULL;
}

static void index_kv(kvlist *l) {
    uint64_t *keys = malloc((l->n ? l->n : 1) * sizeof(*keys));
    if (!keys)
        abort();
    for (size_t i = 0; i < l->n; i++)
        keys[i] = str_key(l->v[i].key);
    index_build(&l->ix, keys, l->n);
    free(keys);
}

/* Entries for a device no handle can name are left out: no lookup could match them. */
static uint64_t dev_key(int dev, unsigned int sub) {
    return dev_ok(dev) ? pair_key((unsigned int)dev, sub) : NO_KEY;
}

#define INDEX_VEC(ix, vec, key_expr)                                          \
    do {                                                                      \
        uint64_t *keys_ = malloc(((vec).n ? (vec).n : 1) * sizeof(*keys_));   \
        if (!keys_)                                                           \
            abort();                                                          \
        for (size_t i_ = 0; i_ < (vec).n; i_++) {                             \
            const __typeof__(*(vec).v) *e = &(vec).v[i_];                     \
            keys_[i_] = (key_expr);                                           \
        }                                                                     \
        index_build((ix), keys_, (vec).n);                                    \
        free(keys_);                                                          \
    } while (0)

static void index_rules(struct rule_index *ri, const struct rule *rules, size_t n) {
    size_t total = 0;
    for (int s = 0; s < SYM_COUNT; s++)
        for (size_t i = 0; i < n; i++)
            total += rules[i].sym == -1 || rules[i].sym == s;
    ri->list = total ? malloc(total * sizeof(*ri->list)) : NULL;
    if (total && !ri->list)
        abort();
    uint32_t k = 0;
    for (int s = 0; s < SYM_COUNT; s++) {
        ri->start[s] = k;
        for (size_t i = 0; i < n; i++)
            if (rules[i].sym == -1 || rules[i].sym == s)
                ri->list[k++] = (uint32_t)i;
    }
    ri->start[SYM_COUNT] = k;
}

struct seq_pos {
    unsigned long long seq;
    uint32_t pos;
};

static int by_seq_then_pos(const void *a, const void *b) {
    const struct seq_pos *x = a, *y = b;
    if (x->seq != y->seq)
        return x->seq < y->seq ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static void build_indexes(struct config *c) {
    index_kv(&c->global);
    for (int d = 0; d < MAX_DEV; d++) {
        index_kv(&c->dev[d]);
        for (int m = 0; m < MAX_MIG; m++)
            index_kv(&c->mig[d][m]);
    }
    INDEX_VEC(&c->procs_ix, c->procs, dev_key(e->dev, (unsigned char)e->kind));
    INDEX_VEC(&c->putils_ix, c->putils, dev_key(e->dev, 0));
    INDEX_VEC(&c->samples_ix, c->samples, dev_key(e->dev, e->type));
    INDEX_VEC(&c->fields_ix, c->fields, dev_key(e->dev, e->id));
    INDEX_VEC(&c->gpm_ix, c->gpm, dev_key(e->dev, e->metric));
    INDEX_VEC(&c->retired_ix, c->retired, dev_key(e->dev, e->cause));
    INDEX_VEC(&c->pnames_ix, c->pnames, (uint64_t)e->pid);
    if (c->events.n) {
        struct seq_pos *order = malloc(c->events.n * sizeof(*order));
        c->event_order = malloc(c->events.n * sizeof(*c->event_order));
        if (!order || !c->event_order)
            abort();
        for (size_t i = 0; i < c->events.n; i++) {
            order[i].seq = c->events.v[i].seq;
            order[i].pos = (uint32_t)i;
        }
        qsort(order, c->events.n, sizeof(*order), by_seq_then_pos);
        for (size_t i = 0; i < c->events.n; i++)
            c->event_order[i] = order[i].pos;
        free(order);
    }
    index_rules(&c->faults_ix, c->faults.v, c->faults.n);
    index_rules(&c->delays_ix, c->delays.v, c->delays.n);
}

static struct config *parse_config(int fd, off_t size) {
    struct config *c = calloc(1, sizeof(*c));
    if (!c)
        abort();
    c->buf = malloc((size_t)size + 1);
    if (!c->buf)
        abort();
    size_t got = 0;
    while (got < (size_t)size) {
        ssize_t r = read(fd, c->buf + got, (size_t)size - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    c->buf[got] = '\0';
    char *save = NULL;
    for (char *line = strtok_r(c->buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        parse_line(c, line);
    build_indexes(c);
    long long n = (long long)num(kv_get(&c->global, "device_count"));
    c->ndev = n > MAX_DEV ? MAX_DEV : (int)n;
    return c;
}

/* ---- global state ---- */

struct entity {
    int dev;
    int mig; /* -1 for a physical device */
};

static struct entity dev_handles[MAX_DEV];
static struct entity mig_handles[MAX_DEV][MAX_MIG];

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const char *config_path;
static uint64_t local_counters[COUNTER_SLOTS];
static uint64_t *counters = local_counters;

static pthread_mutex_t reload_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t cfg_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct config *cfg;
static struct stat cfg_stat;

static pthread_mutex_t init_mu = PTHREAD_MUTEX_INITIALIZER;
static int init_count;

static void setup(void) {
    for (int d = 0; d < MAX_DEV; d++) {
        dev_handles[d].dev = d;
        dev_handles[d].mig = -1;
        for (int m = 0; m < MAX_MIG; m++) {
            mig_handles[d][m].dev = d;
            mig_handles[d][m].mig = m;
        }
    }
    config_path = getenv("NVML_STUB_CONFIG");
    const char *cpath = getenv("NVML_STUB_COUNTERS");
    if (cpath) {
        int fd = open(cpath, O_RDWR | O_CLOEXEC);
        if (fd >= 0) {
            struct stat st;
            if (fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof(local_counters)) {
                void *m = mmap(NULL, sizeof(local_counters), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (m != MAP_FAILED)
                    counters = m;
            }
            close(fd);
        }
    }
    cfg = calloc(1, sizeof(*cfg));
    if (!cfg)
        abort();
}

static int same_file_version(const struct stat *a, const struct stat *b) {
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* The Python side replaces the file atomically, so a new inode or mtime means new content. */
static void maybe_reload(void) {
    if (!config_path)
        return;
    struct stat st;
    if (stat(config_path, &st) != 0)
        return;
    pthread_mutex_lock(&reload_mu);
    if (same_file_version(&st, &cfg_stat)) {
        pthread_mutex_unlock(&reload_mu);
        return;
    }
    int fd = open(config_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0)
            close(fd);
        pthread_mutex_unlock(&reload_mu);
        return;
    }
    struct config *fresh = parse_config(fd, st.st_size);
    close(fd);
    pthread_rwlock_wrlock(&cfg_lock);
    struct config *old = cfg;
    cfg = fresh;
    pthread_rwlock_unlock(&cfg_lock);
    cfg_stat = st;
    pthread_mutex_unlock(&reload_mu);
    free_config(old);
}

static void count(int slot, int delta) {
    __atomic_fetch_add(&counters[slot], (uint64_t)(int64_t)delta, __ATOMIC_RELAXED);
}

static unsigned long long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

static void sleep_ms(long long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/*
 * Spins rather than sleeps for the CPU part: a driver's ioctl keeps the calling thread on the
 * CPU, and that thread CPU time is what the benchmark compares. Only the rest of the wall time
 * (a driver waiting on the GPU) is slept, to an absolute deadline so that time spent preempted
 * during the spin is not slept again. Callers hold no lock, so other threads keep answering.
 */
static void spend(struct cost k) {
    if (k.cpu_ns == 0 && k.wall_ns == 0)
        return;
    unsigned long long deadline = now_ns(CLOCK_MONOTONIC) + k.wall_ns;
    unsigned long long busy_until = now_ns(CLOCK_THREAD_CPUTIME_ID) + k.cpu_ns;
    while (now_ns(CLOCK_THREAD_CPUTIME_ID) < busy_until) {
    }
    if (k.wall_ns > k.cpu_ns) {
        struct timespec at = {.tv_sec = (time_t)(deadline / 1000000000ULL),
                              .tv_nsec = (long)(deadline % 1000000000ULL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR) {
        }
    }
}

static struct cost sym_cost(const struct config *c, enum sym s) {
    struct cost none = {0, 0};
    return c->costs ? c->costs->sym[s] : none;
}

/* The first rule, in file order, for symbol s (or "*") and device dev (or "*"). */
static const struct rule *match_rule(const struct rule *rules, const struct rule_index *ri, int s, int dev) {
    for (uint32_t k = ri->start[s]; k < ri->start[s + 1]; k++) {
        const struct rule *r = &rules[ri->list[k]];
        if (r->dev == ANY || r->dev == dev)
            return r;
    }
    return NULL;
}

static nvmlReturn_t fault_for(const struct config *c, int s, int dev) {
    const struct rule *r = match_rule(c->faults.v, &c->faults_ix, s, dev);
    return r ? (nvmlReturn_t)r->value : NVML_SUCCESS;
}

/* ---- per-call bracket ---- */

struct call {
    const struct config *cfg;
    int dev;
    const kvlist *kv; /* the device's or MIG device's scalar values */
    const struct entity *ent;
};

/*
 * Counts the call, charges its modelled cost and applies any configured delay
 * without holding a lock (so a costly or blocked call stalls only its own
 * thread), then takes the config read lock and applies init state and faults.
 * On success the lock is held until end(). A call that then fails has been
 * charged all the same: the stand-in cannot tell how far a real driver would
 * have got, and charging keeps an injected fault from making a run look cheap.
 */
static nvmlReturn_t begin(struct call *c, enum sym s, int dev) {
    pthread_once(&once, setup);
    count(s, 1);
    maybe_reload();
    pthread_rwlock_rdlock(&cfg_lock);
    const struct rule *d = match_rule(cfg->delays.v, &cfg->delays_ix, s, dev);
    long long ms = d ? d->value : 0;
    struct cost owed = {0, 0};
    if (s != SYM_nvmlDeviceGetSamples) /* it charges only its reads; see there */
        owed = sym_cost(cfg, s);
    pthread_rwlock_unlock(&cfg_lock);
    spend(owed);
    if (ms > 0) {
        sleep_ms(ms);
        maybe_reload();
    }
    pthread_rwlock_rdlock(&cfg_lock);
    c->cfg = cfg;
    c->dev = dev;
    c->kv = NULL;
    c->ent = NULL;
    nvmlReturn_t rc = NVML_SUCCESS;
    if (s != SYM_nvmlInitWithFlags && s != SYM_nvmlInit_v2) {
        pthread_mutex_lock(&init_mu);
        if (init_count == 0)
            rc = NVML_ERROR_UNINITIALIZED;
        pthread_mutex_unlock(&init_mu);
    }
    if (rc == NVML_SUCCESS)
        rc = fault_for(cfg, s, dev);
    if (rc != NVML_SUCCESS)
        pthread_rwlock_unlock(&cfg_lock);
    return rc;
}

static nvmlReturn_t end(nvmlReturn_t rc) {
    pthread_rwlock_unlock(&cfg_lock);
    return rc;
}

static const struct entity *entity_of(const void *h) {
    const struct entity *e = h;
    const struct entity *dev_end = dev_handles + MAX_DEV;
    const struct entity *mig_begin = &mig_handles[0][0];
    const struct entity *mig_end = mig_begin + MAX_DEV * MAX_MIG;
    if ((e >= dev_handles && e < dev_end) || (e >= mig_begin && e < mig_end))
        return e;
    return NULL;
}

static nvmlReturn_t begin_handle(struct call *c, enum sym s, nvmlDevice_t h) {
    pthread_once(&once, setup);
    const struct entity *e = entity_of(h);
    nvmlReturn_t rc = begin(c, s, e ? e->dev : -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!e || e->dev >= c->cfg->ndev)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (e->mig >= 0) {
        if (e->mig >= c->cfg->nmig[e->dev] || c->cfg->mig[e->dev][e->mig].n == 0)
            return end(NVML_ERROR_INVALID_ARGUMENT);
        c->kv = &c->cfg->mig[e->dev][e->mig];
    } else {
        c->kv = &c->cfg->dev[e->dev];
    }
    c->ent = e;
    return NVML_SUCCESS;
}

/* ---- value helpers: a key absent from the config means "not supported" ---- */

static const char *val(const struct call *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const char *val(const struct call *c, const char *fmt, ...) {
    char key[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof(key), fmt, ap);
    va_end(ap);
    return kv_get(c->kv, key);
}

static unsigned long long parse_num(const char *v) {
    return v[0] == '-' ? (unsigned long long)strtoll(v, NULL, 0) : strtoull(v, NULL, 0);
}

/* A function, not an inline test, so GET_NUM on a local's address does not trip -Waddress. */
static int is_null(const void *p) { return p == NULL; }

/* Reads the config value named by the printf-style key into *out, or returns its error. */
#define GET_NUM(c, out, ...)                                    \
    do {                                                        \
        const char *v_ = val((c), __VA_ARGS__);                 \
        if (is_null(out))                                       \
            return end(NVML_ERROR_INVALID_ARGUMENT);            \
        if (!v_)                                                \
            return end(NVML_ERROR_NOT_SUPPORTED);               \
        *(out) = (__typeof__(*(out)))parse_num(v_);             \
    } while (0)

static nvmlReturn_t copy_str(const char *s, char *buf, unsigned int len) {
    if (!s)
        return NVML_ERROR_NOT_SUPPORTED;
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, strlen(s) + 1);
    return NVML_SUCCESS;
}

#define HANDLE_FN(name, ...)                                          \
    EXPORT nvmlReturn_t name(nvmlDevice_t device, __VA_ARGS__) {      \
        struct call c;                                                \
        nvmlReturn_t rc = begin_handle(&c, SYM_##name, device);       \
        if (rc != NVML_SUCCESS)                                       \
            return rc;

#define STR_GETTER(name, key)                                                   \
    HANDLE_FN(name, char *buf, unsigned int len)                                \
    return end(copy_str(val(&c, key), buf, len));                               \
    }

#define UINT_GETTER(name, key)                 \
    HANDLE_FN(name, unsigned int *out)         \
    GET_NUM(&c, out, key);                     \
    return end(NVML_SUCCESS);                  \
    }

/* ---- init and system ---- */

static nvmlReturn_t do_init(enum sym s) {
    struct call c;
    nvmlReturn_t rc = begin(&c, s, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    pthread_mutex_lock(&init_mu);
    init_count++;
    pthread_mutex_unlock(&init_mu);
    return end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return do_init(SYM_nvmlInitWithFlags);
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return do_init(SYM_nvmlInit_v2); }

EXPORT nvmlReturn_t nvmlShutdown(void) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlShutdown, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    pthread_mutex_lock(&init_mu);
    init_count--;
    pthread_mutex_unlock(&init_mu);
    return end(NVML_SUCCESS);
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    pthread_once(&once, setup);
    count(SYM_nvmlErrorString, 1);
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 25: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t global_str(enum sym s, const char *key, char *buf, unsigned int len) {
    struct call c;
    nvmlReturn_t rc = begin(&c, s, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    return end(copy_str(kv_get(&c.cfg->global, key), buf, len));
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned int len) {
    return global_str(SYM_nvmlSystemGetDriverVersion, "driver_version", buf, len);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *buf, unsigned int len) {
    return global_str(SYM_nvmlSystemGetNVMLVersion, "nvml_version", buf, len);
}

static nvmlReturn_t cuda_version(enum sym s, int *out) {
    struct call c;
    nvmlReturn_t rc = begin(&c, s, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    const char *v = kv_get(&c.cfg->global, "cuda_driver_version");
    if (!out)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (!v)
        return end(NVML_ERROR_NOT_SUPPORTED);
    *out = (int)strtol(v, NULL, 0);
    return end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *out) {
    return cuda_version(SYM_nvmlSystemGetCudaDriverVersion, out);
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *out) {
    return cuda_version(SYM_nvmlSystemGetCudaDriverVersion_v2, out);
}

EXPORT nvmlReturn_t nvmlSystemGetProcessName(unsigned int pid, char *buf, unsigned int len) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlSystemGetProcessName, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    size_t i = index_first(&c.cfg->pnames_ix, pid);
    if (i != NO_ENTRY)
        return end(copy_str(c.cfg->pnames.v[i].name, buf, len));
    return end(NVML_ERROR_NOT_FOUND);
}

/* ---- device enumeration and identity ---- */

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlDeviceGetCount_v2, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!count)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    *count = (unsigned int)c.cfg->ndev;
    return end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlDeviceGetHandleByIndex_v2, index < MAX_DEV ? (int)index : -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!device || index >= (unsigned int)c.cfg->ndev)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    *device = &dev_handles[index];
    return end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlDeviceGetHandleByUUID, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!uuid || !device)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    for (int d = 0; d < c.cfg->ndev; d++) {
        struct entity *found = NULL;
        const char *u = kv_get(&c.cfg->dev[d], "uuid");
        if (u && strcmp(u, uuid) == 0)
            found = &dev_handles[d];
        for (int m = 0; !found && m < c.cfg->nmig[d]; m++) {
            u = kv_get(&c.cfg->mig[d][m], "uuid");
            if (u && strcmp(u, uuid) == 0)
                found = &mig_handles[d][m];
        }
        if (found) {
            rc = fault_for(c.cfg, SYM_nvmlDeviceGetHandleByUUID, d);
            if (rc == NVML_SUCCESS)
                *device = found;
            return end(rc);
        }
    }
    return end(NVML_ERROR_NOT_FOUND);
}

STR_GETTER(nvmlDeviceGetUUID, "uuid")
STR_GETTER(nvmlDeviceGetName, "name")
STR_GETTER(nvmlDeviceGetSerial, "serial")
STR_GETTER(nvmlDeviceGetVbiosVersion, "vbios_version")
UINT_GETTER(nvmlDeviceGetBrand, "brand")
UINT_GETTER(nvmlDeviceGetArchitecture, "architecture")
UINT_GETTER(nvmlDeviceGetMinorNumber, "minor_number")
UINT_GETTER(nvmlDeviceGetPersistenceMode, "persistence_mode")
UINT_GETTER(nvmlDeviceGetComputeMode, "compute_mode")

HANDLE_FN(nvmlDeviceGetPciInfo_v3, nvmlPciInfo_t *pci)
    if (!pci)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    memset(pci, 0, sizeof(*pci));
    GET_NUM(&c, &pci->domain, "pci_domain");
    GET_NUM(&c, &pci->bus, "pci_bus");
    GET_NUM(&c, &pci->device, "pci_device");
    GET_NUM(&c, &pci->pciDeviceId, "pci_device_id");
    GET_NUM(&c, &pci->pciSubSystemId, "pci_subsystem_id");
    rc = copy_str(val(&c, "pci_bus_id"), pci->busId, sizeof(pci->busId));
    if (rc == NVML_SUCCESS)
        rc = copy_str(val(&c, "pci_bus_id_legacy"), pci->busIdLegacy, sizeof(pci->busIdLegacy));
    return end(rc);
}

HANDLE_FN(nvmlDeviceGetCudaComputeCapability, int *major, int *minor)
    GET_NUM(&c, major, "cuda_cc_major");
    GET_NUM(&c, minor, "cuda_cc_minor");
    return end(NVML_SUCCESS);
}

/* ---- utilization, memory, thermals, power, clocks ---- */

HANDLE_FN(nvmlDeviceGetUtilizationRates, nvmlUtilization_t *util)
    if (!util)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, &util->gpu, "utilization_gpu");
    GET_NUM(&c, &util->memory, "utilization_memory");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetMemoryInfo, nvmlMemory_t *mem)
    if (!mem)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, &mem->total, "memory_total");
    GET_NUM(&c, &mem->free, "memory_free");
    /* The v1 struct has no reserved field: its "used" is everything not free. */
    mem->used = mem->total - mem->free;
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetMemoryInfo_v2, nvmlMemory_v2_t *mem)
    if (!mem)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (mem->version != MEMORY_V2_VERSION)
        return end(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    GET_NUM(&c, &mem->total, "memory_total");
    GET_NUM(&c, &mem->reserved, "memory_reserved");
    GET_NUM(&c, &mem->free, "memory_free");
    GET_NUM(&c, &mem->used, "memory_used");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetBAR1MemoryInfo, nvmlBAR1Memory_t *bar1)
    if (!bar1)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, &bar1->bar1Total, "bar1_total");
    GET_NUM(&c, &bar1->bar1Free, "bar1_free");
    GET_NUM(&c, &bar1->bar1Used, "bar1_used");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetTemperature, unsigned int sensor, unsigned int *temp)
    GET_NUM(&c, temp, "temperature.%u", sensor);
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetTemperatureV, nvmlTemperature_v1_t *temp)
    if (!temp)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (temp->version != TEMPERATURE_V1_VERSION)
        return end(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    GET_NUM(&c, &temp->temperature, "temperature.%u", temp->sensorType);
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetTemperatureThreshold, unsigned int threshold, unsigned int *temp)
    GET_NUM(&c, temp, "temperature_threshold.%u", threshold);
    return end(NVML_SUCCESS);
}

UINT_GETTER(nvmlDeviceGetPowerUsage, "power_usage")
UINT_GETTER(nvmlDeviceGetEnforcedPowerLimit, "power_limit_enforced")
UINT_GETTER(nvmlDeviceGetPowerManagementLimit, "power_limit")
UINT_GETTER(nvmlDeviceGetPowerManagementDefaultLimit, "power_limit_default")

HANDLE_FN(nvmlDeviceGetPowerManagementLimitConstraints, unsigned int *min, unsigned int *max)
    GET_NUM(&c, min, "power_limit_min");
    GET_NUM(&c, max, "power_limit_max");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetTotalEnergyConsumption, unsigned long long *energy)
    GET_NUM(&c, energy, "energy");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetClockInfo, unsigned int type, unsigned int *clock)
    GET_NUM(&c, clock, "clock.%u.0", type);
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetMaxClockInfo, unsigned int type, unsigned int *clock)
    GET_NUM(&c, clock, "max_clock.%u", type);
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetClock, unsigned int type, unsigned int id, unsigned int *clock)
    GET_NUM(&c, clock, "clock.%u.%u", type, id);
    return end(NVML_SUCCESS);
}

UINT_GETTER(nvmlDeviceGetNumFans, "num_fans")

HANDLE_FN(nvmlDeviceGetFanSpeed, unsigned int *speed)
    GET_NUM(&c, speed, "fan.0");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetFanSpeed_v2, unsigned int fan, unsigned int *speed)
    unsigned int fans;
    GET_NUM(&c, &fans, "num_fans");
    if (fan >= fans)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, speed, "fan.%u", fan);
    return end(NVML_SUCCESS);
}

UINT_GETTER(nvmlDeviceGetPerformanceState, "performance_state")

HANDLE_FN(nvmlDeviceGetCurrentClocksEventReasons, unsigned long long *reasons)
    GET_NUM(&c, reasons, "clocks_event_reasons");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetEncoderUtilization, unsigned int *util, unsigned int *period)
    GET_NUM(&c, util, "encoder_utilization");
    GET_NUM(&c, period, "encoder_sampling_period");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetDecoderUtilization, unsigned int *util, unsigned int *period)
    GET_NUM(&c, util, "decoder_utilization");
    GET_NUM(&c, period, "decoder_sampling_period");
    return end(NVML_SUCCESS);
}

/* nvml.h declares three unsigned int outputs (latency in microseconds); pynvml passes zeroed
 * c_ulonglong buffers, which read back the same value on a little-endian host. */
HANDLE_FN(nvmlDeviceGetEncoderStats, unsigned int *sessions, unsigned int *fps, unsigned int *latency)
    GET_NUM(&c, sessions, "encoder_session_count");
    GET_NUM(&c, fps, "encoder_average_fps");
    GET_NUM(&c, latency, "encoder_average_latency");
    return end(NVML_SUCCESS);
}

/* ---- ECC and memory health ---- */

HANDLE_FN(nvmlDeviceGetEccMode, unsigned int *current, unsigned int *pending)
    GET_NUM(&c, current, "ecc_mode_current");
    GET_NUM(&c, pending, "ecc_mode_pending");
    return end(NVML_SUCCESS);
}

/* A device without ECC, or with ECC disabled, has no error counters: a real driver answers
 * NOT_SUPPORTED for them (nvidia-smi prints N/A) while nvmlDeviceGetEccMode still succeeds. */
static int ecc_counters_unsupported(const struct call *c) {
    const char *mode = val(c, "ecc_mode_current");
    return !mode || parse_num(mode) == 0;
}

static int is_ecc_counter_field(unsigned int id) {
    return id >= FI_ECC_FIRST_COUNTER && id <= FI_ECC_LAST_COUNTER;
}

HANDLE_FN(nvmlDeviceGetTotalEccErrors, unsigned int error_type, unsigned int counter_type,
          unsigned long long *count)
    if (ecc_counters_unsupported(&c))
        return end(NVML_ERROR_NOT_SUPPORTED);
    GET_NUM(&c, count, "ecc_errors.%u.%u", error_type, counter_type);
    return end(NVML_SUCCESS);
}

/* pynvml's sizing call passes only four arguments, so `timestamps` is read only with `addresses`. */
HANDLE_FN(nvmlDeviceGetRetiredPages_v2, unsigned int cause, unsigned int *count,
          unsigned long long *addresses, unsigned long long *timestamps)
    if (!count)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (!val(&c, "retired_pages_supported"))
        return end(NVML_ERROR_NOT_SUPPORTED);
    unsigned int n = 0;
    FOR_EACH_WITH_KEY(i, &c.cfg->retired_ix, pair_key((unsigned int)c.dev, cause)) {
        const struct retired *r = &c.cfg->retired.v[i];
        if (addresses && n < *count) {
            addresses[n] = r->addr;
            if (timestamps)
                timestamps[n] = r->ts;
        }
        n++;
    }
    rc = (n > *count || (n > 0 && !addresses)) ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    *count = n;
    return end(rc);
}

HANDLE_FN(nvmlDeviceGetRemappedRows, unsigned int *corr, unsigned int *unc, unsigned int *pending,
          unsigned int *failure)
    GET_NUM(&c, corr, "remapped_rows_correctable");
    GET_NUM(&c, unc, "remapped_rows_uncorrectable");
    GET_NUM(&c, pending, "remapped_rows_pending");
    GET_NUM(&c, failure, "remapped_rows_failure");
    return end(NVML_SUCCESS);
}

/* ---- PCIe and NVLink ---- */

UINT_GETTER(nvmlDeviceGetCurrPcieLinkGeneration, "pcie_link_gen_current")
UINT_GETTER(nvmlDeviceGetCurrPcieLinkWidth, "pcie_link_width_current")
UINT_GETTER(nvmlDeviceGetMaxPcieLinkGeneration, "pcie_link_gen_max")
UINT_GETTER(nvmlDeviceGetMaxPcieLinkWidth, "pcie_link_width_max")
UINT_GETTER(nvmlDeviceGetPcieReplayCounter, "pcie_replay_counter")

/* counter NVML_PCIE_UTIL_TX_BYTES (0) serves pcie_throughput.0, RX_BYTES (1) pcie_throughput.1,
 * both in KiB/s; nvml.h knows no other counter. */
HANDLE_FN(nvmlDeviceGetPcieThroughput, unsigned int counter, unsigned int *value)
    if (counter >= PCIE_UTIL_COUNT)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, value, "pcie_throughput.%u", counter);
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetNvLinkState, unsigned int link, unsigned int *active)
    unsigned int links;
    GET_NUM(&c, &links, "nvlink_count");
    if (link >= links)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, active, "nvlink_state.%u", link);
    return end(NVML_SUCCESS);
}

/* ---- MIG ---- */

HANDLE_FN(nvmlDeviceGetMigMode, unsigned int *current, unsigned int *pending)
    GET_NUM(&c, current, "mig_mode_current");
    GET_NUM(&c, pending, "mig_mode_pending");
    return end(NVML_SUCCESS);
}

UINT_GETTER(nvmlDeviceGetMaxMigDeviceCount, "max_mig_device_count")

HANDLE_FN(nvmlDeviceGetMigDeviceHandleByIndex, unsigned int index, nvmlDevice_t *mig)
    unsigned int max;
    if (!mig || c.ent->mig >= 0)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, &max, "max_mig_device_count");
    if (index >= max)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (index >= MAX_MIG || (int)index >= c.cfg->nmig[c.dev] || c.cfg->mig[c.dev][index].n == 0)
        return end(NVML_ERROR_NOT_FOUND);
    *mig = &mig_handles[c.dev][index];
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetGpuInstanceId, unsigned int *id)
    if (c.ent->mig < 0)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, id, "gpu_instance_id");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetComputeInstanceId, unsigned int *id)
    if (c.ent->mig < 0)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(&c, id, "compute_instance_id");
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetDeviceHandleFromMigDeviceHandle, nvmlDevice_t *parent)
    if (!parent || c.ent->mig < 0)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    *parent = &dev_handles[c.dev];
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceIsMigDeviceHandle, unsigned int *is_mig)
    if (!is_mig)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    *is_mig = c.ent->mig >= 0;
    return end(NVML_SUCCESS);
}

/* ---- field values ---- */

static const struct field *find_field(const struct call *c, unsigned int id, unsigned int scope) {
    const struct field *wildcard = NULL;
    FOR_EACH_WITH_KEY(i, &c->cfg->fields_ix, pair_key((unsigned int)c->dev, id)) {
        const struct field *f = &c->cfg->fields.v[i];
        if (f->scope == (long long)scope)
            return f;
        if (f->scope == ANY)
            wildcard = f;
    }
    return wildcard;
}

static void set_value(nvmlValue_t *out, unsigned int type, const char *text) {
    memset(out, 0, sizeof(*out));
    switch (type) {
    case 0: out->dVal = strtod(text, NULL); break;
    case 1: out->uiVal = (unsigned int)strtoul(text, NULL, 0); break;
    case 2: out->ulVal = strtoul(text, NULL, 0); break;
    case 3: out->ullVal = strtoull(text, NULL, 0); break;
    case 4: out->sllVal = strtoll(text, NULL, 0); break;
    case 5: out->siVal = (int)strtol(text, NULL, 0); break;
    default: out->usVal = (unsigned short)strtoul(text, NULL, 0); break;
    }
}

/* Per-entry cost of a request, charged after end() so that no lock is held while spinning. */
static uint64_t entry_cpu_ns(const uint64_t *table, unsigned int id) {
    return table && id < COSTED_IDS ? table[id] : 0;
}

/*
 * Unknown or unconfigured fields fail in their own entry; the call itself still succeeds.
 * With ECC off the ECC counter fields fail that way too, whatever the config lists. Every
 * entry asked is charged its field's cost, served or not: a driver asks the GPU to find out.
 */
/* An empty request is INVALID_ARGUMENT, as an H200 with driver 580 answers. */
HANDLE_FN(nvmlDeviceGetFieldValues, int count, nvmlFieldValue_t *values)
    if (count <= 0 || !values)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    int64_t now_us = (int64_t)(now_ns(CLOCK_REALTIME) / 1000);
    int no_ecc_counters = ecc_counters_unsupported(&c);
    const uint64_t *field_costs = c.cfg->costs ? c.cfg->costs->field_cpu_ns : NULL;
    struct cost owed = {0, 0};
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        owed.cpu_ns += entry_cpu_ns(field_costs, v->fieldId);
        const struct field *f = c.ent->mig < 0 ? find_field(&c, v->fieldId, v->scopeId) : NULL;
        if (no_ecc_counters && is_ecc_counter_field(v->fieldId))
            f = NULL;
        v->timestamp = now_us;
        v->latencyUsec = 0;
        if (!f || !f->value) {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            v->valueType = 0;
            memset(&v->value, 0, sizeof(v->value));
            continue;
        }
        v->nvmlReturn = NVML_SUCCESS;
        v->valueType = f->type;
        set_value(&v->value, f->type, f->value);
    }
    end(NVML_SUCCESS);
    owed.wall_ns = owed.cpu_ns;
    spend(owed);
    return NVML_SUCCESS;
}

/* ---- processes and samples ---- */

static nvmlReturn_t running_processes(nvmlDevice_t device, enum sym s, char kind, unsigned int *count,
                                      nvmlProcessInfo_t *infos) {
    struct call c;
    nvmlReturn_t rc = begin_handle(&c, s, device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!count)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    unsigned int gi = 0, ci = 0;
    if (c.ent->mig >= 0) {
        GET_NUM(&c, &gi, "gpu_instance_id");
        GET_NUM(&c, &ci, "compute_instance_id");
    }
    unsigned int n = 0;
    FOR_EACH_WITH_KEY(i, &c.cfg->procs_ix, pair_key((unsigned int)c.dev, (unsigned char)kind)) {
        const struct proc *p = &c.cfg->procs.v[i];
        if (c.ent->mig >= 0 && (p->gi != gi || p->ci != ci))
            continue;
        if (infos && n < *count) {
            infos[n].pid = p->pid;
            infos[n].usedGpuMemory = p->mem;
            infos[n].gpuInstanceId = p->gi;
            infos[n].computeInstanceId = p->ci;
        }
        n++;
    }
    rc = (n > *count || (n > 0 && !infos)) ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    *count = n;
    return end(rc);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                            nvmlProcessInfo_t *infos) {
    return running_processes(device, SYM_nvmlDeviceGetComputeRunningProcesses_v3, 'c', count, infos);
}

EXPORT nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                             nvmlProcessInfo_t *infos) {
    return running_processes(device, SYM_nvmlDeviceGetGraphicsRunningProcesses_v3, 'g', count, infos);
}

/* pynvml expects INSUFFICIENT_SIZE from the sizing call and NOT_FOUND when nothing is newer. */
HANDLE_FN(nvmlDeviceGetProcessUtilization, nvmlProcessUtilizationSample_t *samples, unsigned int *count,
          unsigned long long last_seen)
    if (!count)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (!val(&c, "process_utilization_supported"))
        return end(NVML_ERROR_NOT_SUPPORTED);
    unsigned int n = 0;
    FOR_EACH_WITH_KEY(i, &c.cfg->putils_ix, pair_key((unsigned int)c.dev, 0)) {
        const struct putil *p = &c.cfg->putils.v[i];
        if (p->s.timeStamp <= last_seen)
            continue;
        if (samples && n < *count)
            samples[n] = p->s;
        n++;
    }
    if (n == 0)
        rc = NVML_ERROR_NOT_FOUND;
    else if (!samples || n > *count)
        rc = NVML_ERROR_INSUFFICIENT_SIZE;
    *count = n;
    return end(rc);
}

/*
 * Like real NVML, a NULL buffer asks for the size of the driver's sample buffer for the type:
 * SUCCESS with that capacity (samples_capacity, default 100), whatever last_seen is. That is
 * what NVML's GPUs answer (100 for utilization samples, 120 for power samples, as measured in
 * GoogleCloudPlatform/container-engine-accelerators pkg/gpu/nvidia/metrics/util.go), and what
 * nvml.h implies ("the returned samplesCount will provide the number of samples that can be
 * queried"; the data call may return fewer, see rust-nvml/nvml-wrapper#67). With a buffer:
 * NOT_FOUND when no sample is newer than last_seen (microseconds, like the sample timestamps),
 * else the newer samples. nvml.h documents no INSUFFICIENT_SIZE for a buffer smaller than the
 * newer samples; the stand-in answers it, with the count needed, so that a caller sized from
 * a smaller capacity (a driver whose buffer grew) can be tested. Every sampling type the device
 * lists as samples_supported.TYPE is served from its own "sample" lines; MIG handles have none.
 * Only a read with a buffer is charged the symbol's cost: on an H200 (driver 580, called
 * through ctypes) a read took ~2.5 ms of CPU whether or not any sample was newer, while the
 * NULL-buffer size query took ~3.5 us, so it does not reach the GPU.
 */
#define DEFAULT_SAMPLE_CAPACITY 100

HANDLE_FN(nvmlDeviceGetSamples, unsigned int type, unsigned long long last_seen, unsigned int *value_type,
          unsigned int *count, nvmlSample_t *samples)
    if (!count || !value_type)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (!val(&c, "samples_supported.%u", type))
        return end(NVML_ERROR_NOT_SUPPORTED);
    *value_type = VALUE_TYPE_UNSIGNED_INT;
    if (!samples) {
        const char *capacity = val(&c, "samples_capacity");
        *count = capacity ? (unsigned int)parse_num(capacity) : DEFAULT_SAMPLE_CAPACITY;
        return end(NVML_SUCCESS);
    }
    if (*count == 0)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    unsigned int n = 0;
    FOR_EACH_WITH_KEY(i, &c.cfg->samples_ix, pair_key((unsigned int)c.dev, type)) {
        const struct sample *p = &c.cfg->samples.v[i];
        if (p->ts <= last_seen)
            continue;
        if (n < *count) {
            samples[n].timeStamp = p->ts;
            memset(&samples[n].sampleValue, 0, sizeof(samples[n].sampleValue));
            samples[n].sampleValue.uiVal = p->value;
        }
        n++;
    }
    if (n == 0)
        rc = NVML_ERROR_NOT_FOUND;
    else if (n > *count)
        rc = NVML_ERROR_INSUFFICIENT_SIZE;
    *count = n;
    struct cost owed = sym_cost(c.cfg, SYM_nvmlDeviceGetSamples);
    end(rc);
    spend(owed);
    return rc;
}

/* ---- events ---- */

#define EVENT_SET_MAGIC 0x45564e54u

struct event_set {
    unsigned int magic;
    pthread_mutex_t mu;
    /* Highest event sequence number already handed out from this set. */
    unsigned long long cursor;
    unsigned long long mask[MAX_DEV];
};

EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlEventSetCreate, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!set)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    struct event_set *s = calloc(1, sizeof(*s));
    if (!s)
        abort();
    s->magic = EVENT_SET_MAGIC;
    pthread_mutex_init(&s->mu, NULL);
    *set = s;
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlDeviceGetSupportedEventTypes, unsigned long long *types)
    GET_NUM(&c, types, "supported_event_types");
    return end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                             nvmlEventSet_t set) {
    struct call c;
    nvmlReturn_t rc = begin_handle(&c, SYM_nvmlDeviceRegisterEvents, device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!set || set->magic != EVENT_SET_MAGIC || c.ent->mig >= 0)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    unsigned long long supported;
    GET_NUM(&c, &supported, "supported_event_types");
    if (types & ~supported)
        return end(NVML_ERROR_NOT_SUPPORTED);
    pthread_mutex_lock(&set->mu);
    set->mask[c.dev] |= types;
    pthread_mutex_unlock(&set->mu);
    return end(NVML_SUCCESS);
}

/* Takes the oldest queued event this set has not delivered yet; caller holds set->mu. */
static int next_event(struct event_set *set, nvmlEventData_t *data) {
    int found = 0;
    pthread_rwlock_rdlock(&cfg_lock);
    const struct event *best = NULL;
    /* event_order lists the events by seq (file order among equals): skip those already
     * delivered, then the first one the set registered for is the oldest. */
    size_t lo = 0, hi = cfg->events.n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cfg->events.v[cfg->event_order[mid]].seq <= set->cursor)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t k = lo; !best && k < cfg->events.n; k++) {
        const struct event *e = &cfg->events.v[cfg->event_order[k]];
        if (dev_ok(e->dev) && (set->mask[e->dev] & e->type))
            best = e;
    }
    if (best) {
        data->device = &dev_handles[best->dev];
        data->eventType = best->type;
        data->eventData = best->data;
        data->gpuInstanceId = best->gi;
        data->computeInstanceId = best->ci;
        set->cursor = best->seq;
        found = 1;
    }
    pthread_rwlock_unlock(&cfg_lock);
    return found;
}

/* Polls the config for new events; sleeps without any lock so other threads keep running. */
EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlEventSetWait_v2, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    /* Waiting re-takes the config lock per poll, so it must not be held across the loop. */
    pthread_rwlock_unlock(&cfg_lock);
    if (!set || set->magic != EVENT_SET_MAGIC || !data)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long deadline = now_ns(CLOCK_MONOTONIC) + (unsigned long long)timeout_ms * 1000000ULL;
    for (;;) {
        maybe_reload();
        pthread_mutex_lock(&set->mu);
        int found = next_event(set, data);
        pthread_mutex_unlock(&set->mu);
        if (found)
            return NVML_SUCCESS;
        unsigned long long now = now_ns(CLOCK_MONOTONIC);
        if (now >= deadline)
            return NVML_ERROR_TIMEOUT;
        unsigned long long left_ms = (deadline - now + 999999ULL) / 1000000ULL;
        /* A real driver blocks in the kernel; polling every 25 ms keeps the stand-in's own CPU
         * out of the exporter's figures while events still arrive promptly. */
        sleep_ms(left_ms < 25 ? (long long)left_ms : 25);
    }
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlEventSetFree, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!set || set->magic != EVENT_SET_MAGIC)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    set->magic = 0;
    pthread_mutex_destroy(&set->mu);
    free(set);
    return end(NVML_SUCCESS);
}

/* ---- GPM ---- */

#define GPM_SAMPLE_MAGIC 0x47504d53u

struct gpm_sample {
    unsigned int magic;
    int filled;
    int dev;
    long long gi;
};

HANDLE_FN(nvmlGpmQueryDeviceSupport, nvmlGpmSupport_t *support)
    if (!support)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (support->version != GPM_SUPPORT_VERSION)
        return end(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    GET_NUM(&c, &support->isSupportedDevice, "gpm_supported");
    return end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlGpmSampleAlloc, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!sample)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    struct gpm_sample *s = calloc(1, sizeof(*s));
    if (!s)
        abort();
    s->magic = GPM_SAMPLE_MAGIC;
    *sample = s;
    count(GPM_OUTSTANDING_SLOT, 1);
    return end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample) {
    struct call c;
    nvmlReturn_t rc = begin(&c, SYM_nvmlGpmSampleFree, -1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!sample || sample->magic != GPM_SAMPLE_MAGIC)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    sample->magic = 0;
    free(sample);
    count(GPM_OUTSTANDING_SLOT, -1);
    return end(NVML_SUCCESS);
}

static nvmlReturn_t gpm_fill(struct call *c, nvmlGpmSample_t sample, long long gi) {
    unsigned int supported;
    if (!sample || sample->magic != GPM_SAMPLE_MAGIC || c->ent->mig >= 0)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    GET_NUM(c, &supported, "gpm_supported");
    if (!supported)
        return end(NVML_ERROR_NOT_SUPPORTED);
    if (gi != ANY) {
        int exists = 0;
        for (int m = 0; m < c->cfg->nmig[c->dev]; m++) {
            const char *v = kv_get(&c->cfg->mig[c->dev][m], "gpu_instance_id");
            exists |= v && strtoll(v, NULL, 0) == gi;
        }
        if (!exists)
            return end(NVML_ERROR_NOT_FOUND);
    }
    sample->dev = c->dev;
    sample->gi = gi;
    sample->filled = 1;
    return end(NVML_SUCCESS);
}

HANDLE_FN(nvmlGpmSampleGet, nvmlGpmSample_t sample)
    return gpm_fill(&c, sample, ANY);
}

HANDLE_FN(nvmlGpmMigSampleGet, unsigned int gpu_instance_id, nvmlGpmSample_t sample)
    return gpm_fill(&c, sample, (long long)gpu_instance_id);
}

static int sample_ok(const struct gpm_sample *s) { return s && s->magic == GPM_SAMPLE_MAGIC && s->filled; }

/* Metric values are served as configured; they are not derived from the two samples. */
EXPORT nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *mg) {
    struct call c;
    int dev = (mg && sample_ok(mg->sample1)) ? mg->sample1->dev : -1;
    nvmlReturn_t rc = begin(&c, SYM_nvmlGpmMetricsGet, dev);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!mg)
        return end(NVML_ERROR_INVALID_ARGUMENT);
    if (mg->version != GPM_METRICS_GET_VERSION)
        return end(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (!sample_ok(mg->sample1) || !sample_ok(mg->sample2) || mg->sample1->dev != mg->sample2->dev ||
        mg->sample1->gi != mg->sample2->gi || mg->numMetrics == 0 ||
        mg->numMetrics > GPM_METRIC_MAX) /* none asked: INVALID_ARGUMENT, as on the H200 */
        return end(NVML_ERROR_INVALID_ARGUMENT);
    long long gi = mg->sample1->gi;
    const uint64_t *metric_costs = c.cfg->costs ? c.cfg->costs->gpm_cpu_ns : NULL;
    struct cost owed = {0, 0};
    for (unsigned int i = 0; i < mg->numMetrics; i++) {
        nvmlGpmMetric_t *m = &mg->metrics[i];
        owed.cpu_ns += entry_cpu_ns(metric_costs, m->metricId);
        m->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        m->value = 0.0;
        m->metricInfo.shortName = NULL;
        m->metricInfo.longName = NULL;
        m->metricInfo.unit = NULL;
        FOR_EACH_WITH_KEY(k, &c.cfg->gpm_ix, pair_key((unsigned int)dev, m->metricId)) {
            const struct gpm_value *g = &c.cfg->gpm.v[k];
            if (g->gi == gi) {
                m->nvmlReturn = NVML_SUCCESS;
                m->value = g->value;
                break;
            }
        }
    }
    end(NVML_SUCCESS);
    owed.wall_ns = owed.cpu_ns;
    spend(owed);
    return NVML_SUCCESS;
}
