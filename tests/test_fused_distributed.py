"""The fused loss under DDP: 2 CPU processes (gloo, torchrun) x 2 sequences take the same optimizer step as one
process with all 4 (Trainer's num_items_in_batch counts the tokens of both ranks)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import write_noisy

SCRIPT = textwrap.dedent('''
    import os
    import sys
    from pathlib import Path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from reweight_audit.scoring.distributed import leave_after_gloo
    from reweight_audit.scoring.encoding import choose_template
    from reweight_audit.training import patch
    from reweight_audit.training.run import make_collator, training_examples

    model_dir, data, out, batch = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = training_examples(data, tok, choose_template(tok, "auto"), None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=out + ".trainer", per_device_train_batch_size=batch, max_steps=1,
                             learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                             report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                             ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=make_collator(tok.pad_token_id))
    loss_fn = patch(trainer, "ranktuner-approx")
    trainer.train()
    assert loss_fn.calls == 1
    if trainer.args.process_index == 0:
        torch.save({n: p.detach() - before[n] for n, p in model.named_parameters()}, out)
    if torch.distributed.is_initialized():
        # Both ranks have taken the step (and rank 0 has saved it) once the barrier returns. Then leave as the
        # command line does, without the interpreter's teardown, where a gloo rank aborts now and then
        # ("terminate called without an active exception"; see leave_after_gloo): the Trainer's group is live.
        torch.distributed.barrier()
        leave_after_gloo(0)
        raise AssertionError("leave_after_gloo returned with a live gloo group")
''')


def torchrun(script, *args: str, nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_processes_take_the_single_process_step(tmp_path, tiny_model, noisy_rows, monkeypatch):
    data = write_noisy(tmp_path / "noisy.jsonl", noisy_rows)  # 4 sequences: one global batch
    script = tmp_path / "train_step.py"
    script.write_text(SCRIPT)
    torch.set_grad_enabled(True)
    monkeypatch.setattr(sys, "argv", [str(script), str(tiny_model), str(data), str(tmp_path / "delta-1.pt"), "4"])
    exec(compile(SCRIPT, str(script), "exec"), {"__name__": "__main__"})  # one process, here
    result = torchrun(script, str(tiny_model), str(data), str(tmp_path / "delta-2.pt"), "2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {n: torch.load(tmp_path / f"delta-{n}.pt") for n in (1, 2)}
    for name, delta in steps[1].items():
        assert (steps[2][name] - delta).abs().max() <= 1e-5 * delta.abs().max().clamp_min(1e-12), name
    assert any(delta.abs().max() > 0 for delta in steps[1].values())
