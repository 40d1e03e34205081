// Kappa's view of MPI: a few wrappers with plain C types, so that Swift needs none of MPI's
// macros (MPI_COMM_WORLD, MPI_FLOAT and MPI_SUM are macros that Swift cannot import).
// With Open MPI's headers (pkg-config ompi-c, `bash Scripts/setup.sh`) the wrappers call MPI;
// without them the package still builds and kappa_mpi_available() returns 0, so the
// programs run as one process and say how to get MPI when launched by mpirun.
#ifndef KAPPA_CMPI_SHIM_H
#define KAPPA_CMPI_SHIM_H
#include <stddef.h>
#include <stdlib.h>

#if __has_include(<mpi.h>)
#include <mpi.h>

static inline int kappa_mpi_available(void) { return 1; }

// MPI_Init_thread (FUNNELED: only the main thread calls MPI) and errors returned, not fatal.
static inline int kappa_mpi_init(int *rank, int *size) {
    int provided = 0;
    int e = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    if (e != MPI_SUCCESS) return e;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    e = MPI_Comm_rank(MPI_COMM_WORLD, rank);
    if (e != MPI_SUCCESS) return e;
    return MPI_Comm_size(MPI_COMM_WORLD, size);
}
static inline int kappa_mpi_finalize(void) { return MPI_Finalize(); }
static inline int kappa_mpi_allreduce_f32(float *values, int count, int max) {
    return MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_FLOAT, max ? MPI_MAX : MPI_SUM, MPI_COMM_WORLD);
}
static inline int kappa_mpi_allreduce_f64(double *values, int count, int max) {
    return MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, max ? MPI_MAX : MPI_SUM, MPI_COMM_WORLD);
}
static inline int kappa_mpi_bcast(void *bytes, int count, int root) {
    return MPI_Bcast(bytes, count, MPI_BYTE, root, MPI_COMM_WORLD);
}
// A nonblocking sum of floats in place; *request (freed by kappa_mpi_wait) follows it.
static inline int kappa_mpi_iallreduce_f32(float *values, int count, void **request) {
    MPI_Request *r = (MPI_Request *)malloc(sizeof(MPI_Request));
    if (!r) return MPI_ERR_NO_MEM;
    int e = MPI_Iallreduce(MPI_IN_PLACE, values, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, r);
    if (e != MPI_SUCCESS) { free(r); *request = NULL; return e; }
    *request = r;
    return MPI_SUCCESS;
}
// Progresses the request; *done becomes 1 when it has completed (then call kappa_mpi_wait).
static inline int kappa_mpi_test(void *request, int *done) {
    return MPI_Test((MPI_Request *)request, done, MPI_STATUS_IGNORE);
}
static inline int kappa_mpi_wait(void *request) {
    int e = MPI_Wait((MPI_Request *)request, MPI_STATUS_IGNORE);
    free(request);
    return e;
}
static inline int kappa_mpi_allgather(const void *bytes, int count, void *result) {
    return MPI_Allgather(bytes, count, MPI_BYTE, result, count, MPI_BYTE, MPI_COMM_WORLD);
}
static inline int kappa_mpi_barrier(void) { return MPI_Barrier(MPI_COMM_WORLD); }
static inline void kappa_mpi_abort(int code) { MPI_Abort(MPI_COMM_WORLD, code); }
// The error's text into buffer (at least 256 bytes).
static inline void kappa_mpi_error_string(int code, char *buffer) {
    int length = 0;
    if (MPI_Error_string(code, buffer, &length) != MPI_SUCCESS) length = 0;
    buffer[length < 255 ? length : 255] = 0;
}
static inline int kappa_mpi_max_count(void) { return 1 << 30; }

#else

static inline int kappa_mpi_available(void) { return 0; }
static inline int kappa_mpi_init(int *rank, int *size) { *rank = 0; *size = 1; return 1; }
static inline int kappa_mpi_finalize(void) { return 0; }
static inline int kappa_mpi_allreduce_f32(float *values, int count, int max) { return 1; }
static inline int kappa_mpi_allreduce_f64(double *values, int count, int max) { return 1; }
static inline int kappa_mpi_bcast(void *bytes, int count, int root) { return 1; }
static inline int kappa_mpi_iallreduce_f32(float *values, int count, void **request) { *request = NULL; return 1; }
static inline int kappa_mpi_test(void *request, int *done) { *done = 1; return 1; }
static inline int kappa_mpi_wait(void *request) { return 1; }
static inline int kappa_mpi_allgather(const void *bytes, int count, void *result) { return 1; }
static inline int kappa_mpi_barrier(void) { return 1; }
static inline void kappa_mpi_abort(int code) {}
static inline void kappa_mpi_error_string(int code, char *buffer) {
    const char *s = "Kappa was built without MPI (install Open MPI: bash Scripts/setup.sh, then rebuild)";
    int i = 0;
    for (; s[i] && i < 255; i++) buffer[i] = s[i];
    buffer[i] = 0;
}
static inline int kappa_mpi_max_count(void) { return 1 << 30; }

#endif
#endif
