#!/usr/bin/env bash
# Usage: ./reproduce.sh {voc|coco|ablation|sweep|demo} [--set key=value ...] [--nproc N]
#   voc       Tables 1-2: TKP-PCL on VOC 2012 (+ SBD train_aug), DeepLab-v2 on its pseudo masks
#   coco      Table 3: the same on COCO 2014
#   ablation  Table 4: avg, ViT-PCM max, top-K, top-K + PCE
#   sweep     Fig. 4: k in {1,2,4,6,8,12}, eps in {0.75,...,0.95}
#   demo      the whole chain on generated data with small models, on CPU (< 10 min on 2 cores)
# Re-running the same command resumes: finished stages are skipped.
# Data and weights: see README ("Full reproduction"); e.g. --set data.root=/data/VOCdevkit/VOC2012
#   --set model.weights=weights/jx_vit_base_p16_384-83fb41ba.pth --set seg.weights=weights/resnet101-63fe2227.pth
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  voc|coco|ablation|sweep|demo) ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m tkpbench.pipeline "$@"
