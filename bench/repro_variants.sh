#!/usr/bin/env bash
# Debug aid: the minimal repro against several builds of the library.
for v in kernels/_build/va kernels/_build/vb kernels/_build/vc; do
  echo "== $v"; SVDQ_KERNELS_LIB=$v/libsvdq_kernels.so timeout 60 python3 bench/repro_min.py 2>&1 | grep -v "^  File\|^Extension\|^$" | tail -2 | cut -c1-80
done
python3 -c "import torch; print('stream', torch.cuda.current_stream().cuda_stream)"
