#!/usr/bin/env bash
# docs/METRICS.md from the evaluation, history and fine-tuning records in docs/ (its tables) and
# docs/metrics_notes.md (its analysis): `bash scripts/metrics_doc.sh`. The fine-tuning records are named
# in the order of their sections; OUT=FILE writes elsewhere (to compare with the committed one).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" scripts/write_metrics_doc.py --val docs/eval_val.json --train docs/eval_train.json \
  --before docs/eval_val_before.json --tta docs/eval_val_tta.json --int8 docs/eval_val_int8.json \
  --int8-cpus docs/int8_comparison.json --encoders docs/encoder_comparison.json \
  --history models/livecell-unet.history.json --fewshot-target docs/fewshot_astro_target.json \
  --fewshot docs/fewshot_astro_never_seen.json docs/fewshot_astro.json docs/fewshot_shsy5y.json \
  docs/fewshot29_recipe_full.json docs/fewshot29_recipe_crop384.json docs/fewshot29_astro_k100.json \
  docs/fewshot29_recipe_frozen.json docs/fewshot29_astro.json docs/fewshot29_astro_k1.json docs/fewshot29_shsy5y.json \
  docs/fewshot29_valsplit_s0.json docs/fewshot29_valsplit_s1.json docs/fewshot29_tta_k10.json \
  docs/fewshot29_notrain_k10.json docs/fewshot29_notrain_valsplit_s0.json docs/fewshot29_notrain_valsplit_s1.json \
  docs/fewshot29_filter_k10.json docs/fewshot29_filter_s0.json docs/fewshot29_filter_s1.json \
  docs/fewshot29_rules_k10.json docs/fewshot29_rules_s0.json docs/fewshot29_rules_s1.json \
  docs/fewshot29_rules_shsy5y_k10.json docs/fewshot29_rules_trained_k10.json \
  docs/fewshot29_baserules_tta_k10.json docs/fewshot29_baserules_tta_s0.json docs/fewshot29_baserules_tta_s1.json \
  docs/fewshot29_baserules_k10.json docs/fewshot29_baserules_s0.json docs/fewshot29_baserules_s1.json \
  docs/fewshot29_baserules_trained_k10.json docs/fewshot29_baserules_shsy5y_k10.json \
  docs/fewshot29_norule_k10.json docs/fewshot29_norule_s0.json docs/fewshot29_norule_s1.json \
  docs/fewshot29_norule_shsy5y_k10.json docs/fewshot29_crop384_padfix.json docs/fewshot29_noreplay.json docs/fewshot29_replay.json \
  docs/fewshot29_replay_lr1e4.json docs/fewshot29_fold_replay_s0.json docs/fewshot29_fold_replay_s1.json \
  --notes docs/metrics_notes.md --out "${OUT:-docs/METRICS.md}"
