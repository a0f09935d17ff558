#!/usr/bin/env bash
# The README's PyTorch check of the MoE layer on every config in configs/, several seeds.
#
#   tools/reference/check_configs.sh [MEGAMOE] [SEEDS...]     (defaults: target/release/megamoe, 1 2 3 4)
#
# For each config: random probe inputs (64 tokens), the float64 PyTorch reference, megamoe's
# probe, and the comparison (counts exact, every other tensor within 1e-5 of max|ref|).
# configs/mixtral_like.toml and configs/deepseek_v3_like.toml are checked at a reduced width
# (d_model 64, expert_hidden 32, seq_len 16; every routing setting as in the file): the probe
# takes its shapes from the config, and T must be a multiple of seq_len, so at full size one
# probe would be 4096 tokens of width 2048 in float64 loops. Exits 1 if any check fails.
set -u
MEGAMOE=${1:-target/release/megamoe}
shift || true
SEEDS=${*:-1 2 3 4}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
REF="python3 tools/reference/moe_reference.py"
SMALL=(--set model.d_model=64 --set moe.expert_hidden=32 --set moe.shared_expert_hidden=32
       --set model.seq_len=16)
failed=0
for cfg in configs/*.toml; do
    sets=()
    case "$cfg" in
        *mixtral_like* | *deepseek_v3_like*) sets=("${SMALL[@]}") ;;
    esac
    for seed in $SEEDS; do
        if ! $REF inputs --config "$cfg" "${sets[@]}" --tokens 64 --seed "$seed" \
                --out "$TMP/in.safetensors" >/dev/null 2>"$TMP/err" ||
           ! $REF probe --config "$cfg" "${sets[@]}" --tensors "$TMP/in.safetensors" \
                --out "$TMP/ref.safetensors" >/dev/null 2>>"$TMP/err" ||
           ! "$MEGAMOE" probe moe --config "$cfg" "${sets[@]}" --tensors "$TMP/in.safetensors" \
                --out "$TMP/got.safetensors" >/dev/null 2>>"$TMP/err"; then
            echo "FAIL $cfg seed $seed: $(tail -1 "$TMP/err")"
            failed=1
            continue
        fi
        warn=$(grep -m1 "margin" "$TMP/err" || true)
        if out=$($REF compare "$TMP/ref.safetensors" "$TMP/got.safetensors" 2>&1); then
            echo "ok   $cfg seed $seed: $(echo "$out" | tail -1)${warn:+ ($warn)}"
        else
            echo "FAIL $cfg seed $seed:"
            echo "$out" | grep -i fail
            failed=1
        fi
    done
done
exit $failed
