// The C interface Kappa calls: CBLAS (matrix products), provided by OpenBLAS on Debian
// (`libopenblas-dev`).
#include <cblas.h>
