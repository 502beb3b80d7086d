"""QAT of a causal LM sharded by FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes (gloo)."""

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import launch_ranks, requires_torchao, visible_files

transformers = pytest.importorskip("transformers")
pytestmark = requires_torchao

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fsdp2_qat.py"


def _run(out: Path, kind: str, fails: bool = False) -> str:
    return launch_ranks(SCRIPT, out, kind, fails=fails, timeout=400)


def test_fsdp2_qat_converts_the_model_ddp_trains_and_writes_one_folder(tmp_path):
    """Prepared whole, sharded by the user's configure_model, trained; converted from the full state dict gathered
    from the shards: the int8 model of every rank equals DDP's on the same data bit for bit (two ranks: a
    reduce-scatter and an all-reduce both add the same two gradients; measured 0.0). With a validation step that
    logs the model's own loss and validate_int8, the int8 model's next-token loss over both ranks' batches is
    logged beside it, the same on every rank and as DDP's."""
    _run(tmp_path / "fsdp2", "fsdp2-val")
    _run(tmp_path / "ddp", "ddp-val")
    fsdp = [torch.load(tmp_path / "fsdp2" / f"rank{r}_logits.pt") for r in (0, 1)]
    ddp = torch.load(tmp_path / "ddp" / "rank0_logits.pt")
    assert torch.equal(fsdp[0]["logits"], fsdp[1]["logits"])  # every rank converted the same model
    assert torch.equal(fsdp[0]["logits"], ddp["logits"])
    validated = [torch.load(tmp_path / "fsdp2" / f"rank{r}_val.pt") for r in (0, 1)]
    assert validated[0] == validated[1] == torch.load(tmp_path / "ddp" / "rank0_val.pt")
    # int8 (dynamic activations, int8 weights) is within 0.1% of the fake-quant model's loss on random tokens
    assert validated[0]["val/loss_int8"] == pytest.approx(validated[0]["val_loss"], rel=1e-3)
    # one set of files, written by rank 0, that transformers loads into the same model
    assert visible_files(tmp_path / "fsdp2") == [
        "model_int8.manifest.json",
        "model_int8_hf",
        "rank0_logits.pt",
        "rank0_val.pt",
        "rank1_logits.pt",
        "rank1_val.pt",
    ]
    assert visible_files(tmp_path / "fsdp2" / "model_int8_hf") == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "model_int8_hf").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=fsdp[0]["input_ids"]).logits, fsdp[0]["logits"])


@pytest.mark.slow  # three 2-process runs, about 90 s
def test_distillation_with_an_fsdp2_sharded_student_equals_ddps_and_changes_the_model(tmp_path):
    """KnowledgeDistillation beside QAT while FSDP2 shards the student: the teacher is a float copy taken in setup,
    before the user's configure_model shards (a whole copy on each rank). The int8 model equals DDP's bit for bit."""
    output = _run(tmp_path / "fsdp2-kd", "fsdp2-kd")
    _run(tmp_path / "ddp-kd", "ddp-kd")
    _run(tmp_path / "fsdp2", "fsdp2")
    assert "[KD] teacher: a frozen float copy of 'model'" in output
    kd = [torch.load(tmp_path / "fsdp2-kd" / f"rank{r}_logits.pt") for r in (0, 1)]
    assert torch.equal(kd[0]["logits"], kd[1]["logits"])
    assert torch.equal(kd[0]["logits"], torch.load(tmp_path / "ddp-kd" / "rank0_logits.pt")["logits"])
    # the teacher's soft targets changed what was learnt
    assert not torch.equal(kd[0]["logits"], torch.load(tmp_path / "fsdp2" / "rank0_logits.pt")["logits"])


def test_fsdp2_qat_killed_after_a_distributed_checkpoint_resumes_to_the_same_int8_model(tmp_path):
    """Crash at step 2 after a distributed checkpoint (a folder of shards) at the end of epoch 0, then
    fit(ckpt_path=) from it:
    the fake quantizers' switches and the schedule come back with the sharded weights and the optimizer, and the
    int8 model equals the uninterrupted run's."""
    _run(tmp_path / "fsdp2", "fsdp2")
    assert "simulated crash at step 2" in _run(tmp_path / "crash", "crash", fails=True)
    assert (tmp_path / "crash" / "checkpoints" / "last.ckpt").is_dir()  # FSDP2 writes a distributed checkpoint
    _run(tmp_path / "resume", "resume")
    whole = torch.load(tmp_path / "fsdp2" / "rank0_logits.pt")
    for rank in (0, 1):
        resumed = torch.load(tmp_path / "resume" / f"rank{rank}_logits.pt")
        torch.testing.assert_close(resumed["logits"], whole["logits"], rtol=0, atol=1e-5)


def test_model_parallel_is_refused_for_other_flows_and_for_ptq_before_training():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, TorchaoRecipe
    from tests.helpers import BoringClassifier, quiet_trainer

    environment = dict(os.environ)
    try:
        learned = TorchaoRecipe("int8_dyn_int4_weight", group_size=4, range_learning=True)
        for callback, message in (
            (QuantizationAwareTraining(recipe="fx", export=None), r"does not run under ModelParallelStrategy: FSDP2"),
            (PostTrainingQuantization(export=None), r"does not run under ModelParallelStrategy: FSDP2 shards"),
            (QuantizationAwareTraining(learned, export=None), r"range_learning=True under ModelParallelStrategy"),
        ):
            strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
            trainer = quiet_trainer(callbacks=[callback], strategy=strategy, accelerator="cpu", devices=1)
            with pytest.raises(ValueError, match=message):
                trainer.fit(BoringClassifier())
            assert trainer.global_step == 0
    finally:  # the strategy made this process a process group of one: later multi-process tests start clean
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
