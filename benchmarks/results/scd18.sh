#!/bin/bash
# SCD round 17 (issue 19, session 18): the Gemma-3 pair of round 16 calibrated with every
# 1,024-token chunk of the calib split for distillation (96, was 40) and 4 passes over them (384
# steps, was 160); the training chunks' oracle log-probs are float16 since this round. Then
# `scd eval` on round 16's 24 held-out chunks. Artifacts and logs in /work/scd18g.
#   bash benchmarks/results/scd18.sh
# -> scd18-gemma-eval.json and its plots.
ART=/work/scd18g RUN=long STEPS=384 CHUNKS=96 NAME=scd18-gemma \
  exec bash "$(dirname "$0")/scd17.sh"
