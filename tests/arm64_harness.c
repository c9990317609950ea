/* Runs one TVM-compiled host kernel (`__tvm_ffi_main`, the TVM-FFI packed calling convention the LLVM
 * codegen emits) from an object file built for another CPU, under qemu-user, without a TVM runtime.
 *
 * Usage: harness IN OUT. IN: "TVMA", u32 count, then per tensor: u8 dtype code, u8 bits, u16 lanes,
 * i32 ndim, i64 shape[ndim], the raw row-major data. The kernel is called with every tensor as a
 * DLTensor* argument (outputs are arguments too); OUT gets every tensor's data back, in order.
 *
 * The kernel's imports are the runtime's few backend hooks (function pointers the codegen declares as
 * weak data and a loader fills in) and the error setter; they are given minimal serial versions here:
 * parallel loops run their tasks one after another (3 tasks, so the work split is exercised), workspace
 * is aligned heap memory. */
#include <dlpack/dlpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv* penv, void* cdata);

extern void* __TVMBackendParallelLaunch;
extern void* __TVMBackendAllocWorkspace;
extern void* __TVMBackendFreeWorkspace;
int __tvm_ffi_main(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

static int parallel_launch(ParallelLambda flambda, void* cdata, int num_task) {
  ParallelEnv env = {NULL, num_task > 0 ? num_task : 3};
  for (int i = 0; i < env.num_task; ++i) {
    int rc = flambda(i, &env, cdata);
    if (rc != 0) return rc;
  }
  return 0;
}

static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type, (void)device_id, (void)code, (void)bits;
  return aligned_alloc(64, (nbytes + 63) / 64 * 64 + 64);
}

static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  fprintf(stderr, "kernel error %s: ", kind);
  for (int i = 0; i < num_parts; ++i) fputs(parts[i], stderr);
  fputc('\n', stderr);
}

static void must_read(void* dst, size_t n, FILE* f) {
  if (fread(dst, 1, n, f) != n) {
    fprintf(stderr, "harness: short input\n");
    exit(2);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  if (!in) return 2;
  char magic[4];
  uint32_t count;
  must_read(magic, 4, in);
  must_read(&count, 4, in);
  if (memcmp(magic, "TVMA", 4) != 0 || count > 64) return 2;
  DLTensor* tensors = calloc(count, sizeof(DLTensor));
  TVMFFIAny* args = calloc(count, sizeof(TVMFFIAny));
  size_t* sizes = calloc(count, sizeof(size_t));
  for (uint32_t i = 0; i < count; ++i) {
    uint8_t code, bits;
    uint16_t lanes;
    int32_t ndim;
    must_read(&code, 1, in);
    must_read(&bits, 1, in);
    must_read(&lanes, 2, in);
    must_read(&ndim, 4, in);
    int64_t* shape = calloc(ndim > 0 ? ndim : 1, sizeof(int64_t));
    must_read(shape, sizeof(int64_t) * ndim, in);
    size_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= (size_t)shape[d];
    sizes[i] = n * bits / 8 * lanes;
    void* data = aligned_alloc(64, (sizes[i] + 63) / 64 * 64 + 64);
    must_read(data, sizes[i], in);
    DLTensor t = {data, {kDLCPU, 0}, ndim, {code, bits, lanes}, shape, NULL, 0};
    tensors[i] = t;
    args[i].type_index = kTVMFFIDLTensorPtr;
    args[i].v_ptr = &tensors[i];
  }
  fclose(in);
  __TVMBackendParallelLaunch = (void*)parallel_launch;
  __TVMBackendAllocWorkspace = (void*)alloc_workspace;
  __TVMBackendFreeWorkspace = (void*)free_workspace;
  TVMFFIAny result;
  memset(&result, 0, sizeof(result));
  result.type_index = kTVMFFINone;
  int rc = __tvm_ffi_main(NULL, args, (int32_t)count, &result);
  if (rc != 0) {
    fprintf(stderr, "harness: kernel returned %d\n", rc);
    return 1;
  }
  FILE* out = fopen(argv[2], "wb");
  if (!out) return 2;
  for (uint32_t i = 0; i < count; ++i) fwrite(tensors[i].data, 1, sizes[i], out);
  return fclose(out) == 0 ? 0 : 2;
}
