"""How far does a random-ΔW teacher move the model, against the fine-tuned one? (issue 21 (d))

    PYTHONPATH=src .venv/bin/python results/study-v2/random_teacher_scale.py \\
        /work/sweep-out/pilot-distill/teachers/reasoning-mix/teacher.safetensors

KL(teacher ‖ base) on 32 reasoning-mix validation examples (the study's split: data seed 0)
for the fitted teacher, then for `nora.distill.random_delta` of it at several scales (the
Gaussian ΔW's norm in units of the fitted ΔW's). pilot-distill-random's `delta_scale` (19)
comes from this: KL grows about as scale², and 19× is about the fine-tune's KL.
"""

import sys

import torch

from nora.data import batches, build_splits
from nora.distill import Teacher, kl_eval, random_delta
from nora.models import load_base_model

torch.manual_seed(0)
model, tok = load_base_model()
model.eval()
_, val, _ = build_splits(tok, "reasoning-mix", 8, 32, 300, seed=0)
bs = batches(val[:32], tok.pad_token_id, 8)
fitted = Teacher.load(sys.argv[1]).check(model)
print(f"fitted teacher: KL to the base {kl_eval(model, bs, fitted).nll:.4f}", flush=True)
for scale in (1, 4, 8, 16, 19):
    t = random_delta(fitted, model, scale=scale)
    print(f"random ΔW at {scale}x the fitted norm: KL {kl_eval(model, bs, t).nll:.4f}", flush=True)
