#!/usr/bin/env bash
# One device call: install the carried wheels, then run the steps named in $STEPS (default all), each
# under its own time limit, every log and result into $OUT. What the GPU issue measures:
#   tests      the storage and encode tests against the newest zarr (pip picks it for this Python)
#   decode     bench/decode_probe.py: the pass's JPEG decode alone, beside the encoder (which stream, how much
#              queued, nvjpeg's call size), in threads and processes, and with a CPU share in processes
#   dataplane  bench/dataplane.py: JPEG -> teacher store, fused and two-pass, through the stage functions
#   pipeline   bench/gpu_pipeline.py: `tf pipeline --config configs/imagenet.yaml` on 50k JPEGs
#   generators bench/generators.py: the compiled B step with Muon (TF32, float32 Newton-Schulz) and AdamW
#   profile    bench/encode_profile.py (the fused encode stage alone) under py-spy, once per PROFILE_MODES
#              (idle: where every thread is; gil: who holds the GIL), summarised by bench/pyspy_summary.py
#              (--nonblocking: at 73178de py-spy pausing the process at 100 Hz slowed the stage 2-3x);
#              needs the wheels built with `scripts/gpu_wheels.py --profiler --nvimgcodec-cuda ''`
#   trainprofile bench/train_profile.py: the configured generator step (the product's loop) by kernel family, and
#              its optimiser, EMA updates and gradient norm alone (TP_SETS: --set flags; TP_STEPS; TP_PROCS: that
#              many processes at once, their step times combined into train_profile_concurrent.json; TP_COMPILE="false
#              true" runs it with each generator.compile in turn)
#   proof      bench/trajectory_proof.py (issue 30), resuming from /tmp/proof while the machine stays warm
# Usage (device tool, repository root, .whl carried): STEPS="tests pipeline" bash bench/gpu_session.sh
# (TESTS="<paths>" picks the tests; *_S each step's time limit; GP_FASTEST=1 runs the pipeline with the settings
# of the last data plane's fastest --compare on this machine, from an earlier call too while it stays warm).
# A step written STEP:NAME=VALUE runs with that environment variable set, its logs and results in
# $OUT/NAME_VALUE: decode:CUDA_DEVICE_MAX_CONNECTIONS=32 times the probe with 32 hardware work queues instead of
# CUDA's 8 (streams that share one queue wait for each other). trainprofile:MPS=1 and proof:MPS=1 run that step's
# processes under CUDA MPS (a daemon started for the step and stopped after it; the GPU's settings are not
# touched): without it processes on one GPU take turns in time slices, and a tiny model's kernels fill a few SMs
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=/tmp/prefect
# the device's copy of the tree may carry a stale .git: pass BENCH_COMMIT=<the commit sent> with the call
export BENCH_COMMIT=${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
STEPS=${STEPS:-"tests dataplane pipeline"}
# issue 30's proof at the tiny preset (docs/trajectory.md section 8); PROOF_ARGS replaces it, PROOF_EXTRA adds to
# it (PROOF_EXTRA=--compile: the generators compiled)
PROOF_DEFAULT="--preset tiny --batch-size 256 --steps 512 --max-steps 8192 --samples 512 --reencode 128
  --structure-samples 256 --decoder-steps 1500 --judge-steps 1000"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2; df -h /tmp /dev/shm | tail -2
  bash scripts/gpu_install.sh; } > "$OUT/env.txt" 2>&1 || { tail -20 "$OUT/env.txt"; exit 1; }
# the host's own speed, which the data plane's store writes and JPEG decode depend on (hosts differ 1.4-2.2x):
# 4 GB written to /tmp and fsynced (as each chunk is), and one core's memory copy
{ echo "disk, 4 GB fsynced: $(dd if=/dev/zero of=/tmp/dd_probe bs=64M count=64 conv=fsync 2>&1 | tail -1)"
  rm -f /tmp/dd_probe
  python3 -c "import numpy as np, time; a = np.ones(2**30, np.uint8); b = np.empty_like(a); np.copyto(b, a)
t = time.perf_counter(); [np.copyto(b, a) for _ in range(4)]; print(f'memory copy, one core: {4 * 2**30 / (time.perf_counter() - t) / 1e9:.2f} GB/s')"
} > "$OUT/host_probe.txt" 2>&1; cat "$OUT/host_probe.txt"
tail -1 "$OUT/env.txt"
mps_stop() {   # quits the MPS daemon this script started, if any
  [[ -n ${CUDA_MPS_PIPE_DIRECTORY:-} ]] || return 0
  echo quit | nvidia-cuda-mps-control; sleep 1; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
mps_start() {   # a per-user MPS daemon with its pipes under /tmp; the step's processes find it by the variables
  command -v nvidia-cuda-mps-control > /dev/null || { echo "MPS=1: no nvidia-cuda-mps-control here"; return 1; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # a daemon left by a killed call on this warm machine answers the query and is used as it is
  nvidia-cuda-mps-control -d || echo get_server_list | nvidia-cuda-mps-control > /dev/null \
    || { unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; return 1; }
}
trap mps_stop EXIT
for item in $STEPS; do
  began=$(date +%s); step=${item%%:*}; assign=""; out="$OUT"
  if [[ $item == *:* ]]; then assign=${item#*:}; out="$OUT/${assign//=/_}"; mkdir -p "$out"; fi
  if [[ $assign == MPS=1 ]]; then mps_start > "$out/mps.txt" 2>&1 || { cat "$out/mps.txt"; continue; }; fi
  case $step in
    tests) env $assign timeout "${TESTS_S:-150}" python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/storage \
             tests/tasks/test_encode_files.py tests/tasks/test_phase_clock.py tests/models/test_channel_stats.py \
             tests/models/test_muon.py tests/models/test_regions_batched.py tests/models/test_hierarchy_batched.py \
             tests/scripts} > "$out/tests.log" 2>&1 ;;
    decode) env $assign timeout "${DECODE_S:-180}" python3 bench/decode_probe.py --images "${DECODE_IMAGES:-8192}" \
             --workdir "${DP_WORK:-/tmp/dp}" --processes "${DECODE_PROCESSES-4,8}" --out "$out" \
             > "$out/decode.log" 2>&1 ;;   # the same JPEG files as dataplane's (same names and bytes)
    dataplane) rm -f "${DP_WORK:-/tmp/dp}/last_dataplane.json"   # GP_FASTEST never reads an earlier run's
             env $assign timeout "${DATAPLANE_S:-150}" python3 bench/dataplane.py --images "${DP_IMAGES:-20000}" \
             --workdir "${DP_WORK:-/tmp/dp}" --out "$out" ${DP_SETS:-} > "$out/dataplane.log" 2>&1; rc=$?
             cp "$out/dataplane.json" "${DP_WORK:-/tmp/dp}/last_dataplane.json" 2>/dev/null   # for GP_FASTEST
             rm -rf "${DP_WORK:-/tmp/dp}/fused" "${DP_WORK:-/tmp/dp}/two_pass"; (exit $rc) ;;   # 20 GB each at 50k
    pipeline) fastest=""   # GP_FASTEST=1: with the settings of the last data plane's fastest --compare, if any
             if [[ -n ${GP_FASTEST:-} && -f ${DP_WORK:-/tmp/dp}/last_dataplane.json ]]; then
               fastest=$(python3 bench/dataplane.py --fastest-of "${DP_WORK:-/tmp/dp}/last_dataplane.json")
               echo "pipeline with the data plane's fastest: ${fastest:-as configured}"; fi
             env $assign timeout "${PIPELINE_S:-330}" python3 bench/gpu_pipeline.py --images "${GP_IMAGES:-50000}" \
             --workdir "${DP_WORK:-/tmp/dp}" --out "$out" --time-limit $(( ${PIPELINE_S:-330} - 5 )) ${GP_SETS:-} $fastest \
             > "$out/gp.log" 2>&1; rc=$?   # the data plane's JPEGs (same names and bytes): written once a machine
             rm -rf "${DP_WORK:-/tmp/dp}/root"; (exit $rc) ;;   # its figures are in $out; the disk is needed next
    generators) for run in ${GEN_RUNS:-muon ns_float32 adamw}; do   # GEN_RUNS picks (about 110 s each)
             # the compiled B step with Muon's Newton-Schulz in TF32 (shipped), in float32 (before), and AdamW
             case $run in muon) optimizer="--optimizer muon" ;; ns_float32) optimizer="--optimizer muon --ns-float32" ;;
               *) optimizer="--optimizer adamw" ;; esac
             env $assign timeout "${GENERATOR_S:-150}" python3 bench/generators.py --variants kernel:compile --steps 10 \
               --no-kernel-check $optimizer --out "$out" >> "$out/generators.log" 2>&1
           done ;;
    profile) spy="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/py-spy"
             for mode in ${PROFILE_MODES:-idle gil}; do
               env $assign timeout "${PROFILE_S:-150}" "$spy" record --threads "--$mode" --nonblocking \
                 --rate "${PROFILE_RATE:-50}" --format raw -o "$out/pyspy_$mode.txt" -- python3 bench/encode_profile.py \
                 --images "${PROFILE_IMAGES:-20000}" --workdir "${DP_WORK:-/tmp/dp}" --out "$out/$mode" \
                 ${PROFILE_SETS:-} >> "$out/profile.log" 2>&1
               python3 bench/pyspy_summary.py "$out/pyspy_$mode.txt" --within encode_file_chunks \
                 > "$out/pyspy_${mode}_summary.json"
             done ;;
    trainprofile) procs=${TP_PROCS:-1}   # TP_PROCS=12: that many at once on the one GPU, as issue 30's proof trains
             for compile in ${TP_COMPILE:-configured}; do   # TP_COMPILE="false true": each, into $out/compile_*
               dest="$out"; sets="${TP_SETS:-}"
               if [[ $compile != configured ]]; then
                 dest="$out/compile_$compile"; mkdir -p "$dest"; sets="$sets --set generator.compile=$compile"; fi
               rm -rf /tmp/tp; for i in $(seq "$procs"); do d="$dest"; (( procs > 1 )) && d=/tmp/tp/$i && mkdir -p "$d"
                 env $assign timeout "${TRAINPROFILE_S:-240}" python3 bench/train_profile.py --steps "${TP_STEPS:-8}" \
                 --out "$d" $sets > "$d/train_profile.log" 2>&1 &
               done; wait   # the processes' logs stay in /tmp/tp (at most 8 files come back from a call)
               (( procs == 1 )) || python3 bench/train_profile.py --combine /tmp/tp --out "$dest" > /tmp/tp/combine.log 2>&1 \
                 || { echo "trainprofile $compile:"; tail -4 /tmp/tp/combine.log /tmp/tp/1/train_profile.log; }
             done ;;
    proof) env $assign timeout "${PROOF_S:-560}" python3 bench/trajectory_proof.py --device cuda --work /tmp/proof --parallel \
             --time-limit $(( ${PROOF_S:-560} - 20 )) ${PROOF_ARGS:-$PROOF_DEFAULT} ${PROOF_EXTRA:-} --out "$out" \
             --figure "$out/tf_vs_flat_trajectories.png" \
             --curves-figure "$out/trajectory_proof_curves.png" > "$out/proof.log" 2>&1 ;;   # /tmp/proof: chain calls
  esac
  rc=$?; mps_stop
  echo "$item: rc $rc in $(( $(date +%s) - began ))s"
done
tail -3 "$OUT/tests.log" 2>/dev/null; grep -E "img/s|Error" "$OUT"/decode.log "$OUT"/*/decode.log 2>/dev/null | tail -24; grep -E "img/s|Error|error" "$OUT/dataplane.log" 2>/dev/null | tail -5
grep -E "computed|reused|failed|Error" "$OUT/pipeline.log" 2>/dev/null | tail -14
