/* The one translation unit that holds the implementation of safetensors.h. */
#define ST_IMPLEMENTATION
#include "loader/safetensors.h"
