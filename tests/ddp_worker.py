"""Run by ``torchrun`` in test_distributed.py: a vaelab command in one rank of a data-parallel job, instrumented.

Besides training, each rank records every file it renamed into place (all vaelab writes end with
``os.replace``) and its final parameters, so the test can check which rank wrote what and that the
ranks ended with identical weights; an evaluation also saves the sample set each rank ended with.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import vaelab.training
from vaelab.cli import main

out = Path(os.environ["DDP_TEST_OUT"])
rank = int(os.environ["RANK"])
writes: list[str] = []
real_replace = os.replace


def recording_replace(src, dst, *args, **kwargs):
    writes.append(str(dst))
    return real_replace(src, dst, *args, **kwargs)


os.replace = recording_replace
real_finalize = vaelab.training.finalize


def finalize_and_dump(run, model, *args, **kwargs):
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / f"weights-rank{rank}.safetensors"))
    return real_finalize(run, model, *args, **kwargs)


vaelab.training.finalize = finalize_and_dump

if os.environ.get("DDP_TINY_EVALUATOR"):  # the test's tiny evaluator recipe (the cache key includes it)
    import vaelab.evaluation
    import vaelab.evaluator

    real_recipe = vaelab.evaluator.default_recipe
    vaelab.evaluator.default_recipe = lambda d: {**real_recipe(d), "epochs": 1, "widths": (4, 8)}
    real_generate = vaelab.evaluation.generate

    def generate_and_dump(*args, **kwargs):
        fake, fake_y = real_generate(*args, **kwargs)
        torch.save(fake, out / f"fake-rank{rank}.pt")
        return fake, fake_y

    vaelab.evaluation.generate = generate_and_dump
code = main(sys.argv[1:])
(out / f"writes-rank{rank}.json").write_text(json.dumps(writes))
torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None
sys.exit(code)
