# Sourced by the scripts that measure what one setting costs the pipeline
# (scripts/bench-tls, scripts/bench-tracing): the pipeline's single-stream decode
# tokens/s (three workers on this machine, `strata bench --workers 3`) in two
# modes, alternating in one run, ROUNDS rounds, the order turned every other round
# (A first, then B first: a drift of the machine's speed over the run falls on both
# alike), DECODE_TOKENS (default 64) tokens a run.
#
# Two models, one after the other:
#   1. the test model (STRATA_TEST_MODEL, default smollm2-135m): the cost as a user
#      sees it, where the step's compute dominates and the noise of a shared machine
#      is larger than the few percent sought;
#   2. a random-weight model of hidden 64 (`cargo run --example synthetic_model`),
#      whose pipeline does almost nothing but move frames: the setting's own cost,
#      as seconds a token, measured where it is most of the step.
# Then: the cost the second measure implies for the first model's step.
#
# The sourcing script sets MODE_A and MODE_B (labels) and defines
# `bench_mode MODE MODEL`, which prints `strata bench --json`'s output for MODE.

ab_rounds=${ROUNDS:-3}
ab_decode=${DECODE_TOKENS:-64}

# ab_bench MODEL EXTRA_FLAGS...: the pipeline's bench as JSON.
ab_bench() {
  local path=$1
  shift
  target/release/strata bench --model "$path" --workers 3 --runs 3 --decode-tokens "$ab_decode" --json "$@"
}

# ab_measure LABEL MODEL: prints each run, and `A speeds|B speeds` on fd 3.
ab_measure() {
  local label=$1 path=$2 a=() b=()
  for round in $(seq "$ab_rounds"); do
    local order="$MODE_A $MODE_B"
    [ $((round % 2)) = 0 ] && order="$MODE_B $MODE_A"
    for mode in $order; do
      local speed
      speed=$(bench_mode "$mode" "$path" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["pipeline_decode_tokens_per_s_direct_return"])')
      printf '%s round %s %-10s %8.1f tokens/s\n' "$label" "$round" "$mode" "$speed"
      if [ "$mode" = "$MODE_A" ]; then a+=("$speed"); else b+=("$speed"); fi
    done
  done
  echo "${a[*]}|${b[*]}" >&3
}

# ab_run: builds, measures both models, prints the summary.
ab_run() {
  cargo build --release -q --bin strata --bin strata-worker
  local model=${STRATA_TEST_MODEL:-smollm2-135m} tiny_dir tiny results
  tiny_dir=$(mktemp -d)
  tiny=$(cargo run --release -q -p strata-model --example synthetic_model -- "$tiny_dir")
  results=$(mktemp)
  exec 3>"$results"
  ab_measure model "$model"
  ab_measure frames-only "$tiny"
  exec 3>&-
  python3 - "$results" "$MODE_A" "$MODE_B" <<'PY'
import random, statistics, sys
lines = open(sys.argv[1]).read().split("\n")
a_label, b_label = sys.argv[2], sys.argv[3]
def parse(line):
    a, b = line.split("|")
    return [float(x) for x in a.split()], [float(x) for x in b.split()]
def summary(label, a, b):
    ratios = [x / y for x, y in zip(a, b)]
    # How far the median ratio may be from the truth, given the spread between
    # rounds: a bootstrap over the rounds (fixed seed: a rerun on the same figures agrees).
    random.seed(1)
    medians = sorted(statistics.median(random.choices(ratios, k=len(ratios))) for _ in range(10000))
    print(f"{label}: {a_label} {statistics.median(a):.1f} tokens/s, {b_label} {statistics.median(b):.1f}; "
          f"median ratio {a_label}/{b_label} {statistics.median(ratios):.3f}, 90% bootstrap interval "
          f"{medians[500]:.3f} .. {medians[9500]:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
model_a, model_b = parse(lines[0])
tiny_a, tiny_b = parse(lines[1])
summary("model", model_a, model_b)
summary("frames only", tiny_a, tiny_b)
# The setting's extra time a token, from the frames-only pipeline (each round's
# pair), then that time as a share of the model's step.
extra = statistics.median([1 / x - 1 / y for x, y in zip(tiny_a, tiny_b)])
step = 1 / statistics.median(model_b)
print(f"{a_label} adds {extra * 1e6:.1f} µs a token to the frames-only pipeline (median of rounds); "
      f"on the model's {step * 1e3:.2f} ms step that is {100 * extra / step:.2f}%")
PY
  rm -rf "$results" "$tiny_dir"
}
