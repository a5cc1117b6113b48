export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 200 python3 -m pytest -q -s -m gpu tests/kernels/test_kernels_decode_sub.py tests/kernels/test_unpack_asm.py -p no:cacheprovider 2>&1 | tee $OUT/gpu_sub_tests.log | grep -E "sub codes|passed|failed|Error|assert" | head -30
timeout 200 python3 benchmarks/bench_decode.py --context 4096 32768 131072 --batch 1 8 32 --sub-codes --no-flashinfer --out $OUT/decode_sub 2>&1 | tee $OUT/bench_decode_sub.log | tail -22
OSCAR_KV_INT2_UNPACK=sub timeout 150 python3 benchmarks/bench_decode.py --context 32768 --batch 8 32 --sweep --no-check --no-flashinfer --out $OUT/decode_sub_sweep 2>&1 | tee $OUT/bench_decode_sub_sweep.log | grep -E "best|^ *[0-9]+ +[0-9]+ \|"
