// zlib, for reading gzip-compressed dataset files (MNIST's .gz IDX files).
#include <zlib.h>
