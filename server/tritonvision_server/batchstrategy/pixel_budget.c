/* A pixel budget for the dynamic batches of one Triton model: a custom batching strategy.
 *
 * Triton's DALI backend decodes a whole dynamic batch (up to 128 images) as one run, so the decoded size of a
 * batch is the sum of its images' pixel counts. The ensemble's validate step reads each image's size from its
 * header and sends it to preprocess as the INT64 input PIXEL_COUNT_INPUT; this library makes Triton's batcher
 * close a batch before the request that would take that sum past the budget, the model config parameter
 * BUDGET_PARAMETER. The first request of a batch is always taken: Triton asks again about a refused request
 * as the first of the next batch, and refusing it there would leave it queued forever (the batcher retries
 * the same request at once, GetDynamicBatch in core r24.10 to r26.06), so a request over the budget on its
 * own runs, alone. A request whose count cannot be read (not INT64, a negative value, data in GPU memory)
 * counts as the whole budget: it runs alone too.
 *
 * Triton finds the library as batchstrategy.so in the model's version folder, then the model folder, then
 * the backend folder; it resolves the TRITONSERVER_ and TRITONBACKEND_ functions below from libtritonserver
 * when it loads it, so the library links against nothing but libc. Built by `build_engines.py batcher`, which
 * passes PIXEL_COUNT_INPUT and BUDGET_PARAMETER from tritonvision.spec. Checked against the headers and the
 * batcher of triton-inference-server/core r24.10 (Triton 2.51, the server bundled in nvidia-pytriton, which
 * the tests run it in) and r26.06.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef PIXEL_COUNT_INPUT
#error "define PIXEL_COUNT_INPUT (the input tensor's name); build with build_engines.py batcher"
#endif
#ifndef BUDGET_PARAMETER
#error "define BUDGET_PARAMETER (the model config parameter); build with build_engines.py batcher"
#endif

#define EXPORT __attribute__((visibility("default")))

/* --- the parts of tritonserver.h and tritonbackend.h used here (same declarations, r24.10 to r26.06) --- */

typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef struct TRITONSERVER_Message TRITONSERVER_Message;
typedef struct TRITONBACKEND_Batcher TRITONBACKEND_Batcher;
typedef struct TRITONBACKEND_Input TRITONBACKEND_Input;
typedef struct TRITONBACKEND_Model TRITONBACKEND_Model;
typedef struct TRITONBACKEND_Request TRITONBACKEND_Request;

typedef enum {
  TRITONSERVER_TYPE_INVALID, TRITONSERVER_TYPE_BOOL, TRITONSERVER_TYPE_UINT8, TRITONSERVER_TYPE_UINT16,
  TRITONSERVER_TYPE_UINT32, TRITONSERVER_TYPE_UINT64, TRITONSERVER_TYPE_INT8, TRITONSERVER_TYPE_INT16,
  TRITONSERVER_TYPE_INT32, TRITONSERVER_TYPE_INT64, TRITONSERVER_TYPE_FP16, TRITONSERVER_TYPE_FP32,
  TRITONSERVER_TYPE_FP64, TRITONSERVER_TYPE_BYTES, TRITONSERVER_TYPE_BF16
} TRITONSERVER_DataType;

typedef enum { TRITONSERVER_MEMORY_CPU, TRITONSERVER_MEMORY_CPU_PINNED, TRITONSERVER_MEMORY_GPU } TRITONSERVER_MemoryType;

typedef enum {
  TRITONSERVER_ERROR_UNKNOWN, TRITONSERVER_ERROR_INTERNAL, TRITONSERVER_ERROR_NOT_FOUND,
  TRITONSERVER_ERROR_INVALID_ARG, TRITONSERVER_ERROR_UNAVAILABLE, TRITONSERVER_ERROR_UNSUPPORTED,
  TRITONSERVER_ERROR_ALREADY_EXISTS, TRITONSERVER_ERROR_CANCELLED
} TRITONSERVER_Error_Code;

typedef enum { TRITONSERVER_LOG_INFO, TRITONSERVER_LOG_WARN, TRITONSERVER_LOG_ERROR, TRITONSERVER_LOG_VERBOSE } TRITONSERVER_LogLevel;

extern TRITONSERVER_Error* TRITONSERVER_ErrorNew(TRITONSERVER_Error_Code code, const char* msg);
extern void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* error);
extern TRITONSERVER_Error* TRITONSERVER_LogMessage(TRITONSERVER_LogLevel level, const char* filename, const int line,
                                                   const char* msg);
extern TRITONSERVER_Error* TRITONSERVER_MessageSerializeToJson(TRITONSERVER_Message* message, const char** base,
                                                               size_t* byte_size);
extern TRITONSERVER_Error* TRITONSERVER_MessageDelete(TRITONSERVER_Message* message);
extern TRITONSERVER_Error* TRITONBACKEND_ModelName(TRITONBACKEND_Model* model, const char** name);
extern TRITONSERVER_Error* TRITONBACKEND_ModelConfig(TRITONBACKEND_Model* model, const uint32_t config_version,
                                                     TRITONSERVER_Message** model_config);
extern TRITONSERVER_Error* TRITONBACKEND_RequestInput(TRITONBACKEND_Request* request, const char* name,
                                                      TRITONBACKEND_Input** input);
extern TRITONSERVER_Error* TRITONBACKEND_InputProperties(TRITONBACKEND_Input* input, const char** name,
                                                         TRITONSERVER_DataType* datatype, const int64_t** shape,
                                                         uint32_t* dims_count, uint64_t* byte_size,
                                                         uint32_t* buffer_count);
extern TRITONSERVER_Error* TRITONBACKEND_InputBuffer(TRITONBACKEND_Input* input, const uint32_t index,
                                                     const void** buffer, uint64_t* buffer_byte_size,
                                                     TRITONSERVER_MemoryType* memory_type, int64_t* memory_type_id);

/* --- state --- */

/* The batch being formed. Triton forms a model's batches one at a time on its batcher thread
 * (DynamicBatchScheduler::BatcherThread; ModelBatchInitialize, IncludeRequest and Finalize are only called
 * there), so one per model, inside the batcher, is enough: nothing is allocated per batch, and nothing leaks
 * where the core drops a batch's state without finalising it. */
struct batch {
  uint64_t budget;
  uint64_t pixels;
  uint32_t requests;
};

struct budget {
  uint64_t max_pixels;
  struct batch batch;
};

/* --- the model config: a few lines of JSON scanning, enough for Triton's own serialisation --- */

static const char* skip_ws(const char* p, const char* end)
{
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  return p;
}

/* p at '"': the end of the string (after the closing quote), or NULL. */
static const char* skip_string(const char* p, const char* end)
{
  for (++p; p < end; ++p) {
    if (*p == '\\') {
      ++p;
    } else if (*p == '"') {
      return p + 1;
    }
  }
  return NULL;
}

/* p at a value: the end of it, or NULL. Objects and arrays are skipped by counting brackets outside strings. */
static const char* skip_value(const char* p, const char* end)
{
  if (p >= end) return NULL;
  if (*p == '"') return skip_string(p, end);
  if (*p == '{' || *p == '[') {
    size_t depth = 0;
    while (p < end) {
      if (*p == '"') {
        p = skip_string(p, end);
        if (p == NULL) return NULL;
        continue;
      }
      if (*p == '{' || *p == '[') ++depth;
      if ((*p == '}' || *p == ']') && --depth == 0) return p + 1;
      ++p;
    }
    return NULL;
  }
  while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' && *p != '\r' && *p != '\t') ++p;
  return p;
}

/* p at '{': the value of member `key` (a key without escapes), or NULL. */
static const char* find_member(const char* p, const char* end, const char* key)
{
  const size_t key_len = strlen(key);
  p = skip_ws(p, end);
  if (p >= end || *p != '{') return NULL;
  p = skip_ws(p + 1, end);
  while (p < end && *p == '"') {
    const char* name = p + 1;
    const char* after = skip_string(p, end);
    if (after == NULL) return NULL;
    const bool match = (size_t)(after - 1 - name) == key_len && memcmp(name, key, key_len) == 0;
    p = skip_ws(after, end);
    if (p >= end || *p != ':') return NULL;
    p = skip_ws(p + 1, end);
    if (match) return p;
    p = skip_value(p, end);
    if (p == NULL) return NULL;
    p = skip_ws(p, end);
    if (p < end && *p == ',') p = skip_ws(p + 1, end);
  }
  return NULL;
}

/* The budget from the config's parameters { BUDGET_PARAMETER: { string_value: "<digits>" } }, or 0. */
static uint64_t budget_from_config(const char* json, size_t size)
{
  const char* end = json + size;
  const char* params = find_member(json, end, "parameters");
  const char* entry = params ? find_member(params, end, BUDGET_PARAMETER) : NULL;
  const char* value = entry ? find_member(entry, end, "string_value") : NULL;
  if (value == NULL || value >= end || *value != '"') return 0;
  uint64_t budget = 0;
  const char* p = value + 1;
  for (; p < end && *p >= '0' && *p <= '9'; ++p) {
    const uint64_t digit = (uint64_t)(*p - '0');
    if (budget > (UINT64_MAX - digit) / 10) return 0;
    budget = budget * 10 + digit;
  }
  return (p < end && *p == '"' && p > value + 1) ? budget : 0;
}

/* --- a request's pixels --- */

/* The sum of the request's PIXEL_COUNT_INPUT values, or `whole` (the budget) where it cannot be read. */
static uint64_t request_pixels(TRITONBACKEND_Request* request, uint64_t whole)
{
  TRITONBACKEND_Input* input = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestInput(request, PIXEL_COUNT_INPUT, &input);
  if (err != NULL) {
    TRITONSERVER_ErrorDelete(err);
    return whole;
  }
  TRITONSERVER_DataType datatype = TRITONSERVER_TYPE_INVALID;
  uint64_t byte_size = 0;
  uint32_t buffer_count = 0;
  err = TRITONBACKEND_InputProperties(input, NULL, &datatype, NULL, NULL, &byte_size, &buffer_count);
  if (err != NULL) {
    TRITONSERVER_ErrorDelete(err);
    return whole;
  }
  if (datatype != TRITONSERVER_TYPE_INT64 || byte_size == 0 || byte_size % 8 != 0) return whole;

  /* The values may be split over several buffers, a value even across two: assemble them byte by byte. */
  uint64_t sum = 0, seen = 0;
  unsigned char word[8];
  size_t filled = 0;
  for (uint32_t i = 0; i < buffer_count; ++i) {
    const void* buffer = NULL;
    uint64_t size = 0;
    TRITONSERVER_MemoryType memory_type = TRITONSERVER_MEMORY_CPU;
    int64_t memory_type_id = 0;
    err = TRITONBACKEND_InputBuffer(input, i, &buffer, &size, &memory_type, &memory_type_id);
    if (err != NULL) {
      TRITONSERVER_ErrorDelete(err);
      return whole;
    }
    /* An ensemble step fed by the python-backend validate step gets host memory; a client's CUDA shared
     * memory region (a direct call) would be GPU memory, which this library cannot read. */
    if (memory_type == TRITONSERVER_MEMORY_GPU || (buffer == NULL && size != 0)) return whole;
    const unsigned char* bytes = buffer;
    for (uint64_t j = 0; j < size; ++j) {
      word[filled++] = bytes[j];
      if (filled == sizeof word) {
        int64_t value;
        memcpy(&value, word, sizeof value); /* Triton's tensors are in the host's byte order */
        if (value < 0) return whole;
        sum = (uint64_t)value > UINT64_MAX - sum ? UINT64_MAX : sum + (uint64_t)value;
        filled = 0;
      }
    }
    seen += size;
  }
  return (seen == byte_size && filled == 0) ? sum : whole;
}

/* --- the five functions Triton looks up (all or none must exist) --- */

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelBatcherInitialize(TRITONBACKEND_Batcher** batcher,
                                                                  TRITONBACKEND_Model* model)
{
  *batcher = NULL;
  const char* name = "?";
  TRITONSERVER_Error* err = TRITONBACKEND_ModelName(model, &name);
  if (err != NULL) {
    TRITONSERVER_ErrorDelete(err);
    name = "?";
  }
  TRITONSERVER_Message* config = NULL;
  err = TRITONBACKEND_ModelConfig(model, 1, &config);
  if (err != NULL) return err;
  const char* json = NULL;
  size_t size = 0;
  err = TRITONSERVER_MessageSerializeToJson(config, &json, &size);
  uint64_t max_pixels = err == NULL ? budget_from_config(json, size) : 0;
  TRITONSERVER_Error* deleted = TRITONSERVER_MessageDelete(config);
  if (deleted != NULL) TRITONSERVER_ErrorDelete(deleted);
  if (err != NULL) return err;

  char message[512];
  if (max_pixels == 0) {
    snprintf(message, sizeof message,
             "model '%s' has the pixel-budget batching strategy (batchstrategy.so) but no positive integer "
             "parameter '" BUDGET_PARAMETER "' in its config", name);
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG, message);
  }
  struct budget* state = calloc(1, sizeof *state);
  if (state == NULL) return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INTERNAL, "out of memory");
  state->max_pixels = max_pixels;
  *batcher = (TRITONBACKEND_Batcher*)state;
  snprintf(message, sizeof message,
           "model '%s': a dynamic batch holds at most %llu decoded pixels (the sum of input '" PIXEL_COUNT_INPUT
           "'); a request over that on its own runs alone", name, (unsigned long long)max_pixels);
  err = TRITONSERVER_LogMessage(TRITONSERVER_LOG_INFO, __FILE__, __LINE__, message);
  if (err != NULL) TRITONSERVER_ErrorDelete(err);
  return NULL;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelBatcherFinalize(TRITONBACKEND_Batcher* batcher)
{
  free(batcher);
  return NULL;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelBatchInitialize(const TRITONBACKEND_Batcher* batcher, void** userp)
{
  /* The batcher is this library's own struct budget, allocated (not const) in ModelBatcherInitialize. */
  struct budget* state = (struct budget*)batcher;
  if (state == NULL) {
    *userp = NULL;
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INTERNAL, "pixel budget: no batcher state");
  }
  state->batch.budget = state->max_pixels;
  state->batch.pixels = 0;
  state->batch.requests = 0;
  *userp = &state->batch;
  return NULL;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelBatchIncludeRequest(TRITONBACKEND_Request* request, void* userp,
                                                                  bool* should_include)
{
  struct batch* batch = userp;
  /* No state: the core asks about a batch it has already handed to an instance (it finalises the state
   * then). Refusing closes that batch, which is not empty; its instance runs it and a new batch begins. */
  if (batch == NULL) {
    *should_include = false;
    return NULL;
  }
  const uint64_t pixels = request_pixels(request, batch->budget);
  if (batch->requests == 0 || (pixels <= batch->budget && batch->pixels <= batch->budget - pixels)) {
    *should_include = true;
    batch->pixels = pixels > UINT64_MAX - batch->pixels ? UINT64_MAX : batch->pixels + pixels;
    batch->requests += 1;
  } else {
    *should_include = false;
  }
  return NULL;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelBatchFinalize(void* userp)
{
  (void)userp; /* the state belongs to the batcher */
  return NULL;
}
