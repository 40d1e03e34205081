// The C interfaces Kappa calls: CBLAS (matrix products) and LAPACKE (dense factorizations),
// both provided by OpenBLAS on Debian (`libopenblas-dev`, `liblapacke-dev`).
#include <cblas.h>
#include <lapacke.h>
