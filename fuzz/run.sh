#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time and prints, per target, the executions, the
# time and the coverage reached; then one summary line (also written to FUZZ_SUMMARY).
#
# Stable Rust is enough: without a sanitizer (`-s none`) cargo-fuzz only passes stable rustc
# flags (-Cpasses=sancov-module, -Cllvm-args=...), and libFuzzer (built from C++ by
# libfuzzer-sys, hence g++) does the rest. Panics, overflows (debug assertions are on) and
# failed assertions are found; memory errors that only ASan sees are not (unsafe code is
# libcontainer's and libc's, not the parsers' fuzzed here).
#
#   FUZZ_SECONDS   seconds per target (default 20); 0 skips fuzzing
#   FUZZ_TARGETS   targets to run, space-separated (default: every fuzz/fuzz_targets/*.rs)
#   FUZZ_SUMMARY   file for the summary line (default target/fuzz-summary.txt)
#   FUZZ_ARGS      extra libFuzzer arguments (e.g. -jobs=4)
#   CARGO          the cargo command (default cargo; e.g. "cargo +stable")
#
# Inputs found are kept in fuzz/corpus/TARGET (not in git) and reused by the next run, along
# with the seeds in fuzz/seeds/TARGET. Any crash, panic, timeout (FUZZ_TIMEOUT seconds for
# one input, default 10) or out-of-memory fails the run (exit 1) once every target has run,
# naming the input that failed and how to reproduce it.
set -uo pipefail
cd "$(dirname "$0")/.."

read -r -a CARGO_CMD <<< "${CARGO:-cargo}"
SECONDS_EACH=${FUZZ_SECONDS:-20}
TIMEOUT=${FUZZ_TIMEOUT:-10}
SUMMARY=${FUZZ_SUMMARY:-target/fuzz-summary.txt}
read -r -a EXTRA <<< "${FUZZ_ARGS:-}"
mkdir -p "$(dirname "$SUMMARY")"

if ! [[ "$SECONDS_EACH" =~ ^[0-9]+$ ]]; then
    echo "fuzz: FUZZ_SECONDS must be a whole number of seconds, not '$SECONDS_EACH'" >&2
    exit 2
fi
if [ "$SECONDS_EACH" = 0 ]; then
    echo "fuzz: skipped (FUZZ_SECONDS=0)" | tee "$SUMMARY"
    exit 0
fi
if ! "${CARGO_CMD[@]}" fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing: run 'integration/host.sh install' (or 'cargo install cargo-fuzz --locked')" >&2
    exit 1
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a TARGETS <<< "$FUZZ_TARGETS"
else
    TARGETS=()
    for f in fuzz/fuzz_targets/*.rs; do TARGETS+=("$(basename "$f" .rs)"); done
fi

LOGS=target/fuzz-logs
mkdir -p "$LOGS"
start=$(date +%s)
echo "fuzz: building the targets with $("${CARGO_CMD[@]}" --version 2>/dev/null), no sanitizer"
if ! "${CARGO_CMD[@]}" fuzz build -s none >"$LOGS/build.log" 2>&1; then
    tail -40 "$LOGS/build.log" >&2
    echo "fuzz: FAILED to build the fuzz targets (log: $LOGS/build.log)" >&2
    echo "fuzz: FAILED to build" > "$SUMMARY"
    exit 1
fi
echo "fuzz: built in $(( $(date +%s) - start )) s; running each target for ${SECONDS_EACH} s"
host=$("${CARGO_CMD[@]}" -vV | sed -n 's/^host: //p')
BIN_DIR=fuzz/target/$host/release

total_execs=0
total_secs=0
failed=()
for t in "${TARGETS[@]}"; do
    corpus=fuzz/corpus/$t
    mkdir -p "$corpus"
    dirs=("$corpus")
    [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
    log=$LOGS/$t.log
    mkdir -p "fuzz/artifacts/$t"
    t0=$(date +%s.%N)
    # The binary cargo-fuzz built (what `cargo fuzz run` runs, without checking the build again).
    "$BIN_DIR/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$SECONDS_EACH" -timeout="$TIMEOUT" -rss_limit_mb=2048 \
        -print_final_stats=1 "${EXTRA[@]}" "${dirs[@]}" >"$log" 2>&1
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    corp=$(find "$corpus" -type f | wc -l)
    execs=${execs:-0}
    total_execs=$((total_execs + execs))
    total_secs=$(awk -v a="$total_secs" -v b="$secs" 'BEGIN { printf "%.1f", a + b }')
    if [ "$rc" = 0 ] && [ "$execs" -gt 0 ]; then
        printf 'fuzz: %-14s %10d execs in %5s s (%s/s), coverage %s, corpus %d: ok\n' \
            "$t" "$execs" "$secs" "${rate:-?}" "${cov:-?}" "$corp"
    else
        failed+=("$t")
        {
            echo "================================================================================"
            printf 'fuzz: %s FAILED (exit %s) after %s execs in %s s; its output:\n' "$t" "$rc" "$execs" "$secs"
            # Without libFuzzer's warnings about sanitizers it was built without, and without
            # the backtrace's frames: the panic message, libFuzzer's verdict, the input.
            grep -Ev '^WARNING: Failed to find function|^ +[0-9]+: |^ +at ' "$log" | tail -40
            artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
            if [ -n "$artifact" ]; then
                echo "fuzz: the failing input is $artifact; reproduce with:"
                echo "    ${CARGO_CMD[*]} fuzz run -s none $t $artifact"
            fi
            echo "fuzz: full log: $log"
            echo "================================================================================"
        } >&2
    fi
done

line="fuzz: ${#TARGETS[@]} targets, $total_execs executions in $total_secs s (${SECONDS_EACH} s each, $(( $(date +%s) - start )) s with the build)"
if [ ${#failed[@]} -gt 0 ]; then
    line="$line; FAILED: ${failed[*]}"
fi
echo "$line" | tee "$SUMMARY"
[ ${#failed[@]} -eq 0 ]
